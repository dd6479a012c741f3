"""``bench/gpu_check.sh --dry-run``: the GPU check script runs end to end on CPU (tiny shapes)
and writes what the GPU run will write, within its limits (at most 8 files of at most 16 MiB)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_start_command_is_short():
    # the device tool takes a command of at most 2,000 characters: this one is a handful
    assert len(f"bash {SCRIPT.relative_to(ROOT)} /tmp/out") < 2000
    assert SCRIPT.stat().st_mode & 0o111, "gpu_check.sh must be executable"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_dry_run_writes_summary_logs_and_bench_results(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    env.pop("GPU_CHECK_DRY_RUN", None)
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    assert "summary.md" in files and "check.log" in files, files
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary
    for phase in ("build", "ext", "tests", "kernels", "decode", "speculative"):
        assert f"| {phase} | 0 |" in summary, summary
    log = (out / "check.log").read_text()
    assert "2 passed" in log
    results = [json.loads(p.read_text()) for p in sorted(out.glob("cpu-*.json"))]
    # JSON and PNG per bench run; the markdown tables are in check.log (8 files at most)
    assert len(results) == 2 and all(p.with_suffix(".png").exists()
                                     for p in out.glob("cpu-*.json"))
    assert log.count("### aad_fast bench:") == 2 and "## Oracle draft on the tiny shape" in log
    (spec,) = out.glob("spec-cpu-*.json")
    assert spec.with_suffix(".png").exists()
    oracle = json.loads(spec.read_text())["oracle"]
    assert {(r["k"], r["p"]) for r in oracle if r["k"]} == {(k, p) for k in (2, 4, 8)
                                                           for p in (0.0, 0.3, 0.5, 0.7, 0.85, 1.0)}
    assert all(r["same_tokens_as_aad_lora"] for r in oracle if r["k"])
    kernels = next(r for r in results if r["kernels"])
    decode = next(r for r in results if r["decode"])
    assert {(r["batch"], r["vocab"]) for r in kernels["kernels"]} == {(1, 1000)}
    assert {r["method"] for r in decode["decode"]} == {"hf_generate", "hf_naive_aad", "greedy",
                                                        "aad_two", "aad_lora"}
