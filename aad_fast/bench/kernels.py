"""Selection-kernel bench: every available backend of ``aad_select`` (the public op, and the
``select_core`` call the engine makes with preallocated buffers) against the eager PyTorch a user
would write (``eager_aad``), at ``B x V``, with the per-call timer and the copy bandwidth that the
decode bench also uses as its bandwidth floor."""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..ops import aad_select, select_core
from .machine import log


def time_op(fn, device, quick: bool = False) -> list:
    """ms of each timed call of ``fn()`` after warm-up. CUDA: events around each call, L2
    flushed before each; CPU: ``perf_counter`` per call, repeated for ~0.25 s (>= 5 calls)."""
    if device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
        for _ in range(5):
            fn()
        times = []
        for _ in range(30 if quick else 100):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(3):
        fn()
    times, budget = [], 0.08 if quick else 0.25
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device, quick: bool = False) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting the read and the write (as STREAM's Copy)."""
    n = (64 if quick else 512 if device.type == "cuda" else 256) * 2 ** 20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_op(lambda: dst.copy_(src), device, quick=True))
    return 2 * n / (ms / 1e3)


def eager_aad(a: torch.Tensor, r: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """AAD selection as a user writes it in PyTorch: log_softmax of both, max, mask, log-ratio,
    argmax. ``a``, ``r`` ``[B, V]`` any float dtype; int64 ``[B]``."""
    la = torch.log_softmax(a.float(), dim=-1)
    lr = torch.log_softmax(r.float(), dim=-1)
    keep = la >= la.max(dim=-1, keepdim=True).values + math.log(alpha)
    score = (la - lr).masked_fill(~keep, float("-inf"))
    return score.argmax(dim=-1)


def bench_kernels(device, dtype, batches, vocabs, copy_bw, quick, backend_names) -> list:
    rows = []
    for vocab in vocabs:
        for b in batches:
            g = torch.Generator().manual_seed(b * 7919 + vocab)
            a = (3 * torch.randn(b, vocab, generator=g)).to(device, dtype)
            r = (3 * torch.randn(b, vocab, generator=g)).to(device, dtype)
            log_rel = torch.full((b,), math.log(0.1), device=device)
            floor = torch.full((b,), -math.inf, device=device)
            impls = {"eager": lambda: eager_aad(a, r, 0.1)}
            for be in backend_names:
                impls[f"aad_select[{be}]"] = lambda be=be: aad_select(a, r, 0.1, backend=be)
                impls[f"engine_core[{be}]"] = lambda be=be: select_core(
                    a, r, vocab, 1.0, 0.0, 1.0, -1.0, log_rel, floor, None, None, be)
            want = impls["eager"]()
            nbytes = 2 * b * vocab * a.element_size()
            eager_ms = None
            for name, fn in impls.items():
                same = bool(torch.equal(fn(), want))
                times = time_op(fn, device, quick)
                ms = statistics.median(times)
                eager_ms = ms if name == "eager" else eager_ms
                bw = nbytes / (ms / 1e3)
                rows.append({"batch": b, "vocab": vocab, "impl": name, "dtype": str(dtype),
                             "median_ms": ms, "min_ms": min(times), "calls": len(times),
                             "bytes_read": nbytes, "gb_per_s": bw / 1e9,
                             "fraction_of_copy_bw": bw / copy_bw, "speedup_vs_eager": eager_ms / ms,
                             "same_ids_as_eager": same})
                log(f"kernel B={b} V={vocab} {name}: {ms:.4f} ms, {bw / 1e9:.1f} GB/s, "
                    f"{eager_ms / ms:.1f}x eager")
    return rows
