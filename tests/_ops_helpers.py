"""Shared helpers of the vocabulary-op tests (``test_ops.py``, ``test_ops_mix.py``,
``test_ops_beam.py``): backends, shapes, random logits, the reference calls the ops are
documented to make, and the docs/rules.md threshold check (``spec_argmax``)."""
import math

import pytest
import torch

from aad_fast import available_backends
from aad_fast.ops.reference import select_ref

BACKENDS = available_backends("cpu")
NINF = -math.inf
EPS32 = 2.0**-23
SHAPES = [(1, 1), (3, 423), (2, 50257), (1, 151936), (64, 32000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the Triton interpreter runs float ops in numpy, which warns on inf - inf (intended NaNs)
FILTER_NUMPY_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
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
    """Per row, the ids docs/rules.md allows: ``argmax_{v in K} s_v`` (NaN s = -inf, ties to the
    lowest id, -1 when K is empty) for some K with ``K_lo <= K <= K_hi``, where
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
        assert int(got[i]) in ok, (f"row {i}: got {int(got[i])}, docs/rules.md allows "
                                   f"{sorted(ok)[:8]}")



def spec_contrastive_check(got, a, r, alpha, beta, vocab=None):
    """docs/rules.md Contrastive in float64 log-softmax space, threshold rounding allowed."""
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
