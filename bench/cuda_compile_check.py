"""Compile and link the CUDA extension and the Triton kernels for the NVIDIA GPUs, with no GPU.

    python bench/cuda_compile_check.py --out OUT_DIR [--archs 8.0,8.6,9.0] [--no-fetch]
                                       [--src csrc/cuda] [--no-link] [--no-triton]

(``bench/cuda_compile_check.sh OUT_DIR`` runs it.) Three steps, each reported in
``OUT_DIR/cuda-compile-<date>.json`` and ``.md`` (the full compiler output in ``.log``):

1. **fetch**, once per torch release: the CPU torch wheel has no CUDA headers, so the CUDA build of
   the installed torch release (``torch==X.Y.Z`` from PyPI, the +cu wheel) is downloaded with pip,
   and only ``torch/include`` and the libraries an extension links against are extracted into
   ``$AAD_FAST_CUDA_CACHE`` (default ``~/.cache/aad_fast/cuda-torch-X.Y.Z``, outside the checkout);
   the wheel is deleted. ``--no-fetch`` never downloads: a cold cache is an error (exit code 3).
2. **compile and link** ``csrc/cuda`` for every arch of ``--archs`` (default
   ``$AAD_FAST_CUDA_ARCHS``, else setup.py's ``8.0;8.6;9.0``) in one nvcc call with the flags
   setup.py passes (read from setup.py itself) plus those ``torch.utils.cpp_extension`` adds, and
   ``-Xptxas -v``: per kernel and arch the registers, shared memory, stack frame and spills. The
   objects are linked into ``_cuda.so`` against the cached torch libraries and the toolkit's
   cudart, as ``cpp_extension`` links; the cubins in it are listed. It cannot be loaded here.
3. **Triton**: every specialization the engine's selectors launch (``ENGINE_SPECS``, each chunk
   size of ``plan``) is compiled ahead of time for each arch; ``n_regs`` and ``n_spills`` are what
   the CUDA driver would report (``REG`` and ``LOCAL / 4`` of the cubin) and ``shared`` is the
   kernel's shared memory, checked against the arch's per-block limit (``SMEM_LIMIT``).

Exit code 0 when everything compiled and linked with no spill and no shared memory over its
limit, 1 otherwise (2: bad arguments, 3: cold cache with ``--no-fetch``).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Per-block shared memory a kernel may use (opt-in dynamic shared memory), bytes.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
LINK_LIBS = ("c10", "c10_cuda", "torch", "torch_cpu", "torch_cuda", "torch_python")
EXTRACT = tuple(f"torch/lib/lib{name}.so" for name in LINK_LIBS) + ("torch/version.py",)


# ---- 1. the CUDA torch headers and libraries ---------------------------------------------------

def torch_release() -> str:
    """The installed torch's release without its local tag: ``2.13.0+cpu`` -> ``2.13.0``."""
    import torch
    return torch.__version__.split("+")[0]


def cache_dir(release: str) -> Path:
    env = os.environ.get("AAD_FAST_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aad_fast" / f"cuda-torch-{release}"


def cache_ready(cache: Path) -> bool:
    return (cache / "COMPLETE").is_file()


def fetch(cache: Path, release: str, log) -> None:
    """Download the CUDA torch wheel of ``release`` (bypassing the machine's pip config, whose
    find-links hold the CPU wheel) and extract the headers and link libraries into ``cache``."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache.parent))
    try:
        py = f"{sys.version_info.major}{sys.version_info.minor}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_x86_64", "--python-version", py,
               "--implementation", "cp", "--abi", f"cp{py}", f"torch=={release}", "-d", str(tmp)]
        log(f"$ {' '.join(cmd)}")
        subprocess.run(cmd, check=True, env=env)
        wheel = next(tmp.glob("torch-*.whl"))
        stage = tmp / "torch-cuda"
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist()
                     if (n.startswith("torch/include/") and not n.endswith("/")) or n in EXTRACT]
            missing = set(EXTRACT) - set(names)
            if missing:
                raise RuntimeError(f"{wheel.name} lacks {sorted(missing)}: not a CUDA build?")
            for n in names:
                z.extract(n, stage)
        version = (stage / "torch" / "version.py").read_text()
        (stage / "torch" / "COMPLETE").write_text(f"{wheel.name}\n{version}")
        if cache.exists():
            shutil.rmtree(cache)
        (stage / "torch").rename(cache)
        log(f"extracted {len(names)} files of {wheel.name} into {cache}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- 2. the CUDA extension ---------------------------------------------------------------------

def setup_flags(setup_py: Path = ROOT / "setup.py") -> tuple[list[str], list[str]]:
    """``(cxx, nvcc)`` flags of setup.py's CUDAExtension, read from its source (the one home of
    the flags); nvcc's without the per-arch gencode, which ``gencode`` makes the same way."""
    tree = ast.parse(setup_py.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "CUDAExtension":
            args = next(k.value for k in node.keywords if k.arg == "extra_compile_args")
            flags = {}
            for key, value in zip(args.keys, args.values):
                if isinstance(value, ast.BinOp):  # [...] + gencode
                    value = value.left
                flags[ast.literal_eval(key)] = ast.literal_eval(value)
            return flags["cxx"], flags["nvcc"]
    raise RuntimeError(f"no CUDAExtension(extra_compile_args=...) in {setup_py}")


def parse_archs(text: str) -> list[int]:
    """``"8.0;8.6,9.0"`` -> ``[80, 86, 90]``, as setup.py reads ``AAD_FAST_CUDA_ARCHS``."""
    return [int(a.strip().replace(".", "")) for a in text.replace(",", ";").split(";") if a.strip()]


def gencode(archs: list[int]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def cuda_home() -> Path:
    """The CUDA toolkit: ``$CUDA_HOME``, ``$CUDA_PATH``, nvcc's folder's parent, /usr/local/cuda
    (nvcc may be a wrapper script elsewhere on PATH), the first that holds cuda_runtime.h."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 Path(nvcc).resolve().parents[1], "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    raise FileNotFoundError(f"no CUDA toolkit with include/cuda_runtime.h near {nvcc}; "
                            "set CUDA_HOME")


def compile_commands(src: Path, build: Path, cache: Path, archs: list[int]) -> list[list[str]]:
    """nvcc for the .cu files, g++ for the .cpp files, then the link: what
    ``torch.utils.cpp_extension.BuildExtension`` runs for setup.py's CUDAExtension, with
    ``-Xptxas -v`` added to nvcc."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    cxx, nvcc = setup_flags()
    cuda = cuda_home()
    includes = [f"-I{cache / 'include'}", f"-I{cache / 'include/torch/csrc/api/include'}",
                f"-I{cuda / 'include'}", f"-I{sysconfig.get_paths()['include']}"]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_cuda"]
    cmds, objs = [], []
    for f in sorted(src.glob("*.c*")):
        obj = build / (f.name + ".o")
        objs.append(str(obj))
        if f.suffix == ".cu":
            cmds.append(["nvcc", "-c", str(f), "-o", str(obj), *includes, *COMMON_NVCC_FLAGS,
                         "--compiler-options", "-fPIC", *nvcc, *gencode(archs), *defines,
                         "-Xptxas", "-v"])
        else:
            cmds.append(["g++", "-c", str(f), "-o", str(obj), "-fPIC", *includes, *cxx, *defines])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cmds.append(["g++", "-shared", *objs, f"-L{cache / 'lib'}", f"-L{cuda / 'lib64'}",
                 *[f"-l{name}" for name in LINK_LIBS], "-lcudart",
                 "-o", str(build / f"_cuda{suffix}")])
    return cmds


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    pretty = out.stdout.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> list[dict]:
    """Per entry function and arch of an ``-Xptxas -v`` log: registers, static shared memory,
    stack frame and spill bytes."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "smem": 0,
                   "stack": None, "spill_stores": None, "spill_loads": None}
            rows.append(cur)
            continue
        if cur is None:
            continue
        if (m := _FRAME.search(line)):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        if (m := _USED.search(line)):
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(1)) if (m := _SMEM.search(line)) else 0
    pretty = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["name"] = pretty[r["kernel"]]
    return rows


def cuobjdump() -> str | None:
    """A cuobjdump: on PATH, in the toolkit, else the one Triton bundles."""
    for tool in (shutil.which("cuobjdump"), cuda_home() / "bin" / "cuobjdump"):
        if tool and Path(tool).is_file():
            return str(tool)
    try:
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        return None


def _run(cmds: list[list[str]], log) -> int:
    """Run ``cmds`` at once (the machine's cores build the sources side by side); each one's
    output and time into the log; the first non-zero exit code, else 0."""
    t0 = time.perf_counter()
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)) for cmd in cmds]
    rc = 0
    for cmd, proc in procs:
        out = proc.communicate()[0]
        log(f"$ {' '.join(cmd)}\n{out}[{cmd[0]}: exit code {proc.returncode}, done after "
            f"{time.perf_counter() - t0:.1f} s]")
        rc = rc or proc.returncode
    return rc


def build_cuda(src: Path, cache: Path, archs: list[int], log, link: bool = True) -> dict:
    """Compile ``src`` (its sources in parallel) and link it; ``{"ok", "seconds", "kernels",
    "cubins", "error"}``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aad_fast-cuda-") as build:
        log_path = Path(build) / "compile.log"
        cmds = compile_commands(src, Path(build), cache, archs)
        with open(log_path, "w") as f:
            def both(text):
                f.write(text + "\n")
                log(text)
            rc = _run(cmds[:-1], both)
            if rc == 0 and link:
                rc = _run(cmds[-1:], both)
        text = log_path.read_text()
        done = {"seconds": time.perf_counter() - t0, "kernels": parse_ptxas(text), "cubins": []}
        if rc != 0:
            return {**done, "ok": False, "error": f"the build exited with {rc} (see the log)"}
        so = cmds[-1][-1]
        tool = cuobjdump() if link else None
        if tool:
            listing = subprocess.run([tool, "--list-elf", so], capture_output=True,
                                     text=True).stdout
            log(f"$ {tool} --list-elf {so}\n{listing}")
            done["cubins"] = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", listing)))
    return {**done, "ok": True, "error": None}


# ---- 3. the Triton kernels ---------------------------------------------------------------------

# (name, dtype of a, dtype of r, coefficient kinds KMA/KMR/KSA/KSR, NOISE): what
# aad_fast.decode.selectors launches per rule kind, logits in bfloat16 (mix mixes them in float32 first).
ENGINE_SPECS = (("aad", "bf16", "bf16", (1, 0, 1, 2), False),
                ("contrastive", "bf16", "fp32", (1, 0, 1, 2), False),
                ("greedy", "bf16", "bf16", (1, 0, 1, 0), False),
                ("mix", "fp32", "fp32", (1, 0, 1, 0), False),
                ("mix-sampled", "fp32", "fp32", (1, 0, 1, 0), True))
BLOCKS = (1024, 2048, 4096)   # the chunk sizes kernels.select.plan picks on a GPU
COMBINE_NCH = (64, 256, 1024)  # chunks per row rounded up: large batch, batch 1, the cap


def _chunk_signature(da: str, dr: str) -> dict:
    return {"a_ptr": "*" + da, "sar": "i32", "sac": "constexpr", "r_ptr": "*" + dr, "srr": "i32",
            "src": "constexpr", "vocab": "i32", "ma": "fp32", "mr": "fp32", "sa": "fp32",
            "sr": "fp32", "lrel_ptr": "*fp32", "lrel_stride": "i32", "fl_ptr": "*fp32",
            "fl_stride": "i32", "seed_ptr": "*i64", "seed_stride": "i32", "step_ptr": "*i64",
            "ws_ptr": "*fp32", "n_total": "i32", "n_chunks": "i32"}


def triton_jobs(specs=ENGINE_SPECS, blocks=BLOCKS, combine=COMBINE_NCH) -> list[dict]:
    """The specializations to compile (per arch), as the launcher passes them."""
    jobs = []
    for name, da, dr, kinds, noise in specs:
        for blk in blocks:
            for kern in ("chunk", "fixup"):
                jobs.append({"spec": name, "kernel": kern, "a": da, "r": dr, "kinds": kinds,
                             "noise": noise, "block": blk, "num_warps": max(1, min(8, blk // 256))})
    jobs += [{"spec": "all", "kernel": "combine", "nch": n, "num_warps": 4} for n in combine]
    return jobs


def triton_compile(job: dict, arch: int):
    """The compiled kernel of one ``triton_jobs`` entry for ``arch`` (needs TRITON_INTERPRET
    unset when ``aad_fast.kernels`` is first imported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aad_fast.kernels import select as S
    opts = dict(S._compile_options(False), num_warps=job["num_warps"])
    target = GPUTarget("cuda", arch, 32)
    if job["kernel"] == "combine":
        sig = {"ws_ptr": "*fp32", "n_total": "i32", "n_chunks": "i32", "lrel_ptr": "*fp32",
               "lrel_stride": "i32", "fl_ptr": "*fp32", "fl_stride": "i32", "out_ptr": "*i64"}
        src = ASTSource(S._select_combine_kernel, sig, {"NCH": job["nch"]})
    else:
        kinds = job["kinds"]
        const = dict(zip(("KMA", "KMR", "KSA", "KSR"), kinds), BLOCK=job["block"], NCH=64,
                     NOISE=job["noise"], PRECISE_LOG=True, WIDE=False,
                     ONE_PASS=(kinds[2] == 0 or kinds[0] != 0) and (kinds[3] == 0 or kinds[1] != 0),
                     sac=1, src=1)
        kern = S._select_chunk_kernel if job["kernel"] == "chunk" else S._select_fixup_kernel
        div = [["tt.divisibility", 16]]
        src = ASTSource(kern, _chunk_signature(job["a"], job["r"]), const,
                        attrs={(0,): div, (1,): div, (3,): div, (4,): div})
    return triton.compile(src, target=target, options=opts)


def cubin_resources(cubin: bytes) -> dict:
    """``REG``, ``STACK``, ``SHARED`` (static) and ``LOCAL`` bytes of the cubin's one kernel, as
    ``cuobjdump --dump-resource-usage`` prints them (Triton's bundled one, else nvcc's)."""
    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"Function \S+:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))


def triton_row(job: dict, arch: int, kernel) -> dict:
    """What the driver reports at load (``n_regs``, ``n_spills = LOCAL / 4``) and the kernel's
    shared memory per block, with the arch's limit."""
    res = cubin_resources(kernel.asm["cubin"])
    shared = kernel.metadata.shared + res["shared"]
    return {**{k: v for k, v in job.items() if k != "kinds"}, "arch": f"sm_{arch}",
            "n_regs": res["reg"], "n_spills": res["local"] // 4, "stack": res["stack"],
            "shared": shared, "smem_limit": SMEM_LIMIT[arch]}


def build_triton(archs: list[int], log) -> dict:
    t0 = time.perf_counter()
    rows, errors = [], []
    for arch in archs:
        for job in triton_jobs():
            try:
                rows.append(triton_row(job, arch, triton_compile(job, arch)))
            except Exception as exc:  # one failed specialization must not hide the others
                errors.append(f"sm_{arch} {job}: {type(exc).__name__}: {exc}")
                log(errors[-1])
    return {"ok": not errors, "seconds": time.perf_counter() - t0, "kernels": rows,
            "errors": errors}


# ---- report ------------------------------------------------------------------------------------

def problems(cuda: dict | None, tri: dict | None) -> list[str]:
    """Why the run fails: a build error, a spill, shared memory over the arch's limit."""
    out = []
    if cuda is not None:
        if not cuda["ok"]:
            out.append(f"CUDA extension: {cuda['error']}")
        for k in cuda["kernels"]:
            if k["spill_stores"] or k["spill_loads"]:
                out.append(f"CUDA {k['name']} {k['arch']}: spills {k['spill_stores']}/"
                           f"{k['spill_loads']} bytes")
            if k["smem"] > SMEM_LIMIT[int(k["arch"][3:])]:
                out.append(f"CUDA {k['name']} {k['arch']}: {k['smem']} bytes smem")
    if tri is not None:
        out += [f"Triton: {e}" for e in tri["errors"]]
        for k in tri["kernels"]:
            if k["n_spills"] or k["shared"] > k["smem_limit"]:
                out.append(f"Triton {k['spec']} {k['kernel']} block {k.get('block')} {k['arch']}: "
                           f"n_spills {k['n_spills']}, shared {k['shared']} > {k['smem_limit']}?")
    return out


def _version(cmd: list[str], last: bool = False) -> str:
    """The line of ``cmd``'s output that names its version (the first, or with ``last`` the last)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
    except OSError:
        return "missing"
    return (out[-1] if last else out[0]) if out else "?"


def versions(cache: Path) -> dict:
    import torch
    import triton
    from triton import knobs
    wheel = (cache / "COMPLETE").read_text().splitlines()[0] if cache_ready(cache) else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    return {"date": datetime.date.today().isoformat(), "commit": commit,
            "nvcc": _version(["nvcc", "--version"], last=True), "g++": _version(["g++", "--version"]),
            "torch (installed)": torch.__version__, "torch (headers)": wheel,
            "triton": triton.__version__,
            "triton ptxas": _version([knobs.nvidia.ptxas.path, "--version"], last=True),
            "python": sys.version.split()[0]}


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# CUDA and Triton compile check, {v['date']} (no GPU: compiled, not run)", "",
             "`" + result["command"] + "`", "",
             *[f"- {k}: {val}" for k, val in v.items()], ""]
    cuda = result.get("cuda")
    if cuda is not None:
        state = "compiled and linked" if cuda["ok"] else f"FAILED ({cuda['error']})"
        lines += [f"## CUDA extension `aad_fast._cuda`: {state} in {cuda['seconds']:.0f} s; "
                  f"cubins {', '.join(cuda['cubins']) or '-'}", "",
                  "| kernel | arch | registers | smem B | stack B | spill st/ld B |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k in sorted(cuda["kernels"], key=lambda k: (k["name"], k["arch"])):
            name = k["name"].replace("aad_fast_cuda::(anonymous namespace)::", "")
            name = name.replace("(aad_fast_cuda::(anonymous namespace)::Params)", "")
            lines.append(f"| `{name}` | {k['arch']} | {k['registers']} | {k['smem']} | "
                         f"{k['stack']} | {k['spill_stores']}/{k['spill_loads']} |")
        lines.append("")
    tri = result.get("triton")
    if tri is not None:
        lines += [f"## Triton specializations: {len(tri['kernels'])} compiled in "
                  f"{tri['seconds']:.0f} s, {len(tri['errors'])} failed", "",
                  "| spec | kernel | a/r | block | warps | arch | n_regs | n_spills | shared B "
                  "| limit B |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k in tri["kernels"]:
            ar = f"{k['a']}/{k['r']}" if "a" in k else "-"
            blk = k.get("block", f"NCH {k.get('nch')}")
            lines.append(f"| {k['spec']} | {k['kernel']} | {ar} | {blk} | {k['num_warps']} | "
                         f"{k['arch']} | {k['n_regs']} | {k['n_spills']} | {k['shared']} | "
                         f"{k['smem_limit']} |")
        lines.append("")
    lines += ["## Result", "", *([f"- {p}" for p in result["problems"]] or ["no problem: "
              "everything compiled, no spill, shared memory within each arch's limit"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the .json/.md/.log")
    p.add_argument("--archs", default=os.environ.get("AAD_FAST_CUDA_ARCHS", "8.0;8.6;9.0"),
                   help="compute capabilities, ';' or ',' separated (default %(default)s)")
    p.add_argument("--src", type=Path, default=ROOT / "csrc" / "cuda",
                   help="folder of the CUDA extension's sources (default csrc/cuda)")
    p.add_argument("--no-fetch", action="store_true",
                   help="never download: a cold cache exits with code 3")
    p.add_argument("--no-link", action="store_true", help="compile only")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--name", default=None, help="file stem (default cuda-compile-<date>)")
    args = p.parse_args(argv)
    try:
        archs = parse_archs(args.archs)
    except ValueError:
        p.error(f"bad --archs {args.archs!r}")
    if unknown := [a for a in archs if a not in SMEM_LIMIT]:
        p.error(f"no shared memory limit known for sm_{unknown[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"cuda-compile-{datetime.date.today().isoformat()}")
    logf = open(stem.with_suffix(".log"), "w")

    def log(text):
        logf.write(text.rstrip() + "\n")
        logf.flush()

    release = torch_release()
    cache = cache_dir(release)
    cuda = tri = None
    if not args.no_cuda:
        if not cache_ready(cache):
            if args.no_fetch:
                print(f"cuda_compile_check: no CUDA torch {release} headers in {cache} "
                      f"(cold cache) and --no-fetch", file=sys.stderr)
                return 3
            fetch(cache, release, log)
        cuda = build_cuda(args.src, cache, archs, log, link=not args.no_link)
    if not args.no_triton:
        tri = build_triton(archs, log)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python bench/cuda_compile_check.py", *given]),
              "archs": [f"sm_{a}" for a in archs],
              "versions": versions(cache), "cuda": cuda, "triton": tri}
    result["problems"] = problems(cuda, tri)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    logf.close()
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
