"""``mix_select``: greedy mixes (EFT, DeRa, CFG weights) and sampling with temperature, top-k,
top-p and min-p, against the reference and docs/rules.md on every CPU backend; the counter-based
Gumbel noise, its seeds and steps, and the sample frequencies it gives."""
import math

import pytest
import torch
from _ops_helpers import (BACKENDS, DTYPES, EPS32, FILTER_NUMPY_WARNINGS, NINF, assert_ids,
                          full, randn, ref_mix_greedy, rows_for, spec_argmax, sprinkle)

from aad_fast import mix_select
from aad_fast.ops import mix_floor
from aad_fast.ops.reference import gumbel_noise, linear2, select_ref

pytestmark = FILTER_NUMPY_WARNINGS


# ---------------------------------------------------------------------------------------------
# Greedy mix.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_a,w_r", [(4.0, -3.0), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0),
                                     (3.0, -2.0), (-1.0, 2.0)],
                         ids=["EFT4", "DeRa.5", "a-only", "r-only", "DeRa3", "neg-w_a"])
def test_mix_greedy(backend, w_a, w_r):
    a, r = randn(6, 32000, 28), randn(6, 32000, 29)
    got = mix_select(a, r, w_a, w_r, backend=backend)
    assert_ids(got, ref_mix_greedy(a, r, w_a, w_r))
    # docs/rules.md: argmax of w_a*la + w_r*lr in float64
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


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("torch", "triton")])
@pytest.mark.parametrize("seed,step", [(0, 0), (-7, 2**35 + 11), (2**40 + 3, 1)])
def test_backend_noise_is_the_reference_noise_bit_for_bit(backend, seed, step):
    """The backend's Gumbel noise g equals ``reference.gumbel_noise`` at every id, read through
    the select op: with ``a = -g_ref`` the score ``a + g`` is exactly 0 everywhere iff the noise
    agrees. Row j keeps the ids ``>= j`` (mask ``m = r = id``, floor j), so it answers j exactly
    when no id ``>= j`` scores above 0 and id j does not score below 0: rows 0..V-1 together
    see a one-ulp difference at any id (but a rise at id 0 or a fall at id V-1). (Triton's
    interpreter rounds a float64 log instead, see test_kernels.py; the compiled kernel is checked
    on a GPU.)"""
    v = 2048
    sd, st = torch.full((v,), seed, dtype=torch.int64), torch.tensor(step)
    g = gumbel_noise(sd[:1], st, v)
    a = (-g).expand(v, v)
    r = torch.arange(v, dtype=torch.float32)[None, :].expand(v, v)
    floor = torch.arange(v, dtype=torch.float32)
    args = (v, 0.0, 1.0, 1.0, 0.0, full(v, NINF), floor, sd, st)
    assert_ids(select_ref(a, r, *args), torch.arange(v))
    from aad_fast.ops import select_core
    assert_ids(select_core(a, r, *args, backend), torch.arange(v))
