"""Measured choices of the machine-dependent fast paths, cached per machine.

Which way of running a decode step is fastest depends on the CPU, its BLAS and the library
versions (``cpu_linear``: a layout that doubled the speed on one CPU halved it on another), so
nothing here is assumed: each choice is timed where the code runs, the plain PyTorch path is
always a candidate and wins unless the other is faster beyond noise (``MARGIN``), and the
answer is cached in a JSON file keyed by the machine (CPU model and flags, BLAS, threads,
library versions), so the second ``Decoder`` on a machine measures nothing.

Choices:
- ``linear``: per weight shape ``N x K`` and decode row count, ``plain`` (``F.linear``),
  ``few_row`` (``cpu_linear.few_row_linear``) or ``packed`` (oneDNN's packed weights,
  ``cpu_linear.packed_linear``, where the build has them), for fp32 ``nn.Linear`` on CPU.
- ``backend``: the default selection backend where more than one is available (CPU: ``cpp``
  or ``torch``; CUDA: ``triton``, ``cuda`` or ``torch``), timed on AAD at B=1, V=131072.
- ``decoder``: per model shape, dtype and decode row count on CPU, the model's own forward
  (``plain``) or the engine's one-token forward (``fast_decoder.FastDecoder``), timed on one
  step (``decoder_pays``).
- ``threads``: per model shape and dtype on CPU, the intra-op thread count a ``Decoder``'s calls
  run with: the process's count, or a half or quarter of it where the model's linear weights
  (what a step streams) ran faster beyond noise both at one row and at ``max_batch_size`` rows
  (``threads_choice``).
- ``compile``: per model shape, pair kind, rows and device, whether the ``torch.compile``-d
  decode step is worth its compile time for a call of a given length (``compile_pays``), from
  the ms/token and compile times that decodes on this machine observed (``observe_step``).

Switches (environment, or ``Decoder(cpu_linear=...)``):
- ``AAD_FAST_CPU_LINEAR=auto|plain|few_row|packed``: measure (default) or force a layout everywhere
  (``AAD_FAST_CPU_FEW_ROW_LINEAR=0``, the older switch, means ``plain``).
- ``AAD_FAST_DECODER=auto|hf|fast``: measure (default) or force the one-token forward.
- ``AAD_FAST_THREADS=auto|keep|N``: measure (default), keep the process's count, or use N.
- ``AAD_FAST_TUNE_CACHE=PATH``: the cache file (default
  ``$XDG_CACHE_HOME/aad_fast/tuning.json``, i.e. ``~/.cache/aad_fast/tuning.json``);
  ``off`` keeps choices in memory only.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

MARGIN = 0.05          # the alternative must be this much faster than plain to be chosen
ROUNDS = 9             # timed rounds per candidate at most (interleaved), after one warm-up
MIN_ROUNDS = 5         # ... and at least
STABLE = 1.5           # median round / best round above this: the machine is busy, keep nothing
BUDGET_S = 0.25        # stop adding rounds past this much time per shape
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "neon", "sve")


# ---------------------------------------------------------------------------- the machine
@functools.cache
def machine() -> dict:
    """What a measured choice depends on: CPU model and the flags that matter, BLAS, threads
    and library versions."""
    cpu, flags = None, set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu is None:
                    cpu = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    cpu = cpu or platform.processor() or platform.machine()
    config = torch.__config__.show()
    blas = next((b for b in ("MKL", "OpenBLAS", "BLIS", "Accelerate", "Eigen")
                 if f"BLAS_INFO={b.lower()}" in config.replace(" ", "").lower()
                 or f"USE_{b.upper()}=ON" in config), "unknown")
    from .version import __version__
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        tf_version = None
    return {"cpu": cpu, "flags": sorted(f for f in _FLAGS if f in flags),
            "cores": os.cpu_count(), "blas": blas, "torch": torch.__version__,
            "transformers": tf_version, "aad_fast": __version__}


def machine_key() -> str:
    """Hash of ``machine()`` plus the current thread count (which changes timings)."""
    ident = dict(machine(), threads=torch.get_num_threads())
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the cache
def cache_path() -> Path | None:
    env = os.environ.get("AAD_FAST_TUNE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aad_fast" / "tuning.json"


_MEMORY: dict = {}


def _read_cache(path: Path):
    """The cache file's content: ``{}`` where there is none (or it is empty), the dict of
    machine records where it is one, ``None`` where it is something else (a directory,
    unreadable, not JSON, another shape): such a file is not ours, and is never written."""
    try:
        if not path.exists():
            return {}
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        return None
    return data


def cached(entry: str) -> dict | None:
    """This machine's record for ``entry`` (a dict), or ``None``: no record, or a cache file
    that is unreadable or hand-edited into another shape (measure again)."""
    key = machine_key()
    if (key, entry) in _MEMORY:
        return _MEMORY[(key, entry)]
    path = cache_path()
    if path is None:
        return None
    rec = (_read_cache(path) or {}).get(key, {}).get(entry)
    if not isinstance(rec, dict):
        return None
    _MEMORY[(key, entry)] = rec
    return rec


def valid(rec, choices) -> bool:
    """A cached record whose ``choice`` is one of ``choices`` (a hand-edited one is not)."""
    return isinstance(rec, dict) and any(rec.get("choice") == c and type(rec.get("choice"))
                                         is type(c) for c in choices)


def store(entry: str, record: dict, persist: bool = True) -> None:
    """Keep ``record`` for this machine (in memory, and in the cache file when there is one and
    ``persist``; an unwritable cache directory only costs a measurement next time)."""
    key = machine_key()
    _MEMORY[(key, entry)] = record
    path = cache_path()
    if path is None or not persist:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        if data is None:  # not a cache of ours: left as it is (choices stay in memory)
            return
        mine = data.setdefault(key, {})
        mine.setdefault("_machine", dict(machine(), threads=torch.get_num_threads()))
        mine[entry] = record
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:  # a full disk: no temporary file left
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def forget() -> None:
    """Drop the in-memory copies (tests; the cache file is left alone)."""
    _MEMORY.clear()


# ---------------------------------------------------------------------------- timing
def time_rounds(fns: dict, rounds: int = ROUNDS, budget_s: float = BUDGET_S) -> dict:
    """ms of each zero-argument function per round, run interleaved (one warm-up each, then
    rounds in rotated order so drift on a shared machine hits every candidate alike; at least
    ``MIN_ROUNDS``, more while under ``budget_s``)."""
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
    return times


def time_candidates(fns: dict, rounds: int = ROUNDS, budget_s: float = BUDGET_S) -> dict:
    """Best time in ms of each candidate (``time_rounds``), plus ``"stable"``: whether every
    candidate's median round is within ``STABLE`` of its best (a machine busy with other work
    gives rounds that scatter; such a measurement is used, with the plain path, but not kept)."""
    times = time_rounds(fns, rounds, budget_s)
    out = {name: min(ts) for name, ts in times.items()}
    out["stable"] = all(statistics.median(ts) <= STABLE * min(ts) for ts in times.values())
    return out


def decide(times: dict, plain: str = "plain") -> str:
    """The plain candidate unless another is faster than it by more than ``MARGIN`` in a stable
    measurement (``time_candidates``; a timer without ``"stable"`` counts as stable)."""
    if not times.get("stable", True):
        return plain
    ms = {k: v for k, v in times.items() if k != "stable"}
    best = min(ms, key=ms.get)
    return best if ms[best] < ms[plain] * (1 - MARGIN) else plain


# ---------------------------------------------------------------------------- threads


# ---------------------------------------------------------------------------- compile on/off
def observe_step(entry: str, compiled: bool, ms_per_token: float, compile_s: float | None) -> None:
    """Remember what one decode measured: its ms/token (eager or compiled) and, when it
    compiled, the compile time. The latest observation of each wins (machines drift)."""
    rec = dict(cached(entry) or {})
    rec["compiled_ms" if compiled else "eager_ms"] = ms_per_token
    if compile_s is not None:
        rec["compile_s"] = compile_s
    store(entry, rec)


def compile_pays(entry: str, steps: int, compiles: int = 1) -> bool:
    """Whether compiling beats eager for ``steps`` decode steps, by this machine's record:
    the compiled step must be faster beyond noise and save more than ``compiles`` compiles'
    time (one per read length the call reaches, ``cache.read_ladder``). Without both
    measurements the answer is no (eager costs nothing up front)."""
    rec = cached(entry) or {}
    eager, comp, cost = rec.get("eager_ms"), rec.get("compiled_ms"), rec.get("compile_s")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in (eager, comp, cost)):
        return False
    return comp < eager * (1 - MARGIN) and (eager - comp) * steps > cost * compiles * 1e3


# ---------------------------------------------------------------------------- selection backend


