"""Bulk generation on Ray Data (``pip install 'aad_fast[ray]'``): one ``Decoder`` per worker.

- ``Generate`` / ``MakePairs``: stateful callables for ``Dataset.map_batches``. Each worker
  builds its ``Decoder`` once (``num_gpus=1`` per worker where the cluster has GPUs) and maps a
  pandas batch of rows with ``prompt`` (optional ``id``, per-row rule parameters, anything else
  is passed through) to rows with the completion, tokens, finish reason and timing. Rows are
  decoded through the public ``Decoder.generate`` (it batches rows itself), grouped by the
  optional ``_batch`` column and by their rule, so a scheduler inside the Decoder changes
  nothing here.
- ``generate(source, out=None, ...)``: one call over a ``ray.data.Dataset``, a JSONL path or a
  list of rows; returns the result rows or writes them to a resumable JSONL (``ResultsFile``).
- ``run_rows``: the driver loop under both (and under ``ray_cli``'s ``aad-fast generate --ray``
  and ``make-pairs --ray``): prompts in as one block per ``generate`` batch, rows out as they
  come, each written once (deduplicated by id), the file sorted at the end.

Nothing here starts a cluster manager: the driver joins ``--ray-address`` (or ``RAY_ADDRESS``,
or a running local cluster, or starts a local Ray instance as ``ray.init()`` does).

Test hook: ``AAD_FAST_RAY_FAULT`` in the driver's environment is forwarded to the workers;
``exit:FLAG`` makes the first batch that finds no file ``FLAG`` create it and kill its worker
(``os._exit``) after decoding, before returning rows; ``stall:FLAG`` lets the first batch
through (creating ``FLAG``) and holds every later one forever; ``sleep:S`` sleeps ``S`` seconds
per batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time

try:
    import ray
    import ray.data  # noqa: F401  (ray without the [data] extra has no ray.data)
except ImportError as exc:  # pragma: no cover - exercised by the CLI test without ray
    raise ImportError("aad_fast.ray_data needs Ray Data: pip install 'aad_fast[ray]' "
                      f"(or pip install 'ray[data]'); {exc}") from exc

import pandas as pd

from ..rules import AAD, Rule
from .outfile import row_key

FAULT_ENV = "AAD_FAST_RAY_FAULT"
#: per-row columns besides the rule's own fields that a row may set
ROW_OPTIONS = ("max_new_tokens",)


class RowError(ValueError):
    """Bad input in one row (the message names the row's id)."""


def _row_name(row) -> str:
    rid = row.get("id")
    if rid is None or (isinstance(rid, float) and math.isnan(rid)):
        return f"row {row.get('_pos', '?')} (no id)" if "_pos" in row else "a row without id"
    return f"row id {rid!r}"


def _given(v) -> bool:
    if v is None:
        return False
    try:
        return not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v)
    except (TypeError, ValueError):  # lists, arrays: given
        return True


def _as_field(rule: Rule, name: str, v):
    """A column value as the rule field wants it: numpy scalars as Python ones, and int fields
    as ints (pandas turns an int column with gaps into floats)."""
    if hasattr(v, "item"):
        v = v.item()
    old = getattr(rule, name)
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(v, float) \
            and v.is_integer():
        return int(v)
    return v


def row_rule(rule: Rule, row: dict, max_new_tokens: int):
    """``(rule, max_new_tokens)`` of one row: columns named like a field of ``rule`` (or
    ``max_new_tokens``) override it; a bad value raises ``RowError`` naming the row."""
    names = {f.name for f in dataclasses.fields(rule) if f.init}
    over = {k: _as_field(rule, k, row[k]) for k in names if k in row and _given(row[k])}
    try:
        if over:
            rule = dataclasses.replace(rule, **over)
    except (ValueError, TypeError) as exc:
        raise RowError(f"{_row_name(row)}: bad rule parameter(s) {over} for "
                       f"{type(rule).__name__}: {exc}") from None
    if "max_new_tokens" in row and _given(row["max_new_tokens"]):
        v = row["max_new_tokens"]
        v = int(v) if isinstance(v, float) and v.is_integer() else v
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RowError(f"{_row_name(row)}: max_new_tokens must be an int >= 1, got {v!r}")
        max_new_tokens = v
    return rule, max_new_tokens


def check_prompt(row: dict) -> str:
    p = row.get("prompt")
    if not isinstance(p, str) or not p:
        raise RowError(f"{_row_name(row)}: 'prompt' must be a non-empty string, got {p!r}")
    return p


def build_decoder(spec):
    """A ``Decoder`` from ``spec``: a dict of ``Decoder`` keyword arguments (``aligned``,
    ``reference``, ``dtype`` as a name, ``max_batch_size``, ...) or a zero-argument callable
    (picklable: a module-level function or a ``functools.partial``) that returns one."""
    from ..decoder import Decoder
    if callable(spec):
        return spec()
    kw = dict(spec)
    if isinstance(kw.get("dtype"), str):
        import torch
        kw["dtype"] = getattr(torch, kw["dtype"])
    return Decoder(kw.pop("aligned"), kw.pop("reference", None), **kw)


def describe(spec) -> str:
    """A stable text of a decoder spec (for a sidecar): no object addresses."""
    import functools
    if isinstance(spec, functools.partial):
        return f"{describe(spec.func)}{spec.args!r}{spec.keywords!r}"
    if callable(spec):
        return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', spec)}"
    return repr(dict(spec))


class _Worker:
    """Base of the ``map_batches`` callables: the Decoder, the grouping, the timing."""

    def __init__(self, decoder, *, max_new_tokens: int = 128, chat: bool = False, stop=None,
                 threads: int | None = None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.dec = build_decoder(decoder)
        self.max_new_tokens, self.chat = max_new_tokens, chat
        self.stop = self._stop(stop)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _stop(self, stop):
        return stop or None

    def _decode(self, prompts, rule, max_new):
        """One ``generate`` call; its ``Generation`` and wall ms."""
        t0 = time.perf_counter()
        gen = self.dec.generate(prompts, rule=rule, chat=self.chat, max_new_tokens=max_new,
                                stop=self.stop)
        return gen, 1000.0 * (time.perf_counter() - t0)

    def _fault(self) -> None:
        spec = os.environ.get(FAULT_ENV, "")
        for part in filter(None, spec.split(",")):
            kind, _, arg = part.partition(":")
            if kind == "sleep":
                time.sleep(float(arg))
            elif kind == "exit" and not os.path.exists(arg):
                open(arg, "w").close()
                os._exit(17)  # the worker dies mid-batch: Ray restarts it and retries
            elif kind == "stall":
                if os.path.exists(arg):
                    while True:  # hold every later batch until the job is killed
                        time.sleep(1)
                open(arg, "w").close()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "prompt" not in batch.columns:
            first = _row_name(batch.iloc[0].to_dict()) if len(batch) else "the batch"
            raise RowError(f"{first}: no 'prompt' column (columns: {list(batch.columns)}); "
                           "each row needs {'prompt': str}")
        rows = batch.to_dict("records")
        groups: dict = {}
        for i, row in enumerate(rows):
            check_prompt(row)
            key, params = self._group(row)
            groups.setdefault((row.get("_batch"), key), (params, []))[1].append(i)
        done: list = [None] * len(rows)
        for params, idx in groups.values():
            for i, rec in zip(idx, self._rows([rows[i] for i in idx], params)):
                done[i] = rec
        self._fault()
        out = pd.DataFrame(done)
        return out.drop(columns=["_batch"], errors="ignore")


class Generate(_Worker):
    """``ds.map_batches(Generate, fn_constructor_kwargs=dict(decoder=..., rule=AAD(0.1)),
    batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=N))``.

    Input rows: ``prompt`` (str), optional ``id``, optional per-row rule fields (``alpha``,
    ``seed``, ``temperature``, ... of ``rule``) and ``max_new_tokens``; rows sharing a
    ``_batch`` value and a rule are decoded by one ``generate`` call. Output rows: the input
    columns plus ``completion`` (str), ``tokens`` (list of int, stop id excluded),
    ``finish_reason`` (``"stop"``/``"length"``), ``batch_ms`` (wall ms of the row's
    ``generate`` call), ``batch_rows``, ``ms_per_token`` and ``worker`` (``host:pid``).
    """

    def __init__(self, decoder, rule: Rule = AAD(0.1), **kw):
        if not isinstance(rule, Rule):
            raise ValueError(f"rule must be an aad_fast rule (AAD(0.1), ...), got {rule!r}")
        super().__init__(decoder, **kw)
        self.rule = rule

    def _group(self, row):
        rule, max_new = row_rule(self.rule, row, self.max_new_tokens)
        return (repr(rule), max_new), (rule, max_new)

    def _rows(self, rows, params):
        rule, max_new = params
        gen, ms = self._decode([r["prompt"] for r in rows], rule, max_new)
        for j, r in enumerate(rows):
            yield {**r, "completion": gen.text[j] if gen.text is not None else None,
                   "tokens": list(gen.tokens[j]), "finish_reason": gen.finish_reason[j],
                   "batch_ms": ms, "batch_rows": len(rows),
                   "ms_per_token": gen.stats.get("ms_per_token"), "worker": self.worker}


# ----------------------------------------------------------------------------- driver side
def connect(address=None) -> bool:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``, a running local cluster, or a
    new local instance). True when this call initialised Ray (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    return True


def worker_resources(workers=None, threads: int = 1) -> tuple:
    """``(resources, workers)`` of ``map_batches``: one GPU per worker where the cluster has
    GPUs, else ``threads`` CPUs; ``workers`` defaults to the cluster's GPUs (or CPUs //
    threads)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1}, workers or gpus
    return {"num_cpus": threads}, workers or max(1, int(res.get("CPU", 1)) // threads)


def map_dataset(ds, worker=Generate, *, workers=None, threads: int = 1, batch_size=None, **kw):
    """``ds.map_batches(worker, ...)`` with one Decoder per worker (``kw``: the worker's
    constructor arguments). With ``batch_size=None`` whole blocks are batches: a block built
    from one ``_batch`` group is decoded by one ``generate`` call, as the single-process
    command does; give ``batch_size`` (at most the Decoder's ``max_batch_size``) for a
    Dataset built elsewhere."""
    extra = {}
    if os.environ.get(FAULT_ENV):
        extra["runtime_env"] = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
    res, n = worker_resources(workers, threads)
    if "num_cpus" in res:
        kw.setdefault("threads", threads)
    return ds.map_batches(worker, fn_constructor_kwargs=kw, batch_format="pandas",
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=n),
                          **res, **extra)


def unwrap(exc: BaseException):
    """The ``RowError`` inside a Ray task error, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RowError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None



def run_rows(rows: list, groups: list, record_of, *, out=None, worker=Generate, workers=None,
             threads: int = 1, count=None, **worker_kw) -> dict:
    """Decode ``groups`` on the cluster and hand each result row to ``out`` as it comes.

    Args:
        rows: every prompt row (dicts with ``id`` and ``prompt``), in the order of the input.
        groups: the ``generate`` batches still to do: lists of the dicts to send (each with
            ``_pos``, its index in ``rows``, and ``prompt``, plus any per-row rule columns).
        record_of: ``(row, result) -> dict``, the line written for a row.
        out: a ``ResultsFile`` (rows already in it are skipped) or a list to append to.
        count: ``result -> int``, the tokens of a row (default ``len(result["tokens"])``).
    Returns:
        ``{"rows", "tokens", "seconds", "workers", "duplicates"}``.
    """
    out = [] if out is None else out
    seen = set()
    if not isinstance(out, list):
        seen = {k for k in out.done}
    count = count or (lambda r: len(r["tokens"]))
    blocks = [pd.DataFrame([{**s, "_batch": b} for s in g]) for b, g in enumerate(groups) if g]
    todo = {s["_pos"] for g in groups for s in g}
    stats = {"rows": 0, "tokens": 0, "seconds": 0.0, "workers": 0, "duplicates": 0}
    if not blocks:
        return stats
    n_workers = worker_resources(workers, threads)[1]
    ds = map_dataset(ray.data.from_pandas(blocks), worker,
                     workers=min(n_workers, len(blocks)), threads=threads, **worker_kw)
    t0, names, got = time.perf_counter(), set(), set()
    try:
        # no prefetch: the iterator would otherwise hold a finished batch until the next one
        # is done too, and a killed run would lose rows that were already decoded
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=0):
            for rec in batch.to_dict("records"):
                pos = int(rec["_pos"])
                row = rows[pos]
                key = row_key(row["id"])
                if pos not in todo:
                    raise RuntimeError(f"a worker returned {_row_name(row)}, which was not sent")
                if key in seen:  # a retried worker's rows that already came: written once
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                got.add(pos)
                line = record_of(row, rec)
                out.append(line) if isinstance(out, list) else out.write(line)
                stats["rows"] += 1
                stats["tokens"] += count(rec)
                names.add(rec.get("worker"))
    except Exception as exc:
        err = unwrap(exc)
        if err is not None:
            raise ValueError(str(err)) from None
        raise
    stats["seconds"] = time.perf_counter() - t0
    stats["workers"] = len(names)
    lost = todo - got
    if lost:
        raise RuntimeError(f"{len(lost)} row(s) came back from no worker (first: "
                           f"{_row_name(rows[min(lost)])}); rerun to do them")
    return stats


def summary(stats: dict) -> str:
    """The final progress line."""
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    dup = f", {stats['duplicates']} duplicate row(s) dropped" if stats["duplicates"] else ""
    return (f"ray: {stats['rows']} rows, {stats['tokens']} tokens in {stats['seconds']:.1f} s "
            f"({rate:.1f} tokens/s) on {stats['workers']} worker(s){dup}")


def in_order(results: list, rows: list) -> list:
    """``results`` (dicts with ``id``) in the order of ``rows``; unknown ids last."""
    order = {row_key(r["id"]): i for i, r in enumerate(rows)}
    return sorted(results, key=lambda r: (row_key(r["id"]) not in order,
                                          order.get(row_key(r["id"]), 0)))


def sort_file(out, rows: list) -> list:
    """Rewrite ``out``'s file (atomically) with its rows in the order of ``rows`` (the input
    order, which is what the single-process command writes); rows of ids no longer in the
    input follow in file order. Returns the rows in that order."""
    import json

    from .outfile import write_atomic
    have = list(out.done.values())
    ranked = in_order(have, rows)
    if [id(r) for r in ranked] != [id(r) for r in have]:
        write_atomic(out.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in ranked))
    return ranked


def write_parquet(path, rows: list) -> None:
    """The same rows as Parquet (through a temporary file and a rename)."""
    from pathlib import Path
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, p)


def generate(source, out=None, *, decoder, rule: Rule = AAD(0.1), max_new_tokens: int = 128,
             chat: bool = False, stop=None, batch_size: int = 8, workers=None, threads: int = 1,
             address=None, parquet=None, settings: dict | None = None):
    """Decode every prompt of ``source`` on Ray, one ``Decoder`` per worker.

    Args:
        source: a ``ray.data.Dataset`` (returned mapped, lazily: ``Generate``'s output
            columns; batches of ``batch_size`` rows), or a JSONL path / list of rows
            ``{"prompt", "id"?, rule fields?}``.
        out: with a path or list source, append the rows to this JSONL (resumable: a rerun
            decodes only the ids not in it; ``settings``, by default the rule, lengths and
            decoder spec, are checked against its sidecar ``OUT.meta.json``).
        decoder: ``Decoder`` keyword arguments (dict) or a picklable zero-argument factory.
        batch_size: prompts per ``generate`` call (the Decoder needs ``max_batch_size`` >= it).
    Returns:
        the mapped ``Dataset``, or the result rows in input order (``id, prompt, completion,
        tokens, finish_reason``, the timing columns, and the row's other fields).
    """
    import contextlib

    from .prompt_files import check_resume, prompts_identity, read_prompts_file
    from .outfile import ResultsFile
    kw = dict(decoder=decoder, rule=rule, max_new_tokens=max_new_tokens, chat=chat, stop=stop)
    if isinstance(source, ray.data.Dataset):
        if out is not None:
            raise ValueError("out= needs a JSONL path or a list of rows as source; write a "
                             "mapped Dataset with its own writers (ds.write_json(...))")
        return map_dataset(source, Generate, workers=workers, threads=threads,
                           batch_size=batch_size, **kw)
    if isinstance(source, (list, tuple)):
        rows = [dict(r, id=r.get("id", i)) for i, r in enumerate(source)]
        ident = {"rows": len(rows)}
    else:
        rows = read_prompts_file(source, "source")
        ident = prompts_identity(source)
    for r in rows:
        check_prompt(r)
        row_rule(rule, r, max_new_tokens)  # bad parameters fail before any work
    names = {f.name for f in dataclasses.fields(rule) if f.init} | set(ROW_OPTIONS)
    started = connect(address)
    try:
        with contextlib.ExitStack() as stack:
            done = None
            if out is not None:
                done = stack.enter_context(ResultsFile(out, settings or {
                    "rule": repr(rule), "max_new_tokens": max_new_tokens, "chat": chat,
                    "stop": stop, "decoder": describe(decoder)}, ident, arg="out"))
                check_resume(done, rows, lambda row: row.get("prompt"), arg="out")
            todo = [i for i, r in enumerate(rows) if done is None or not done.is_done(r["id"])]
            groups = [[{"_pos": i, "prompt": rows[i]["prompt"],
                        **{k: rows[i][k] for k in names if k in rows[i]}}
                       for i in todo[j:j + batch_size]] for j in range(0, len(todo), batch_size)]

            def record_of(row, rec):
                return {**row, **{k: v for k, v in rec.items() if k not in ("_pos", "prompt")},
                        "tokens": [int(t) for t in rec["tokens"]]}
            got = done if done is not None else []
            stats = run_rows(rows, groups, record_of, out=got, workers=workers,
                             threads=threads, **kw)
            print(summary(stats), file=sys.stderr)
            result = sort_file(done, rows) if done is not None else in_order(got, rows)
        if parquet:
            write_parquet(parquet, result)
        return result
    finally:
        if started:
            ray.shutdown()
