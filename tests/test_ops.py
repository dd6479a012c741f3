"""Public vocabulary ops (``aad_select``, ``contrastive_select``, ``mix_select``,
``aad_beam_topk``) against the reference, on every backend ``available_backends("cpu")`` lists
(``torch``, ``cpp`` when the extension is built, ``triton`` under ``TRITON_INTERPRET=1``).

Two kinds of check:
- backend vs ``reference.select_ref`` with the arguments the op is documented to pass: token ids
  equal, exactly (the contract of every backend);
- op vs SPEC written out independently in float64 log-softmax space: ids equal, except that a
  token within float32 rounding of the alpha / min-p threshold may fall on either side
  (``assert_threshold_choice`` says precisely which ids that allows).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aad_fast import aad_beam_topk, aad_select, available_backends, contrastive_select, mix_select
from aad_fast.ops import mix_floor
from aad_fast.reference import aad_topk_ref, gumbel_noise, linear2, select_ref

BACKENDS = available_backends("cpu")
NINF = -math.inf
EPS32 = 2.0**-23
SHAPES = [(1, 1), (3, 423), (2, 50257), (1, 151936), (64, 32000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the Triton interpreter runs float ops in numpy, which warns on inf - inf (intended NaNs)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


def rows_for(backend, b):
    """The Triton interpreter runs each program in Python: fewer rows of the big shapes."""
    return min(b, 4) if backend == "triton" else b


def randn(b, v, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * scale).to(dtype)


def sprinkle(x, seed, frac=0.02, values=(NINF, math.nan)):
    """Copy of x with a fraction of entries set to each of ``values``."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    for val in values:
        x[torch.rand(x.shape, generator=g) < frac] = val
    return x


def full(b, value):
    return torch.full((b,), value, dtype=torch.float32)


def log_alpha(alpha, b):
    """What the ops pass as ``log_rel``: float32 ln(alpha) per row."""
    al = alpha.float().reshape(-1).expand(b) if isinstance(alpha, torch.Tensor) else full(b, alpha)
    return torch.log(al)


def ref_contrastive(a, r, alpha, beta, vocab=None):
    vocab = vocab or min(a.shape[1], r.shape[1])
    b = a.shape[0]
    return select_ref(a, r, vocab, 1.0, 0.0, 1.0, -beta, log_alpha(alpha, b), full(b, NINF))


def ref_mix_greedy(a, r, w_a, w_r, vocab=None):
    vocab = vocab or min(a.shape[1], r.shape[1])
    b = a.shape[0]
    return select_ref(a, r, vocab, w_a, w_r, w_a, w_r, full(b, NINF), full(b, NINF))


def assert_ids(got, want):
    assert got.dtype == torch.int64 and got.shape == want.shape, (got.dtype, got.shape)
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, f"rows {bad[:8]}: got {got[bad[:8]].tolist()}, want {want[bad[:8]].tolist()}"


def spec_argmax(m, s, t, tol):
    """Per row, the ids SPEC allows: ``argmax_{v in K} s_v`` (NaN s = -inf, ties to the lowest
    id, -1 when K is empty) for some K with ``K_lo <= K <= K_hi``, where
    ``K_lo = {m > -inf, m >= t + tol}`` and ``K_hi = {m > -inf, m >= t - tol}``: only tokens
    within ``tol`` of the threshold may be in or out. Float64 in; a list of sets of ids."""
    s = torch.where(torch.isnan(s), torch.full_like(s, NINF), s)
    lo = (m > NINF) & (m >= (t + tol)[:, None])
    hi = (m > NINF) & (m >= (t - tol)[:, None])
    allowed = []
    for i in range(m.shape[0]):
        ok = set() if lo[i].any() else {-1}
        best_lo = s[i][lo[i]].max().item() if lo[i].any() else NINF
        first_best_lo = int((lo[i] & (s[i] == best_lo)).int().argmax()) if lo[i].any() else None
        # v wins over K_lo + {v} iff it beats every K_lo score, or ties the best and comes first
        for v in (hi[i] & (s[i] >= best_lo)).nonzero().flatten().tolist():
            if s[i, v].item() > best_lo or first_best_lo is None or v <= first_best_lo:
                ok.add(v)
        allowed.append(ok)
    return allowed


def assert_threshold_choice(got, m, s, t, tol):
    """``got`` is an allowed id of ``spec_argmax`` in every row; with ``tol = 0`` this is the
    exact argmax. ``tol`` is the float32 rounding of the threshold, not a loosening of it."""
    allowed = spec_argmax(m, s, t, tol)
    for i, ok in enumerate(allowed):
        assert int(got[i]) in ok, f"row {i}: got {int(got[i])}, SPEC allows {sorted(ok)[:8]}"


def test_threshold_helper_is_precise():
    m = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[5.0, 4.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([2.0], dtype=torch.float64)
    assert spec_argmax(m, s, t, torch.tensor([0.0])) == [{1}]
    assert spec_argmax(m, s, t, torch.tensor([0.5])) == [{1, 2}]  # id 1 sits on t
    assert spec_argmax(m, s, t, torch.tensor([1.0])) == [{0, 1, 2}]
    assert spec_argmax(m, s, torch.tensor([3.5], dtype=torch.float64),
                       torch.tensor([0.0])) == [{-1}]
    assert spec_argmax(m, s, torch.tensor([3.0], dtype=torch.float64),
                       torch.tensor([0.1])) == [{-1, 2}]


def spec_contrastive_check(got, a, r, alpha, beta, vocab=None):
    """SPEC Contrastive in float64 log-softmax space, threshold rounding allowed."""
    vocab = vocab or min(a.shape[1], r.shape[1])
    a64, r64 = a[:, :vocab].double(), r[:, :vocab].double()
    assert not a64.isnan().any() and not r64.isnan().any()  # log-softmax of a NaN row is NaN
    la, lr = a64.log_softmax(1), r64.log_softmax(1)
    big = torch.where(torch.isnan(la), torch.full_like(la, NINF), la).amax(1)
    lg = log_alpha(alpha, a.shape[0]).double()
    t = torch.where(lg == NINF, torch.full_like(lg, NINF), big + lg)
    # ops compare a >= fl32(max a + fl32(ln alpha)): one rounding of ln(alpha), one of the sum
    amax = torch.where(torch.isnan(a64), torch.full_like(a64, NINF), a64).amax(1)
    tol = torch.where(lg == NINF, torch.zeros_like(lg),
                      EPS32 * (lg.abs() + (amax + lg).abs().nan_to_num(0.0, 0.0, 0.0)))
    s = la - beta * lr if beta != 0 else la
    assert_threshold_choice(got, la, s, t, tol)


# ---------------------------------------------------------------------------------------------
# Shapes x dtypes x backends, against the reference (exact) and SPEC (float64).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_aad_matches_reference(backend, dtype, shape):
    b, v = rows_for(backend, shape[0]), shape[1]
    a, r = randn(b, v, 1, dtype), randn(b, v, 2, dtype)
    got = aad_select(a, r, 0.1, backend=backend)
    assert_ids(got, ref_contrastive(a, r, 0.1, 1.0))
    if dtype == torch.float32:
        spec_contrastive_check(got, a, r, 0.1, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_specials_match_reference(backend, dtype, shape):
    """-inf and NaN in both streams, +inf in r (score +inf), every rule."""
    b, v = rows_for(backend, shape[0]), shape[1]
    a = sprinkle(randn(b, v, 3, dtype), 4)
    r = sprinkle(randn(b, v, 5, dtype), 6, values=(NINF, math.nan, math.inf))
    assert_ids(aad_select(a, r, 0.1, backend=backend), ref_contrastive(a, r, 0.1, 1.0))
    assert_ids(contrastive_select(a, r, 0.3, 0.5, backend=backend),
               ref_contrastive(a, r, 0.3, 0.5))
    assert_ids(mix_select(a, r, 4.0, -3.0, backend=backend), ref_mix_greedy(a, r, 4.0, -3.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dead_rows_give_minus_one(backend, dtype):
    v = 20000
    a, r = randn(6, v, 7, dtype), randn(6, v, 8, dtype)
    a[0] = NINF
    a[1] = math.nan
    a[2, ::2], a[2, 1::2] = NINF, math.nan
    r[3] = math.nan  # a alive, every score NaN (counts as -inf): the first candidate
    r[4] = NINF  # every candidate scores +inf: the first candidate
    first_alive = torch.isfinite(a.float()).int().argmax(1)
    for alpha, beta in ((0.1, 1.0), (0.0, 1.0), (0.5, 2.0), (1.0, 0.0)):
        got = contrastive_select(a, r, alpha, beta, backend=backend)
        assert_ids(got, ref_contrastive(a, r, alpha, beta))
        assert got[:3].tolist() == [-1, -1, -1]
        if alpha == 0.0:
            assert got[3:5].tolist() == first_alive[3:5].tolist()
    # mix: z = w_a*a + w_r*r is -inf/NaN everywhere in rows 0-3 and -inf in row 4
    got = mix_select(a, r, 0.5, 0.5, backend=backend)
    assert_ids(got, ref_mix_greedy(a, r, 0.5, 0.5))
    assert got[:5].tolist() == [-1] * 5 and int(got[5]) >= 0
    got = mix_select(a, r, 0.5, 0.5, temperature=1.0, seed=3, backend=backend)
    assert got[:5].tolist() == [-1] * 5 and int(got[5]) >= 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.1, "per-row"])
def test_alpha_values(backend, alpha):
    b, v = 4, 5000
    a, r = randn(b, v, 9), randn(b, v, 10)
    if alpha == "per-row":
        alpha = torch.tensor([0.0, 0.1, 0.9, 1.0])
    got = aad_select(a, r, alpha, backend=backend)
    assert_ids(got, ref_contrastive(a, r, alpha, 1.0))
    spec_contrastive_check(got, a, r, alpha, 1.0)
    if isinstance(alpha, float) and alpha == 1.0:
        assert torch.equal(got, a.argmax(1))  # distinct maxima: K is the argmax alone
    if isinstance(alpha, float) and alpha == 0.0:
        assert torch.equal(got, (a - r).argmax(1))  # every finite token is a candidate


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_one_keeps_every_tied_maximum(backend):
    a = torch.zeros(2, 3000)
    a[:, [7, 1500, 2999]] = 5.0
    r = torch.zeros(2, 3000)
    r[0, 1500] = -1.0  # best score among the maxima
    got = aad_select(a, r, 1.0, backend=backend)
    assert got.tolist() == [1500, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_id(backend):
    """Equal best scores in one vector lane, across lanes, blocks and chunks of every backend."""
    v = 50257
    g = torch.Generator().manual_seed(11)
    sets = [[0, 1], [3, 19], [64, 8191, 8192], [8192, 40000, 50256], [50255, 50256],
            sorted(torch.randperm(v, generator=g)[:5].tolist())]
    b = len(sets)
    a = torch.zeros(b, v)
    r = torch.rand(b, v, generator=g) + 1.0  # scores a - r in [-2, -1)
    for i, ids in enumerate(sets):
        r[i, ids] = 0.0  # score 0: the best, tied
    for alpha in (0.0, 0.5, 1.0):
        got = aad_select(a, r, alpha, backend=backend)
        assert got.tolist() == [ids[0] for ids in sets]
    got = mix_select(-r, a, 1.0, 0.0, backend=backend)  # z = -r: same ties
    assert got.tolist() == [ids[0] for ids in sets]


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_plus_inf_where_r_is_minus_inf(backend):
    v = 30000
    a, r = randn(3, v, 12), randn(3, v, 13)
    ids = [[20001], [29000, 4097], []]
    for i, row in enumerate(ids):
        a[i, row] = a[i].max() - 0.5  # candidates at alpha = 0.1, not the maximum
        r[i, row] = NINF  # score +inf
    r[2, a[2].argmin()] = NINF  # the worst a: not a candidate at alpha = 0.1
    got = aad_select(a, r, 0.1, backend=backend)
    assert_ids(got, ref_contrastive(a, r, 0.1, 1.0))
    assert int(got[0]) == 20001 and int(got[1]) == 4097  # two +inf scores: the lower id
    assert int(got[2]) != int(a[2].argmin())
    assert int(aad_select(a, r, 0.0, backend=backend)[2]) == int(a[2].argmin())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_candidates_score_minus_inf_still_chosen(backend):
    """A candidate scoring -inf (r = +inf) beats "no candidate"; the lowest candidate id."""
    a, r = randn(2, 9000, 14), torch.full((2, 9000), math.inf)
    got = aad_select(a, r, 0.1, backend=backend)
    assert_ids(got, ref_contrastive(a, r, 0.1, 1.0))
    cand = a >= a.amax(1, keepdim=True) + math.log(0.1)
    assert got.tolist() == cand.int().argmax(1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logits_in_a(backend):
    """a = +inf: M = +inf, only the +inf tokens are candidates; inf - inf scores are NaN."""
    a, r = randn(3, 5000, 15), randn(3, 5000, 16)
    a[0, [100, 4000]] = math.inf
    a[1, [10, 20]] = math.inf
    r[1, 10] = math.inf  # score NaN counts as -inf: id 20 wins
    a[2, 30] = math.inf
    r[2, 30] = math.inf  # the only candidate scores NaN: still chosen
    for alpha in (0.0, 0.1, 1.0):
        got = aad_select(a, r, alpha, backend=backend)
        assert_ids(got, ref_contrastive(a, r, alpha, 1.0))
        assert got[:2].tolist() == [100, 20]  # row 0: two scores +inf, the lower id
        if alpha > 0:  # else every finite token is a candidate too and id 30 scores NaN
            assert int(got[2]) == 30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("va,vr", [(1000, 1200), (1200, 1000), (70000, 66000)])
def test_different_vocabularies(backend, va, vr):
    a, r = randn(3, va, 17), randn(3, vr, 18)
    v = min(va, vr)
    a[:, v:] = 100.0  # beyond the shared vocabulary: never chosen
    r[:, v:] = -100.0
    got = aad_select(a, r, 0.1, backend=backend)
    assert_ids(got, ref_contrastive(a, r, 0.1, 1.0, v))
    assert bool((got < v).all())
    spec_contrastive_check(got, a, r, 0.1, 1.0, v)
    assert_ids(mix_select(a, r, 2.0, -1.0, backend=backend), ref_mix_greedy(a, r, 2.0, -1.0, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_limit(backend):
    a, r = randn(4, 32128, 19), randn(4, 32128, 20)
    a[:, 32000:] = 50.0  # padding rows of an embedding: the max would be there
    r[:, 32000:] = -50.0
    got = aad_select(a, r, 0.1, vocab_size=32000, backend=backend)
    assert bool((got < 32000).all())
    assert_ids(got, ref_contrastive(a, r, 0.1, 1.0, 32000))
    spec_contrastive_check(got, a, r, 0.1, 1.0, 32000)
    assert bool((aad_select(a, r, 0.1, backend=backend) >= 32000).all())
    got = mix_select(a, r, 4.0, -3.0, vocab_size=32000, backend=backend)
    assert_ids(got, ref_mix_greedy(a, r, 4.0, -3.0, 32000))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(backend, dtype):
    b, t, v = 3, 5, 20011
    g = torch.Generator().manual_seed(21)
    seq_a = (torch.randn(b, t, v + 7, generator=g) * 3).to(dtype)
    seq_r = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    cases = {
        "last position": (seq_a[:, -1], seq_r[:, -1]),  # row stride t*V, column stride 1
        "transposed": (randn(v, b, 22, dtype).t(), randn(v, b, 23, dtype).t()),  # column stride b
        "every other column": (seq_a[:, 1, ::2], seq_r[:, 2, 1::2]),
        "mixed": (seq_a[:, 0], randn(v, b, 24, dtype).t()),
    }
    for name, (a, r) in cases.items():
        assert not a.is_contiguous() or not r.is_contiguous(), name
        for got, want in (
                (aad_select(a, r, 0.1, backend=backend), ref_contrastive(a, r, 0.1, 1.0)),
                (contrastive_select(a, r, 0.05, 0.7, backend=backend),
                 ref_contrastive(a, r, 0.05, 0.7)),
                (mix_select(a, r, 1.5, -0.5, backend=backend), ref_mix_greedy(a, r, 1.5, -0.5))):
            assert_ids(got, want)
            # the same choice as on contiguous copies
        assert_ids(aad_select(a, r, 0.1, backend=backend),
                   aad_select(a.contiguous(), r.contiguous(), 0.1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
def test_contrastive_beta(backend, beta):
    a, r = sprinkle(randn(5, 40000, 25), 26, 0.01), randn(5, 40000, 27)
    got = contrastive_select(a, r, 0.1, beta, backend=backend)
    assert_ids(got, ref_contrastive(a, r, 0.1, beta))
    a_clean, r_clean = randn(5, 40000, 25), randn(5, 40000, 27)
    got = contrastive_select(a_clean, r_clean, 0.1, beta, backend=backend)
    spec_contrastive_check(got, a_clean, r_clean, 0.1, beta)
    if beta == 0.0:  # la alone: the argmax of a
        assert torch.equal(got, a_clean.argmax(1))
    if beta == 1.0:
        assert torch.equal(got, aad_select(a_clean, r_clean, 0.1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_a,w_r", [(4.0, -3.0), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0),
                                     (3.0, -2.0), (-1.0, 2.0)],
                         ids=["EFT4", "DeRa.5", "a-only", "r-only", "DeRa3", "neg-w_a"])
def test_mix_greedy(backend, w_a, w_r):
    a, r = randn(6, 32000, 28), randn(6, 32000, 29)
    got = mix_select(a, r, w_a, w_r, backend=backend)
    assert_ids(got, ref_mix_greedy(a, r, w_a, w_r))
    # SPEC: argmax of w_a*la + w_r*lr in float64
    z = w_a * a.double().log_softmax(1) + w_r * r.double().log_softmax(1)
    assert torch.equal(got, z.argmax(1))
    a2, r2 = sprinkle(a, 30), sprinkle(r, 31, values=(NINF, math.nan, math.inf))
    assert_ids(mix_select(a2, r2, w_a, w_r, backend=backend), ref_mix_greedy(a2, r2, w_a, w_r))


# ---------------------------------------------------------------------------------------------
# Sampling.


def probs64(a, r, w_a, w_r, temperature):
    z = (w_a * a.double() + w_r * r.double()) / temperature
    return z.softmax(-1)


FREQ_A = torch.tensor([[1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.5, -1.0]])
FREQ_R = torch.tensor([[0.3, -0.2, 1.2, 0.0, 0.1, -1.0, 0.4, 0.0]])
CHI2_7DF_1E4 = 29.88  # the 1 - 1e-4 quantile of chi-square with 7 degrees of freedom


def assert_frequencies(ids, p):
    """Pearson chi-square of the counts of V=8 tokens against p at significance 1e-4 (every
    expected count is >= 5 at the sizes used), and per token |count - N p| <= 4.5 sd."""
    n = ids.numel()
    counts = torch.bincount(ids, minlength=8).double()
    assert int(counts.sum()) == n and counts.numel() == 8
    assert bool((n * p >= 5).all())
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < CHI2_7DF_1E4, (chi2, counts.tolist(), (n * p).tolist())
    sd = (n * p * (1 - p)).sqrt()
    assert bool(((counts - n * p).abs() <= 4.5 * sd).all()), (counts, n * p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_frequencies_match_the_distribution(backend):
    """Samples over many seeds follow softmax(z/T) (min p 0.0086). Deterministic: fixed seeds
    and counter-based noise, so this either always passes or always fails."""
    w_a, w_r, temp = 1.5, -0.5, 0.8
    p = probs64(FREQ_A, FREQ_R, w_a, w_r, temp)[0]
    # the interpreter runs one Python program per row: fewer rows, the same test
    n, steps = (700, (123456789,)) if backend == "triton" else (20000, (0, 123456789))
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 13
    for step in steps:
        ids = mix_select(FREQ_A.expand(n, 8), FREQ_R.expand(n, 8), w_a, w_r, temperature=temp,
                         seed=seeds, step=torch.tensor(step), backend=backend)
        assert_frequencies(ids, p)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_sampling_frequencies_over_steps(backend):
    """One seed, 1000 steps: the step counter gives fresh noise each step. (The Triton
    backend's noise per seed and step is checked against the reference's elsewhere.)"""
    w_a, w_r, temp = 1.5, -0.5, 0.8
    p = probs64(FREQ_A, FREQ_R, w_a, w_r, temp)[0]
    ids = torch.cat([mix_select(FREQ_A, FREQ_R, w_a, w_r, temperature=temp, seed=5,
                                step=torch.tensor(s), backend=backend) for s in range(1000)])
    assert_frequencies(ids, p)


def assert_same_samples(got, want, z, noise):
    """Sampled ids equal; a backend whose float32 log differs from PyTorch's by an ulp (the
    Triton interpreter, GPU libdevice) may pick the other of two tokens whose perturbed scores
    ``z + g`` are within a few ulps of each other, and nothing else."""
    for i in (got != want).nonzero().flatten().tolist():
        gi, wi = int(got[i]), int(want[i])
        assert gi >= 0 and wi >= 0, (i, gi, wi)
        sg, sw = (z[i, gi] + noise[i, gi]).item(), (z[i, wi] + noise[i, wi]).item()
        assert abs(sg - sw) <= 4 * EPS32 * max(abs(sg), abs(sw), 1.0), (i, gi, wi, sg, sw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(), dict(top_k=5), dict(top_p=0.7), dict(min_p=0.05),
                                     dict(top_k=50, top_p=0.9, min_p=0.02), dict(top_k=1)],
                         ids=["plain", "top_k", "top_p", "min_p", "all", "top_k1"])
def test_sampling_filters_explicit(backend, filters):
    """Every sample is the Gumbel-max over the filtered set, where the filters are computed
    here from their definitions (top-k: z at least the k-th largest; top-p: the smallest
    prefix of the sorted distribution with mass >= top_p; min-p: p >= min_p * max p)."""
    b, v = 16, 2000
    a, r = randn(b, v, 40, scale=2.0), randn(b, v, 41, scale=2.0)
    w_a, w_r, temp = 2.0, -1.0, 0.9
    seeds = torch.arange(b, dtype=torch.int64) + 1000
    step = torch.tensor(7)
    got = mix_select(a, r, w_a, w_r, temperature=temp, seed=seeds, step=step, backend=backend,
                     **filters)
    ca, cr = w_a / temp, w_r / temp
    z = linear2(a, r, ca, cr)  # float32, as the ops compute it
    keep = torch.ones(b, v, dtype=torch.bool)
    top_k, top_p, min_p = filters.get("top_k", 0), filters.get("top_p", 1.0), filters.get(
        "min_p", 0.0)
    if top_k:
        kth = z.sort(1, descending=True).values[:, top_k - 1]
        keep &= z >= kth[:, None]
    if top_p < 1.0:
        zk = torch.where(keep, z.double(), torch.tensor(NINF, dtype=torch.float64))
        p = zk.softmax(1)
        order = p.argsort(1, descending=True)
        mass_above = p.gather(1, order).cumsum(1) - p.gather(1, order)
        # away from the boundary, so float32 and float64 agree on who is in
        assert bool(((mass_above - top_p).abs() > 1e-5).all())
        keep_sorted = mass_above < top_p
        keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
    t = torch.full((b,), NINF, dtype=torch.float64)
    tol = torch.zeros(b, dtype=torch.float64)
    if min_p > 0:  # p_v >= min_p * max p  <=>  z_v >= max z + ln(min_p)
        t = z.amax(1).double() + math.log(min_p)
        tol = EPS32 * (t.abs() + abs(math.log(min_p)))  # float32 ln(min_p) and sum
    noise = gumbel_noise(seeds, step, v)
    m = torch.where(keep, z.double(), torch.tensor(NINF, dtype=torch.float64))
    allowed = spec_argmax(m, (z + noise).double(), t, tol)
    # the reference path (mix_floor + select_ref) follows the explicit definition ...
    floor = mix_floor(a, r, v, ca, cr, top_k, top_p) if (top_k or top_p < 1.0) else full(b, NINF)
    ref = select_ref(a, r, v, ca, cr, ca, cr, full(b, math.log(min_p) if min_p else NINF),
                     floor, seeds, step)
    for i, ok in enumerate(allowed):
        assert int(ref[i]) in ok, (i, int(ref[i]), sorted(ok)[:8])
    # ... and the backend follows the reference
    assert_same_samples(got, ref, z, noise)
    if top_k == 1:
        assert torch.equal(got, z.argmax(1))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_sampling_never_draws_a_negligible_token(backend):
    """One token holds all but ~1e-12 of the mass: 1000 draws must all be that token (the noise's
    uniform is strictly below 1, so no token gets +inf noise)."""
    v = 151936
    a = torch.full((100, v), -20.0)
    a[:, 0] = 20.0
    r = torch.zeros(100, v)
    for call in range(10):
        seeds = torch.arange(100, dtype=torch.int64) + 100 * call
        ids = mix_select(a, r, 1.0, 0.0, temperature=1.0, seed=seeds, step=torch.tensor(0),
                         backend=backend)
        assert ids.eq(0).all(), (call, ids[ids != 0].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducibility(backend):
    a, r = randn(8, 5000, 42), randn(8, 5000, 43)
    kw = dict(temperature=1.0, top_p=0.95, backend=backend)
    x = mix_select(a, r, 1.0, 0.0, seed=123, step=torch.tensor(4), **kw)
    y = mix_select(a, r, 1.0, 0.0, seed=123, step=torch.tensor(4), **kw)
    assert torch.equal(x, y)
    seeds = torch.full((8,), 123, dtype=torch.int64)
    assert torch.equal(x, mix_select(a, r, 1.0, 0.0, seed=seeds, step=torch.tensor(4), **kw))
    # rows with equal logits and seed sample the same token; other steps and seeds differ
    same = mix_select(a[:1].expand(8, -1), r[:1].expand(8, -1), 1.0, 0.0, seed=seeds,
                      step=torch.tensor(4), **kw)
    assert len(set(same.tolist())) == 1
    outs = {tuple(mix_select(a, r, 1.0, 0.0, seed=123, step=torch.tensor(s), **kw).tolist())
            for s in range(6)}
    assert len(outs) == 6
    outs = {tuple(mix_select(a, r, 1.0, 0.0, seed=sd, step=torch.tensor(0), **kw).tolist())
            for sd in range(6)}
    assert len(outs) == 6
    # a torch.Generator seeds the draw when no seed is given
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(mix_select(a, r, 1.0, 0.0, generator=g1, **kw),
                       mix_select(a, r, 1.0, 0.0, generator=g2, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampling_matches_reference(backend, dtype):
    b, v = rows_for(backend, 8), 50257
    a, r = sprinkle(randn(b, v, 44, dtype), 45, 0.01), randn(b, v, 46, dtype)
    seeds = torch.arange(b, dtype=torch.int64) * 3 - 5  # negative seeds wrap mod 2**32
    step = torch.tensor(2**33 + 3)
    for kw in (dict(temperature=0.7), dict(temperature=1.3, min_p=0.1, top_k=40)):
        got = mix_select(a, r, 1.2, -0.2, seed=seeds, step=step, backend=backend, **kw)
        ca, cr = 1.2 / kw["temperature"], -0.2 / kw["temperature"]
        floor = mix_floor(a, r, v, ca, cr, kw.get("top_k", 0), 1.0) if "top_k" in kw else full(
            b, NINF)
        lr = full(b, math.log(kw["min_p"]) if "min_p" in kw else NINF)
        want = select_ref(a, r, v, ca, cr, ca, cr, lr, floor, seeds, step)
        assert_same_samples(got, want, linear2(a.float(), r.float(), ca, cr),
                            gumbel_noise(seeds, step, v))


def test_cpp_noise_is_the_reference_noise():
    """The C++ Gumbel noise equals reference.gumbel_noise bit for bit (hash and float32 log)."""
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    ops = pytest.importorskip("aad_fast.backends").load_cpp()
    seed = torch.tensor([0, 1, -7, 2**40 + 3])
    step = torch.tensor(2**35 + 11)
    got = ops.gumbel_noise(seed, step, 1 << 20)
    want = gumbel_noise(seed, step, 1 << 20)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Property test.


@st.composite
def logit_pairs(draw):
    """Logits of any size up to a few chunks, any dtype, with -inf/NaN/+inf at drawn rates and,
    when ``levels`` is drawn, values rounded to a few levels so that exact ties are common."""
    b = draw(st.integers(1, 3))
    va, vr = draw(st.integers(1, 20000)), draw(st.integers(1, 20000))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 10.0, 1e4]))
    levels = draw(st.sampled_from([None, 1, 4]))
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in (va, vr):
        x = torch.randn(b, v, generator=g) * scale
        if levels is not None:
            x = (x / scale * levels).round()
        for val in (NINF, math.nan, math.inf):
            frac = draw(st.sampled_from([0.0, 0.0, 0.001, 0.3, 1.0]))
            x[torch.rand(b, v, generator=g) < frac] = val
        out.append(x.to(dtype))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=logit_pairs(), alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
       beta=st.floats(0.0, 4.0), w=st.tuples(st.floats(-3, 4), st.floats(-3, 4)),
       transpose=st.booleans(), limit=st.one_of(st.none(), st.integers(1, 20000)))
def test_property_every_rule_matches_reference(backend, pair, alpha, beta, w, transpose, limit):
    a, r = pair
    if transpose:  # column stride = batch
        a, r = a.t().contiguous().t(), r.t().contiguous().t()
    vocab = min(a.shape[1], r.shape[1], limit or a.shape[1])
    got = contrastive_select(a, r, alpha, beta, vocab_size=limit, backend=backend)
    assert_ids(got, ref_contrastive(a, r, alpha, beta, vocab))
    if w != (0.0, 0.0):
        got = mix_select(a, r, *w, vocab_size=limit, backend=backend)
        assert_ids(got, ref_mix_greedy(a, r, *w, vocab))


# ---------------------------------------------------------------------------------------------
# Beam step.


def spec_beam(a, r, alpha, k, tau, vocab):
    """SPEC BeamAAD quantities in float64, by loops over each row's candidates."""
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


def assert_beam_matches(got, a, r, vocab, log_alpha, k, tau):
    """``got`` equals ``aad_topk_ref`` bitwise, except the entropy (within ``entropy_tol``) and,
    on a row whose reference entropy is within that tolerance of ``tau``, the other side of
    ``H <= tau`` (the scores and ids of the reference run with tau just past that entropy)."""
    want = aad_topk_ref(a, r, vocab, log_alpha, k, tau)
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
        alt = aad_topk_ref(a[i:i + 1], r[i:i + 1], vocab, log_alpha[i:i + 1], k, other)
        assert torch.equal(scores[i], alt[0][0]) and torch.equal(ids[i], alt[1][0]), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [None, 0.5, 100.0])
@pytest.mark.parametrize("k", [1, 4, 40])
def test_beam_topk_against_spec(backend, k, tau):
    a, r = randn(4, 3000, 50), randn(4, 3000, 51)
    a[3] = torch.linspace(0, 1, 3000)  # flat: every token is a candidate
    got = aad_beam_topk(a, r, 0.1, k, tau=tau, backend=backend)
    assert_beam_matches(got, a, r, 3000, log_alpha(0.1, 4), k, tau)
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
        assert_beam_matches(got, a, r, v, log_alpha(alpha, b), k, tau)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_topk_tau_at_the_entropy(backend):
    """tau equal to a row's reference entropy: that row may take either side, nothing else."""
    a, r = randn(3, 2000, 59), randn(3, 2000, 60)
    lg = log_alpha(0.05, 3)
    h = aad_topk_ref(a, r, 2000, lg, 5)[3]
    for i in range(3):
        tau = h[i].item()
        got = aad_beam_topk(a, r, 0.05, 5, tau=tau, backend=backend)
        assert_beam_matches(got, a, r, 2000, lg, 5, tau)


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
    assert_beam_matches(got, a, r, 2000, lg, 5, h0)
    got[1][1] = got[1][1].flip(0)  # a wrong order on row 1
    with pytest.raises(AssertionError):
        assert_beam_matches(got, a, r, 2000, lg, 5, h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_topk_top1_is_aad_and_pads(backend):
    a, r = randn(5, 7000, 52), randn(5, 7000, 53)
    _, ids, n_cand, _, _ = aad_beam_topk(a, r, 0.1, 1, backend=backend)
    assert torch.equal(ids[:, 0], aad_select(a, r, 0.1, backend=backend))  # SPEC
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
    assert_beam_matches(got, a, r, 100, log_alpha(0.5, 4), 4, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_beam_topk_strides_and_vocab_size(backend, dtype):
    seq = (torch.randn(2, 3, 4001, generator=torch.Generator().manual_seed(54)) * 3).to(dtype)
    cases = [(seq[:, -1], seq[:, 0]), (randn(4001, 2, 61, dtype).t(), seq[:, 1])]
    for a, r in cases:
        got = aad_beam_topk(a, r, 0.2, 6, tau=1.0, vocab_size=4000, backend=backend)
        assert_beam_matches(got, a.contiguous(), r.contiguous(), 4000, log_alpha(0.2, 2), 6, 1.0)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument.


A2, R2 = torch.randn(2, 10), torch.randn(2, 10)
BAD_CALLS = [
    ("alpha", lambda: aad_select(A2, R2, 1.5)),
    ("alpha", lambda: aad_select(A2, R2, -0.1)),
    ("alpha", lambda: aad_select(A2, R2, math.nan)),
    ("alpha", lambda: aad_select(A2, R2, torch.tensor([0.1, 1.2]))),
    ("alpha", lambda: aad_select(A2, R2, torch.tensor([0.1, 0.2, 0.3]))),
    ("alpha", lambda: aad_beam_topk(A2, R2, 2.0, 2)),
    ("batch", lambda: aad_select(A2, torch.randn(3, 10))),
    ("logits_a", lambda: aad_select(torch.randn(2, 1, 10), R2)),
    ("logits_r", lambda: aad_select(A2, torch.randn(10))),
    ("logits_a", lambda: aad_select(A2.long(), R2)),
    ("logits_r", lambda: contrastive_select(A2, R2.int(), 0.1, 1.0)),
    ("logits_a", lambda: mix_select(A2.bool(), R2, 1.0, 0.0)),
    ("logits_a", lambda: aad_select(A2[:, :0], R2)),
    ("beta", lambda: contrastive_select(A2, R2, 0.1, -1.0)),
    ("temperature", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=-0.5)),
    ("temperature", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=math.inf)),
    ("top_p", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, top_p=0.0)),
    ("top_p", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, top_p=1.5)),
    ("min_p", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, min_p=-0.1)),
    ("min_p", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, min_p=1.1)),
    ("top_k", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, top_k=-1)),
    ("top_k", lambda: mix_select(A2, R2, 1.0, 0.0, temperature=1.0, top_k=2.5)),
    ("w_a", lambda: mix_select(A2, R2, math.nan, 0.0)),
    ("w_a and w_r", lambda: mix_select(A2, R2, 0.0, 0.0)),
    ("vocab_size", lambda: aad_select(A2, R2, vocab_size=0)),
    ("k", lambda: aad_beam_topk(A2, R2, 0.1, 0)),
    ("tau", lambda: aad_beam_topk(A2, R2, 0.1, 2, tau=-1.0)),
    ("backend", lambda: aad_beam_topk(A2, R2, 0.1, 2, backend="nope")),
    ("backend", lambda: aad_select(A2, R2, backend="nope")),
    ("backend", lambda: aad_select(A2, R2, backend="cuda")),  # CPU tensors
    ("backend", lambda: mix_select(A2, R2, 1.0, 0.0, backend="fast")),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[f"{n}-{i}" for i, (n, _) in
                                                       enumerate(BAD_CALLS)])
def test_bad_input_raises_value_error_naming_it(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_cpp_op_checks_its_arguments():
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    from aad_fast.backends import load_cpp
    op = load_cpp().select
    lr, fl = full(2, NINF), full(2, NINF)
    with pytest.raises(RuntimeError, match="different batch sizes"):
        op(A2, torch.randn(3, 10), 10, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="vocab must be in"):
        op(A2, R2, 11, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(A2.double(), R2, 10, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="seed and step"):
        op(A2, R2, 10, 1.0, 0.0, 1.0, -1.0, lr, fl, torch.zeros(2, dtype=torch.int64), None)
    with pytest.raises(RuntimeError, match="log_rel must have shape"):
        op(A2, R2, 10, 1.0, 0.0, 1.0, -1.0, full(3, 0.0), fl, None, None)
    meta = op(A2.to("meta"), R2.to("meta"), 10, 1.0, 0.0, 1.0, -1.0, lr.to("meta"),
              fl.to("meta"), None, None)
    assert meta.shape == (2,) and meta.dtype == torch.int64


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
