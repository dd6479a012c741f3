"""A PEFT LoRA adapter on some rows of a batch only: the aligned stream of a shared pair.

Both streams of a LoRA pair run as one batch through the base weights; the adapter's update
``scaling * B(A(x))`` is added to the first ``n`` rows (the aligned stream) only. PEFT's own
mixed-adapter batches build index lists on the host per forward; here ``n`` is a plain int fixed
per runner, so the forward is graph-safe and traceable by ``torch.compile``.

``RowLoRA(peft_model)`` checks once that every LoRA layer is one this can compute exactly (plain
LoRA on ``nn.Linear``, one active adapter, not merged, no DoRA/variants/bias/trained copies) and
lists them; ``RowLoRALinear`` is the layer the engine's view of the model (``runner.engine_view``)
puts in place of each one. The user's ``PeftModel`` is never modified.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RowCount:
    """The number of leading rows that get the adapter, shared by every ``RowLoRALinear`` of
    one engine view (a prefill of ``U`` distinct prompts sets it to ``U`` for one forward)."""

    def __init__(self, n: int):
        self.n = n


class RowLoRA:
    """The LoRA layers of a ``PeftModel``: ``layers`` is a list of
    ``(name, lora_layer, A weight [r, K], B weight [N, r], scaling)``."""

    def __init__(self, peft_model):
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ImportError("LoRA pairs need peft: pip install peft") from exc
        from peft.utils import AuxiliaryTrainingWrapper  # peft >= 0.15 (pyproject.toml)
        self.layers = []
        for name, mod in peft_model.named_modules():
            if isinstance(mod, AuxiliaryTrainingWrapper):
                raise ValueError(f"{name} is a trained copy ({type(mod).__name__}, e.g. "
                                 "modules_to_save) that would run on both streams; the "
                                 "shared-weight pair supports LoRA layers only (merge the adapter "
                                 "and pass two models instead)")
            if not isinstance(mod, LoraLayer):
                continue
            if not isinstance(mod.base_layer, torch.nn.Linear):  # (embeddings keep theirs apart)
                raise ValueError(f"LoRA layer {name} wraps {type(mod.base_layer).__name__}; the "
                                 "shared-weight pair supports LoRA on nn.Linear only (merge the "
                                 "adapter and pass two models instead)")
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if len(active) != 1:
                raise ValueError(f"LoRA layer {name}: exactly one active adapter is supported, "
                                 f"got {list(mod.active_adapters)}")
            ad = active[0]
            if getattr(mod, "merged", False):
                raise ValueError(f"LoRA layer {name} is merged into its base weights, so the "
                                 "base cannot serve the reference stream; call "
                                 "unmerge_adapter() first, or pass two models")
            if getattr(mod, "use_dora", {}).get(ad, False):
                raise ValueError(f"LoRA layer {name} uses DoRA, which the shared-weight pair does "
                                 "not support (merge the adapter and pass two models instead)")
            if ad in getattr(mod, "lora_variant", {}):
                raise ValueError(f"LoRA layer {name} is a {type(mod.lora_variant[ad]).__name__} "
                                 "variant; the shared-weight pair supports plain LoRA only "
                                 "(merge the adapter and pass two models instead)")
            if mod.lora_B[ad].bias is not None:
                raise ValueError(f"LoRA layer {name} has a lora_B bias (lora_bias=True), which "
                                 "the shared-weight pair does not support (merge the adapter "
                                 "and pass two models instead)")
            if getattr(mod, "fan_in_fan_out", False):
                raise ValueError(f"LoRA layer {name} has fan_in_fan_out=True (Conv1D); merge the "
                                 "adapter and pass two models instead")
            self.layers.append((name, mod, mod.lora_A[ad].weight, mod.lora_B[ad].weight,
                                float(mod.scaling[ad])))
        if not self.layers:
            raise ValueError("the aligned model is a PeftModel without LoRA layers")

    PROBE = (2, 3)  # rows, tokens of check_rows's probe batch (distinct, so neither hides)

    def check_rows(self, peft_model) -> None:
        """Refuse LoRA layers whose inputs are not the batch's rows, where "the first ``n``
        rows" would be other tokens: a layer inside a mixture-of-experts block sees the tokens
        flattened or routed to it, a router returns more than its logits. One forward of a
        ``PROBE``-shaped batch through the base model (adapter disabled, no cache) checks that
        every LoRA layer's base saw ``[rows, tokens, K]`` and returned ``[rows, tokens, N]``."""
        rows, length = self.PROBE
        seen: dict = {}

        def hook(name):
            def record(module, args, kwargs, out):
                x = args[0] if args else next(iter(kwargs.values()), None)
                seen.setdefault(name, (_shape(x), _shape(out)))
            return record

        handles = [mod.base_layer.register_forward_hook(hook(name), with_kwargs=True)
                   for name, mod, *_ in self.layers]
        was_training = peft_model.training
        try:
            dev = next(peft_model.parameters()).device
            ids = torch.arange(rows * length, device=dev).view(rows, length) % 2 + 1
            peft_model.eval()
            with torch.inference_mode(), peft_model.disable_adapter():
                peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            peft_model.train(was_training)
            for h in handles:
                h.remove()
        for name, _, _, b_w, _ in self.layers:
            x, out = seen.get(name, (None, None))
            if x is None:
                continue  # not on the causal LM's path (an unused head): never runs
            want_in, want_out = (rows, length), (rows, length, b_w.shape[0])
            if x[:2] != want_in or len(x) != 3 or out != want_out:
                raise ValueError(
                    f"LoRA layer {name} does not see the batch's rows (a {rows}x{length} probe "
                    f"batch gave it input {_fmt(x)} and output {_fmt(out)}, not "
                    f"[{rows}, {length}, K] and {list(want_out)}: a layer inside a "
                    "mixture-of-experts block or a router), so the adapter cannot be put on the "
                    "aligned stream's rows only. Leave that layer out of the adapter's "
                    "target_modules, or merge the adapter (merge_and_unload) and pass the merged "
                    "model and its base as two models")

    def check_unmerged(self) -> None:
        """Refuse a decode after the adapter was merged into the base weights (the base could
        no longer serve the reference stream)."""
        for name, mod, *_ in self.layers:
            if getattr(mod, "merged", False):
                raise RuntimeError(f"LoRA layer {name} was merged into its base weights after the "
                                   "Decoder was built; call unmerge_adapter() first")


class RowLoRALinear(nn.Module):
    """``base(x)``, plus ``scaling * B(A(x[:n]))`` added to the first ``n = rows.n`` rows.

    ``x`` ``[R, T, K]`` (rows first, as the engine's batches are); the adapter's matmuls run in
    its weights' dtype and the sum is rounded once to the output dtype, as PEFT does."""

    def __init__(self, base: nn.Module, a_w: Tensor, b_w: Tensor, scale: float, rows: RowCount):
        super().__init__()
        self.base, self.a_w, self.b_w, self.scale, self.rows = base, a_w, b_w, scale, rows

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x)
        n = self.rows.n
        if n:
            xa = x[:n] if x.dtype == self.a_w.dtype else x[:n].to(self.a_w.dtype)
            delta = torch.nn.functional.linear(torch.nn.functional.linear(xa, self.a_w),
                                               self.b_w)
            # in place, same two roundings as PEFT's ``out + delta * scale``, fewer ops
            out[:n].add_(delta.mul_(self.scale))
        return out


def _shape(x):
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _fmt(shape) -> str:
    return str(list(shape)) if isinstance(shape, tuple) else f"a {shape}"
