"""Triton selection core: ``reference.select_ref``, exact, with each logit read about once.

Three launches per call, the vocabulary of each row split into chunks of ``BLOCK`` ids:

1. ``_select_chunk_kernel``, grid ``(B, n_chunks)``: the chunk max of the mask value ``m`` (NaN
   ignored) and, where this pass can afford it, the best ``(score, id)`` of the chunk and that
   token's ``m``:
   - rows with ``log_rel == -inf``: the threshold ``t = floor`` needs no row max, so the chunk's
     best is exact;
   - rules whose score reads no stream the mask does not (Mix: ``m`` and ``s`` both read ``a``
     and ``r``): one pass, the best among the *local* candidates ``m >= max(floor, chunk_max +
     log_rel)``, a superset of the chunk's true candidates since ``chunk_max <= M``;
   - otherwise (AAD, Contrastive: ``m = a``, ``s`` also reads ``r``): only the mask's streams are
     read, so ``r`` is read later for the few chunks that can hold a candidate.
2. ``_select_fixup_kernel``, grid ``(B, n_chunks)``: ``M`` = max of the row's chunk maxima,
   ``t = max(floor, M + log_rel)``. A chunk with ``chunk_max >= t`` holds a candidate; if its stored
   best is missing or has ``m < t`` (a local candidate only), the chunk is scanned again with ``t``.
   Chunks are fixed in parallel, so a flat distribution with candidates everywhere costs one more
   parallel pass, never a serial one.
3. ``_select_combine_kernel``, grid ``(B,)``: the best over the chunks with ``chunk_max >= t``,
   ties to the lowest id; ``-1`` when there is none.

Ties: the largest score, then the lowest id among the candidates holding it (float equality, so
``-0 == +0``); NaN scores count as -inf, and a candidate scoring -inf still beats no candidate.
The float maths follows the reference op by op with no FMA contraction (``enable_fp_fusion=False``).
The Gumbel log is libdevice ``logf`` when compiled (the function PyTorch's CUDA ``log`` uses);
the interpreter has no libdevice and rounds a float64 log to float32 (see ``_gumbel``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from aad_fast.ops import check_core

_NINF = tl.constexpr(float("-inf"))
_NO_ID = tl.constexpr(2**31 - 1)
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: "m >= max(t, -FLT_MAX)" is "m > -inf"


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed_ptr, seed_stride, step_ptr, row):
    """``mix32(mix32(seed mod 2**32) ^ (step mod 2**32))`` for one row, uint32 scalar."""
    seed = (tl.load(seed_ptr + row * seed_stride) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(step_ptr) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(_mix32(seed) ^ step)


@triton.jit
def _gumbel(key, cols, PRECISE_LOG: tl.constexpr):
    """``-log(-log(u))``, ``u = ((h >> 9) + 0.5) * 2**-23``, ``h = mix32(key ^ (v * GOLDEN))``."""
    v = cols.to(tl.uint32)
    h = _mix32(key ^ (v * tl.full(v.shape, 0x9E3779B9, tl.uint32)))
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    if PRECISE_LOG:
        g = -libdevice.log(-libdevice.log(u))
    else:
        l1 = tl.log(u.to(tl.float64)).to(tl.float32)
        g = -(tl.log((-l1).to(tl.float64)).to(tl.float32))
    return g


@triton.jit
def _scale(x, c, K: tl.constexpr):
    """``c * x`` for a coefficient of kind ``K`` (1: c == 1, 2: c == -1, 3: other); exact
    shortcuts, since ``x * 1 == x`` and ``x * -1 == -x`` in IEEE arithmetic."""
    if K == 1:
        y = x
    elif K == 2:
        y = -x
    else:
        y = x * c
    return y


@triton.jit
def _linear2(a, r, ca, cr, KA: tl.constexpr, KR: tl.constexpr):
    """``ca*a + cr*r`` with a zero coefficient (kind 0) dropping its term, as
    ``reference.linear2``."""
    if KA == 0:
        if KR == 0:
            x = tl.zeros(a.shape, tl.float32)
        else:
            x = _scale(r, cr, KR)
    elif KR == 0:
        x = _scale(a, ca, KA)
    else:
        x = _scale(a, ca, KA) + _scale(r, cr, KR)
    return x


@triton.jit
def _load(row_ptr, cs, cols, valid, NEED: tl.constexpr, MASKED: tl.constexpr,
          WIDE: tl.constexpr):
    """One stream's tile as float32 (zeros when the stream is not needed)."""
    if NEED:
        if WIDE:
            off = cols.to(tl.int64) * cs
        else:
            off = cols * cs
        if MASKED:
            x = tl.load(row_ptr + off, mask=valid, other=0.0).to(tl.float32)
        else:
            x = tl.load(row_ptr + off).to(tl.float32)
    else:
        x = tl.zeros(cols.shape, tl.float32)
    return x


@triton.jit
def _tile_m(a_row, sac, r_row, src, cols, valid, ma, mr, KMA: tl.constexpr, KMR: tl.constexpr,
            MASKED: tl.constexpr, WIDE: tl.constexpr):
    """The mask value ``m`` of a tile, NaN and ids >= vocab as -inf; reads ``m``'s streams only."""
    a = _load(a_row, sac, cols, valid, KMA != 0, MASKED, WIDE)
    r = _load(r_row, src, cols, valid, KMR != 0, MASKED, WIDE)
    m = _linear2(a, r, ma, mr, KMA, KMR)
    if MASKED:
        m = tl.where(valid & (m == m), m, _NINF)
    else:
        m = tl.where(m == m, m, _NINF)
    return m


@triton.jit
def _tile_ms(a_row, sac, r_row, src, cols, valid, ma, mr, sa, sr, key,
             KMA: tl.constexpr, KMR: tl.constexpr, KSA: tl.constexpr, KSR: tl.constexpr,
             NOISE: tl.constexpr, PRECISE_LOG: tl.constexpr, MASKED: tl.constexpr,
             WIDE: tl.constexpr):
    """``m`` (as ``_tile_m``) and the score ``s`` of a tile, NaN scores as -inf."""
    a = _load(a_row, sac, cols, valid, (KMA != 0) or (KSA != 0), MASKED, WIDE)
    r = _load(r_row, src, cols, valid, (KMR != 0) or (KSR != 0), MASKED, WIDE)
    m = _linear2(a, r, ma, mr, KMA, KMR)
    s = _linear2(a, r, sa, sr, KSA, KSR)
    if NOISE:
        s = s + _gumbel(key, cols, PRECISE_LOG)
    if MASKED:
        m = tl.where(valid & (m == m), m, _NINF)
    else:
        m = tl.where(m == m, m, _NINF)
    s = tl.where(s == s, s, _NINF)
    return m, s


@triton.jit
def _threshold(floor, big, log_rel):
    """``max(floor, big + log_rel)``, the relative part -inf when ``log_rel == -inf``; NaN wins
    (``torch.maximum``)."""
    rel = tl.where(log_rel == _NINF, _NINF, big + log_rel)
    return tl.maximum(floor, rel, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _best(m, s, cols, t):
    """``(score, id)`` of the best candidate ``m >= t, m > -inf`` of a tile; ``(-inf, _NO_ID)``
    when there is none."""
    cand = m >= tl.maximum(t, _LOWEST, propagate_nan=tl.PropagateNan.ALL)
    best = tl.max(tl.where(cand, s, _NINF), 0)
    idx = tl.min(tl.where(cand & (s == best), cols, _NO_ID), 0)
    return best, idx


@triton.jit
def _workspace(ws_ptr, n_total):
    """The four ``[B, n_chunks]`` arrays in one float32 buffer: chunk max, best score, best m,
    best id (int32 bits)."""
    bid_ptr = (ws_ptr + 3 * n_total).to(tl.pointer_type(tl.int32), bitcast=True)
    return ws_ptr, ws_ptr + n_total, ws_ptr + 2 * n_total, bid_ptr


@triton.jit
def _row_threshold(cmax_ptr, ws, n_chunks, fl, lrel, NCH: tl.constexpr):
    """``t`` of a row from its chunk maxima."""
    cidx = tl.arange(0, NCH)
    big = tl.full((), _NINF, tl.float32)
    for c0 in range(0, n_chunks, NCH):
        cm = tl.load(cmax_ptr + ws + c0 + cidx, mask=c0 + cidx < n_chunks, other=_NINF)
        big = tl.maximum(big, tl.max(cm, 0))
    return _threshold(fl, big, lrel)


@triton.jit
def _chunk_one_pass(a_row, sac, r_row, src, cols, valid, full, ma, mr, sa, sr, key, fl, lrel,
                    KMA: tl.constexpr, KMR: tl.constexpr, KSA: tl.constexpr, KSR: tl.constexpr,
                    NOISE: tl.constexpr, PRECISE_LOG: tl.constexpr, WIDE: tl.constexpr):
    """Chunk max and the best local candidate (``m >= max(floor, chunk_max + log_rel)``) with
    its ``m``: exact for the chunk when ``log_rel == -inf``, a superset otherwise."""
    if full:
        m, s = _tile_ms(a_row, sac, r_row, src, cols, valid, ma, mr, sa, sr, key, KMA, KMR,
                        KSA, KSR, NOISE, PRECISE_LOG, False, WIDE)
    else:
        m, s = _tile_ms(a_row, sac, r_row, src, cols, valid, ma, mr, sa, sr, key, KMA, KMR,
                        KSA, KSR, NOISE, PRECISE_LOG, True, WIDE)
    cmax = tl.max(m, 0)
    bs, bid = _best(m, s, cols, _threshold(fl, cmax, lrel))
    bm = tl.max(tl.where(cols == bid, m, _NINF), 0)
    return cmax, bs, bid, bm


@triton.jit
def _select_chunk_kernel(a_ptr, sar, sac, r_ptr, srr, src, vocab, ma, mr, sa, sr,
                         lrel_ptr, lrel_stride, fl_ptr, fl_stride, seed_ptr, seed_stride, step_ptr,
                         ws_ptr, n_total, n_chunks,
                         BLOCK: tl.constexpr, NCH: tl.constexpr, KMA: tl.constexpr,
                         KMR: tl.constexpr, KSA: tl.constexpr, KSR: tl.constexpr,
                         NOISE: tl.constexpr, PRECISE_LOG: tl.constexpr, WIDE: tl.constexpr,
                         ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    cmax_ptr, bs_ptr, bm_ptr, bid_ptr = _workspace(ws_ptr, n_total)
    a_row = a_ptr + row64 * sar
    r_row = r_ptr + row64 * srr
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < vocab
    lrel = tl.load(lrel_ptr + row * lrel_stride)
    fl = tl.load(fl_ptr + row * fl_stride)
    key = 0
    if NOISE:
        key = _row_key(seed_ptr, seed_stride, step_ptr, row)
    full = (chunk + 1) * BLOCK <= vocab  # unmasked loads vectorise whatever vocab is
    if (lrel == _NINF) | ONE_PASS:  # t known (= floor), or the score's streams are read anyway
        cmax, bs, bid, bm = _chunk_one_pass(a_row, sac, r_row, src, cols, valid, full, ma, mr,
                                            sa, sr, key, fl, lrel, KMA, KMR, KSA, KSR, NOISE,
                                            PRECISE_LOG, WIDE)
    else:
        if full:
            m = _tile_m(a_row, sac, r_row, src, cols, valid, ma, mr, KMA, KMR, False, WIDE)
        else:
            m = _tile_m(a_row, sac, r_row, src, cols, valid, ma, mr, KMA, KMR, True, WIDE)
        cmax = tl.max(m, 0)
        bs = tl.full((), _NINF, tl.float32)
        bid = tl.full((), _NO_ID, tl.int32)
        bm = tl.full((), _NINF, tl.float32)
    w = row64 * n_chunks + chunk
    tl.store(cmax_ptr + w, cmax)
    tl.store(bs_ptr + w, bs)
    tl.store(bid_ptr + w, bid)
    tl.store(bm_ptr + w, bm)


@triton.jit
def _select_fixup_kernel(a_ptr, sar, sac, r_ptr, srr, src, vocab, ma, mr, sa, sr,
                         lrel_ptr, lrel_stride, fl_ptr, fl_stride, seed_ptr, seed_stride, step_ptr,
                         ws_ptr, n_total, n_chunks,
                         BLOCK: tl.constexpr, NCH: tl.constexpr, KMA: tl.constexpr,
                         KMR: tl.constexpr, KSA: tl.constexpr, KSR: tl.constexpr,
                         NOISE: tl.constexpr, PRECISE_LOG: tl.constexpr, WIDE: tl.constexpr,
                         ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    cmax_ptr, bs_ptr, bm_ptr, bid_ptr = _workspace(ws_ptr, n_total)
    ws = row64 * n_chunks
    w = ws + chunk
    cm = tl.load(cmax_ptr + w)
    bm = tl.load(bm_ptr + w)
    t = _row_threshold(cmax_ptr, ws, n_chunks, tl.load(fl_ptr + row * fl_stride),
                       tl.load(lrel_ptr + row * lrel_stride), NCH)
    if (cm > _NINF) & (cm >= t) & ~(bm >= t):
        key = 0
        if NOISE:
            key = _row_key(seed_ptr, seed_stride, step_ptr, row)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        a_row = a_ptr + row64 * sar
        r_row = r_ptr + row64 * srr
        if (chunk + 1) * BLOCK <= vocab:
            m, s = _tile_ms(a_row, sac, r_row, src, cols, cols < vocab, ma, mr, sa, sr, key,
                            KMA, KMR, KSA, KSR, NOISE, PRECISE_LOG, False, WIDE)
        else:
            m, s = _tile_ms(a_row, sac, r_row, src, cols, cols < vocab, ma, mr, sa, sr, key,
                            KMA, KMR, KSA, KSR, NOISE, PRECISE_LOG, True, WIDE)
        bs, bid = _best(m, s, cols, t)
        tl.store(bs_ptr + w, bs)
        tl.store(bid_ptr + w, bid)
        tl.store(bm_ptr + w, cm)  # the chunk's best is now exact: mark it valid (cm >= t)


@triton.jit
def _select_combine_kernel(ws_ptr, n_total, n_chunks, lrel_ptr, lrel_stride, fl_ptr, fl_stride,
                           out_ptr, NCH: tl.constexpr):
    row = tl.program_id(0)
    cmax_ptr, bs_ptr, bm_ptr, bid_ptr = _workspace(ws_ptr, n_total)
    ws = row.to(tl.int64) * n_chunks
    t = _row_threshold(cmax_ptr, ws, n_chunks, tl.load(fl_ptr + row * fl_stride),
                       tl.load(lrel_ptr + row * lrel_stride), NCH)
    cidx = tl.arange(0, NCH)
    best = tl.full((), _NINF, tl.float32)
    best_id = tl.full((), _NO_ID, tl.int32)
    for c0 in range(0, n_chunks, NCH):
        inside = c0 + cidx < n_chunks
        cm = tl.load(cmax_ptr + ws + c0 + cidx, mask=inside, other=_NINF)
        bm = tl.load(bm_ptr + ws + c0 + cidx, mask=inside, other=_NINF)
        bs = tl.load(bs_ptr + ws + c0 + cidx, mask=inside, other=_NINF)
        bid = tl.load(bid_ptr + ws + c0 + cidx, mask=inside, other=_NO_ID)
        ok = inside & (cm > _NINF) & (cm >= t) & (bm >= t)
        gs = tl.max(tl.where(ok, bs, _NINF), 0)
        gid = tl.min(tl.where(ok & (bs == gs), bid, _NO_ID), 0)
        better = (gid != _NO_ID) & ((best_id == _NO_ID) | (gs > best) |
                                    ((gs == best) & (gid < best_id)))
        best = tl.where(better, gs, best)
        best_id = tl.where(better, gid, best_id)
    tl.store(out_ptr + row, tl.where(best_id == _NO_ID, -1, best_id.to(tl.int64)))


# ---------------------------------------------------------------------------------------------
# Host launcher: argument checks (``aad_fast.ops.check_core``), block sizes, workspace.

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_NCH = 1024


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _compile_options(interpreted: bool) -> tuple:
    """Launch options: no FMA contraction; libdevice without flush-to-zero where the backend has
    the switch (PyTorch's CUDA kernels do not flush denormals)."""
    if interpreted:
        return ()
    opts = {"enable_fp_fusion": False}
    if torch.version.hip is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions
            if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__:
                opts["enable_reflect_ftz"] = False
        except ImportError:
            pass
    return tuple(opts.items())


def _interpreted() -> bool:
    """Whether ``triton.jit`` gave interpreter functions (``TRITON_INTERPRET`` set at import)."""
    return not isinstance(_select_chunk_kernel, triton.runtime.JITFunction)


def _kind(c: float) -> int:
    """Coefficient kind for the kernels: 0 drops the term, 1 and 2 are exact +-1, 3 multiplies."""
    return 0 if c == 0.0 else 1 if c == 1.0 else 2 if c == -1.0 else 3


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@functools.lru_cache(maxsize=1024)
def plan(batch: int, vocab: int, device: torch.device, block: int | None = None):
    """``(block, n_chunks, num_warps)``: ids per program, chunks per row, warps per program.

    On a GPU the chunk is the largest of 1024/2048/4096 that still gives ``batch * n_chunks``
    at least 4 programs per SM: at batch 1 a row is spread over the whole GPU, at large batch
    each program streams 4096 ids (16 per thread). ``block`` (a power of two >= 16) overrides
    the choice; tests use tiny blocks to get many chunks and fix-ups.
    """
    if block is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            target = 4 * _sm_count(index)
            block = 1024
            for b in (2048, 4096):
                if batch * _cdiv(vocab, b) >= target:
                    block = b
        else:
            block = 4096
        block = min(block, max(16, _pow2(vocab)))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    num_warps = max(1, min(8, block // 256))
    return block, _cdiv(vocab, block), num_warps


def _per_row(x: torch.Tensor, dtype):
    """A per-row argument (checked: ``[B]`` or one element) as ``dtype``, and its row stride."""
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.numel() == 1:
        return x.reshape(1), 0
    return x, x.stride(0)


def launch(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed=None, step=None, *, block=None):
    """Check arguments, pick block sizes and run the three kernels; see ``select``. ``block``
    forces the chunk size (a power of two >= 16). The checks are the package's one set
    (``aad_fast.ops.check_core``) plus the dtypes these kernels read."""
    check_core(a, r, vocab, log_rel, floor, seed, step)
    for name, x in (("a", a), ("r", r)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")
    interp = _interpreted()
    dev, batch = a.device, a.shape[0]
    if dev.type != "cuda" and not interp:
        raise ValueError(f"Triton runs {dev.type} tensors only under TRITON_INTERPRET=1 "
                         f"(set before aad_fast.kernels is imported)")
    out = torch.empty((batch,), dtype=torch.int64, device=dev)
    if batch == 0:
        return out
    lrel, lrel_s = _per_row(log_rel, torch.float32)
    fl, fl_s = _per_row(floor, torch.float32)
    noise = seed is not None
    if noise:
        sd, sd_s = _per_row(seed, torch.int64)
        st = step.to(torch.int64)
    else:
        sd, sd_s, st = lrel, 0, lrel  # never read: NOISE is off
    blk, n_chunks, num_warps = plan(batch, vocab, dev, block)
    nch = min(_pow2(n_chunks), _MAX_NCH)
    n_total = batch * n_chunks
    ws = torch.empty((4 * n_total,), dtype=torch.float32, device=dev)
    kinds = [_kind(c) for c in (ma, mr, sa, sr)]
    # one pass when the score reads no stream that the mask does not
    one_pass = (kinds[2] == 0 or kinds[0] != 0) and (kinds[3] == 0 or kinds[1] != 0)
    wide = (vocab - 1) * max(a.stride(1), r.stride(1)) >= 2**31
    flags = dict(KMA=kinds[0], KMR=kinds[1], KSA=kinds[2], KSR=kinds[3], NOISE=noise,
                 PRECISE_LOG=not interp, WIDE=wide, ONE_PASS=one_pass)
    args = (a, a.stride(0), a.stride(1), r, r.stride(0), r.stride(1), vocab,
            float(ma), float(mr), float(sa), float(sr), lrel, lrel_s, fl, fl_s, sd, sd_s, st,
            ws, n_total, n_chunks)
    opts = dict(_compile_options(interp))
    grid = (batch, n_chunks)
    _select_chunk_kernel[grid](*args, BLOCK=blk, NCH=nch, num_warps=num_warps, **flags, **opts)
    _select_fixup_kernel[grid](*args, BLOCK=blk, NCH=nch, num_warps=num_warps, **flags, **opts)
    _select_combine_kernel[(batch,)](ws, n_total, n_chunks, lrel, lrel_s, fl, fl_s, out, NCH=nch,
                                     num_warps=4, **opts)
    return out


def select(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed=None, step=None):
    """The selection core of ``reference.select_ref`` in Triton (exactly equal results).

    Args:
        a, r: ``[B, Va]``, ``[B, Vr]`` float32/float16/bfloat16 (float64 accepted), any strides;
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
        vocab: ids ``< vocab <= min(Va, Vr)`` are considered.
        ma, mr, sa, sr: mask ``m = ma*a + mr*r`` and score ``s = sa*a + sr*r`` coefficients
            (rounded to float32; a zero coefficient drops its term).
        log_rel, floor: float32 ``[B]`` (or one element): ``t = max(floor, max_v m_v + log_rel)``;
            on the logits' device.
        seed, step: int64 ``[B]`` and int64 scalar, both or neither; with them the score gets the
            counter-based Gumbel noise of ``reference.gumbel_noise``.
    Returns:
        int64 ``[B]``: the candidate with the largest score, ties to the lowest id, ``-1`` where
        no token is a candidate.

    Graph safety: no host sync; the workspace comes from the caching allocator. The floats, the
    shapes and ``vocab`` are baked into a captured graph; the tensors' contents may change
    between replays (``step`` is read on the device, so bumping it in place gives fresh noise).
    Compile once outside capture (a warm-up call) before capturing.
    """
    return launch(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step)
