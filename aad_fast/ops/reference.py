"""PyTorch reference of the selection core: the definition every backend must match.

All decoding rules of docs/rules.md reduce, per row and per step, to one *masked argmax* over the
vocabulary in logit space (docs/rules.md: ``la_v - lr_v`` and ``a_v - r_v`` differ by a per-row
constant, and so do ``w_a*la + w_r*lr`` and ``w_a*a + w_r*r``):

    m_v = ma*a_v + mr*r_v                     mask value           (float32)
    s_v = sa*a_v + sr*r_v  [+ g_v]            score, g_v Gumbel noise when sampling
    M   = max_v m_v                           (NaN ignored)
    t   = max(floor, M + log_rel)             (M + log_rel taken as -inf when log_rel == -inf)
    K   = { v < vocab : m_v > -inf and m_v >= t }
    y   = argmax_{v in K} s_v                 NaN scores count as -inf, ties -> lowest id,
                                              y = -1 when K is empty

A coefficient equal to 0 drops its term (so ``0 * inf`` never makes a NaN). Each product and
the sum are rounded to float32 separately; backends must not contract them into an FMA.

AAD(alpha):           ma, mr, sa, sr = 1, 0, 1, -1;   log_rel = ln(alpha)
Contrastive(a, beta): ma, mr, sa, sr = 1, 0, 1, -beta; log_rel = ln(alpha)
Mix greedy:           ma = sa = w_a, mr = sr = w_r;   log_rel = -inf
Mix sampled at T:     ma = sa = w_a/T, mr = sr = w_r/T; log_rel = ln(min_p) (or -inf);
                      floor from top-k/top-p (see ``mix_floor``); noise on.

Noise is counter-based so that it is identical on every backend and across CUDA-graph
replays: ``g_v = -log(-log(u))``, ``u = ((h >> 9) + 0.5) / 2**23`` with
``h = mix32(mix32(mix32(seed mod 2**32) ^ (step mod 2**32)) ^ ((v * 0x9E3779B9) mod 2**32))``
and ``mix32`` the "lowbias32" integer hash. ``seed`` is per row, ``step`` a scalar counter.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def mix32(x: Tensor) -> Tensor:
    """lowbias32 hash on int64 tensors holding uint32 values (products wrap; low bits stay exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel noise ``[B, vocab]`` float32 for per-row ``seed`` int64[B] and scalar ``step``."""
    seed = seed.to(torch.int64) & MASK32
    step = step.to(torch.int64).reshape(()) & MASK32
    key = mix32(mix32(seed) ^ step)  # [B]
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = mix32(key[:, None] ^ ((v * GOLDEN) & MASK32)[None, :])
    # (h >> 9) + 0.5 has 24 significant bits: exact in float32, so 0 < u < 1 always
    u = ((h >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


def linear2(a: Tensor, r: Tensor, ca: float, cr: float) -> Tensor:
    """``ca*a + cr*r`` in float32 with zero coefficients dropped (no ``0*inf``)."""
    out = None
    if ca != 0.0:
        out = a if ca == 1.0 else a * ca
    if cr != 0.0:
        t = r if cr == 1.0 else r * cr
        out = t if out is None else out + t
    return torch.zeros_like(a) if out is None else out


def select_ref(a: Tensor, r: Tensor, vocab: int, ma: float, mr: float, sa: float, sr: float,
               log_rel: Tensor, floor: Tensor, seed: Tensor | None = None,
               step: Tensor | None = None) -> Tensor:
    """The selection core (module docstring). ``a [B, >=vocab]``, ``r [B, >=vocab]`` any float
    dtype and strides; ``log_rel``, ``floor`` float32 ``[B]``; ``seed`` int64 ``[B]`` and ``step``
    int64 scalar, both or neither. Returns int64 ``[B]`` (``-1`` for a row with no candidate)."""
    a = a[:, :vocab].float()
    r = r[:, :vocab].float()
    m = linear2(a, r, ma, mr)
    s = linear2(a, r, sa, sr)
    if seed is not None:
        s = s + gumbel_noise(seed, step, vocab)
    ninf = a.new_full((), -math.inf)  # a fill kernel: capture-safe, unlike torch.tensor(x, device)
    big = torch.where(torch.isnan(m), ninf, m).amax(dim=1)
    lrel = log_rel.float().to(a.device)
    rel = torch.where(lrel == -math.inf, ninf, big + lrel)
    t = torch.maximum(floor.float().to(a.device), rel)
    cand = (m > -math.inf) & (m >= t[:, None])
    s = torch.where(torch.isnan(s) | ~cand, ninf, s)
    best = s.amax(dim=1, keepdim=True)
    hit = cand & (s == best)
    idx = hit.to(torch.int8).argmax(dim=1)  # first True
    return torch.where(cand.any(dim=1), idx, torch.full_like(idx, -1))


def aad_topk_ref(a: Tensor, r: Tensor, vocab: int, log_alpha: Tensor, k: int,
                 tau: float | None = None):
    """Beam-search step quantities for AAD (docs/rules.md, BeamAAD), all float32 over ``v < vocab``.

    Returns ``(scores [B,k], ids [B,k], n_cand [B] int64, entropy [B], log_pmax [B])``:
    the ``k`` best candidates by ``s_v = la_v - lr_v`` (or ``la_v + ln|K|`` where the reference
    entropy over K is ``<= tau``), best first, ties to the lowest id, padded with ``-inf``/``-1``;
    ``|K|``; ``H = sum_{v in K} -p_r(v) ln p_r(v)``; ``max_v la_v``.
    """
    a = a[:, :vocab].float()
    r = r[:, :vocab].float()
    # A NaN logit must not poison its row's normaliser: a NaN a_v is no candidate (as -inf); a
    # NaN r_v is left out of lr's normaliser and its own score is NaN, i.e. ranks last (as select).
    a = a.masked_fill(torch.isnan(a), -math.inf)
    r_nan = torch.isnan(r)
    la = torch.log_softmax(a, dim=1)
    lr = torch.log_softmax(r.masked_fill(r_nan, -math.inf), dim=1).masked_fill(r_nan, math.nan)
    ninf = a.new_full((), -math.inf)  # a fill kernel: capture-safe, unlike torch.tensor(x, device)
    big = torch.where(torch.isnan(a), ninf, a).amax(dim=1)
    lg = log_alpha.float().to(a.device)
    t = torch.where(lg == -math.inf, ninf, big + lg)
    cand = (a > -math.inf) & (a >= t[:, None])
    n_cand = cand.sum(dim=1)
    pr = lr.exp()
    ent = torch.where(cand & (pr > 0), -pr * lr, torch.zeros_like(pr)).sum(dim=1)
    s = la - lr
    if tau is not None:
        flat = (ent <= tau) & (n_cand > 0)
        s = torch.where(flat[:, None], la + torch.log(n_cand.clamp(min=1).float())[:, None], s)
    s = torch.where(torch.isnan(s) | ~cand, ninf, s)
    order = _best_ids(s, cand, min(k, vocab))
    ids = torch.where(cand.gather(1, order), order, torch.full_like(order, -1))
    scores = torch.where(ids >= 0, s.gather(1, order), ninf)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -math.inf)], dim=1)
    log_pmax = torch.where(torch.isnan(la), ninf, la).amax(dim=1)
    return scores, ids, n_cand, ent, log_pmax


def _best_ids(s: Tensor, cand: Tensor, k: int) -> Tensor:
    """Ids ``[B, k]`` of each row ordered by (candidate first, score ``s`` descending, id
    ascending): one ``torch.topk`` on a key that is unique per id, so topk's own order among
    equal values never matters (no full sort). ``s`` float32 ``[B, V]`` without NaN.

    key = ordered(s) * 2**32 + (2**32 - 1 - id), int64, where ``ordered`` maps the float32 bits
    to an int32 in the order of the floats (negative floats have their magnitude bits flipped;
    ``s + 0.0`` first turns -0.0 into +0.0, as the two are equal scores); a non-candidate gets
    INT32_MIN, below ``ordered(-inf)``, so a candidate scored ``-inf`` still ranks before it.
    """
    bits = (s + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = torch.where(cand, ordered, torch.full_like(ordered, -2**31)).to(torch.int64)
    low = (2**32 - 1) - torch.arange(s.shape[1], device=s.device, dtype=torch.int64)
    top = torch.topk(ordered * 2**32 + low, k, dim=1).values
    return (2**32 - 1) - (top & (2**32 - 1))
