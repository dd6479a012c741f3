"""``aad_beam_topk`` (the BeamAAD step: top-k candidates by score, |K|, the reference entropy
and log p_max) on every CPU backend against an independent float64 construction of
docs/rules.md's BeamAAD (``spec_beam_check``, all backends) and, for a backend that is not the
reference itself (``cpp``), against ``reference.aad_topk_ref`` bit for bit. (The ``torch`` and
``triton`` backends of this op *are* ``aad_topk_ref``: comparing them with it proves nothing.)"""
import math

import pytest
import torch
from _ops_helpers import (BACKENDS, DTYPES, EPS32, FILTER_NUMPY_WARNINGS, NINF, SHAPES, log_alpha,
                          randn, sprinkle)

from aad_fast import aad_beam_topk, aad_select
from aad_fast.ops.reference import aad_topk_ref

pytestmark = FILTER_NUMPY_WARNINGS


# ---------------------------------------------------------------------------------------------
# Beam step.


def spec_beam(a, r, alpha, k, tau, vocab):
    """docs/rules.md BeamAAD quantities in float64, by loops over each row's candidates."""
    out = []
    for i in range(a.shape[0]):
        ai, ri = a[i, :vocab].double(), r[i, :vocab].double()
        la, lr = ai.log_softmax(0), ri.log_softmax(0)
        amax = ai[~torch.isnan(ai)].max().item() if (~torch.isnan(ai)).any() else NINF
        cand = [v for v in range(vocab) if ai[v] > NINF and ai[v] >= amax + math.log(alpha)]
        ent = sum(-lr[v].exp().item() * lr[v].item() for v in cand if lr[v] > NINF)
        flat = tau is not None and ent <= tau and cand
        sc = {v: (la[v].item() + math.log(len(cand))) if flat else (la[v] - lr[v]).item()
              for v in cand}
        order = sorted(cand, key=lambda v: (-sc[v], v))[:k]
        out.append((order, [sc[v] for v in order], len(cand), ent))
    return out


def entropy_tol(ent, n):
    """Float32 rounding of the reference entropy: a sum of n >= 0 float32 terms p*ln p, each
    within an ulp or two of the exact product."""
    return (math.log2(max(n, 1)) + 4) * EPS32 * ent.abs()


def spec_beam_check(got, a, r, vocab, alpha, k, tau):
    """``got`` is docs/rules.md's BeamAAD step, rebuilt here in float64 without the reference:
    candidates ``a_v >= max a + ln(alpha)``, scores ``la - lr`` (or ``la + ln|K|`` where the
    reference entropy over K is ``<= tau``), the k best, best first, ties to the lowest id.

    Float32 is allowed exactly its rounding: tokens within the threshold's rounding may be in or
    out (``|K|`` between the two counts); a score may differ by a few ulps of the log-softmax
    terms, and the entropy by the rounding of its terms and of its sum; a row whose entropy is
    that close to ``tau`` may take either side. The j-th returned score must lie between the j-th
    best over the surely-in and over the maybe-in candidates (up to that score rounding)."""
    scores, ids, n_cand, ent, log_pmax = got
    b = a.shape[0]
    assert scores.shape == ids.shape == (b, k) and n_cand.shape == ent.shape == (b,)
    assert scores.dtype == ent.dtype == log_pmax.dtype == torch.float32
    assert ids.dtype == n_cand.dtype == torch.int64
    a64 = a[:, :vocab].double()
    r64 = r[:, :vocab].double()
    a64 = a64.masked_fill(a64.isnan(), NINF)
    r_nan = r64.isnan()
    lse_a = torch.logsumexp(a64, 1, keepdim=True)
    lse_r = torch.logsumexp(r64.masked_fill(r_nan, NINF), 1, keepdim=True)
    la = a64 - lse_a
    lr = (r64 - lse_r).masked_fill(r_nan, math.nan)
    lg = math.log(alpha) if alpha > 0 else NINF
    amax = a64.amax(1, keepdim=True)
    t = amax + lg
    tol_t = (EPS32 * (abs(lg) + (amax + lg).abs())).nan_to_num(0.0, 0.0, 0.0) if alpha > 0 else 0.0
    alive = a64 > NINF
    k_lo = alive & (a64 >= t + tol_t)
    k_hi = alive & (a64 >= t - tol_t)
    assert bool(((k_lo.sum(1) <= n_cand) & (n_cand <= k_hi.sum(1))).all()), n_cand
    # entropy over K: the terms of the surely-in tokens, plus at most those of the maybe-in ones
    pr = lr.exp()
    term = torch.where(pr > 0, -pr * lr, torch.zeros_like(pr)).nan_to_num(0.0)
    h_lo, h_hi = (term * k_lo).sum(1), (term * k_hi).sum(1)
    dl = 4 * EPS32 * (lr.abs() + lse_r.abs() + 1).nan_to_num(0.0, 0.0, 0.0)
    tol_h = (pr.nan_to_num(0.0) * (lr.abs().nan_to_num(0.0, 0.0, 0.0) + 1) * dl * k_hi).sum(1)
    tol_h = tol_h + (math.log2(max(vocab, 2)) + 4) * EPS32 * h_hi
    e = ent.double()
    assert bool(((e >= h_lo - tol_h) & (e <= h_hi + tol_h)).all()), (ent, h_lo, h_hi)
    pmax = torch.where(alive.any(1), amax[:, 0] - lse_a[:, 0], torch.full((b,), NINF,
                                                                        dtype=torch.float64))
    tol_p = 4 * EPS32 * (amax[:, 0].abs() + lse_a[:, 0].abs() + 1).nan_to_num(0.0, 0.0, 0.0)
    ok = (log_pmax.double() == pmax) | ((log_pmax.double() - pmax).abs() <= tol_p)
    assert bool(ok.all()), (log_pmax, pmax)
    n = n_cand.clamp(min=1).double()[:, None]
    s_ratio, s_flat = la - lr, la + torch.log(n)
    tol_ratio = 8 * EPS32 * (la.abs() + lr.abs() + lse_a.abs() + lse_r.abs() + 1)
    tol_flat = 8 * EPS32 * (la.abs() + lse_a.abs() + torch.log(n) + 1)
    for i in range(b):
        sides = [False] if tau is None else (
            [False, True] if abs(float(h_hi[i]) - tau) <= float(tol_h[i]) + float(h_hi[i] - h_lo[i])
            else [float(h_hi[i]) <= tau])
        errs = [_check_top_row(scores[i], ids[i], int(n_cand[i]), k,
                               *((s_flat[i], tol_flat[i]) if flat else (s_ratio[i], tol_ratio[i])),
                               k_lo[i], k_hi[i]) for flat in sides]
        assert None in errs, f"row {i}: {errs}"


def _check_top_row(scores, ids, n_cand, k, s, tol, k_lo, k_hi):
    """None if one row's top-k is right for float64 scores ``s`` (NaN = -inf), else the reason."""
    s = s.nan_to_num(nan=NINF)
    n = min(k, n_cand)
    if ids[n:].ne(-1).any() or scores[n:].ne(NINF).any():
        return "padding"
    got = ids[:n].tolist()
    if len(set(got)) != n or any(v < 0 or not bool(k_hi[v]) for v in got):
        return f"ids {got} are not distinct candidates"
    sc = scores[:n].double()
    if n and not bool(((sc == s[got]) | ((sc - s[got]).abs() <= tol[got])).all()):
        return f"scores {sc.tolist()} vs {s[got].tolist()}"
    for j in range(n - 1):  # best first, equal scores by ascending id
        if sc[j] < sc[j + 1] or (sc[j] == sc[j + 1] and got[j] > got[j + 1]):
            return f"order at {j}"
    slack = float(tol[k_hi].max()) if k_hi.any() else 0.0
    best_lo = s[k_lo].sort(descending=True).values
    best_hi = s[k_hi].sort(descending=True).values
    for j, val in enumerate(s[got].sort(descending=True).values.tolist()):
        lo = float(best_lo[j]) if j < len(best_lo) else NINF
        hi = float(best_hi[j])
        if not (val == lo or val >= lo - slack) or not (val == hi or val <= hi + slack):
            return f"rank {j}: {val} outside [{lo}, {hi}]"
    return None


def assert_beam_matches(got, a, r, vocab, alpha, k, tau, backend):
    """``spec_beam_check`` on every backend; and, on a backend that is not the reference itself,
    ``aad_topk_ref`` bit for bit except the entropy (within ``entropy_tol``) and, on a row whose
    reference entropy is within that tolerance of ``tau``, the other side of ``H <= tau``."""
    spec_beam_check(got, a, r, vocab, alpha, k, tau)
    if backend != "cpp":  # torch and triton run aad_topk_ref itself (ops.aad_beam_topk)
        return
    log_alpha_ = log_alpha(alpha, a.shape[0])
    want = aad_topk_ref(a, r, vocab, log_alpha_, k, tau)
    names = ("scores", "ids", "n_cand", "entropy", "log_pmax")
    for g, w, name in zip(got, want, names):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
    scores, ids, n_cand, ent, log_pmax = got
    assert torch.equal(n_cand, want[2]) and torch.equal(log_pmax, want[4])
    tol = entropy_tol(want[3], vocab)
    assert bool(((ent - want[3]).abs() <= tol).all()), (ent, want[3])
    for i in range(a.shape[0]):
        if torch.equal(scores[i], want[0][i]) and torch.equal(ids[i], want[1][i]):
            continue
        h = want[3][i].item()
        assert tau is not None and abs(h - tau) <= tol[i].item(), f"row {i} differs"
        # tau is compared in float32: the float32 below h flips a flat row, h itself the other
        below = torch.nextafter(torch.tensor(h), torch.tensor(NINF)).item()
        other = below if h <= tau else h
        alt = aad_topk_ref(a[i:i + 1], r[i:i + 1], vocab, log_alpha_[i:i + 1], k, other)
        assert torch.equal(scores[i], alt[0][0]) and torch.equal(ids[i], alt[1][0]), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [None, 0.5, 100.0])
@pytest.mark.parametrize("k", [1, 4, 40])
def test_beam_topk_against_spec(backend, k, tau):
    a, r = randn(4, 3000, 50), randn(4, 3000, 51)
    a[3] = torch.linspace(0, 1, 3000)  # flat: every token is a candidate
    got = aad_beam_topk(a, r, 0.1, k, tau=tau, backend=backend)
    assert_beam_matches(got, a, r, 3000, 0.1, k, tau, backend)
    scores, ids, n_cand, ent, log_pmax = got
    for i, (order, sc, n, h) in enumerate(spec_beam(a, r, 0.1, k, tau, 3000)):
        assert int(n_cand[i]) == n
        torch.testing.assert_close(ent[i].double(), torch.tensor(h, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        got_ids = [x for x in ids[i].tolist() if x >= 0]
        assert got_ids == order, (i, got_ids, order)  # scores well separated at these seeds
        torch.testing.assert_close(scores[i, :len(order)].double(),
                                   torch.tensor(sc, dtype=torch.float64), rtol=0, atol=2e-5)
        assert ids[i, len(order):].eq(-1).all() and scores[i, len(order):].eq(NINF).all()
    torch.testing.assert_close(log_pmax, a.log_softmax(1).amax(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_beam_topk_matches_reference(backend, dtype, shape):
    b, v = shape
    a = sprinkle(randn(b, v, 55, dtype), 56, 0.01, values=(NINF,))
    r = sprinkle(randn(b, v, 57, dtype), 58, 0.01, values=(NINF,))
    for alpha, k, tau in ((0.1, 4, None), (0.01, 8, 2.0), (0.0, 3, 1e9)):
        got = aad_beam_topk(a, r, alpha, k, tau=tau, backend=backend)
        assert_beam_matches(got, a, r, v, alpha, k, tau, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_topk_tau_at_the_entropy(backend):
    """tau equal to a row's reference entropy: that row may take either side, nothing else."""
    a, r = randn(3, 2000, 59), randn(3, 2000, 60)
    lg = log_alpha(0.05, 3)
    h = aad_topk_ref(a, r, 2000, lg, 5)[3]
    for i in range(3):
        tau = h[i].item()
        got = aad_beam_topk(a, r, 0.05, 5, tau=tau, backend=backend)
        assert_beam_matches(got, a, r, 2000, 0.05, 5, tau, backend)


def test_beam_helper_allows_the_tau_flip_and_nothing_else():
    """``assert_beam_matches`` accepts the other side of H <= tau on a row whose entropy is
    tau, and rejects any other difference."""
    a, r = randn(3, 2000, 59), randn(3, 2000, 60)
    lg = log_alpha(0.05, 3)
    h0 = aad_topk_ref(a, r, 2000, lg, 5)[3][0].item()
    want = aad_topk_ref(a, r, 2000, lg, 5, h0)  # row 0 flat (H == tau)
    below = torch.nextafter(torch.tensor(h0), torch.tensor(NINF)).item()
    flipped = aad_topk_ref(a[:1], r[:1], 2000, lg[:1], 5, below)  # row 0 not flat
    assert not torch.equal(flipped[0][0], want[0][0])
    got = [x.clone() for x in want]
    got[0][0], got[1][0] = flipped[0][0], flipped[1][0]
    assert_beam_matches(got, a, r, 2000, 0.05, 5, h0, "cpp")
    got[1][1] = got[1][1].flip(0)  # a wrong order on row 1
    with pytest.raises(AssertionError):
        assert_beam_matches(got, a, r, 2000, 0.05, 5, h0, "cpp")
    with pytest.raises(AssertionError):  # the independent check sees it too
        spec_beam_check(got, a, r, 2000, 0.05, 5, h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_topk_top1_is_aad_and_pads(backend):
    a, r = randn(5, 7000, 52), randn(5, 7000, 53)
    _, ids, n_cand, _, _ = aad_beam_topk(a, r, 0.1, 1, backend=backend)
    # docs/rules.md: BeamAAD(1) is AAD
    assert torch.equal(ids[:, 0], aad_select(a, r, 0.1, backend=backend))
    # k beyond the vocabulary and beyond |K|: padded with -1 / -inf
    scores, ids, n_cand, _, _ = aad_beam_topk(a[:, :5], r[:, :5], 1.0, 8, backend=backend)
    assert ids.shape == (5, 8) and n_cand.tolist() == [1] * 5
    assert ids[:, 1:].eq(-1).all() and scores[:, 1:].eq(NINF).all()
    assert torch.equal(ids[:, 0], a[:, :5].argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_topk_ties_specials_and_dead_rows(backend):
    a = torch.zeros(4, 100)
    r = torch.zeros(4, 100)
    r[0, [5, 50, 70]] = -1.0  # tied best scores: ascending ids
    a[1] = NINF  # dead row
    a[2, ::2] = NINF
    r[2, 3] = NINF  # score +inf first
    r[3] = math.inf  # log_softmax of r NaN: every score NaN, counted as -inf: ascending ids
    got = aad_beam_topk(a, r, 0.5, 4, backend=backend)
    scores, ids, n_cand, ent, _ = got
    assert ids[0].tolist() == [5, 50, 70, 0]
    assert ids[1].tolist() == [-1] * 4 and int(n_cand[1]) == 0
    assert int(ids[2, 0]) == 3 and scores[2, 0].item() == math.inf
    assert ids[3].tolist() == [0, 1, 2, 3] and scores[3].eq(NINF).all()
    assert_beam_matches(got, a, r, 100, 0.5, 4, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_beam_topk_strides_and_vocab_size(backend, dtype):
    seq = (torch.randn(2, 3, 4001, generator=torch.Generator().manual_seed(54)) * 3).to(dtype)
    cases = [(seq[:, -1], seq[:, 0]), (randn(4001, 2, 61, dtype).t(), seq[:, 1])]
    for a, r in cases:
        got = aad_beam_topk(a, r, 0.2, 6, tau=1.0, vocab_size=4000, backend=backend)
        assert_beam_matches(got, a.contiguous(), r.contiguous(), 4000, 0.2, 6, 1.0, backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_beam_step_nan_logit_does_not_poison_its_row(backend):
    """One NaN in a (or r) must leave the other tokens' scores as without it."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 50, generator=g) * 3
    r = torch.randn(2, 50, generator=g) * 3
    clean = aad_beam_topk(a, r, 0.0, 3, backend=backend)  # alpha 0: every token a candidate
    top = int(clean[1][0, 0])
    a2, r2 = a.clone(), r.clone()
    a2[0, 49 if top != 49 else 48] = float("nan")  # a non-winning token of row 0
    r2[1, int(clean[1][1, 0])] = float("nan")      # row 1's winner: its score becomes NaN (last)
    got = aad_beam_topk(a2, r2, 0.0, 3, backend=backend)
    assert int(got[1][0, 0]) == top
    assert int(got[1][1, 0]) == int(clean[1][1, 1])  # the runner-up moves up
    assert torch.isfinite(got[0][1, 0])
