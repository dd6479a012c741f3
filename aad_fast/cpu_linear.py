"""CPU layouts of a decode step's linear: few-row ``(W @ X^T)^T`` and oneDNN-packed weights.

A decode step multiplies every weight matrix by a few rows (batch x streams x beams). Which
way of doing that streams the weights faster depends on the machine's BLAS and CPU: on a 2-core
AMD EPYC with MKL, ``F.linear`` with 1-2 rows read the weights at ~9 GB/s while ``W @ X^T``
with ``X^T`` a column-major view read them at ~22 GB/s; on a 2-core Intel Xeon (AVX-512) it was
the other way round (``F.linear`` 50-150 GB/s, ``W @ X^T`` 20-30 GB/s). So the layout is never
assumed: ``tuning.plan_linears`` times both on the machine, per weight shape and row count, and
the engine's view of the model (``runner.engine_view``) puts a ``FewRowLinear`` only where the
measurement chose it. Same product, another fp32 summation order.

The packed layout (``PackedLinear``): oneDNN's blocked copy of the weight
(``mkldnn._reorder_linear_weight``) multiplied by ``mkldnn._linear_pointwise``. On the 2-core
Xeon, MKL's ``F.linear`` costs ~1.8x its one-row time at 8 rows and ~2.2x at 16 (small-M GEMM
kernels, not the memory, are the limit there), the packed weight ~1.3x and ~1.6x; at one row it
is no faster. It costs a second copy of each packed weight (made once per weight, shared by
every view that holds it and freed with the last, ``packed``), so ``runner.engine_view`` takes it
only where it was measured faster and the copies fit in the memory left (``fits_in_memory``).
Same product, another fp32 summation
order; the compiled step calls it through the ``aad_fast::packed_linear`` op, so eager and
compiled steps multiply alike.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(W @ X^T)^T``; one row is doubled to take
    the same path. ``x`` float32 ``[..., K]`` (CPU), ``weight`` ``[N, K]``, ``bias`` ``[N]``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 1:
        x2 = x2.expand(2, k)
    y = torch.mm(weight, x2.contiguous().t())[:, :m].t()
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], y.shape[-1])


class FewRowLinear(nn.Module):
    """An ``nn.Linear``'s weights (shared, not copied) with the few-row layout for inputs of at
    most ``max_rows`` rows (the decode step the layout was measured for); larger inputs (a
    prefill) take ``F.linear``."""

    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // x.shape[-1] <= self.max_rows:
            return few_row_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, few-row layout up to {self.max_rows} rows"


# ---------------------------------------------------------------------------- packed (oneDNN)
PACK_HINT = 16  # the row count oneDNN blocks a packed weight for (8..64 measured alike; 1 differs)


class _Pack:
    """A weight's packed copy (``tensor``) and the weight ``_version`` it was made from."""
    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: Tensor, version: int):
        self.tensor, self.version = tensor, version


# (data_ptr, shape) -> _Pack, while some PackedLinear holds it: a plan the whole-step check
# turned down, or a closed Decoder's views, leave no copy behind
_PACKS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


@functools.cache
def packed_supported() -> bool:
    """Whether oneDNN's packed linear works in this torch build on this CPU: the ops exist
    (x86 builds have them) and a trial product on a small weight equals ``F.linear``'s."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 16, generator=g), torch.randn(3, 16, generator=g)
    try:
        with torch.no_grad():
            pk = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
            y = torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], "")
    except (RuntimeError, NotImplementedError):  # a build or CPU without the kernels
        return False
    return bool(torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-4))


def packed(weight: Tensor) -> _Pack:
    """oneDNN's packed copy of ``weight`` ``[N, K]`` (fp32, CPU), shared by every view of the
    weight while one holds it; a weight written since (a changed ``_version``) packs again."""
    key = (weight.data_ptr(), tuple(weight.shape))
    hit = _PACKS.get(key)
    if hit is not None and hit.version == weight._version:
        return hit
    with torch.no_grad():
        pack = _Pack(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT),
                     weight._version)
    _PACKS[key] = pack
    return pack


def packed_bytes(weights) -> int:
    """Bytes that packing ``weights`` would add (those not packed yet)."""
    return sum(w.numel() * w.element_size() for w in {id(w): w for w in weights}.values()
               if (w.data_ptr(), tuple(w.shape)) not in _PACKS)


def fits_in_memory(extra: int, share: float = 0.5) -> bool:
    """Whether ``extra`` bytes are at most ``share`` of the memory the system has available
    (``/proc/meminfo``; without it, yes)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return extra <= share * avail


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  pk: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``weight``'s packed copy ``pk`` (default
    ``packed(weight)``). ``x`` float32 ``[..., K]`` (CPU), ``weight`` ``[N, K]``, ``bias``
    ``[N]``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    pk = packed(weight).tensor if pk is None else pk
    y = torch.ops.mkldnn._linear_pointwise(x2, pk, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("aad_fast::packed_linear", mutates_args=())
def packed_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``packed_linear`` as an op ``torch.compile`` keeps whole (inductor cannot lower
    oneDNN's packed tensors; the op finds the copy by the weight it is given)."""
    return packed_linear(x, weight, bias)


@packed_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s weights (shared) plus their packed copy, used for inputs of at most
    ``max_rows`` rows (a decode step); larger inputs (a prefill) take ``F.linear``."""

    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows
        self._pack = packed(self.weight)  # made now, not inside the first timed step

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // x.shape[-1] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return packed_linear_op(x, self.weight, self.bias)
        if self.weight._version != self._pack.version:  # written in place since: pack again
            self._pack = packed(self.weight)
        return packed_linear(x, self.weight, self.bias, self._pack.tensor)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, packed up to {self.max_rows} rows"
