"""Benchmark of bulk generation on Ray Data against one process: writes JSON to OUT_DIR.

    python bench/bench_ray.py OUT_DIR [--aligned PATH --reference PATH] [--prompts 64]
        [--max-new-tokens 32] [--batch-size 8] [--workers 2] [--threads 1] [--ray-address A]

Same prompts (the embedded pair's held-out prompts by default), same rule (AAD 0.1), same
``generate`` batches:

- ``single``: one process, ``--workers * --threads`` torch threads, one ``Decoder``, the batches
  back to back (after one untimed warm-up batch): tokens/s.
- ``ray``: ``--workers`` Ray Data workers x ``--threads`` threads (``aad_fast.jobs.ray_data``), one
  ``Decoder`` each. ``wall_s`` is the whole job as a user sees it; ``startup_s`` is the time to
  the first batch's rows less that batch's decode (actors, imports, model loading);
  ``busy_s`` each worker's time inside ``Decoder.generate``. ``tokens_per_s`` counts the whole
  wall time, ``steady_tokens_per_s`` the wall time after start-up, and
  ``overhead_per_batch_ms`` is what Ray adds per batch once running:
  ``(wall - startup - max(busy)) / (batches per worker)``.

The rows of both are compared (same tokens) and the result says whether they matched. Run on an
idle machine for numbers; the tests only check that it runs end to end on tiny settings.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path


def prompts_of(n: int) -> list:
    from aad_fast.toy import task
    held_out = task.split_problems()[1]
    return [held_out[i % len(held_out)].prompt for i in range(n)]


def shape_pair(name: str, folder: Path) -> tuple:
    """A random-weight pair of config ``name`` (``aad_fast/bench/configs``) with the embedded
    pair's tokenizer and vocabulary, saved under ``folder`` so workers load it by path as users
    load theirs: (aligned path, reference path)."""
    import torch

    from aad_fast.bench.shapes import default_config_dir, load_shape, make_config, random_model
    from aad_fast.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    shape = dict(load_shape(name, default_config_dir()), vocab_size=len(tok))
    paths = []
    for seed, role in ((0, "aligned"), (1, "reference")):
        model = random_model(make_config(shape), torch.float32, "cpu", seed)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(folder / role)
        tok.save_pretrained(folder / role)
        paths.append(str(folder / role))
    return tuple(paths)


def decoder_spec(a) -> dict:
    if a.aligned:
        return {"aligned": os.path.abspath(a.aligned), "max_batch_size": a.batch_size,
                "reference": a.reference and os.path.abspath(a.reference), "max_seq_len": 256}
    from aad_fast.toy.assets import default_pair_dir
    return {"aligned": str(default_pair_dir() / "dpo"), "max_batch_size": a.batch_size,
            "max_seq_len": 256}


def run_single(a, prompts, spec, rule) -> dict:
    import torch

    from aad_fast.jobs.ray_data import build_decoder
    torch.set_num_threads(a.workers * a.threads)
    kw = dict(rule=rule, chat=True, max_new_tokens=a.max_new_tokens)
    with build_decoder(spec) as dec:
        dec.generate(prompts[: a.batch_size], **kw)  # warm-up (tuning, caches)
        t0, tokens = time.perf_counter(), []
        for i in range(0, len(prompts), a.batch_size):
            tokens += dec.generate(prompts[i:i + a.batch_size], **kw).tokens
        s = time.perf_counter() - t0
    n = sum(len(t) for t in tokens)
    return {"processes": 1, "threads": a.workers * a.threads, "seconds": s, "tokens": n,
            "tokens_per_s": n / s, "rows": tokens}


def run_ray(a, prompts, spec, rule) -> dict:
    import pandas as pd
    import ray

    from aad_fast.jobs import ray_data
    started = ray_data.connect(a.ray_address) if a.ray_address else False
    if not ray.is_initialized():
        ray.init(num_cpus=a.workers * a.threads, include_dashboard=False, log_to_driver=False)
        started = True
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600  # all workers decode
    try:
        blocks = [pd.DataFrame({"_pos": range(i, min(i + a.batch_size, len(prompts))),
                                "prompt": prompts[i:i + a.batch_size]})
                  for i in range(0, len(prompts), a.batch_size)]
        ds = ray_data.map_dataset(ray.data.from_pandas(blocks), ray_data.Generate,
                                  workers=a.workers, threads=a.threads, decoder=spec, rule=rule,
                                  chat=True, max_new_tokens=a.max_new_tokens)
        t0, first, rows, busy = time.perf_counter(), None, {}, {}
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=0):
            recs = batch.to_dict("records")
            if first is None:
                first = time.perf_counter() - t0 - recs[0]["batch_ms"] / 1000
            for r in recs:
                rows[int(r["_pos"])] = [int(t) for t in r["tokens"]]
            for w, ms in {(r["worker"], r["batch_ms"]) for r in recs}:  # one entry per batch
                busy[w] = busy.get(w, 0.0) + ms / 1000
        wall = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    n = sum(len(t) for t in rows.values())
    per_worker = len(blocks) / max(1, len(busy))
    steady = wall - first
    return {"workers": a.workers, "threads": a.threads, "workers_used": len(busy),
            "batches": len(blocks), "wall_s": wall, "startup_s": first,
            "busy_s": sorted(busy.values()), "tokens": n, "tokens_per_s": n / wall,
            "steady_tokens_per_s": n / steady if steady > 0 else None,
            # what Ray adds per batch once running; below the timer's resolution when negative
            "overhead_per_batch_ms": 1000 * (steady - max(busy.values())) / per_worker,
            "rows": [rows[i] for i in range(len(prompts))]}


def _device() -> str:
    from aad_fast.bench.machine import device_name
    import torch
    return device_name(torch.device("cpu"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--aligned", default=None)
    p.add_argument("--reference", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--shape", default=None,
                   help="a random pair of this config (e.g. cpu-60m) with the embedded "
                        "tokenizer, instead of the embedded pair")
    a = p.parse_args(argv)
    from aad_fast import AAD
    tmp = None
    if a.shape and not a.aligned:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="aad_bench_ray_")
        a.aligned, a.reference = shape_pair(a.shape, Path(tmp.name))
    prompts, spec, rule = prompts_of(a.prompts), decoder_spec(a), AAD(0.1)
    ray_res = run_ray(a, prompts, spec, rule)  # first: its workers start from a cold cache too
    single = run_single(a, prompts, spec, rule)
    same = ray_res.pop("rows") == single.pop("rows")
    if tmp is not None:
        tmp.cleanup()
    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": a.shape or (a.aligned and "paths") or "embedded pair",
              "device": _device(), "prompts": a.prompts, "max_new_tokens": a.max_new_tokens,
              "batch_size": a.batch_size, "rule": repr(rule), "same_tokens": same,
              "single": single, "ray": ray_res,
              "ray_over_single": ray_res["tokens_per_s"] / single["tokens_per_s"]}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray-cpu-{a.shape or 'embedded'}-{datetime.date.today()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("single", "ray")}))
    print(f"single {single['tokens_per_s']:.1f} tok/s; ray {ray_res['tokens_per_s']:.1f} tok/s "
          f"(steady {ray_res['steady_tokens_per_s'] or 0:.1f}), overhead/batch "
          f"{ray_res['overhead_per_batch_ms']:.1f} ms -> {path}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
