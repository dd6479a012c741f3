"""``aad-fast generate --ray`` and ``aad-fast make-pairs --ray``: the single-process commands'
rows, made on a Ray cluster (``aad_fast.ray_data``), written to the same resumable JSONL (same
sidecar settings, so a file started by one can be finished by the other), sorted into the
input order at the end; ``--parquet`` also writes them as Parquet.

The ``generate`` calls are cut as the single-process commands cut them (``generate``: from
the prompts still to do, ``--batch-size`` times ``cli.CONTINUOUS_CHUNK`` prompts per call
where the continuous scheduler takes them; ``make-pairs``: from the whole list, a batch's
rejected samples seeded ``seed + its start``), and each is one block and one
``Decoder.generate`` call on a worker, so the rows are the ones the single-process command
writes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

INSTALL = "pip install 'aad_fast[ray]'"


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (docs/serving.md 'Beyond one machine')")
    g.add_argument("--ray", action="store_true",
                   help=f"run on a Ray cluster, one Decoder per worker (needs {INSTALL})")
    g.add_argument("--ray-address", default=None,
                   help="cluster to join (default: $RAY_ADDRESS, a running local cluster, or "
                        "a new local Ray instance)")
    g.add_argument("--workers", type=int, default=None,
                   help="Decoder workers (default: one per GPU, else one per CPU // "
                        "--threads)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per CPU worker")
    g.add_argument("--parquet", default=None, help="also write the rows as Parquet here")


def dispatch(single, distributed):
    """The command's function: ``distributed`` (by name, in this module) with ``--ray``."""
    def run(a):
        if a.ray and (getattr(a, "min_tokens", 0) or getattr(a, "ignore_eos", False)):
            raise ValueError("--min-tokens and --ignore-eos are not supported with --ray yet")
        if a.ray:
            return globals()[distributed](a)
        if a.parquet or a.ray_address or a.workers:
            raise ValueError("--parquet, --ray-address and --workers go with --ray; add --ray")
        return single(a)
    return run


def _ray():
    import importlib
    try:
        return importlib.import_module("aad_fast.ray_data")
    except ImportError as exc:
        raise SystemExit(f"--ray needs Ray Data, which is not installed: {INSTALL} ({exc})")


def _check(a) -> None:
    for name in ("workers", "threads"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if a.parquet:
        from ..jobs.outfile import check_writable
        check_writable(a.parquet, "--parquet")
    if a.out is None and a.parquet:
        raise ValueError("--parquet needs --out (the resumable JSONL it is made from)")


def _abs(x):
    return None if x is None else os.path.abspath(x)


def _run(rd, a, rows, out, groups, record_of, **kw):
    """Join the cluster, decode, write; sort the file and write Parquet at the end."""
    started = rd.connect(a.ray_address)
    try:
        got = out if out is not None else []
        stats = rd.run_rows(rows, groups, record_of, out=got, workers=a.workers,
                            threads=a.threads, **kw)
        print(rd.summary(stats), file=sys.stderr)
    finally:
        if started:
            rd.ray.shutdown()
    return stats, got


def run_generate(a) -> int:
    """``generate --ray``: what ``cli.cmd_generate`` writes, decoded on Ray workers (the same
    ``cli.open_generate`` job: inputs, resume checks, calls; the same ``cli.generate_record``)."""
    import contextlib

    from . import generate_decoder, generate_record, open_generate
    rd = _ray()
    _check(a)
    with contextlib.ExitStack() as stack:
        job = open_generate(a, stack)
        rows, out = job.rows, job.out
        groups = [[{"_pos": i, "prompt": rows[i]["prompt"]} for i in chunk]
                  for chunk in job.chunks()]

        def record_of(row, rec):
            return generate_record(a, row, rec["completion"], rec["tokens"],
                                   rec["finish_reason"])
        if job.todo:
            _, got = _run(rd, a, rows, out, groups, record_of,
                          decoder=generate_decoder(a, job, _abs), rule=job.rule,
                          max_new_tokens=a.max_new_tokens, chat=a.chat, stop=a.stop or None)
            if out is None:
                got = rd.in_order(got, rows)
                for rec in got:
                    print(rec["completion"] if len(rows) == 1 else
                          json.dumps(rec))
        if out is not None:
            result = rd.sort_file(out, rows)
            if a.parquet:
                rd.write_parquet(a.parquet, result)
    return 0


def run_make_pairs(a) -> int:
    """``make-pairs --ray``: chosen = AAD, rejected = nucleus sample, as ``make-pairs``."""
    from . import check_resume
    from ..jobs.outfile import ResultsFile
    from ..toy.evaluate import pair_prompts, pairs_settings
    rd = _ray()
    from ..toy import ray_pairs  # imports Ray Data, which _ray() has just checked
    if a.batch_size < 1 or a.max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1, got "
                         f"{a.batch_size} and {a.max_new_tokens}")
    _check(a)
    rows, ident = pair_prompts(a)
    with ResultsFile(a.out, pairs_settings(a), ident) as out:
        check_resume(out, rows, lambda row: row["prompt"][0]["content"])
        # batches cut from the whole list, seeded by their start, as make-pairs does
        groups = [[{"_pos": i, "prompt": rows[i]["prompt"], "seed": a.seed + j}
                   for i in range(j, min(j + a.batch_size, len(rows)))
                   if not out.is_done(rows[i]["id"])] for j in range(0, len(rows), a.batch_size)]
        todo = sum(len(g) for g in groups)
        print(f"make-pairs: {todo} prompt(s) to do, {len(out.done)} already in {a.out}",
              file=sys.stderr)

        def record_of(row, rec):
            return {"id": row["id"], "prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                    "rejected": [{"role": "assistant", "content": rec["rejected"]}]}
        if todo:
            decoder = functools.partial(ray_pairs.pairs_decoder, _abs(a.aligned), _abs(a.reference))
            _run(rd, a, rows, out, [g for g in groups if g], record_of, worker=ray_pairs.MakePairs,
                 decoder=decoder, alpha=a.alpha, max_new_tokens=a.max_new_tokens,
                 count=lambda r: len(r["chosen_tokens"]) + len(r["rejected_tokens"]))
        result = rd.sort_file(out, rows)
        if a.parquet:
            rd.write_parquet(a.parquet, result)
    return 0
