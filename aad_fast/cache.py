"""Static KV cache: a duck-typed transformers ``Cache`` over buffers sized once.

Per layer ``[N, kv_heads, max_len, head_dim]`` keys and values; the model calls ``update`` with
each forward's new keys/values and gets the whole cache back, which it attends over under the
runner's 4D mask (``runner.Runner``). Beam search reorders rows in place.
"""
from __future__ import annotations

from torch import Tensor


class StaticKVCache:
    """Duck-typed stand-in for a transformers ``Cache``: the model calls ``update`` per layer.

    ``write_pos`` (int64 ``[T]``) says which cache slots a prefill's ``T`` tokens go to (the
    same for every row). ``row_pos`` (int64 ``[N]``, or ``None``) is set for one-token decode
    steps: row ``i`` writes slot ``row_pos[i]`` (a per-row scatter); the runner points it at its
    static slot buffer, so a captured graph keeps writing through the same tensor. Storage is
    allocated lazily on the first update (dtype, heads and head size come from the model's own
    key states), or by ``admit``.
    """

    is_compileable = True

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.write_pos: Tensor | None = None
        self.row_pos: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            n, h, _, dk = key_states.shape
            dv = value_states.shape[-1]
            self.keys.append(key_states.new_zeros((n, h, self.max_len, dk)))
            self.values.append(value_states.new_zeros((n, h, self.max_len, dv)))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.row_pos is None:
            k.index_copy_(2, self.write_pos, key_states)
            v.index_copy_(2, self.write_pos, value_states)
        else:  # one token per row, each to its own slot
            n, h, _, _ = key_states.shape
            at = self.row_pos.view(n, 1, 1, 1)
            k.scatter_(2, at.expand(n, h, 1, k.shape[3]), key_states)
            v.scatter_(2, at.expand(n, h, 1, v.shape[3]), value_states)
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

    def admit(self, other: "StaticKVCache", dst: Tensor, n_rows: int) -> None:
        """Rows ``dst`` (int64 ``[U]``, distinct) take ``other``'s ``U`` rows in their first
        ``other.max_len`` slots; the other rows are untouched (a new prompt refills a slot row
        while the rest of the batch goes on). The rows' later slots keep stale keys, which the
        runner's mask hides until the row writes them. Storage for ``n_rows`` rows is made on
        first use, else written in place."""
        length = other.max_len
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, t in enumerate(theirs):
                if i == len(mine):
                    _, h, _, d = t.shape
                    mine.append(t.new_zeros((n_rows, h, self.max_len, d)))
                mine[i][:, :, :length].index_copy_(0, dst, t)
