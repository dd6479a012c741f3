"""``aad-fast bench --quick`` on the smallest settings: it runs end to end and writes a JSON with
every field a reader needs, a markdown table and a plot. No timing is asserted."""
import argparse
import json
import math

import pytest

from aad_fast import bench


def _run(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv) + ["--out", str(tmp_path)])
    assert bench.run(args) == 0
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text()), path


def test_quick_bench_writes_json_table_and_plot(tmp_path):
    res, path = _run(tmp_path, "--quick", "--device", "cpu", "--models", "tiny", "--batch", "1",
                     "--new-tokens", "4", "--prompt-lens", "8", "--repeats", "1",
                     "--kernel-batches", "1", "--kernel-vocabs", "1000",
                     "--methods", ",".join(bench.DEFAULT_METHODS))
    assert path.name.startswith("cpu-")
    machine = res["device"]["machine"]  # the CPU model, its flags and the BLAS beside every figure
    assert machine["cpu"] and machine["blas"] and isinstance(machine["flags"], list)
    for key in ("date", "device", "dtype", "versions", "commit", "command", "settings",
                "kernels", "decode", "ttft", "skipped", "targets", "notes"):
        assert key in res, key
    assert res["device"]["type"] == "cpu" and res["device"]["copy_bandwidth_gb_s"] > 0
    for mod in ("torch", "triton", "transformers"):
        assert res["versions"][mod]
    assert res["dtype"] == "float32"
    assert "--quick" in res["command"]
    assert res["skipped"] == [], res["skipped"]

    impls = {r["impl"] for r in res["kernels"]}
    assert "eager" in impls
    assert {f"aad_select[{b}]" for b in res["backends"]} <= impls
    for r in res["kernels"]:
        assert r["same_ids_as_eager"], r
        assert r["median_ms"] > 0 and math.isfinite(r["fraction_of_copy_bw"])

    methods = {r["method"] for r in res["decode"]}
    assert methods == set(bench.DEFAULT_METHODS)
    for r in res["decode"]:
        assert r["model"] == "tiny" and r["batch"] == 1 and r["new_tokens"] == 4
        # values only (no timing assertions; BeamAAD's (t(n) - t(1)) / (n - 1) is noisy at n = 4)
        for key in ("ms_per_token", "tokens_per_s", "x_greedy", "floor_fraction"):
            assert math.isfinite(r[key]), (key, r)
        assert len(r["ms_per_token_runs"]) == 1
        assert r["peak_mem_bytes"] >= r["weights_bytes"] > 0
    greedy = next(r for r in res["decode"] if r["method"] == "greedy")
    assert greedy["x_greedy"] == 1.0 and greedy["pair"] == "single:a"
    assert next(r for r in res["decode"] if r["method"] == "aad_lora")["pair"] == "lora"
    assert next(r for r in res["decode"] if r["method"] == "aad_two")["pair"] == "two"
    # fp32 on CPU: the baselines choose exactly the engine's tokens
    assert next(r for r in res["decode"] if r["method"] == "hf_generate")["same_tokens_as_greedy"]
    assert next(r for r in res["decode"]
                if r["method"] == "hf_naive_aad")["same_tokens_as_aad_two"]
    assert {(r["method"], r["prompt_len"]) for r in res["ttft"]} == {
        (m, 8) for m in bench.TTFT_METHODS}
    assert all(math.isfinite(r["ttft_ms"]) for r in res["ttft"])

    assert path.with_suffix(".png").stat().st_size > 0
    assert "| model | batch | method |" in path.with_suffix(".md").read_text()


def test_eager_aad_matches_the_public_op():
    import torch
    from aad_fast import aad_select
    g = torch.Generator().manual_seed(0)
    a, r = torch.randn(5, 300, generator=g), torch.randn(5, 300, generator=g)
    assert torch.equal(bench.eager_aad(a, r, 0.1), aad_select(a, r, 0.1, backend="torch"))


def test_configs_have_the_real_shapes():
    """Parameter counts of the configs match the released models (rounded)."""
    want = {"llama-3.2-1b": 1236, "llama-3.2-3b": 3213, "llama-3.1-8b": 8030, "qwen3-0.6b": 596,
            "qwen3-4b": 4022, "olmo-2-7b": 7299, "cpu-60m": 60, "smollm2-135m": 135,
            "qwen2.5-0.5b": 494}
    for name, millions in want.items():
        cfg = bench.make_config(bench.load_shape(name, bench.default_config_dir()))
        assert round(bench.meta_param_count(cfg) / 1e6) == millions, name
        assert cfg.eos_token_id is None


def test_bad_options_are_refused(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--models", "no-such-model", "--out",
                              str(tmp_path)])
    assert bench.run(args) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch", "0"])


def test_verdict_allows_noise_and_flags_real_misses():
    from aad_fast.bench.report import NOISE, _verdict
    assert _verdict(1.10, 1.10, 1.20, "<=") == "yes"
    assert _verdict(1.20 * (1 + NOISE / 2), 1.3, 1.20, "<=") == "noise"   # within noise
    assert _verdict(1.40, 1.19, 1.20, "<=") == "noise"                    # best rounds meet it
    assert _verdict(1.40, 1.35, 1.20, "<=") == "NO"
    assert _verdict(0.80, 0.85, 1.00, ">=") == "NO"
    assert _verdict(1.30, 1.30, 1.25, ">=") == "yes"


def test_check_exits_nonzero_only_on_a_miss_beyond_noise(tmp_path, monkeypatch, capsys):
    from aad_fast.bench import report
    argv = ["--quick", "--device", "cpu", "--models", "tiny", "--batch", "1", "--new-tokens", "4",
            "--prompt-lens", "8", "--repeats", "1", "--no-kernels", "--methods",
            "greedy,greedy_plain", "--check"]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # an impossible bound: plain F.linear 100x faster than the engine's choice
    monkeypatch.setitem(report.TARGETS, "cpu", [("impossible", "greedy", "greedy_plain", 0.01,
                                                "<=", [("tiny", 1)])])
    assert bench.run(parser.parse_args(argv + ["--out", str(tmp_path / "a")])) == 1
    assert "impossible (tiny batch 1)" in capsys.readouterr().err
    md = next((tmp_path / "a").glob("*.md")).read_text()
    assert "| impossible | tiny batch 1 |" in md and "| NO |" in md
    monkeypatch.setitem(report.TARGETS, "cpu", [("easy", "greedy", "greedy_plain", 100.0, "<=",
                                                [("tiny", 1)])])
    assert bench.run(parser.parse_args(argv + ["--out", str(tmp_path / "b")])) == 0


def test_recorded_results_carry_no_machine_paths(tmp_path, monkeypatch):
    """``argv``, ``command`` and the settings' folders are recorded relative to the checkout or as
    typed, with placeholders for folders outside it: never the machine's home, temp folders or
    checkout path (issue 24, item 6)."""
    from pathlib import Path

    from aad_fast.bench.machine import checkout_root, portable_argv, portable_path

    root = checkout_root()
    assert portable_path(root / "aad_fast" / "bench" / "configs") == "aad_fast/bench/configs"
    assert portable_path("results/run1") == "results/run1"  # typed relative: kept
    assert portable_path("/tmp/x/y", "OUT_DIR") == "OUT_DIR"
    assert portable_path("~/runs", "OUT_DIR") == "OUT_DIR"
    assert portable_argv(["/home/u/.venv/bin/aad-fast", "bench", "--out", "/tmp/r",
                          "--configs=/home/u/shapes", "--models", "tiny", "/tmp/pos"],
                         positional="OUT_DIR") == \
        ["aad-fast", "bench", "--out", "OUT_DIR", "--configs=CONFIG_DIR", "--models", "tiny",
         "OUT_DIR"]
    assert portable_argv([str(root / "aad_fast" / "bench" / "__main__.py")]) == \
        ["aad_fast/bench/__main__.py"]

    out = tmp_path / "results"
    monkeypatch.setattr("sys.argv", ["/root/.pyenv/versions/3.11.7/bin/aad-fast", "bench",
                                     "--quick", "--out", str(out)])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", "--models", "tiny", "--no-kernels",
                              "--no-decode", "--configs", str(bench.default_config_dir()),
                              "--out", str(out)])
    assert bench.run(args) == 0
    (path,) = out.glob("*.json")
    res = json.loads(path.read_text())
    assert res["argv"] == ["aad-fast", "bench", "--quick", "--out", "OUT_DIR"]
    assert "--out OUT_DIR" in res["command"]
    assert res["settings"]["out"] == "OUT_DIR"
    assert res["settings"]["configs"] == "aad_fast/bench/configs"
    for text in (path.read_text(), path.with_suffix(".md").read_text()):
        for bad in (str(tmp_path), str(root), str(Path.home()), "/tmp/", "/root/"):
            assert bad not in text, bad
