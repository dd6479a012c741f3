"""CPU layouts of a decode step's linear: few-row ``(W @ X^T)^T`` and oneDNN-packed weights.

A decode step multiplies every weight matrix by a few rows (batch x streams x beams). Which
way of doing that streams the weights faster depends on the machine's BLAS and CPU: on a 2-core
AMD EPYC with MKL, ``F.linear`` with 1-2 rows read the weights at ~9 GB/s while ``W @ X^T``
with ``X^T`` a column-major view read them at ~22 GB/s; on a 2-core Intel Xeon (AVX-512) it was
the other way round (``F.linear`` 50-150 GB/s, ``W @ X^T`` 20-30 GB/s). So the layout is never
assumed: ``plan_linears`` (below) times both on the machine, per weight shape and row count, and
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
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tuning import cached, decide, store, time_candidates, valid


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


MAX_BYTES = 256 << 20  # weights of one shape timed per round (a subset beyond that)


LINEAR_MODES = ("auto", "plain", "few_row", "packed")


LAYOUTS = ("few_row", "packed")  # the alternatives to plain F.linear


def measure_linear(weights: list, rows: int) -> dict:
    """ms of ``rows`` rows through every weight in ``weights`` (in model order, as a decode
    step streams them), for each layout."""
    chosen, total = [], 0
    for w in weights:
        if chosen and total + w.numel() * w.element_size() > MAX_BYTES:
            break
        chosen.append(w)
        total += w.numel() * w.element_size()
    g = torch.Generator().manual_seed(0)  # never the caller's global RNG
    x = torch.randn(rows, chosen[0].shape[1], dtype=chosen[0].dtype, generator=g)

    def plain():
        for w in chosen:
            F.linear(x, w)

    def few_row():
        for w in chosen:
            few_row_linear(x, w)
    fns = {"plain": plain, "few_row": few_row}
    with torch.inference_mode():
        if packed_supported():  # temporary copies of the timed weights, not kept
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT) for w in chosen]

            def packed():
                for pk in packs:
                    torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], "")
            fns["packed"] = packed
        return time_candidates(fns)


def linear_mode(mode: str | None = None) -> str:
    """The layout switch: ``mode`` if given, else the environment, else ``auto``."""
    if mode is None:
        mode = os.environ.get("AAD_FAST_CPU_LINEAR")
        if mode is None and os.environ.get("AAD_FAST_CPU_FEW_ROW_LINEAR", "1") == "0":
            mode = "plain"
    mode = mode or "auto"
    if mode not in LINEAR_MODES:
        raise ValueError(f"cpu_linear (or AAD_FAST_CPU_LINEAR) must be one of {LINEAR_MODES}, "
                         f"got {mode!r}")
    return mode


def plan_linears(model: nn.Module, rows: int, mode: str | None = None,
                 measure=None) -> dict:
    """Layout of each weight shape of ``model``'s plain ``nn.Linear`` layers for a decode step
    of ``rows`` rows: ``{(N, K): {"choice": "plain" | "few_row" | "packed", "source": ...,
    "<layout>_ms": ...}}``.

    Only fp32 weights on CPU have a choice (everything else is ``plain``). ``measure(weights,
    rows) -> {"plain": ms, "few_row": ms, ...}`` is the timer (tests inject fake timings)."""
    mode = linear_mode(mode)
    measure = measure or measure_linear
    groups: dict = {}
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.device.type == "cpu" \
                and mod.weight.dtype == torch.float32:
            groups.setdefault(tuple(mod.weight.shape), []).append(mod.weight)
    plan = {}
    for shape, weights in groups.items():
        if mode != "auto":
            plan[shape] = {"choice": mode, "source": "forced"} \
                if mode != "packed" or packed_supported() else \
                {"choice": "plain", "source": "forced packed: no working oneDNN packed linear here"}
            continue
        entry = f"linear/{shape[0]}x{shape[1]}/float32/rows{rows}/" + \
            ",".join(("plain",) + LAYOUTS[: 2 if packed_supported() else 1])
        rec = cached(entry)
        if not valid(rec, ("plain",) + LAYOUTS):
            times = measure(weights, rows)
            rec = {"choice": decide(times), "weights_timed": len(weights),
                   "stable": times.get("stable", True),
                   **{f"{k}_ms": v for k, v in times.items() if k != "stable"}}
            store(entry, rec, persist=rec["stable"])
            rec = dict(rec, source="measured")
        else:
            rec = dict(rec, source="cache")
        plan[shape] = rec
    return plan


def measure_forward(view_plan: nn.Module, view_plain: nn.Module, rows: int) -> dict:
    """ms of one token per row through each whole view (no cache: the linears dominate, as in
    a decode step): ``{"planned": ms, "plain": ms}``."""
    vocab = view_plain.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 1), generator=g)

    def run(view):
        return lambda: view(input_ids=ids, use_cache=False, logits_to_keep=1)
    with torch.inference_mode():
        return time_candidates({"planned": run(view_plan), "plain": run(view_plain)})


def plan_pays(view_plan: nn.Module, view_plain: nn.Module, rows: int, layouts: dict,
              measure=None) -> bool:
    """Whether the model with ``layouts`` (``{(N, K): "few_row" | "packed"}``) beats plain
    ``F.linear`` everywhere, timed on the whole forward (per-shape timings can mislead: cache
    reuse inside one shape's loop, neighbouring layers). Cached like the per-shape choices."""
    model = type(view_plain).__name__
    entry = f"step/{model}/rows{rows}/" + ",".join(
        f"{n}x{k}:{layouts[(n, k)]}" for n, k in sorted(layouts))
    rec = cached(entry)
    if not valid(rec, ("plain", "planned")):
        times = (measure or measure_forward)(view_plan, view_plain, rows)
        rec = {"choice": decide(times), "plain_ms": times["plain"],
               "planned_ms": times["planned"], "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"] == "planned"


def summarize(plan: dict) -> dict:
    """``{"NxK": "few_row (measured: plain 0.52 ms, few_row 0.31 ms)"}`` for stats."""
    out = {}
    for (n, k), rec in plan.items():
        text = rec["choice"]
        if "plain_ms" in rec:
            busy = "" if rec.get("stable", True) else ", machine busy: plain kept, not cached"
            times = ", ".join(f"{name} {rec[f'{name}_ms']:.3f} ms"
                              for name in ("plain",) + LAYOUTS
                              if isinstance(rec.get(f"{name}_ms"), (int, float)))
            text += f" ({rec['source']}: {times}{busy})"
        else:
            text += f" ({rec['source']})"
        out[f"{n}x{k}"] = text
    return out
