"""The intra-op thread count a Decoder's calls run with, as a measured choice
(``Decoder(threads=...)`` / ``$AAD_FAST_THREADS``): the process's count unless a half or a quarter
of it streamed the model's linear weights faster beyond noise at one row and no slower at
``max_batch_size`` rows; cached per machine in ``aad_fast.tuning``."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..tuning import MARGIN, cached, decide, store, time_candidates, valid
from .cpu_linear import MAX_BYTES
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
    if not valid(rec, thread_candidates(n)):
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
