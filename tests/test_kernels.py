"""Internals of the Triton selection kernel (``kernels/select.py``) and its CUDA C++ twin.

CPU part (``TRITON_INTERPRET=1``): tiny forced chunk sizes so that the multi-chunk combine and
the fix-up both run, ties across chunk boundaries, -inf/NaN, strides, dtypes, noise; every
choice compared exactly with ``reference.select_ref``. GPU part (``-m gpu``): compiled Triton and
the ``aad_fast._cuda`` extension against the reference on CUDA tensors, and CUDA-graph replay.
The backend-generic op tests live in ``test_ops.py``, ``test_ops_mix.py`` and ``test_ops_beam.py``.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aad_fast.ops.reference import gumbel_noise, linear2, select_ref

triton = pytest.importorskip("triton", reason="Triton is not installed")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from aad_fast.kernels import select as tsel  # noqa: E402  (after the skip: needs Triton)

NINF = -math.inf
AAD = (1.0, 0.0, 1.0, -1.0)
interp_only = pytest.mark.skipif(not INTERPRETED, reason="CPU tests need TRITON_INTERPRET=1")
# the interpreter runs float ops in numpy, which warns on inf - inf and the like (the NaNs are
# intended: they are part of what the kernels must handle)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def rows(b, value, device="cpu"):
    return torch.full((b,), value, dtype=torch.float32, device=device)


def check(a, r, vocab, coef, log_rel, floor, seed=None, step=None, block=None):
    """Kernel result == reference, exactly; returns the ids."""
    want = select_ref(a, r, vocab, *coef, log_rel, floor, seed, step)
    got = tsel.launch(a, r, vocab, *coef, log_rel, floor, seed, step, block=block)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), (got.tolist(), want.tolist())
    return got


def fixups(a, r, vocab, coef, log_rel, floor, block, seed=None, step=None):
    """Mirror in torch of which chunks the fix-up kernel rescans, as ``(row, chunk)`` lists:
    ``"local"``: one-pass rules (the score reads no stream the mask does not) where the chunk's
    best local candidate (``m >= max(floor, chunk_max + log_rel)``) falls below the row threshold
    ``t`` while the chunk still holds a candidate; ``"scan"``: mask-first rules (AAD: ``m = a``),
    every chunk holding a candidate. Rows with ``log_rel = -inf`` are exact in the first pass."""
    ma, mr, sa, sr = coef
    one_pass = (sa == 0 or ma != 0) and (sr == 0 or mr != 0)
    m = linear2(a[:, :vocab].float(), r[:, :vocab].float(), ma, mr)
    s = linear2(a[:, :vocab].float(), r[:, :vocab].float(), sa, sr)
    if seed is not None:
        s = s + gumbel_noise(seed, step, vocab)
    m = torch.where(torch.isnan(m), torch.tensor(NINF), m)
    s = torch.where(torch.isnan(s), torch.tensor(NINF), s)
    out = {"local": [], "scan": []}
    for b in range(m.shape[0]):
        if float(log_rel[b]) == NINF:
            continue
        t = max(float(floor[b]), float(m[b].max() + log_rel[b]))
        for c0 in range(0, vocab, block):
            mc, sc = m[b, c0:c0 + block], s[b, c0:c0 + block]
            cmax = float(mc.max())
            if cmax == NINF or not cmax >= t:
                continue
            if not one_pass:
                out["scan"].append((b, c0 // block))
                continue
            loc = (mc > NINF) & (mc >= max(float(floor[b]), cmax + float(log_rel[b])))
            best = int(torch.where(loc, sc, torch.tensor(NINF)).argmax())
            if float(mc[best]) < t:
                out["local"].append((b, c0 // block))
    return out


# ---------------------------------------------------------------------------------------------
# Interpreter tests: exact agreement with the reference on the paths inside the kernels.

ONE_PASS = (1.0, 0.5, 1.0, -1.0)  # m = a + r/2 reads both streams: the one-pass path


def local_trap_case():
    """Three chunks of 16 with the one-pass rule ``m = a + r/2, s = a - r``, ``alpha = 0.1``:
    the global max M = 0 is token 0, so ``t = ln 0.1 = -2.30``; in chunk 1 (max -1) token 25
    (m = -3, s = 9) is the best local candidate (-3 >= -1 + ln 0.1) but not a candidate, while
    token 20 (m = -1, s = 5) is one, and the answer; chunk 2 holds token 40 (m = -2, s = -2)."""
    a = torch.full((1, 48), -50.0)
    r = torch.zeros((1, 48))
    a[0, 0] = 0.0
    a[0, 20], r[0, 20] = 1.0, -4.0
    a[0, 25], r[0, 25] = 1.0, -8.0
    a[0, 40] = -2.0
    return a, r


def aad_trap_case():
    """The same trap for AAD (``m = a``, ``s = a - r``), which reads ``a`` first and then scans
    the chunks holding candidates: token 20 (a = -1, s = 4) beats token 25 (a = -3, s = 7, no
    candidate), token 0 (s = 0) and token 40 (s = -2)."""
    a = torch.full((1, 48), -50.0)
    r = torch.zeros((1, 48))
    a[0, 0] = 0.0
    a[0, 20], r[0, 20] = -1.0, -5.0
    a[0, 25], r[0, 25] = -3.0, -10.0
    a[0, 40] = -2.0
    return a, r


@interp_only
def test_local_candidate_trap_is_fixed_up():
    lr, fl = rows(1, math.log(0.1)), rows(1, NINF)
    a, r = local_trap_case()
    assert fixups(a, r, 48, ONE_PASS, lr, fl, 16) == {"local": [(0, 1)], "scan": []}
    assert check(a, r, 48, ONE_PASS, lr, fl, block=16).tolist() == [20]
    a, r = aad_trap_case()
    assert fixups(a, r, 48, AAD, lr, fl, 16) == {"local": [], "scan": [(0, 0), (0, 1), (0, 2)]}
    assert check(a, r, 48, AAD, lr, fl, block=16).tolist() == [20]
    # the same rows in a batch next to rows that need no fix-up, at several chunk sizes
    for coef, (a, r) in ((ONE_PASS, local_trap_case()), (AAD, aad_trap_case())):
        a2 = torch.cat([a, torch.randn(2, 48), a.flip(1)])
        r2 = torch.cat([r, torch.randn(2, 48), r.flip(1)])
        for block in (16, 32, 64):
            check(a2, r2, 48, coef, rows(4, math.log(0.1)), rows(4, NINF), block=block)


@interp_only
def test_fixed_up_chunk_ties_with_exact_chunk():
    # the fixed-up chunk's answer ties with another chunk's best: the lower id must win
    lr, fl = rows(1, math.log(0.1)), rows(1, NINF)
    a, r = local_trap_case()
    a[0, 40], r[0, 40] = 1.0, -4.0     # m = -1, s = 5: same as token 20
    assert fixups(a, r, 48, ONE_PASS, lr, fl, 16)["local"] == [(0, 1)]
    assert check(a, r, 48, ONE_PASS, lr, fl, block=16).tolist() == [20]
    a, r = a.flip(1), r.flip(1)        # now the chunk that needs no fix-up holds the lower id
    assert fixups(a, r, 48, ONE_PASS, lr, fl, 16)["local"] == [(0, 1)]
    assert check(a, r, 48, ONE_PASS, lr, fl, block=16).tolist() == [7]


@interp_only
@pytest.mark.parametrize("block", [16, 64])
def test_random_multi_chunk_rules(block):
    g = torch.Generator().manual_seed(block)
    b, v = 5, 301
    a = torch.randn(b, v, generator=g) * 4
    r = a + torch.randn(b, v, generator=g)   # correlated streams, like a DPO/SFT pair
    ninf = rows(b, NINF)
    lr = torch.log(torch.tensor([0.1, 0.5, 1.0, 0.0, 0.02]))
    check(a, r, v, AAD, lr, ninf, block=block)
    check(a, r, v, (1.0, 0.0, 1.0, -0.3), lr, ninf, block=block)      # contrastive beta 0.3
    check(a, r, v, (0.7, 0.3, 0.7, 0.3), ninf, ninf, block=block)     # mix greedy
    check(a, r, v, (4.0, -3.0, 4.0, -3.0), ninf, ninf, block=block)   # EFT(4)
    check(a, r, v, ONE_PASS, lr, ninf, block=block)
    fl = torch.tensor([0.0, 1.0, -2.0, 100.0, NINF])                  # a floor (top-k/top-p)
    check(a, r, v, (1 / 0.9, 0.0, 1 / 0.9, 0.0), lr, fl, block=block)
    check(a, r, v, (0.7, 0.3, 0.7, 0.3), ninf, fl, block=block)
    check(a, r, 250, AAD, lr, ninf, block=block)                      # vocab < width


@interp_only
def test_fuzz_against_reference_covers_both_fixups():
    g = torch.Generator().manual_seed(1234)
    seen = {"local": 0, "scan": 0}
    for case in range(48):
        b = int(torch.randint(1, 4, (1,), generator=g))
        v = int(torch.randint(1, 200, (1,), generator=g))
        block = 2 ** int(torch.randint(4, 7, (1,), generator=g))
        a = torch.randn(b, v, generator=g) * 3
        r = torch.randn(b, v, generator=g) * 3
        for x in (a, r):  # sprinkle specials
            k = torch.rand(b, v, generator=g)
            x[k < 0.05] = NINF
            x[(k >= 0.05) & (k < 0.08)] = math.nan
            x[(k >= 0.08) & (k < 0.09)] = math.inf
        a[:, ::7] = a[:, :1].clone()  # repeated values: ties inside and across chunks
        r[:, ::7] = r[:, :1].clone()
        alpha = [0.0, 0.05, 0.3, 1.0][case % 4]
        lr = rows(b, math.log(alpha) if alpha > 0 else NINF)
        fl = rows(b, NINF) if case % 3 else torch.randn(b, generator=g)
        coef = [AAD, (1.0, 0.0, 1.0, -0.5), (0.6, 0.4, 0.6, 0.4), (0.0, 1.0, 2.0, -1.0),
                ONE_PASS, (0.6, 0.4, 0.6, 0.4)][case % 6]
        seed = step = None
        if case % 6 == 5:  # Mix sampled: m = s - noise, the one-pass path with traps
            seed, step = torch.randint(-2**40, 2**40, (b,), generator=g), torch.tensor(case)
        for k, found in fixups(a, r, v, coef, lr, fl, block, seed, step).items():
            seen[k] += len(found)
        check(a, r, v, coef, lr, fl, seed, step, block=block)
    assert seen["local"] > 0 and seen["scan"] > 0, seen


@interp_only
def test_ties_across_chunk_boundaries():
    v = 64
    a = torch.zeros(3, v)
    r = torch.full((3, v), 5.0)
    r[0, 15] = r[0, 16] = 0.0    # equal best scores on both sides of the 16-boundary
    r[1, 31] = r[1, 48] = 0.0    # in chunk 1 and chunk 3
    r[2, 47] = r[2, 63] = -1.0   # best tied in the last chunk and the one before
    for block in (16, 32):
        got = check(a, r, v, AAD, rows(3, math.log(0.5)), rows(3, NINF), block=block)
        assert got.tolist() == [15, 31, 47]
    # -0.0 and +0.0 scores are equal: the lower id wins whichever sign it has
    a = torch.full((2, 32), -1.0)
    a[0, 20], a[0, 3] = -0.0, 0.0
    a[1, 3], a[1, 20] = -0.0, 0.0
    got = check(a, a, 32, (1.0, 0.0, 1.0, 0.0), rows(2, NINF), rows(2, -0.5), block=16)
    assert got.tolist() == [3, 3]


@interp_only
def test_infinities_nan_and_empty_rows():
    v = 40
    a = torch.randn(7, v)
    r = torch.randn(7, v)
    a[0] = NINF                              # all -inf: no candidate
    a[1] = math.nan                          # all NaN: no candidate
    a[2, :] = NINF; a[2, 33] = math.nan; a[2, 37] = 0.0   # one finite token, in the last chunk
    r[3] = math.nan                          # every score NaN: lowest-id candidate wins
    a[4, 5] = math.inf; a[4, 30] = math.inf  # M = +inf: only the +inf tokens are candidates
    r[5, 10] = NINF; r[5, 35] = NINF         # score +inf; tie between chunks
    a[5, 10] = a[5, 35] = a[5].max() + 1
    r[6] = math.inf                          # every score -inf, candidates exist
    lr, fl = rows(7, math.log(0.1)), rows(7, NINF)
    got = check(a, r, v, AAD, lr, fl, block=16)
    assert got[:2].tolist() == [-1, -1] and got[2] == 37 and got[4] == 5 and got[5] == 10
    assert got[6] == int((a[6] >= a[6].max() + math.log(0.1)).nonzero()[0, 0])
    # a floor above every finite m (row 4's +inf tokens stay); a NaN floor or a NaN log_rel
    # with a finite floor makes the threshold NaN: no candidate
    want = [-1] * 4 + [5] + [-1] * 2
    assert check(a, r, v, AAD, rows(7, NINF), rows(7, 1e9), block=16).tolist() == want
    assert check(a, r, v, AAD, lr, rows(7, math.nan), block=16).tolist() == [-1] * 7
    assert check(a, r, v, AAD, rows(7, math.nan), rows(7, 0.0), block=16).tolist() == [-1] * 7
    # a zero coefficient drops its term: 0 * inf must not make NaN
    a2 = torch.randn(2, v)
    a2[:, 7] = math.inf
    check(a2, r[:2], v, (0.0, 1.0, 0.0, 1.0), rows(2, NINF), rows(2, NINF), block=16)
    check(a2, r[:2], v, (0.0, 0.0, 0.0, 0.0), rows(2, NINF), rows(2, NINF), block=16)


@interp_only
@pytest.mark.parametrize("da,dr", [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float64, torch.float16)])
def test_dtypes(da, dr):
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(3, 423, generator=g) * 3).to(da)
    r = (torch.randn(3, 423, generator=g) * 3).to(dr)
    for block in (32, None):
        check(a, r, 423, AAD, rows(3, math.log(0.1)), rows(3, NINF), block=block)
        check(a, r, 423, (0.7, 0.3, 0.7, 0.3), rows(3, NINF), rows(3, NINF), block=block)


@interp_only
def test_strides_views_and_broadcast_rows():
    g = torch.Generator().manual_seed(3)
    b, v = 3, 100
    lr, fl = rows(b, math.log(0.2)), rows(b, NINF)
    base = torch.randn(b, 4, v + 9, generator=g)
    a = base[:, -1, :v]                                   # last position of [B, T, V]
    r = torch.randn(v, b, generator=g).t()                # column stride b
    check(a, r, v, AAD, lr, fl, block=16)
    check(r, a, v, AAD, lr, fl, block=32)
    e = torch.randn(1, v, generator=g).expand(b, v)       # row stride 0
    check(e, r, v, AAD, lr, fl, block=16)
    check(a[:, ::2], r[:, ::2], 50, AAD, lr, fl, block=16)  # column stride 2
    # one-element log_rel / floor broadcast over rows
    check(a, r, v, AAD, torch.tensor([math.log(0.2)]), torch.tensor(NINF), block=16)


@interp_only
def test_sampling_noise_matches_reference():
    # Hash, counter and u are bit-exact; the two logs are libdevice logf when compiled (PyTorch's
    # CUDA log) but, in the interpreter, a float64 log rounded to float32, which differs from
    # PyTorch's CPU log by an ulp on some inputs: the choices below are fixed data with no such
    # near-tie, compared exactly.
    g = torch.Generator().manual_seed(11)
    b, v = 4, 500
    a = torch.randn(b, v, generator=g) * 2
    r = torch.randn(b, v, generator=g) * 2
    seed = torch.tensor([0, 987654321, -5, 2**40 + 3])    # reduced mod 2**32 like the reference
    for step in (0, 17, 123457, 2**33 + 5):
        st = torch.tensor(step)
        check(a, r, v, (0.8, 0.2, 0.8, 0.2), rows(b, NINF), rows(b, NINF), seed, st, block=128)
        check(a, r, v, (1.25, 0.0, 1.25, 0.0), rows(b, math.log(0.05)), rows(b, -1.0),
              seed, st, block=64)
    # pure noise: the choice is the argmax of g itself, over many seeds and steps
    z = torch.zeros(8, 997)
    for step in range(3):
        check(z, z, 997, (0.0, 0.0, 0.0, 0.0), rows(8, NINF), rows(8, NINF),
              torch.arange(8) * 7919, torch.tensor(step), block=256)


@interp_only
def test_plan_and_argument_checks():
    cpu = torch.device("cpu")
    assert tsel.plan(1, 1, cpu) == (16, 1, 1)
    assert tsel.plan(2, 50257, cpu) == (4096, 13, 8)
    assert tsel.plan(2, 100, cpu, block=16)[:2] == (16, 7)
    with pytest.raises(ValueError, match="power of two"):
        tsel.plan(1, 100, cpu, block=24)
    a, lr = torch.zeros(2, 8), rows(2, NINF)
    with pytest.raises(ValueError, match="vocab"):
        tsel.select(a, a, 9, *AAD, lr, lr)
    with pytest.raises(ValueError, match="batch"):
        tsel.select(a, a[:1], 8, *AAD, lr, lr)
    with pytest.raises(ValueError, match="log_rel"):
        tsel.select(a, a, 8, *AAD, rows(3, 0.0), lr)
    with pytest.raises(ValueError, match="both or neither"):
        tsel.select(a, a, 8, *AAD, lr, lr, torch.zeros(2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="dtype|float32"):
        tsel.select(a.int(), a, 8, *AAD, lr, lr)
    assert tsel.select(a[:0], a[:0], 8, *AAD, lr[:0], lr[:0]).shape == (0,)
    assert tsel.select(a[:, :1], a[:, :1], 1, *AAD, lr, lr).tolist() == [0, 0]


# Ahead-of-time compilation for NVIDIA GPUs, which needs Triton's compiler but no GPU: the
# interpreter runs the kernels' Python, this checks that they also lower to PTX and cubin for the
# A100 (sm_80), the 3090 (sm_86) and the H100/H200 (sm_90), with 16-byte loads, no FMA
# contraction, no spill and shared memory within the arch's per-block limit. The specializations
# are the engine's (bench/cuda_compile_check.py, whose committed run has every chunk size); here
# each rule kind once, at one of the chunk sizes plan() picks, and the combine at its largest NCH.
AOT_PICK = {"aad": 1024, "contrastive": 4096, "greedy": 2048, "mix": 4096, "mix-sampled": 1024}
AOT_SCRIPT = r"""
import importlib.util, json, re, sys
spec = importlib.util.spec_from_file_location("cuda_compile_check", sys.argv[1])
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
pick = json.loads(sys.argv[2])
jobs = [j for j in check.triton_jobs()
        if j["kernel"] == "combine" and j["nch"] == 1024
        or j["kernel"] != "combine" and pick[j["spec"]] == j["block"]]
for arch in (80, 86, 90):
    for job in jobs:
        k = check.triton_compile(job, arch)
        row = check.triton_row(job, arch, k)
        if job["kernel"] != "combine":
            ptx = k.asm["ptx"]
            assert re.search(r"ld\.global[^;]*\.v4", ptx), ("no 16-byte loads", row)
            if not job["noise"]:  # libdevice logf brings its own fma; ours must not be contracted
                assert not re.search(r"\bfma\.", ptx), ("FMA contraction", row)
        assert row["n_spills"] == 0, ("spills", row)
        assert row["shared"] <= row["smem_limit"], ("shared memory over the limit", row)
        print("ok", json.dumps(row))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_nvidia_gpus():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton has no NVIDIA backend here")
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = Path(__file__).resolve().parents[1] / "bench" / "cuda_compile_check.py"
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(script), json.dumps(AOT_PICK)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(line[3:]) for line in res.stdout.splitlines() if line.startswith("ok ")]
    # per arch: chunk and fixup of each rule kind, and the combine
    assert len(rows) == 3 * (2 * len(AOT_PICK) + 1), res.stdout
    assert {r["arch"] for r in rows} == {"sm_80", "sm_86", "sm_90"}
    assert all(r["n_regs"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# GPU tests: compiled Triton and the CUDA extension on CUDA tensors.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(1, 1), (3, 423), (2, 50257), (1, 151936), (64, 32000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gpu_backends():
    from aad_fast.ops import backends
    out = []
    if not INTERPRETED:
        out.append(("triton", tsel.select))
    ext = backends.load_cuda()
    if ext is not None:
        out.append(("cuda", ext.select))
    return out


def lm_like(b, v, dtype, seed):
    """Logits with an LM-like shape (a few high tokens, long tail) and a correlated second model."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(b, v, generator=g, device="cuda") * 2.5
    top = torch.randint(0, v, (b, 8), generator=g, device="cuda")
    a.scatter_add_(1, top, torch.rand(b, 8, generator=g, device="cuda") * 12)
    r = a + torch.randn(b, v, generator=g, device="cuda") * 0.7
    return a.to(dtype), r.to(dtype)


def gpu_cases(b):
    ninf = rows(b, NINF, "cuda")
    la = torch.log(torch.full((b,), 0.1, device="cuda"))
    seed = torch.arange(b, device="cuda") * 31 + 7
    step = torch.tensor(5, device="cuda")
    return [(AAD, la, ninf, None, None),
            ((0.75, 0.25, 0.75, 0.25), ninf, ninf, None, None),
            ((1.25, -0.25, 1.25, -0.25), torch.log(torch.full((b,), 0.02, device="cuda")),
             rows(b, -1.0, "cuda"), seed, step)]


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends_match_reference(shape, dtype):
    backends = gpu_backends()
    if not backends:
        pytest.skip("neither compiled Triton nor the CUDA extension is available")
    b, v = shape
    a, r = lm_like(b, v, dtype, seed=b * 1000 + v)
    for coef, lr, fl, seed, step in gpu_cases(b):
        want = select_ref(a, r, v, *coef, lr, fl, seed, step)
        for name, fn in backends:
            got = fn(a, r, v, *coef, lr, fl, seed, step)
            assert torch.equal(got, want), (name, coef, got.tolist()[:8], want.tolist()[:8])


@gpu
@needs_cuda
def test_gpu_specials_strides_and_forced_fixups():
    if INTERPRETED:
        pytest.skip("compiled Triton is off under TRITON_INTERPRET")
    lr, fl = rows(1, math.log(0.1), "cuda"), rows(1, NINF, "cuda")
    for coef, (a, r) in ((ONE_PASS, local_trap_case()), (AAD, aad_trap_case())):
        assert tsel.launch(a.cuda(), r.cuda(), 48, *coef, lr, fl, block=16).tolist() == [20]
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(3, 2, 50257 + 5, generator=g, device="cuda")
    a = base[:, -1, :50257]
    r = torch.randn(50257, 3, generator=g, device="cuda").t()
    a[0, 100:200] = math.nan
    a[1] = NINF
    r[2, 7] = NINF
    lr, fl = rows(3, math.log(0.1), "cuda"), rows(3, NINF, "cuda")
    want = select_ref(a, r, 50257, *AAD, lr, fl)
    for name, fn in gpu_backends():
        assert torch.equal(fn(a, r, 50257, *AAD, lr, fl, None, None), want), name
    for block in (1024, 2048, 4096):
        assert torch.equal(tsel.launch(a, r, 50257, *AAD, lr, fl, block=block), want)
    from aad_fast.ops import backends
    ext = backends.load_cuda()
    if ext is not None:  # the binding keeps the invariants (the user-facing checks: ops.py)
        with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
            ext.select(a.double(), r, 50257, *AAD, lr, fl, None, None)
        with pytest.raises(RuntimeError, match="seed and step"):
            ext.select(a, r, 50257, *AAD, lr, fl, torch.zeros(3, dtype=torch.int64,
                                                                device="cuda"), None)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cuda_graph_replay(dtype):
    backends = gpu_backends()
    if not backends:
        pytest.skip("neither compiled Triton nor the CUDA extension is available")
    b, v = 4, 128256
    a, r = lm_like(b, v, dtype, seed=1)
    la = torch.log(torch.full((b,), 0.1, device="cuda"))
    fl = rows(b, -2.0, "cuda")
    seed = torch.arange(b, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    coef = (1.0, 0.0, 1.0, -1.0)
    for name, fn in backends:
        fn(a, r, v, *coef, la, fl, seed, step)       # compile / warm up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(a, r, v, *coef, la, fl, seed, step)
        for k in range(3):
            a2, r2 = lm_like(b, v, dtype, seed=100 + k)
            a.copy_(a2)
            r.copy_(r2)
            step.fill_(k)
            graph.replay()
            want = select_ref(a, r, v, *coef, la, fl, seed, step)
            assert torch.equal(out, want), (name, k)
