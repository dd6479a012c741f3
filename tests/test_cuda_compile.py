"""``bench/cuda_compile_check.py``: the CUDA extension's sources compile and link for a real GPU
arch with no GPU, and a source that stops compiling fails the check.

The compile tests need ``nvcc`` and a warm cache of the CUDA torch headers
(``bench/cuda_compile_check.sh OUT_DIR`` fills it once; a test never downloads) and skip with the
reason otherwise. They build for sm_90 only (both sources side by side, about a minute on two
cores); the committed run in bench/results/ covers every arch.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cuda_compile_check.py"
_spec = importlib.util.spec_from_file_location("cuda_compile_check", SCRIPT)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# One entry of a real ``-Xptxas -v`` log of select_cuda.cu (nvcc 13.0, sm_90), and one with
# spills, as ptxas prints them.
PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_ZN13aad_fast_cuda12_GLOBAL__N_121select_combine_kernelENS0_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN13aad_fast_cuda12_GLOBAL__N_121select_combine_kernelENS0_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 1 barriers, 96 bytes smem, 624 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6spillyPf' for 'sm_86'
ptxas info    : Function properties for _Z6spillyPf
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_ptxas_report_is_parsed_per_kernel_and_arch():
    rows = check.parse_ptxas(PTXAS_LOG)
    assert [(r["arch"], r["registers"], r["smem"], r["stack"], r["spill_stores"],
             r["spill_loads"]) for r in rows] == [("sm_90", 20, 96, 0, 0, 0),
                                                  ("sm_86", 255, 0, 40, 36, 28)]
    if shutil.which("c++filt"):
        assert rows[0]["name"] == ("aad_fast_cuda::(anonymous namespace)::"
                                   "select_combine_kernel(aad_fast_cuda::(anonymous namespace)::"
                                   "Params)")
        assert rows[1]["name"] == "spilly(float*)"
    cuda = {"ok": True, "error": None, "kernels": rows}
    assert check.problems(cuda, None) == ["CUDA spilly(float*) sm_86: spills 36/28 bytes"
                                          if shutil.which("c++filt") else
                                          "CUDA _Z6spillyPf sm_86: spills 36/28 bytes"]


def test_flags_and_archs_are_setup_pys():
    cxx, nvcc = check.setup_flags()
    assert "-std=c++17" in cxx and "-O3" in cxx
    assert "--fmad=false" in nvcc and "-O3" in nvcc
    assert check.parse_archs("8.0;8.6,9.0") == [80, 86, 90]
    assert check.gencode([86]) == ["-gencode=arch=compute_86,code=sm_86"]
    # the shared memory a block may use on each arch the check compiles for
    assert {a: check.SMEM_LIMIT[a] // 1024 for a in (80, 86, 90)} == {80: 163, 86: 99, 90: 227}


def _skip_reason():
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    if shutil.which("g++") is None:
        return "g++ is not on PATH"
    cache = check.cache_dir(check.torch_release())
    if not check.cache_ready(cache):
        return (f"cold cache: no CUDA torch headers in {cache} (bench/cuda_compile_check.sh "
                "OUT_DIR fetches them once; tests never download)")
    return None


needs_toolchain = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _run(out: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if k != "AAD_FAST_CUDA_ARCHS"}
    env["TRITON_INTERPRET"] = "0"
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--name", "run",
                           "--no-fetch", "--no-triton", "--archs", "9.0", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@needs_toolchain
def test_cuda_extension_compiles_and_links_for_sm90(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "run.json").read_text())
    cuda = result["cuda"]
    assert cuda["ok"] and result["problems"] == []
    kernels = {(re.search(r"select_\w+_kernel", k["name"]).group(), k["arch"])
               for k in cuda["kernels"]}
    assert kernels == {(f"select_{k}_kernel", "sm_90") for k in ("chunk", "fixup", "combine")}
    # 3 logit dtypes each for a and r: 9 instantiations of chunk and fixup, one combine
    assert len(cuda["kernels"]) == 19
    assert all(k["spill_stores"] == 0 and k["registers"] > 0 for k in cuda["kernels"])
    if check.cuobjdump() is not None:
        assert cuda["cubins"] == ["sm_90"]


@needs_toolchain
def test_a_planted_compile_error_fails_the_check(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    text = (ROOT / "csrc" / "cuda" / "select_cuda.cu").read_text()
    good = "const float cmax = block_max(lm, sh_f);"
    assert good in text
    # a device-code error deep in the kernel: block_max called with a missing argument
    (src / "select_cuda.cu").write_text(text.replace(good, "const float cmax = block_max(lm);"))
    proc = _run(tmp_path / "out", "--src", str(src), "--no-link")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "run.json").read_text())
    assert not result["cuda"]["ok"] and "CUDA extension" in result["problems"][0]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "select_cuda.cu" in log and "error" in log and "block_max" in log
