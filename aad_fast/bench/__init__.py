"""``aad-fast bench``: selection kernels and end-to-end decode on real model shapes, one run.

Everything is measured in ONE run on ONE machine and reported as ratios to baselines measured in
that same run (docs/engine.md "Why it can be fast"):

- kernels: every available backend of ``aad_select`` (the public op, and the ``select_core`` call
  the engine makes with preallocated buffers) against the eager PyTorch a user would write
  (``eager_aad``), at ``B x V``; median ms, effective bandwidth (bytes of both logits read / time)
  and its fraction of the copy bandwidth measured in the same run (read + write bytes / time).
  On CUDA each call is timed with CUDA events after a 256 MiB L2 flush; on CPU with
  ``time.perf_counter`` (warm caches, as in a decode step right after the LM head).
- decode: per model shape and batch size, ``METHODS``: Hugging Face ``generate()`` greedy on one
  model, the naive Hugging Face two-model AAD loop (``naive_hf_aad``), this engine's greedy, AAD
  with two models, AAD with a LoRA pair (rank 64 on q/k/v) and the other two-stream rules; ms/token
  and tokens/s (medians of ``--repeats`` runs after a warm-up run), time to first token at batch 1
  for each prompt length, peak memory, and the fraction of the bandwidth floor
  (weight + KV bytes read per step / copy bandwidth).

Models are built from ``aad_fast/bench/configs/*.json`` with random weights (seeded; nothing is downloaded)
and with no end-of-sequence id, so every run decodes exactly ``--new-tokens`` tokens.
Writes ``OUT/<device>-<date>.json`` and ``.png`` and prints markdown tables.
"""
# This package: the CLI (``add_arguments``, ``run``, ``main``) here; ``shapes`` (model configs,
# random-weight models, parameter and byte counts), ``kernels`` (selection-kernel bench),
# ``decode`` (decode and time-to-first-token methods), ``report`` (targets, markdown, plot),
# ``machine`` (timing, memory, environment). Every public name is re-exported here.
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from .. import available_backends, tuning
from .decode import (DEFAULT_METHODS, ENGINE_RULES, METHODS, PRINCIPLE_IDS, QUICK_METHODS,
                     SAME_TOKENS, TTFT_METHODS, Decoders, bench_shape, engine_run, hf_generate,
                     interleaved, measure_decode, measure_ttft, method_runner, naive_hf_aad,
                     weights_and_floor)
from .kernels import bench_kernels, copy_bandwidth, eager_aad, time_op
from .machine import (GIB, PeakMemory, device_name, free_bytes, git_info, guarded, is_oom,
                      load_average, log, portable_argv, portable_path, portable_settings, release,
                      rss_bytes, sync, versions, wall_ms)
from .report import TARGETS, add_ratios, evaluate_targets, fmt, markdown, out_stem, plot
from .shapes import (REAL_SHAPES, add_lora, default_config_dir, kv_bytes_per_token, load_shape,
                     make_config, meta_param_count, param_bytes, random_model, step_weight_bytes)

__all__ = [
    # CLI
    "add_arguments", "main", "reproduce_command", "resolve", "run",
    # shapes
    "REAL_SHAPES", "add_lora", "default_config_dir", "kv_bytes_per_token", "load_shape",
    "make_config", "meta_param_count", "param_bytes", "random_model", "step_weight_bytes",
    # kernels
    "bench_kernels", "copy_bandwidth", "eager_aad", "time_op",
    # decode
    "DEFAULT_METHODS", "ENGINE_RULES", "METHODS", "PRINCIPLE_IDS", "QUICK_METHODS", "SAME_TOKENS",
    "TTFT_METHODS", "Decoders",
    "bench_shape", "engine_run", "hf_generate", "interleaved", "measure_decode", "measure_ttft",
    "method_runner", "naive_hf_aad", "weights_and_floor",
    # report
    "TARGETS", "add_ratios", "evaluate_targets", "fmt", "markdown", "out_stem", "plot",
    # machine
    "GIB", "PeakMemory", "device_name", "free_bytes", "git_info", "guarded", "is_oom",
    "load_average", "log", "portable_argv", "portable_path", "portable_settings", "release",
    "rss_bytes", "sync", "versions", "wall_ms",
]


def _ints(text: str) -> list:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aad-fast bench``."""
    a = parser.add_argument
    a("--quick", action="store_true",
      help="one small real shape, batch 1, few tokens, the verdict table: under a minute on a "
      "2-core CPU")
    a("--check", action="store_true",
      help="exit with status 1 when a ratio of the verdict table misses its bound by more than "
      "noise (a regression guard to run on your own machine before sending a change)")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    a("--models", default=None, help="comma list of config names in aad_fast/bench/configs (or "
      f".json paths); default: {','.join(REAL_SHAPES)} on cuda, cpu-60m,smollm2-135m on cpu "
      "(--quick: smollm2-135m on cpu, qwen3-0.6b,llama-3.2-1b on cuda)")
    a("--batch", type=_ints, default=None, help="decode batch sizes (default 1,8,32; --quick: 1)")
    a("--new-tokens", type=int, default=None, help="new tokens per decode (default 128 on cuda, "
      "32 on cpu, 16 with --quick); models have no EOS, so exactly this many are made")
    a("--prompt-lens", type=_ints, default=None,
      help="prompt lengths for time to first token, batch 1 (default 128,1024,4096)")
    a("--decode-prompt-len", type=int, default=None, help="prompt length of decode runs (128)")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
      help="model and logits dtype (default bfloat16 on cuda, float32 on cpu)")
    a("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    a("--repeats", type=int, default=None, help="timed runs per measurement after one warm-up "
      "(default 3; --quick: 2); the median is reported")
    a("--ttft-repeats", type=int, default=None,
      help="timed runs per time-to-first-token measurement (default: --repeats)")
    a("--methods", default=None, help="comma list of decode methods (default all: "
      f"{','.join(DEFAULT_METHODS)}; --quick: {','.join(QUICK_METHODS)}; also "
      "greedy_compiled, aad_lora_compiled: compile=True, minutes of compiling; greedy_bf16: "
      "the aligned model in bf16, added by default on a CPU with AVX-512 BF16 or AMX)")
    a("--kernel-batches", type=_ints, default=None, help="B of the kernel bench "
      "(default 1,8,64; cuda also 256)")
    a("--kernel-vocabs", type=_ints, default=None,
      help="V of the kernel bench (default 128256,151936)")
    a("--backend", default=None, help="selection backend the engine uses (default: fastest)")
    a("--no-graphs", action="store_true", help="engine without CUDA graphs")
    a("--hf-dynamic", action="store_true",
      help="HF generate() with its dynamic cache on cuda too (default there: static cache)")
    a("--max-beam-rows", type=int, default=64, help="skip BeamAAD(4) above this many rows")
    a("--configs", type=Path, default=None,
      help="model shape directory (default: the package's aad_fast/bench/configs)")
    a("--seed", type=int, default=0, help="seed of the random weights and prompts")
    a("--out", type=Path, default=Path("bench/results"), help="output directory")
    a("--no-kernels", action="store_true", help="skip the kernel bench")
    a("--no-decode", action="store_true", help="skip the decode bench")
    a("--speculative", action="store_true",
      help="instead: the speculative rows (issue 26): the embedded toy pair with the n-gram "
      "and shipped drafts, k 2/4/6, and the oracle sweep (p x k 2/4/8) on --spec-shape; "
      "writes OUT/spec-<device>-<date>.json/.md/.png")
    a("--spec-prompts", type=int, default=16,
      help="with --speculative: prompts per method (toy held-out prompts; oracle prompts)")
    a("--spec-shape", default="smollm2-135m",
      help="with --speculative: the shape of the oracle sweep (a config name)")
    a("--no-toy", action="store_true", help="with --speculative: skip the toy pair's rows")
    a("--no-oracle", action="store_true", help="with --speculative: skip the oracle sweep")


def resolve(args) -> torch.device:
    """Fill in defaults that depend on the device and ``--quick``; validate."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    device = torch.device(args.device)
    cuda, quick = device.type == "cuda", args.quick
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    default_models = (("qwen3-0.6b,llama-3.2-1b" if cuda else "smollm2-135m") if quick
                      else (",".join(REAL_SHAPES) if cuda else "cpu-60m,smollm2-135m"))
    args.models = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    args.batch = args.batch or ([1] if quick else [1, 8, 32])
    args.new_tokens = args.new_tokens or (16 if quick else 128 if cuda else 32)
    args.decode_prompt_len = args.decode_prompt_len or (32 if quick and not cuda else 128)
    lens = args.prompt_lens or [128, 1024, 4096]
    if quick:
        cap = 1024 if cuda else 128
        if args.prompt_lens is None and any(L > cap for L in lens):
            log(f"--quick: time to first token only at prompt lengths <= {cap}")
        lens = [L for L in lens if L <= cap] or [min(lens)]
    args.prompt_lens = lens
    args.repeats = args.repeats or (2 if quick else 3)
    args.ttft_repeats = args.ttft_repeats or args.repeats
    args.kernel_batches = args.kernel_batches or ([1] if quick and not cuda else
                                                  [1, 8, 64, 256] if cuda else [1, 8, 64])
    args.kernel_vocabs = args.kernel_vocabs or ([128256] if quick and not cuda
                                                else [128256, 151936])
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.configs = args.configs or default_config_dir()
    methods = args.methods or ",".join(QUICK_METHODS if quick else DEFAULT_METHODS)
    native_bf16 = {"avx512_bf16", "amx_bf16"} & set(tuning.machine()["flags"])
    if args.methods is None and not quick and not cuda and native_bf16 \
            and args.dtype == "float32":
        methods += ",greedy_bf16"  # this CPU computes bf16 natively: measure it against fp32
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    for name in ("new_tokens", "decode_prompt_len", "repeats", "ttft_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for m in args.models:
        load_shape(m, args.configs)
    return device


def reproduce_command(args) -> str:
    """``aad-fast bench`` with every resolved setting spelt out (defaults depend on the device)."""
    parts = ["aad-fast", "bench"] + (["--quick"] if args.quick else [])
    parts += ["--device", args.device,
              "--models", ",".join(portable_path(m, "MODEL.json") for m in args.models),
              "--batch", ",".join(map(str, args.batch)), "--new-tokens", str(args.new_tokens),
              "--prompt-lens", ",".join(map(str, args.prompt_lens)),
              "--decode-prompt-len", str(args.decode_prompt_len), "--dtype", args.dtype,
              "--threads", str(torch.get_num_threads()), "--repeats", str(args.repeats),
              "--ttft-repeats", str(args.ttft_repeats),
              "--methods", ",".join(args.methods),
              "--kernel-batches", ",".join(map(str, args.kernel_batches)),
              "--kernel-vocabs", ",".join(map(str, args.kernel_vocabs)),
              "--seed", str(args.seed), "--out", portable_path(args.out, "OUT_DIR")]
    for flag in ("no_graphs", "hf_dynamic", "no_kernels", "no_decode", "check"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.backend:
        parts += ["--backend", args.backend]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run the benchmark described by ``args`` (see ``add_arguments``); returns an exit code."""
    try:
        device = resolve(args)
    except ValueError as exc:
        print(f"aad-fast bench: {exc}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    commit, dirty = git_info()
    log(f"device {device_name(device)}, dtype {args.dtype}, backends "
        f"{available_backends(device)}")
    copy_bw = copy_bandwidth(device, args.quick)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    result = {
        "schema": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device),
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "machine": tuning.machine(),
                   "load_average_at_start": load_average(),
                   "copy_bandwidth_gb_s": copy_bw / 1e9},
        "dtype": args.dtype,
        "versions": versions(),
        "commit": commit, "git_dirty": dirty,
        "command": reproduce_command(args),
        "argv": portable_argv(sys.argv),  # recorded without the machine's folders
        "settings": portable_settings({k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()
                                       if k not in ("func", "cmd")}),
        "backends": available_backends(device),
        "kernels": [], "decode": [], "ttft": [], "skipped": [], "targets": [],
        "notes": ["ms/token: decode time after the first token / (new tokens - 1); engine times "
                  "from Generation.stats, HF generate() from a streamer's first-token time, "
                  "BeamAAD as (t(n) - t(1)) / (n - 1) of wall times",
                  "peak_mem_bytes: weights the method uses + its peak above the memory held "
                  "before it started (CUDA max_memory_allocated; CPU RSS sampled every 5 ms "
                  "during the warm-up run)",
                  "floor_fraction: (weight + KV bytes one decode step must read) / copy "
                  "bandwidth / measured ms per token; 1.0 = at the bandwidth floor",
                  "time to first token: batch 1, wall time of a one-token generate (engine, "
                  "HF generate()) or of the prompt pass + first choice (naive loop), median"],
    }
    if device.type == "cpu":
        args.backends = [b for b in available_backends(device) if b != "triton"]
        if "triton" in available_backends(device):
            result["notes"].append("triton under TRITON_INTERPRET is a test path; not timed")
    else:
        args.backends = available_backends(device)
    result["backends"] = list(args.backends)  # the ones timed
    with torch.inference_mode():
        if not args.no_kernels:
            log(f"kernels: {args.backends} vs eager PyTorch at B={args.kernel_batches}, "
                f"V={args.kernel_vocabs}")
            result["kernels"] = bench_kernels(device, dtype, args.kernel_batches,
                                              args.kernel_vocabs, copy_bw, args.quick,
                                              args.backends)
    if not args.no_decode:
        for name in args.models:
            guarded(name, result["skipped"], device,
                    lambda: bench_shape(name, args, device, dtype, copy_bw, result))
        add_ratios(result["decode"])
    result["device"]["load_average_at_end"] = load_average()
    result["targets"] = evaluate_targets(device.type, result["decode"], result["kernels"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = out_stem(device, args.out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    print(table)
    log(f"wrote {stem}.json, {stem}.md and {stem}.png")
    missed = [t for t in result["targets"] if t["verdict"] == "NO"]
    if args.check and missed:
        print(f"aad-fast bench --check: {len(missed)} ratio(s) miss their bound beyond noise on "
              f"this machine ({device_name(device)}): "
              + "; ".join(f"{t['target']} ({t['model']} batch {t['batch']}): {t['value']:.2f}, "
                          f"bound {t['bound']}" for t in missed), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aad_fast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
