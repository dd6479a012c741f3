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
import torch.nn.functional as F
from torch import nn

from .cpu_linear import PACK_HINT, few_row_linear, packed_supported

MARGIN = 0.05          # the alternative must be this much faster than plain to be chosen
ROUNDS = 9             # timed rounds per candidate at most (interleaved), after one warm-up
MIN_ROUNDS = 5         # ... and at least
STABLE = 1.5           # median round / best round above this: the machine is busy, keep nothing
BUDGET_S = 0.25        # stop adding rounds past this much time per shape
MAX_BYTES = 256 << 20  # weights of one shape timed per round (a subset beyond that)
LINEAR_MODES = ("auto", "plain", "few_row", "packed")
LAYOUTS = ("few_row", "packed")  # the alternatives to plain F.linear
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
    from . import __version__
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


def _valid(rec, choices) -> bool:
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


def measure_linear(weights: list, rows: int) -> dict:
    """ms of ``rows`` rows through every weight in ``weights`` (in model order, as a decode
    step streams them), for each layout."""
    chosen, total = [], 0
    for w in weights:
        if chosen and total + w.numel() * w.element_size() > MAX_BYTES:
            break
        chosen.append(w)
        total += w.numel() * w.element_size()
    g = torch.Generator().manual_seed(0)  # never the caller's global RNG
    x = torch.randn(rows, chosen[0].shape[1], dtype=chosen[0].dtype, generator=g)

    def plain():
        for w in chosen:
            F.linear(x, w)

    def few_row():
        for w in chosen:
            few_row_linear(x, w)
    fns = {"plain": plain, "few_row": few_row}
    with torch.inference_mode():
        if packed_supported():  # temporary copies of the timed weights, not kept
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT) for w in chosen]

            def packed():
                for pk in packs:
                    torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], "")
            fns["packed"] = packed
        return time_candidates(fns)


def linear_mode(mode: str | None = None) -> str:
    """The layout switch: ``mode`` if given, else the environment, else ``auto``."""
    if mode is None:
        mode = os.environ.get("AAD_FAST_CPU_LINEAR")
        if mode is None and os.environ.get("AAD_FAST_CPU_FEW_ROW_LINEAR", "1") == "0":
            mode = "plain"
    mode = mode or "auto"
    if mode not in LINEAR_MODES:
        raise ValueError(f"cpu_linear (or AAD_FAST_CPU_LINEAR) must be one of {LINEAR_MODES}, "
                         f"got {mode!r}")
    return mode


def plan_linears(model: nn.Module, rows: int, mode: str | None = None,
                 measure=None) -> dict:
    """Layout of each weight shape of ``model``'s plain ``nn.Linear`` layers for a decode step
    of ``rows`` rows: ``{(N, K): {"choice": "plain" | "few_row" | "packed", "source": ...,
    "<layout>_ms": ...}}``.

    Only fp32 weights on CPU have a choice (everything else is ``plain``). ``measure(weights,
    rows) -> {"plain": ms, "few_row": ms, ...}`` is the timer (tests inject fake timings)."""
    mode = linear_mode(mode)
    measure = measure or measure_linear
    groups: dict = {}
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.device.type == "cpu" \
                and mod.weight.dtype == torch.float32:
            groups.setdefault(tuple(mod.weight.shape), []).append(mod.weight)
    plan = {}
    for shape, weights in groups.items():
        if mode != "auto":
            plan[shape] = {"choice": mode, "source": "forced"} \
                if mode != "packed" or packed_supported() else \
                {"choice": "plain", "source": "forced packed: no working oneDNN packed linear here"}
            continue
        entry = f"linear/{shape[0]}x{shape[1]}/float32/rows{rows}/" + \
            ",".join(("plain",) + LAYOUTS[: 2 if packed_supported() else 1])
        rec = cached(entry)
        if not _valid(rec, ("plain",) + LAYOUTS):
            times = measure(weights, rows)
            rec = {"choice": decide(times), "weights_timed": len(weights),
                   "stable": times.get("stable", True),
                   **{f"{k}_ms": v for k, v in times.items() if k != "stable"}}
            store(entry, rec, persist=rec["stable"])
            rec = dict(rec, source="measured")
        else:
            rec = dict(rec, source="cache")
        plan[shape] = rec
    return plan


def measure_forward(view_plan: nn.Module, view_plain: nn.Module, rows: int) -> dict:
    """ms of one token per row through each whole view (no cache: the linears dominate, as in
    a decode step): ``{"planned": ms, "plain": ms}``."""
    vocab = view_plain.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 1), generator=g)

    def run(view):
        return lambda: view(input_ids=ids, use_cache=False, logits_to_keep=1)
    with torch.inference_mode():
        return time_candidates({"planned": run(view_plan), "plain": run(view_plain)})


def plan_pays(view_plan: nn.Module, view_plain: nn.Module, rows: int, layouts: dict,
              measure=None) -> bool:
    """Whether the model with ``layouts`` (``{(N, K): "few_row" | "packed"}``) beats plain
    ``F.linear`` everywhere, timed on the whole forward (per-shape timings can mislead: cache
    reuse inside one shape's loop, neighbouring layers). Cached like the per-shape choices."""
    model = type(view_plain).__name__
    entry = f"step/{model}/rows{rows}/" + ",".join(
        f"{n}x{k}:{layouts[(n, k)]}" for n, k in sorted(layouts))
    rec = cached(entry)
    if not _valid(rec, ("plain", "planned")):
        times = (measure or measure_forward)(view_plan, view_plain, rows)
        rec = {"choice": decide(times), "plain_ms": times["plain"],
               "planned_ms": times["planned"], "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"] == "planned"


DECODER_MODES = ("auto", "hf", "fast")


def decoder_mode(mode: str | None = None) -> str:
    """The one-token forward switch: ``mode`` if given (``Decoder(forward=...)``), else
    ``$AAD_FAST_DECODER``, else ``auto`` (measure); ``hf``: the model's own forward; ``fast``:
    ``fast_decoder.FastDecoder`` where the architecture has one."""
    if mode is None:
        mode = os.environ.get("AAD_FAST_DECODER", "auto").strip().lower() or "auto"
    if mode not in DECODER_MODES:
        raise ValueError(f"forward (or AAD_FAST_DECODER) must be one of {DECODER_MODES}, "
                         f"got {mode!r}")
    return mode


def measure_decoder(view: nn.Module, fast, rows: int) -> dict:
    """ms of one one-token step of ``rows`` rows (over a 16-slot cache) through the model's own
    forward (``plain``) and through ``fast`` plus the model's head (``fast``)."""
    from .cache import StaticKVCache
    from .runner import cache_kwarg
    vocab = view.get_output_embeddings().weight.shape[0]
    p = next(view.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 1), generator=g).to(p.device)
    pos = torch.zeros((rows, 1), dtype=torch.int64, device=p.device)
    mask = torch.zeros((rows, 1, 1, 16), dtype=p.dtype, device=p.device)
    cache = StaticKVCache(16)
    cache.row_pos = torch.zeros((rows,), dtype=torch.int64, device=p.device)
    head, kw = view.get_output_embeddings(), cache_kwarg(type(view))

    def plain():
        view(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
             logits_to_keep=1, **{kw: cache})

    def engine():
        head(fast(ids, mask, pos, cache))
    with torch.inference_mode():
        plain()  # the cache's storage, before either is timed
        return time_candidates({"plain": plain, "fast": engine})


def decoder_pays(view: nn.Module, fast, rows: int, measure=None, mode: str | None = None) -> bool:
    """Whether decode steps of ``rows`` rows run ``fast`` (a ``FastDecoder``) instead of the
    model's forward: forced by ``$AAD_FAST_DECODER``, else measured on CPU (``measure_decoder``;
    cached per model shape, rows and dtype) and kept only if faster beyond noise. Other devices
    keep the model's forward (a captured CUDA graph has no per-op overhead to save)."""
    mode = decoder_mode(mode)
    if fast is None or mode == "hf":
        return False
    if mode == "fast":
        return True
    p = next(view.parameters())
    if p.device.type != "cpu":
        return False
    cfg = view.config
    entry = (f"decoder/{type(view).__name__}/h{cfg.hidden_size}/l{cfg.num_hidden_layers}/"
             f"{str(p.dtype).replace('torch.', '')}/rows{rows}")
    rec = cached(entry)
    if not _valid(rec, ("plain", "fast")):
        times = (measure or measure_decoder)(view, fast, rows)
        rec = {"choice": decide(times), "plain_ms": times["plain"], "fast_ms": times["fast"],
               "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"] == "fast"


def summarize(plan: dict) -> dict:
    """``{"NxK": "few_row (measured: plain 0.52 ms, few_row 0.31 ms)"}`` for stats."""
    out = {}
    for (n, k), rec in plan.items():
        text = rec["choice"]
        if "plain_ms" in rec:
            busy = "" if rec.get("stable", True) else ", machine busy: plain kept, not cached"
            times = ", ".join(f"{name} {rec[f'{name}_ms']:.3f} ms"
                              for name in ("plain",) + LAYOUTS
                              if isinstance(rec.get(f"{name}_ms"), (int, float)))
            text += f" ({rec['source']}: {times}{busy})"
        else:
            text += f" ({rec['source']})"
        out[f"{n}x{k}"] = text
    return out


# ---------------------------------------------------------------------------- threads
THREAD_MODES = ("auto", "keep")


def threads_mode(threads=None):
    """The thread switch: ``threads`` if given (``Decoder(threads=...)``), else
    ``$AAD_FAST_THREADS``, else ``auto``; ``keep`` or an int >= 1 force."""
    if threads is None:
        env = os.environ.get("AAD_FAST_THREADS", "auto").strip().lower() or "auto"
        threads = int(env) if env.isdigit() else env
    if isinstance(threads, bool) or not (threads in THREAD_MODES
                                         or (isinstance(threads, int) and threads >= 1)):
        raise ValueError(f"threads (or AAD_FAST_THREADS) must be 'auto', 'keep' or an int "
                         f">= 1, got {threads!r}")
    return threads


def thread_candidates(n: int) -> list:
    """``n`` (the process's count) and up to two halvings of it: ``[8, 4, 2]`` for 8."""
    out, m = [n], n // 2
    while m >= 1 and len(out) < 3:
        out.append(m)
        m //= 2
    return out


def measure_threads(model: nn.Module, counts: list, rows: int) -> dict:
    """ms of ``rows`` rows through the model's linear weights (in model order, at most
    ``MAX_BYTES`` of them: what a decode step streams, well under a second) at each thread
    count, each timed in a block of its own (switching counts between rounds would time the
    pool's resizing); the process's count is restored. ``{"<count>": ms, "stable": bool}``."""
    chosen, total = [], 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 2:
            if chosen and total + w.numel() * w.element_size() > MAX_BYTES:
                break
            chosen.append(w)
            total += w.numel() * w.element_size()
    g = torch.Generator().manual_seed(0)
    xs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], generator=g).to(w.device, w.dtype)
          for w in chosen}

    def run():
        for w in chosen:
            F.linear(xs[(w.shape[1], w.dtype)], w)
    before, out, stable = torch.get_num_threads(), {}, True
    try:
        with torch.inference_mode():
            for n in counts:
                torch.set_num_threads(n)
                t = time_candidates({"x": run})
                out[str(n)], stable = t["x"], stable and t["stable"]
    finally:
        torch.set_num_threads(before)
    out["stable"] = stable
    return out


def threads_choice(model: nn.Module, max_rows: int, mode=None, measure=None) -> int | None:
    """The thread count a ``Decoder`` of ``model`` runs its calls with, ``None`` for the
    process's own (``keep``; ``auto`` on other devices, with one thread, or when nothing fewer
    is faster). ``auto``: fewer threads only where measured faster beyond noise at one row and
    not slower beyond noise at ``max_rows`` rows; cached per model shape and dtype."""
    mode = threads_mode(mode)
    if mode == "keep":
        return None
    if isinstance(mode, int):
        return mode
    p = next(model.parameters())
    n = torch.get_num_threads()
    if p.device.type != "cpu" or n == 1:
        return None
    shape = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)})
    ident = hashlib.sha1(repr(shape).encode()).hexdigest()[:12]  # the weights a step streams
    entry = (f"threads/{type(model).__name__}/{ident}/{str(p.dtype).replace('torch.', '')}/"
             f"rows1,{max_rows}/of{n}")
    rec = cached(entry)
    if not _valid(rec, thread_candidates(n)):
        counts = thread_candidates(n)
        one = (measure or measure_threads)(model, counts, 1)
        many = (measure or measure_threads)(model, counts, max_rows) if max_rows > 1 else one
        stable = one.get("stable", True) and many.get("stable", True)
        best = decide(one, plain=str(n)) if stable else str(n)
        if many[best] > many[str(n)] * (1 + MARGIN):  # faster alone, slower batched: keep
            best = str(n)
        rec = {"choice": int(best), "rows1_ms": {k: v for k, v in one.items() if k != "stable"},
               f"rows{max_rows}_ms": {k: v for k, v in many.items() if k != "stable"},
               "stable": stable}
        store(entry, rec, persist=stable)
    return None if rec["choice"] == n else rec["choice"]


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
def measure_backends(device: torch.device, candidates: list) -> dict:
    """ms of one AAD selection (B=1, V=131072, float32 logits) on each backend."""
    from .ops import select_core
    g = torch.Generator().manual_seed(0)
    a, r = (torch.randn(1, 131072, generator=g).to(device) for _ in range(2))
    log_rel = torch.full((1,), -2.302585, device=device)
    floor = torch.full((1,), float("-inf"), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(name):
        def fn():
            select_core(a, r, 131072, 1.0, 0.0, 1.0, -1.0, log_rel, floor, None, None, name)
            sync()
        return fn
    with torch.inference_mode():
        return time_candidates({name: run(name) for name in candidates})


def fastest_backend(device: torch.device, candidates: list, measure=None) -> str:
    """The default selection backend among ``candidates`` (preference order) on ``device``: the
    measured fastest, unless it beats the PyTorch reference by no more than noise."""
    entry = f"backend/{device.type}/{'+'.join(candidates)}"
    rec = cached(entry)
    if not _valid(rec, candidates):
        times = (measure or measure_backends)(device, candidates)
        plain = "torch" if "torch" in times else candidates[0]
        rec = {"choice": decide(times, plain),
               "ms": {k: v for k, v in times.items() if k != "stable"},
               "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"]
