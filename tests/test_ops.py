"""Public vocabulary ops (``aad_select``, ``contrastive_select``, greedy ``mix_select``) against
the reference, on every backend ``available_backends("cpu")`` lists (``torch``, ``cpp`` when the
extension is built, ``triton`` under ``TRITON_INTERPRET=1``), and their argument checks.
Sampling (``mix_select`` with a temperature) is in ``test_ops_mix.py``, the beam step
(``aad_beam_topk``) in ``test_ops_beam.py``, shared helpers in ``_ops_helpers.py``.

Two kinds of check:
- backend vs ``reference.select_ref`` with the arguments the op is documented to pass: token ids
  equal, exactly (the contract of every backend);
- op vs docs/rules.md written out independently in float64 log-softmax space: ids equal, except
  that a token within float32 rounding of the alpha / min-p threshold may fall on either side
  (``assert_threshold_choice`` says precisely which ids that allows).
"""
import math

import pytest
import torch
from _ops_helpers import (BACKENDS, DTYPES, FILTER_NUMPY_WARNINGS, NINF, SHAPES, assert_ids, full,
                          randn, ref_contrastive, ref_mix_greedy, rows_for, spec_argmax,
                          spec_contrastive_check, sprinkle)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aad_fast import aad_beam_topk, aad_select, contrastive_select, mix_select
from aad_fast.ops.reference import select_ref

pytestmark = FILTER_NUMPY_WARNINGS


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

# ---------------------------------------------------------------------------------------------
# Shapes x dtypes x backends, against the reference (exact) and docs/rules.md (float64).


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


def test_cpp_kernel_checks_its_invariants():
    """The C++ binding holds only the invariants its loops rely on (RuntimeError); the user-facing
    checks are ``ops.check_core``'s (below)."""
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    from aad_fast.ops.backends import load_cpp
    op = load_cpp().select
    lr, fl = full(2, NINF), full(2, NINF)
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        op(A2, torch.randn(3, 10), 10, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="vocab must be in"):
        op(A2, R2, 11, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        op(A2.double(), R2, 10, 1.0, 0.0, 1.0, -1.0, lr, fl, None, None)
    with pytest.raises(RuntimeError, match="seed and step"):
        op(A2, R2, 10, 1.0, 0.0, 1.0, -1.0, lr, fl, torch.zeros(2, dtype=torch.int64), None)
    with pytest.raises(RuntimeError, match="log_rel must be a CPU float tensor of shape"):
        op(A2, R2, 10, 1.0, 0.0, 1.0, -1.0, full(3, 0.0), fl, None, None)
    with pytest.raises(RuntimeError, match="log_alpha must be"):
        load_cpp().aad_topk(A2, R2, 10, full(3, 0.0), 2, None)
    meta = op(A2.to("meta"), R2.to("meta"), 10, 1.0, 0.0, 1.0, -1.0, lr.to("meta"),
              fl.to("meta"), None, None)
    assert meta.shape == (2,) and meta.dtype == torch.int64


CORE_ARGS = dict(a=A2, r=R2, vocab=10, ma=1.0, mr=0.0, sa=1.0, sr=-1.0, log_rel=full(2, -2.0),
                 floor=full(2, NINF), seed=None, step=None)
BAD_CORE = [
    ("a", dict(a=A2.long())),
    ("r", dict(r=R2[0])),
    ("batch sizes", dict(r=torch.randn(3, 10))),
    ("vocab", dict(vocab=11)),
    ("vocab", dict(vocab=0)),
    ("log_rel", dict(log_rel=full(3, 0.0))),
    ("log_rel", dict(log_rel=torch.zeros(2, dtype=torch.int64))),
    ("floor", dict(floor=torch.zeros(2, 1))),
    ("seed and step", dict(seed=torch.zeros(2, dtype=torch.int64))),
    ("seed", dict(seed=torch.zeros(2), step=torch.tensor(0))),
    ("seed", dict(seed=torch.zeros(3, dtype=torch.int64), step=torch.tensor(0))),
    ("step", dict(seed=torch.zeros(2, dtype=torch.int64), step=torch.zeros(2, dtype=torch.int64))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,bad", BAD_CORE,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_CORE)])
def test_core_arguments_checked_once_alike_on_every_backend(backend, name, bad):
    """Every backend refuses the same bad core arguments with the same ValueError (one check,
    ``ops.check_core``), before any kernel runs."""
    from aad_fast.ops import select_core
    kw = dict(CORE_ARGS, **bad)
    with pytest.raises(ValueError, match=name):
        select_core(*kw.values(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_broadcasts_one_element_row_arguments_on_every_backend(backend):
    """A one-element ``log_rel`` / ``floor`` / ``seed`` means the same value on every row, on every
    backend (the C++ binding used to refuse it while CUDA and Triton accepted it)."""
    from aad_fast.ops import select_core
    b, v = 3, 700
    a, r = randn(b, v, 90), randn(b, v, 91)
    seed, step = torch.full((b,), 17, dtype=torch.int64), torch.tensor(5)
    for coef, noise in (((1.0, 0.0, 1.0, -1.0), False), ((0.8, 0.2, 0.8, 0.2), True)):
        want = select_ref(a, r, v, *coef, full(b, -2.0), full(b, -4.0),
                          seed if noise else None, step if noise else None)
        got = select_core(a, r, v, *coef, torch.tensor([-2.0]), torch.tensor([-4.0]),
                          seed[:1] if noise else None, step if noise else None, backend)
        assert_ids(got, want)


def test_an_extension_that_registers_no_kernel_is_refused(monkeypatch):
    """A C++ extension built from other sources (a stale ``_C``) loads but gives
    ``aad_fast::select_native`` no CPU kernel: ``load_cpp`` refuses it with a warning, so the
    default backend falls back instead of failing at the first call."""
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    from aad_fast.ops import backends
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.warns(UserWarning, match="registers no CPU kernel of aad_fast::select_native"):
        assert backends.load_cpp.__wrapped__() is None
    monkeypatch.undo()
    assert backends.load_cpp.__wrapped__() is not None
