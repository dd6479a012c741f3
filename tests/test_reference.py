"""Sanity of the reference selection core against docs/rules.md written out naively: with
log-softmax, as a per-id loop with infinities and NaN, and the documented noise hash."""
import math

import torch

from aad_fast.ops.reference import gumbel_noise, select_ref


def test_reference_matches_log_space_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 300, generator=g) * 3
    r = torch.randn(8, 300, generator=g) * 3
    la, lr = a.log_softmax(1), r.log_softmax(1)
    alpha = 0.1
    cand = la >= la.max(1, keepdim=True).values + math.log(alpha)
    want = torch.where(cand, la - lr, torch.tensor(-math.inf)).argmax(1)
    lg = torch.full((8,), math.log(alpha))
    got = select_ref(a, r, 300, 1.0, 0.0, 1.0, -1.0, lg, torch.full((8,), -math.inf))
    assert torch.equal(got, want)


def _topk_by_sort(s, cand, k):
    """The ordering of ``aad_topk_ref`` written as two stable full sorts (its old body)."""
    key = torch.where(cand, s, torch.tensor(-math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank_c = torch.sort((~cand).to(torch.int8).gather(1, order), dim=1, stable=True).indices
    return order.gather(1, rank_c)[:, :k]


def test_beam_topk_key_orders_like_two_stable_sorts():
    """``_best_ids`` (one topk on a unique key) against the stable-sort definition on rows full
    of ties, -0.0 next to +0.0, candidates scored -inf/+inf and fewer candidates than k."""
    from aad_fast.ops.reference import _best_ids
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        b, v = 5, int(torch.randint(1, 70, (1,), generator=g))
        s = (torch.randn(b, v, generator=g) * 2).round() / 2  # many equal scores
        s[torch.rand(b, v, generator=g) < 0.1] = -0.0
        s[torch.rand(b, v, generator=g) < 0.1] = 0.0
        s[torch.rand(b, v, generator=g) < 0.05] = -math.inf
        s[torch.rand(b, v, generator=g) < 0.05] = math.inf
        cand = torch.rand(b, v, generator=g) < (0.9 if trial % 2 else 0.2)
        s = torch.where(cand, s, torch.tensor(-math.inf))
        for k in {1, 3, v}:
            assert torch.equal(_best_ids(s, cand, min(k, v)), _topk_by_sort(s, cand, k))


def naive_select(a, r, coef, log_rel, floor):
    """The selection core of docs/rules.md ("one masked argmax"), one row and one id at a time
    in float64 Python arithmetic: mask m = ma*a + mr*r and score s = sa*a + sr*r (a zero
    coefficient drops its term), t = max(floor, max m + log_rel), candidates m > -inf and
    m >= t, NaN scores count as -inf, ties to the lowest id, -1 when nothing is a candidate."""
    ma, mr, sa, sr = coef

    def lin(x, y, cx, cy):
        out = 0.0
        if cx != 0.0:
            out += cx * x
        if cy != 0.0:
            out += cy * y
        return out
    ids = []
    for i in range(a.shape[0]):
        ar, rr = a[i].tolist(), r[i].tolist()
        m = [lin(x, y, ma, mr) for x, y in zip(ar, rr)]
        s = [lin(x, y, sa, sr) for x, y in zip(ar, rr)]
        finite_m = [x for x in m if not math.isnan(x)]
        big = max(finite_m) if finite_m else -math.inf
        lr = float(log_rel[i])
        rel = -math.inf if lr == -math.inf else big + lr
        t = max(float(floor[i]), rel)
        best, best_s = -1, None
        for v, (mv, sv) in enumerate(zip(m, s)):
            if math.isnan(mv) or mv == -math.inf or not mv >= t:
                continue
            sv = -math.inf if math.isnan(sv) else sv
            if best < 0 or sv > best_s:
                best, best_s = v, sv
        ids.append(best)
    return ids


def test_reference_matches_a_naive_loop_with_infinities_and_nan():
    """Away from float32 rounding (integer-valued logits: every sum and product below is exact
    in float32), the reference is exactly the naive loop, for every rule's coefficients, with
    -inf, +inf and NaN in both streams, ties, a floor, and rows with no candidate."""
    g = torch.Generator().manual_seed(5)
    b, v = 12, 64
    a = torch.randint(-6, 7, (b, v), generator=g).float()
    r = torch.randint(-6, 7, (b, v), generator=g).float()
    for x, seed in ((a, 6), (r, 7)):
        k = torch.rand(b, v, generator=torch.Generator().manual_seed(seed))
        x[k < 0.06] = -math.inf
        x[(k >= 0.06) & (k < 0.1)] = math.nan
        x[(k >= 0.1) & (k < 0.12)] = math.inf
    a[0] = -math.inf
    a[1] = math.nan
    rules = [(1.0, 0.0, 1.0, -1.0), (1.0, 0.0, 1.0, -0.5), (4.0, -3.0, 4.0, -3.0),
             (0.5, 0.5, 0.5, 0.5), (0.0, 1.0, 1.0, 0.0), (2.0, 0.0, 2.0, 0.0)]
    # log_rel = ln 2**-j, exact in float32 and on the grid of the (integer) maxima plus it
    lrs = [torch.full((b,), -math.inf), torch.full((b,), -2.0), torch.full((b,), 0.0)]
    floors = [torch.full((b,), -math.inf), torch.linspace(-8.0, 4.0, b).round()]
    for coef in rules:
        for log_rel in lrs:
            for floor in floors:
                got = select_ref(a, r, v, *coef, log_rel, floor).tolist()
                assert got == naive_select(a, r, coef, log_rel, floor), (coef, log_rel[0])


def _mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_gumbel_noise_is_the_documented_hash():
    """``reference.gumbel_noise`` against the hash written out in Python integers (docs/rules.md,
    "Sampling"): the uniform exactly, the noise to float32 rounding of its two logs."""
    seeds, steps = [0, 1, -7, 2**40 + 3], [0, 5, 2**35 + 11]
    vocab = 300
    for step in steps:
        got = gumbel_noise(torch.tensor(seeds), torch.tensor(step), vocab)
        for i, seed in enumerate(seeds):
            key = _mix32(_mix32(seed % 2**32) ^ (step % 2**32))
            for v in range(0, vocab, 7):
                h = _mix32(key ^ ((v * 0x9E3779B9) % 2**32))
                u = ((h >> 9) + 0.5) / 2**23
                want = -math.log(-math.log(u))
                assert abs(float(got[i, v]) - want) <= 4e-7 * max(1.0, abs(want)), (seed, v)
