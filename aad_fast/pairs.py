"""Where the two streams come from. Each pair gives a shared prefill and a one-token step that
returns the next logits of both streams (``[B, V]`` each, model dtype).

- ``TwoModelPair``: two separate models (full fine-tune, contrastive amateur): two runners,
  back to back.
- ``SharedPair``: one set of weights for both streams, run as ONE batch of ``2B`` rows:
  rows ``[0, B)`` are stream ``a``, rows ``[B, 2B)`` stream ``r``. Serves a LoRA pair (the
  adapter is applied to the ``a`` rows only) and a prompt pair (OPAD/CFG: one model, the two
  streams differ only in their prompts).
- ``SinglePair``: one stream only (``Greedy``): one runner, ``r`` is ``None``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import Runner
from .cpu_linear import linear


class RowLoRA:
    """A PEFT LoRA adapter applied to the first ``n`` rows of every batch only, inside
    ``with lora.rows(n):``.

    PEFT's own mixed-adapter batches build index lists on the host per forward. Here, for the
    duration of one engine forward, each LoRA layer's forward is replaced by
    ``base(x)`` plus ``scaling * B(A(x[:n]))`` added to ``out[:n]`` in place, which is
    graph-safe (``n`` is a plain int fixed per runner). Outside ``with`` the ``PeftModel`` is
    untouched: its adapter works for other code as before.
    """

    def __init__(self, peft_model):
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ImportError("LoRA pairs need peft: pip install peft") from exc
        try:
            from peft.utils import AuxiliaryTrainingWrapper
        except ImportError:  # pragma: no cover - older peft
            AuxiliaryTrainingWrapper = ()
        self.layers = []
        for name, mod in peft_model.named_modules():
            if AuxiliaryTrainingWrapper and isinstance(mod, AuxiliaryTrainingWrapper):
                raise ValueError(f"{name} is a trained copy ({type(mod).__name__}, e.g. "
                                 "modules_to_save) that would run on both streams; the "
                                 "shared-weight pair supports LoRA layers only (merge the adapter "
                                 "and pass two models instead)")
            if not isinstance(mod, LoraLayer):
                continue
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if len(active) != 1:
                raise ValueError(f"LoRA layer {name}: exactly one active adapter is supported, "
                                 f"got {list(mod.active_adapters)}")
            ad = active[0]
            if not isinstance(mod.base_layer, torch.nn.Linear):
                raise ValueError(f"LoRA layer {name} wraps {type(mod.base_layer).__name__}; the "
                                 "shared-weight pair supports LoRA on nn.Linear only (merge the "
                                 "adapter and pass two models instead)")
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
            self.layers.append((mod, mod.lora_A[ad].weight, mod.lora_B[ad].weight,
                                float(mod.scaling[ad])))
        if not self.layers:
            raise ValueError("the aligned model is a PeftModel without LoRA layers")

    def rows(self, n: int) -> "_RowScope":
        """Context manager: the adapter on rows ``[0, n)`` (``0``: the base model alone)."""
        return _RowScope(self.layers, n)


def _row_lora_forward(base, a_w: Tensor, b_w: Tensor, scale: float, n: int, x: Tensor,
                      *args, **kwargs) -> Tensor:
    out = base(x)
    if n:
        delta = linear(linear(x[:n].to(a_w.dtype), a_w), b_w) * scale
        out[:n] = out[:n] + delta  # PEFT's order: one rounding to the output dtype
    return out


class _RowScope:
    """Swaps the LoRA layers' forwards for ``_row_lora_forward`` inside ``with`` and restores
    what was there (also when scopes nest)."""

    def __init__(self, layers, n: int):
        self.fwds = [(mod, functools.partial(_row_lora_forward, mod.base_layer, a, b, s, n))
                     for mod, a, b, s in layers]
        self._saved: list = []

    def __enter__(self):
        if any(mod.merged for mod, _ in self.fwds):
            raise RuntimeError("a LoRA layer was merged into its base weights after the "
                               "Decoder was built; call unmerge_adapter() first")
        self._saved.append([mod.__dict__.get("forward") for mod, _ in self.fwds])
        for mod, fwd in self.fwds:
            mod.__dict__["forward"] = fwd
        return self

    def __exit__(self, *exc):
        for (mod, _), prev in zip(self.fwds, self._saved.pop()):
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.__dict__["forward"] = prev
        return False


class TwoModelPair:
    """Two separate models, each with its own runner over the same ``B`` rows."""

    shared = False

    def __init__(self, model_a, model_r, n_rows: int, max_len: int):
        self.a = Runner(model_a, n_rows, max_len)
        self.r = Runner(model_r, n_rows, max_len)
        self.runners = (self.a, self.r)

    def prefill(self, ids_a, real_a, ids_r, real_r, rows=None):
        return self.a.prefill(ids_a, real_a, rows), self.r.prefill(ids_r, real_r, rows)

    def step(self, tokens: Tensor):
        return self.a.step(tokens), self.r.step(tokens)

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        self.a.reorder(index, start, stop)
        self.r.reorder(index, start, stop)


class SharedPair:
    """One model, both streams as one batch of ``2B`` rows (LoRA pair or prompt pair)."""

    shared = True

    def __init__(self, model, n_rows: int, max_len: int, lora: RowLoRA | None = None):
        self.n, self.lora = n_rows, lora
        self.runner = Runner(model, 2 * n_rows, max_len, lora.rows(n_rows) if lora else None)
        self.runners = (self.runner,)
        self._tok2 = torch.zeros((2 * n_rows,), dtype=torch.int64, device=self.runner.device)

    def prefill(self, ids_a, real_a, ids_r, real_r, rows=None):
        """``rows`` (int64 ``[B]``, optional): the ``U`` prompts of ``ids_*`` are encoded once
        and row ``i`` of each stream continues prompt ``rows[i]`` (see ``Runner.prefill``)."""
        ids, real = _stack_left_padded(ids_a, real_a, ids_r, real_r)
        scope = None
        if rows is not None:
            u = ids_a.shape[0]
            rows = torch.cat([rows, rows + u])
            scope = self.lora.rows(u) if self.lora is not None else None
        logits = self.runner.prefill(ids, real, rows, scope)
        return logits[: self.n], logits[self.n:]

    def step(self, tokens: Tensor):
        self._tok2[: self.n].copy_(tokens)
        self._tok2[self.n:].copy_(tokens)
        logits = self.runner.step(self._tok2)
        return logits[: self.n], logits[self.n:]

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        self.runner.reorder(torch.cat([index, index + self.n]), start, stop)


class SinglePair:
    """One stream (``Greedy``): ``lora_rows`` is ``n_rows`` to run a LoRA model with its
    adapter on, ``0`` to run its base."""

    shared = False

    def __init__(self, model, n_rows: int, max_len: int, lora: RowLoRA | None = None,
                 lora_rows: int = 0):
        self.runner = Runner(model, n_rows, max_len, lora.rows(lora_rows) if lora else None)
        self.runners = (self.runner,)

    def prefill(self, ids, real, ids_r=None, real_r=None, rows=None):
        return self.runner.prefill(ids, real, rows), None

    def step(self, tokens: Tensor):
        return self.runner.step(tokens), None


def _stack_left_padded(ids_a, real_a, ids_r, real_r):
    """Stack two left-padded batches of possibly different widths into one."""
    width = max(ids_a.shape[1], ids_r.shape[1])

    def pad(ids, real):
        extra = width - ids.shape[1]
        if extra == 0:
            return ids, real
        return (F.pad(ids, (extra, 0), value=0), F.pad(real, (extra, 0), value=False))

    ia, ra = pad(ids_a, real_a)
    ir, rr = pad(ids_r, real_r)
    return torch.cat([ia, ir]), torch.cat([ra, rr])
