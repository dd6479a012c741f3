"""Static KV cache and the one-model runner: prefill and a graph-safe one-token step.

The runner owns every buffer a decode step touches, sized once: the KV cache
``[N, kv_heads, max_len, head_dim]`` per layer, the token input ``[N, 1]``, the per-row
positions ``[N, 1]``, the cache write slot ``[1]`` and an additive attention mask
``[N, 1, 1, max_len]``. Rows are left-padded, so every row writes the same cache slot at each
step while RoPE positions stay per row. Hugging Face models accept the prepared 4D mask as-is
and only call ``cache.update`` (we always pass ``position_ids``), so the same runner serves
Llama, Qwen2/3, Mistral, OLMo2 and other standard decoder-only models.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .cpu_linear import FewRowLinears


class StaticKVCache:
    """Duck-typed stand-in for a transformers ``Cache``: the model calls ``update`` per layer.

    ``write_pos`` (int64 ``[T]``) says which cache slots the current forward's ``T`` tokens go
    to; the runner points it at its static slot buffer for decode steps, so a captured graph
    keeps writing through the same tensor. Storage is allocated lazily on the first update
    (dtype, heads and head size come from the model's own key states).
    """

    is_compileable = True

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.write_pos: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            n, h, _, dk = key_states.shape
            dv = value_states.shape[-1]
            self.keys.append(key_states.new_zeros((n, h, self.max_len, dk)))
            self.values.append(value_states.new_zeros((n, h, self.max_len, dv)))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.write_pos, key_states)
        v.index_copy_(2, self.write_pos, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("aad_fast's StaticKVCache needs explicit position_ids")

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        """Beam search: row ``i`` takes the cache of row ``index[i]`` in slots ``[start, stop)``
        (on device, in place). Beams of one prompt share its prompt slots, so a beam step only
        moves the slots written since the prompt."""
        stop = self.max_len if stop is None else stop
        if stop <= start:
            return
        for t in self.keys + self.values:
            part = t[:, :, start:stop]
            part.copy_(part.index_select(0, index))

    def adopt(self, other: "StaticKVCache", rows: Tensor) -> None:
        """Take ``other``'s cache rows ``rows`` (int64 ``[N]``) into the first
        ``other.max_len`` slots: this cache's row ``i`` becomes ``other``'s row ``rows[i]``.
        Existing storage is written in place (a captured graph keeps pointing at it)."""
        length = other.max_len
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, t in enumerate(theirs):
                if i == len(mine):
                    n, h, _, d = t.shape
                    mine.append(t.new_zeros((rows.shape[0], h, self.max_len, d)))
                mine[i][:, :, :length].copy_(t.index_select(0, rows))


class Runner:
    """One causal LM over ``n_rows`` rows with static buffers (see module docstring).

    ``scope``: a context manager entered around every forward (a LoRA adapter on some rows,
    ``pairs.RowLoRA.rows``); on CPU the few-row linear path (``cpu_linear``) is entered too."""

    def __init__(self, model, n_rows: int, max_len: int, scope=None):
        self.model = model
        self.n_rows = n_rows
        self.max_len = max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.neg = torch.finfo(self.dtype).min
        self.cache = StaticKVCache(max_len)
        dev = self.device
        self.ids = torch.zeros((n_rows, 1), dtype=torch.int64, device=dev)
        self.pos = torch.zeros((n_rows, 1), dtype=torch.int64, device=dev)
        self.slot = torch.zeros((1,), dtype=torch.int64, device=dev)
        self.mask = torch.full((n_rows, 1, 1, max_len), self.neg, dtype=self.dtype, device=dev)
        self.prompt_len = 0
        self.linears = FewRowLinears(model)
        self.scope = scope if scope is not None else contextlib.nullcontext()

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache=None, scope=None) -> Tensor:
        with self.linears, self.scope if scope is None else scope:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=self.cache if cache is None else cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def prefill(self, ids: Tensor, real: Tensor, rows: Tensor | None = None,
                scope=None) -> Tensor:
        """Encode left-padded prompts. ``ids``, ``real`` int64/bool ``[n_rows, L]`` (``real``
        marks non-padding). Returns the last position's logits ``[n_rows, V]`` (model dtype).

        ``rows`` (int64 ``[n_rows]``, optional): ``ids``/``real`` then hold ``U`` distinct
        prompts and row ``i`` is prompt ``rows[i]``; each prompt is encoded once and its cache
        copied to its rows (beam search); ``scope`` then replaces the runner's own scope
        for that forward (the LoRA rows of ``U`` prompts)."""
        n, length = (ids.shape if rows is None else (rows.shape[0], ids.shape[1]))
        if n != self.n_rows:
            raise ValueError(f"prefill got {n} rows, runner was built for {self.n_rows}")
        if length > self.max_len:
            raise ValueError(f"prompt length {length} exceeds max_seq_len={self.max_len}")
        dev = self.device
        ids, real = ids.to(dev), real.to(dev).bool()
        # U distinct prompts go through a temporary cache of just the prompt's slots
        cache = self.cache if rows is None else StaticKVCache(length)
        u, slots = ids.shape[0], cache.max_len
        keys = torch.zeros((u, slots), dtype=torch.bool, device=dev)
        keys[:, :length] = real
        causal = torch.ones((length, slots), dtype=torch.bool, device=dev).tril()
        allowed = causal[None] & keys[:, None, :]
        mask4 = torch.full((u, 1, length, slots), self.neg, dtype=self.dtype, device=dev)
        mask4.masked_fill_(allowed[:, None], 0.0)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        cache.write_pos = torch.arange(length, device=dev)
        logits = self._forward(ids, mask4, pos, cache, scope)
        if rows is not None:
            rows = rows.to(dev)
            self.cache.adopt(cache, rows)
            logits, real = logits.index_select(0, rows), real.index_select(0, rows)
        # Decode state: the prompt's real tokens are visible, the next token goes to slot L.
        self.mask.fill_(self.neg)
        self.mask[:, 0, 0, :length].masked_fill_(real, 0.0)
        self.pos.copy_(real.long().sum(1, keepdim=True))
        self.slot.fill_(length)
        self.cache.write_pos = self.slot
        self.prompt_len = length
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (int64 ``[n_rows]``, valid ids) and return the next logits
        ``[n_rows, V]``. Graph-safe: only in-place updates of the runner's own buffers."""
        self.ids.copy_(tokens.view(-1, 1))
        self.mask.index_fill_(3, self.slot, 0.0)
        logits = self._forward(self.ids, self.mask, self.pos)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        """Row ``i`` continues from row ``index[i]`` (beam search): cache slots
        ``[start, stop)`` (default all), positions and mask."""
        self.cache.reorder(index, start, stop)
        self.pos.copy_(self.pos.index_select(0, index))
        self.mask.copy_(self.mask.index_select(0, index))

    def snapshot(self) -> list[Tensor]:
        """Copies of the small decode buffers (graph warm-up must not change the decode)."""
        return [t.clone() for t in (self.pos, self.slot, self.mask)]

    def restore(self, saved: list[Tensor]) -> None:
        for t, s in zip((self.pos, self.slot, self.mask), saved):
            t.copy_(s)
