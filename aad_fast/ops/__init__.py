"""Public vocabulary ops: AAD / contrastive / mix selection and the beam-search step.

Every op checks its arguments, resolves the backend once (``backends.pick_backend``) and calls
the selection core through the ``aad_fast::select`` custom op, so ``torch.compile`` and CUDA-graph
capture see one opaque op with a fake (meta) implementation. The maths is in ``reference.py``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from ..rules import check_real
from .reference import aad_topk_ref, linear2, select_ref

# ---------------------------------------------------------------------------------------------
# The ops. ``aad_fast::select`` is the selection core on a resolved backend, one opaque op for
# torch.compile and graph capture. ``aad_fast::select_native`` and ``aad_fast::aad_topk_native``
# are the compiled kernels, one op each with a kernel per dispatch key: CPU from the C++
# extension (csrc/cpu/bindings.cpp), CUDA from the CUDA extension (csrc/cuda/bindings_cuda.cpp).
# Their schemas and fake implementations are defined here, once; the extensions only register
# kernels (TORCH_LIBRARY_IMPL), and ``backends.py`` loads them (docs/engine.md, "The selection
# op and its backends").

_LIB = torch.library.Library("aad_fast", "FRAGMENT")
_LIB.define("select_native(Tensor a, Tensor r, int vocab, float ma, float mr, float sa, "
            "float sr, Tensor log_rel, Tensor floor, Tensor? seed, Tensor? step) -> Tensor")
_LIB.define("aad_topk_native(Tensor a, Tensor r, int vocab, Tensor log_alpha, int k, "
            "float? tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("aad_fast::select_native", lib=_LIB)
def _(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step):
    return a.new_empty((a.shape[0],), dtype=torch.int64)


@torch.library.register_fake("aad_fast::aad_topk_native", lib=_LIB)
def _(a, r, vocab, log_alpha, k, tau):
    b = a.shape[0]
    f = dict(dtype=torch.float32, device=a.device)
    i = dict(dtype=torch.int64, device=a.device)
    return (a.new_empty((b, k), **f), a.new_empty((b, k), **i), a.new_empty((b,), **i),
            a.new_empty((b,), **f), a.new_empty((b,), **f))


def check_core(a: Tensor, r: Tensor, vocab: int, log_rel: Tensor, floor: Tensor,
               seed: Tensor | None = None, step: Tensor | None = None) -> None:
    """The arguments of the selection core (``select_core``, every backend), checked once.

    ``a [B, Va]``, ``r [B, Vr]`` floating point on one device, ``1 <= vocab <= min(Va, Vr)``;
    ``log_rel``, ``floor`` floating point, ``[B]`` or one element (broadcast), on that device;
    ``seed`` integer ``[B]`` or one element and ``step`` an integer scalar, both or neither.
    Raises ``ValueError`` naming the argument. Metadata only: no host sync, graph-safe.
    """
    for name, x in (("a", a), ("r", r)):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor [batch, vocab], got "
                             f"{_describe(x)}")
    if a.shape[0] != r.shape[0]:
        raise ValueError(f"a and r have different batch sizes: {a.shape[0]} vs {r.shape[0]}")
    if a.device != r.device:
        raise ValueError(f"a is on {a.device} but r is on {r.device}")
    top = min(a.shape[1], r.shape[1])
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= top:
        raise ValueError(f"vocab must be an int in [1, min(V_a, V_r)] = [1, {top}], "
                         f"got {vocab!r}")
    b = a.shape[0]
    rows = [("log_rel", log_rel, True), ("floor", floor, True)]
    if (seed is None) != (step is None):
        raise ValueError("seed and step must be given together (both or neither)")
    if seed is not None:
        rows += [("seed", seed, False)]
        if not isinstance(step, Tensor) or step.numel() != 1 or step.is_floating_point():
            raise ValueError(f"step must be an integer scalar tensor, got {_describe(step)}")
        if step.device != a.device:
            raise ValueError(f"step must be on {a.device} (the logits' device), got {step.device}")
    for name, x, floating in rows:
        if (not isinstance(x, Tensor) or x.dim() > 1 or x.numel() not in (b, 1)
                or x.is_floating_point() != floating or x.is_complex()):
            kind = "floating-point" if floating else "integer"
            raise ValueError(f"{name} must be a {kind} tensor of shape [{b}] (or one element), "
                             f"got {_describe(x)}")
        if x.device != a.device:
            raise ValueError(f"{name} must be on {a.device} (the logits' device), "
                             f"got {x.device}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype} on {x.device}"
    return type(x).__name__


def _run_backend(backend, a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step):
    if backend == "triton":  # its launcher runs check_core itself (it is also called directly)
        return backends.load_triton().select(a, r, vocab, ma, mr, sa, sr, log_rel, floor,
                                             seed, step)
    check_core(a, r, vocab, log_rel, floor, seed, step)
    if backend in ("cpp", "cuda"):  # float32 arithmetic (docs/rules.md); C++ takes <= 32 bits
        a, r = _no_f64(a), _no_f64(r)
    if backend == "torch":
        return select_ref(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step)
    # "cpp" on CPU tensors, "cuda" on CUDA tensors: the one op aad_fast::select_native, whose
    # kernel the dispatcher picks by the tensors' device
    ext = backends.load_cpp() if backend == "cpp" else backends.load_cuda()
    return ext.select(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step)


def _no_f64(x: Tensor) -> Tensor:
    return x.float() if x.dtype == torch.float64 else x


@torch.library.custom_op("aad_fast::select", mutates_args=())
def select_core(a: Tensor, r: Tensor, vocab: int, ma: float, mr: float, sa: float, sr: float,
                log_rel: Tensor, floor: Tensor, seed: Tensor | None, step: Tensor | None,
                backend: str) -> Tensor:
    """The selection core of ``reference.py`` on a resolved ``backend`` (``backends.pick_backend``).

    ``a [B, Va]``, ``r [B, Vr]`` float32/float16/bfloat16, any strides, ``vocab <= min(Va, Vr)``;
    ``log_rel``, ``floor`` float32 ``[B]`` (or one element); ``seed`` int64 ``[B]`` and ``step``
    int64 ``[]`` (both or neither). Returns int64 ``[B]`` on ``a``'s device. The arguments are
    checked once, by ``check_core`` (ValueError naming the argument). Graph-safe: no host sync; the
    float arguments and ``backend`` are baked into a captured graph, the tensors may change
    between replays (``step`` is read on device, so bumping it in place gives fresh noise).
    """
    return _run_backend(backend, a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step)


@select_core.register_fake
def _(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step, backend):
    return a.new_empty((a.shape[0],), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Argument checks (docs/stopping-and-input.md "Bad input"): ValueError naming the argument and
# the value.


def check_logits(logits_a: Tensor, logits_r: Tensor, vocab_size: int | None = None) -> int:
    """Validate a logits pair and return the vocabulary ``V`` the choice ranges over."""
    for name, x in (("logits_a", logits_a), ("logits_r", logits_r)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, vocab], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")
    if logits_a.shape[0] != logits_r.shape[0]:
        raise ValueError(f"logits_a and logits_r have different batch sizes: "
                         f"{logits_a.shape[0]} vs {logits_r.shape[0]}")
    if logits_a.device != logits_r.device:
        raise ValueError(f"logits_a is on {logits_a.device} but logits_r is on {logits_r.device}")
    vocab = min(logits_a.shape[1], logits_r.shape[1])
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        vocab = min(vocab, vocab_size)
    return vocab


def alpha_to_log(alpha, batch: int, device) -> Tensor:
    """``ln(alpha)`` as float32 ``[batch]``; ``alpha`` a float or a per-row tensor in [0, 1]."""
    if isinstance(alpha, Tensor):
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] not in (1, batch)):
            raise ValueError(f"alpha must be a float or a tensor of shape [{batch}], "
                             f"got shape {tuple(alpha.shape)}")
        al = alpha.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(batch)
        bad = torch.isnan(al) | (al < 0) | (al > 1)
        if bool(bad.any()):
            raise ValueError(f"alpha must be in [0, 1], got {al[bad][0].item()!r} "
                             f"at row {int(bad.nonzero()[0, 0])}")
        return torch.log(al).contiguous()
    alpha = check_real("alpha", alpha, 0.0, 1.0)
    return torch.log(torch.full((batch,), alpha, dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------------
# Public ops.


def contrastive_select(logits_a: Tensor, logits_r: Tensor, alpha=0.1, beta: float = 1.0, *,
                       vocab_size: int | None = None, backend: str | None = None) -> Tensor:
    """docs/rules.md Contrastive: ``argmax_{v in K} (la_v - beta*lr_v)``,
    ``K = {v: p_a(v) >= alpha*max p_a}``.

    Args:
        logits_a, logits_r: ``[B, V_a]``, ``[B, V_r]`` float32/float16/bfloat16, any strides.
        alpha: float or float tensor ``[B]`` in [0, 1].
        beta: weight of the reference log-probs, finite, ``>= 0``.
        vocab_size: exclude ids ``>= vocab_size`` (padding rows of an embedding).
        backend: ``None`` (fastest available), or one of ``backends.BACKENDS``.
    Returns:
        int64 ``[B]`` on the logits' device; ``-1`` for a row whose ``a`` logits are all
        ``-inf``/NaN.
    """
    vocab = check_logits(logits_a, logits_r, vocab_size)
    beta = check_real("beta", beta, 0.0)
    b = logits_a.shape[0]
    log_rel = alpha_to_log(alpha, b, logits_a.device)
    floor = torch.full((b,), -math.inf, device=logits_a.device)
    be = backends.pick_backend(logits_a.device, backend)
    return select_core(logits_a, logits_r, vocab, 1.0, 0.0, 1.0, -beta, log_rel, floor,
                       None, None, be)


def aad_select(logits_a: Tensor, logits_r: Tensor, alpha=0.1, *, vocab_size: int | None = None,
               backend: str | None = None) -> Tensor:
    """docs/rules.md AAD: ``argmax_{v in K} (la_v - lr_v)`` (paper Algorithm 1);
    ``contrastive_select`` with ``beta = 1``. Same arguments and result."""
    return contrastive_select(logits_a, logits_r, alpha, 1.0, vocab_size=vocab_size,
                              backend=backend)


def mix_floor(a: Tensor, r: Tensor, vocab: int, ca: float, cr: float, top_k: int,
              top_p: float) -> Tensor:
    """Per-row lower bound on ``z = ca*a + cr*r`` (temperature already folded into ``ca, cr``)
    that applies top-k and then top-p (Hugging Face's order). Tokens with ``z >= floor`` are kept,
    so ties at the boundary are all kept. Graph-safe torch ops; float32 ``[B]``."""
    z = linear2(a[:, :vocab].float(), r[:, :vocab].float(), ca, cr)
    z = torch.where(torch.isnan(z), z.new_full((), -math.inf), z)
    floor = torch.full((z.shape[0],), -math.inf, device=z.device)
    if top_k and top_k < vocab:
        floor = torch.topk(z, top_k, dim=1).values[:, -1]
        z = torch.where(z >= floor[:, None], z, z.new_full((), -math.inf))
    if top_p < 1.0:
        zs, _ = torch.sort(z, dim=1, descending=True)
        p = torch.softmax(zs, dim=1)
        before = torch.cumsum(p, dim=1) - p  # mass strictly above each sorted position
        keep = before < top_p  # the first token is always kept
        n_keep = keep.sum(dim=1).clamp(min=1)
        floor = torch.maximum(floor, zs.gather(1, (n_keep - 1)[:, None])[:, 0])
    return floor


def mix_select(logits_a: Tensor, logits_r: Tensor, w_a: float, w_r: float, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               generator: torch.Generator | None = None, seed: Tensor | int | None = None,
               step: Tensor | None = None, vocab_size: int | None = None,
               backend: str | None = None) -> Tensor:
    """docs/rules.md Mix: the token from ``z = w_a*la + w_r*lr``; greedy when
    ``temperature == 0``, else a sample from ``softmax(z / T)`` after top-k, top-p and min-p
    (in that order).

    Sampling is Gumbel-max with counter-based noise (``reference.gumbel_noise``): no host sync,
    and the same ``seed``/``step`` give the same token on every backend. ``seed`` (int or int64
    ``[B]``) wins over ``generator``; with neither, a seed is drawn from torch's default generator.
    ``step`` (int64 scalar tensor, default 0) is the counter the engine bumps each token.

    Returns int64 ``[B]``; ``-1`` for a row with no finite ``z``.
    """
    vocab = check_logits(logits_a, logits_r, vocab_size)
    w_a = check_real("w_a", w_a)
    w_r = check_real("w_r", w_r)
    if w_a == 0.0 and w_r == 0.0:
        raise ValueError("w_a and w_r are both 0: the mixed distribution would be uniform")
    temperature = check_real("temperature", temperature, 0.0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    top_p = check_real("top_p", top_p, 0.0, 1.0, lo_open=True)
    min_p = check_real("min_p", min_p, 0.0, 1.0)
    dev, b = logits_a.device, logits_a.shape[0]
    be = backends.pick_backend(dev, backend)
    ninf = torch.full((b,), -math.inf, device=dev)
    if temperature == 0.0:
        return select_core(logits_a, logits_r, vocab, w_a, w_r, w_a, w_r, ninf, ninf,
                           None, None, be)
    ca, cr = w_a / temperature, w_r / temperature
    floor = mix_floor(logits_a, logits_r, vocab, ca, cr, top_k, top_p) if (
        top_k or top_p < 1.0) else ninf
    log_rel = torch.full((b,), math.log(min_p) if min_p > 0 else -math.inf, device=dev)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    if not isinstance(seed, Tensor):
        seed = torch.full((b,), int(seed), dtype=torch.int64, device=dev)
    seed = seed.to(device=dev, dtype=torch.int64).reshape(-1).expand(b).contiguous()
    step = torch.zeros((), dtype=torch.int64, device=dev) if step is None else step.to(dev)
    return select_core(logits_a, logits_r, vocab, ca, cr, ca, cr, log_rel, floor, seed, step, be)


def aad_beam_topk(logits_a: Tensor, logits_r: Tensor, alpha=0.1, k: int = 1, *,
                  tau: float | None = None, vocab_size: int | None = None,
                  backend: str | None = None):
    """One beam-search step's quantities for BeamAAD (docs/rules.md), see
    ``reference.aad_topk_ref``.

    Returns ``(scores [B,k] f32, ids [B,k] int64, n_cand [B] int64, entropy [B] f32,
    log_pmax [B] f32)``; missing candidates are ``-inf`` / ``-1``. ``backend`` as for
    ``aad_select``: ``cpp`` runs the fused C++ step, every other backend the reference. The C++
    step sums the entropy in double, so it is within float32 rounding of the reference's and a
    row whose entropy is that close to ``tau`` may take the other side of ``H <= tau``; all else
    (``n_cand``, ``log_pmax``, and scores and ids given the side) is bitwise the reference's.
    """
    vocab = check_logits(logits_a, logits_r, vocab_size)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if tau is not None:
        tau = check_real("tau", tau, 0.0)
    log_alpha = alpha_to_log(alpha, logits_a.shape[0], logits_a.device)
    if backends.pick_backend(logits_a.device, backend) == "cpp":
        return tuple(backends.load_cpp().aad_topk(_no_f64(logits_a), _no_f64(logits_r), vocab,
                                                   log_alpha, k, tau))
    return aad_topk_ref(logits_a, logits_r, vocab, log_alpha, k, tau)
