"""Throughput of continuous batching against static batches (issue 15).

``python bench/bench_scheduler.py OUT_DIR [--shape tiny] [--prompts 64] [--batch 8]
[--min-new 8] [--max-new 128]``: ``--prompts`` prompts of ``--prompt-len`` random ids, each with
its own completion length drawn uniformly from ``[--min-new, --max-new]`` (a per-request
``max_new_tokens``, no stop id, so the lengths are exact), decoded with AAD on a random pair of
the ``--shape`` config (``aad_fast/bench/configs``) or on ``--aligned``/``--reference`` paths:

- *continuous*: one ``Scheduler`` of ``--batch`` rows, every prompt submitted, a finished row
  refilled with the next prompt at the next burst;
- *static*: the same scheduler, ``--batch`` prompts admitted, all of them finished, then the
  next ``--batch`` (a batch runs until its longest row ends).

Writes ``OUT_DIR/scheduler-<device>-<date>.json``: tokens/s of both, their ratio, the
one-token steps of the batch and the share of row-steps that were idle (a row's first token
comes from its prefill, not from a step). Both modes must give every request the same tokens
(checked). Not a test: no timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from aad_fast import AAD, Decoder, bench
from aad_fast.bench.machine import device_name, git_info, portable_argv, portable_path
from aad_fast.decode.scheduler import Request


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the JSON")
    p.add_argument("--shape", default="tiny", help="config name in aad_fast/bench/configs")
    p.add_argument("--aligned", help="aligned model path (instead of a random --shape pair)")
    p.add_argument("--reference", help="reference model path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default: fp32 on "
                   "CPU, bf16 on CUDA)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--check-every", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("prompts", "batch", "prompt_len", "min_new", "max_new", "check_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.min_new > a.max_new:
        p.error(f"--min-new {a.min_new} is above --max-new {a.max_new}")
    return a


def _decoder(a, device, dtype) -> Decoder:
    kw = dict(max_batch_size=a.batch, max_seq_len=a.prompt_len + a.max_new,
              check_every=a.check_every)
    if a.aligned:
        return Decoder(a.aligned, a.reference, dtype=dtype, device=str(device), **kw)
    config = bench.make_config(bench.load_shape(a.shape, bench.default_config_dir()))
    return Decoder(bench.random_model(config, dtype, device, 0),
                   bench.random_model(config, dtype, device, 1), **kw)


def _run(sched, work, batch: int, static: bool, device) -> dict:
    """Decode ``work`` (``(ids, max_new)`` pairs); returns tokens, seconds and steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps0 = sched.steps
    sync()
    t0 = time.perf_counter()
    groups = [work[i:i + batch] for i in range(0, len(work), batch)] if static else [work]
    handles = []
    for group in groups:
        handles += [sched.submit(Request(ids_a=ids, max_new_tokens=m, stop_ids=()))
                    for ids, m in group]
        sched.run_until_idle()
    sync()
    seconds = time.perf_counter() - t0
    tokens = [h.tokens for h in handles]
    n_tok = sum(map(len, tokens))
    steps = sched.steps - steps0  # one-token steps of the batch (first tokens come from prefill)
    stepped = n_tok - len(work)
    return {"tokens": tokens, "generated_tokens": n_tok, "seconds": seconds,
            "tokens_per_s": n_tok / seconds, "steps": steps, "waves": len(groups),
            "idle_row_share": 1.0 - stepped / (steps * batch) if steps else 0.0}


def main(argv=None) -> int:
    a = _args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    dec = _decoder(a, device, dtype)
    g = torch.Generator().manual_seed(a.seed)
    vocab = dec.vocab
    work = [(torch.randint(3, vocab, (a.prompt_len,), generator=g).tolist(),
             int(torch.randint(a.min_new, a.max_new + 1, (1,), generator=g)))
            for _ in range(a.prompts)]
    sched = dec.scheduler(AAD(a.alpha), rows=a.batch)
    _run(sched, work[:a.batch], a.batch, True, device)  # warm-up: tuning, capture
    res = {}
    for mode in ("static", "continuous", "static", "continuous"):  # interleaved, best of 2
        r = _run(sched, work, a.batch, mode == "static", device)
        if mode not in res or r["tokens_per_s"] > res[mode]["tokens_per_s"]:
            res[mode] = r
    same = res["static"].pop("tokens") == res["continuous"].pop("tokens")
    if not same:
        raise SystemExit("continuous and static batching gave different tokens")
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": portable_path(a.aligned, "MODEL_DIR") if a.aligned else a.shape,
        "commit": git_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(portable_argv([os.path.basename(sys.argv[0])]
                                          + (argv or sys.argv[1:]), "OUT_DIR")),
        "settings": {k: getattr(a, k) for k in ("prompts", "batch", "prompt_len", "min_new",
                                                 "max_new", "alpha", "check_every", "seed")},
        "completion_lengths": [m for _, m in work],
        "static": res["static"],
        "continuous": res["continuous"],
        "ratio": res["continuous"]["tokens_per_s"] / res["static"]["tokens_per_s"],
        "same_tokens": same,
    }
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"scheduler-{device.type}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"{path}: static {res['static']['tokens_per_s']:.1f} tok/s, continuous "
          f"{res['continuous']['tokens_per_s']:.1f} tok/s, ratio {out['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
