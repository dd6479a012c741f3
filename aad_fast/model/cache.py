"""Static KV cache: a duck-typed transformers ``Cache`` over buffers sized once, and the KV pool
those buffers are views of.

Per layer ``[N, kv_heads, max_len, head_dim]`` keys and values; the model calls ``update`` with
each forward's new keys/values and gets the whole cache back, which it attends over under the
runner's 4D mask (``runner.Runner``). Beam search reorders rows in place.

``KVPool``: the KV memory of one set of weights, allocated once for ``rows x max_len`` slots per
layer. A runner of ``n <= rows`` rows and ``L <= max_len`` slots takes the first
``n * kv_heads * L * head_dim`` elements of each layer's buffer as a contiguous
``[n, kv_heads, L, head_dim]`` view (with ``L = max_len`` that is exactly the first ``n`` rows),
so every batch bucket, stream set and static/eager runner of a ``Decoder`` shares one
allocation: runners that are never live at the same time (one decode at a time per Decoder)
can share it, because every prefill/admission rewrites the slots a row reads and a decode step
writes its slot before it attends over it (the mask hides the rest).
"""
from __future__ import annotations

import torch
from torch import Tensor


class CacheLengthAsked(RuntimeError):
    """A model's forward asked ``StaticKVCache`` for one sequence length (``Runner`` turns it
    into an error that names the model)."""


class KVPool:
    """Keys and values of ``rows`` rows x ``max_len`` slots per layer, allocated on first use (a
    layer's shapes and dtype come from the model's own key states) and shared by the runners of
    one set of weights (``view``). Unused memory is zeroed the first time a view reaches it (on
    CPU the untouched pages of a large allocation stay unmapped); stale slots always hold finite
    values, so a masked slot contributes exactly zero to attention."""

    def __init__(self, rows: int, max_len: int, planned: int | None = None):
        self.rows, self.max_len = rows, max_len
        self.planned = planned  # bytes the whole pool will take (kv_bytes), when known
        self.keys: list[Tensor] = []    # per layer, flat [rows * h * max_len * dk]
        self.values: list[Tensor] = []
        self._shape: list[tuple] = []   # per layer (h, dk, dv)
        self._zeroed: list[int] = []    # per layer, elements (per head_dim unit) zeroed so far

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds (allocated layers), or will hold (``planned``) before its first
        use."""
        held = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        return held if self.keys or self.planned is None else self.planned

    def view(self, layer: int, n: int, length: int, like_k: Tensor, like_v: Tensor):
        """``(k, v)``: contiguous ``[n, h, length, d]`` views of layer ``layer``'s buffers
        (``h``, ``d``, dtype and device from ``like_k``/``like_v``). Layers are allocated in
        order on first use."""
        if n > self.rows or length > self.max_len:
            raise ValueError(f"a cache of {n} rows x {length} slots does not fit this KV pool of "
                             f"{self.rows} rows x {self.max_len} slots")
        h, dk, dv = like_k.shape[1], like_k.shape[3], like_v.shape[3]
        if layer == len(self.keys):
            size = self.rows * h * self.max_len
            self.keys.append(like_k.new_empty((size * dk,)))
            self.values.append(like_v.new_empty((size * dv,)))
            self._shape.append((h, dk, dv))
            self._zeroed.append(0)
        if self._shape[layer] != (h, dk, dv) or self.keys[layer].dtype != like_k.dtype:
            raise ValueError(f"layer {layer}: keys/values of {h} heads x {dk}/{dv} "
                             f"({like_k.dtype}) do not match this KV pool's "
                             f"{self._shape[layer]} ({self.keys[layer].dtype})")
        units = n * h * length
        if units > self._zeroed[layer]:
            lo = self._zeroed[layer]
            self.keys[layer][lo * dk:units * dk].zero_()
            self.values[layer][lo * dv:units * dv].zero_()
            self._zeroed[layer] = units
        return (self.keys[layer][:units * dk].view(n, h, length, dk),
                self.values[layer][:units * dv].view(n, h, length, dv))

    def free(self) -> None:
        """Drop the buffers (views still held elsewhere keep their memory alive)."""
        self.keys, self.values, self._shape, self._zeroed = [], [], [], []


def kv_layout(model):
    """``(layers, kv_heads, head_dim)`` of a causal LM from its config, or ``None`` when the
    config does not say (the pool then learns its shapes at the first forward)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim:
        hidden = getattr(cfg, "hidden_size", None)
        if not hidden:
            return None
        head_dim = hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def kv_bytes(model, rows: int, max_len: int) -> int | None:
    """Bytes of a KV pool of ``rows`` rows x ``max_len`` slots for ``model``: keys and values,
    ``2 * layers * rows * kv_heads * max_len * head_dim * itemsize`` (the model's dtype), or
    ``None`` when the config does not give the layout."""
    layout = kv_layout(model)
    if layout is None:
        return None
    layers, kv_heads, head_dim = layout
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * rows * kv_heads * max_len * head_dim * itemsize


def available_bytes(device) -> int | None:
    """Memory a new allocation on ``device`` can take: on CUDA the driver's free memory plus
    what torch's caching allocator holds unused; on CPU ``MemAvailable`` of ``/proc/meminfo``;
    ``None`` where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device)
                   - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_fits(needed: int | None, device, max_batch_size: int, max_seq_len: int,
               what: str = "the KV cache", rows_name: str = "max_batch_size") -> None:
    """Refuse (``ValueError``) a KV allocation of ``needed`` bytes that ``device`` does not
    have available, naming the sizes that set it (``rows_name``: what the caller calls the
    row count)."""
    if not needed:
        return
    avail = available_bytes(device)
    if avail is not None and needed > avail:
        raise ValueError(
            f"{what} for {rows_name}={max_batch_size} and max_seq_len={max_seq_len} needs "
            f"{needed} bytes ({needed / 2**30:.2f} GiB) but {torch.device(device)} has "
            f"{avail} bytes ({avail / 2**30:.2f} GiB) available; pass a smaller "
            f"{rows_name} or max_seq_len")


# The first read length of the ladder a captured or compiled step runs at (``read_ladder``), per
# device type. CUDA: below 256 a shorter read saves little (at batch 8 on the Llama-3.1-8B shape
# a slot of every row is 1 MiB of keys and values, so 256 slots are 256 MiB per step beside 16 GB
# of weights: 1.6%), while every rung costs a capture and its graph. CPU: 64, the eager step's
# granule (``ReadBound``) and the shortest cache a compiled step had before the ladder; a small
# model's KV is a larger share of its step there (SmolLM2-135M at batch 8: 256 slots are 94 MB
# beside 540 MB of fp32 weights), so the rungs start lower and each costs a compile.
MIN_READ = {"cuda": 256, "cpu": 64}


def read_ladder(max_len: int, device="cuda", first: int | None = None) -> tuple:
    """The read lengths a captured/compiled step on ``device`` is made for: ``first``
    (default ``MIN_READ`` of the device type), doubling while below ``max_len``, then
    ``max_len``; e.g. 256, 512, 1024, 2048 for 2048 slots on CUDA, ``(max_len,)`` when
    ``max_len <= first``. Doubling keeps a step at most twice what its rows need (1.4x,
    ``2 ln 2``, on average over a long decode) with ``log2(max_len / first) + 1`` rungs: 4
    graphs per (batch bucket, rule kind) at 2048 slots on CUDA, 8 at 32768."""
    n = MIN_READ.get(torch.device(device).type, 256) if first is None else first
    out = []
    while n < max_len:
        out.append(n)
        n *= 2
    return tuple(out) + (max_len,)


def ladder_length(ladder, needed: int | None) -> int:
    """The smallest rung of ``ladder`` that is at least ``needed`` (the last when none is;
    the first when ``needed`` is ``None``: no live row, nothing read matters)."""
    if needed is None:
        return ladder[0]
    return next((n for n in ladder if n >= needed), ladder[-1])


class ReadBound:
    """How many cache slots a runner's next decode step must attend over, known on the host
    (no device sync): one past the largest slot a live row writes in that step, rounded up to a
    multiple of ``granule`` (at most ``max_len``; few distinct shapes, and on CPU the attention
    kernels then sum the same blocks as over the whole cache: the masked tail adds exact zeros).

    Row ``i``'s next write slot is ``min(base[i] + steps, max_len - 1)``; ``fill`` sets
    ``base`` at a prefill or admission, ``step`` counts the steps, ``idle`` drops rows whose
    output no longer matters (a retired row keeps stepping, but what it reads is never used).
    ``length()`` is ``None`` (read every slot) while nothing is known or after ``off()``: a
    step captured or compiled outside ``engine.LengthSteps`` replays a fixed shape without
    running this bookkeeping, so such a runner reads its whole cache from then on. A
    ``LengthSteps`` step keeps it on: the host counts each replay (``step``) and picks the read
    length of the next one from ``needed()``."""

    def __init__(self, n_rows: int, max_len: int, granule: int = 64):
        self.n_rows, self.max_len, self.granule = n_rows, max_len, granule
        self.on = True
        self.steps = 0
        self.base: list = [None] * n_rows  # None: idle (or never filled)
        self.hi: int | None = None         # max of the live bases

    def _update(self) -> None:
        self.hi = max((b for b in self.base if b is not None), default=None)

    def fill(self, rows, length: int) -> None:
        """Rows ``rows`` (host ints; ``None`` = every row) write slot ``length`` next."""
        for i in (range(self.n_rows) if rows is None else rows):
            self.base[i] = length - self.steps
        self._update()

    def idle(self, rows) -> None:
        for i in rows:
            self.base[i] = None
        self._update()

    def merge(self) -> None:
        """Rows took other rows' caches (beam search): each may now be at any live row's slot."""
        if self.hi is not None:
            self.base = [self.hi] * self.n_rows

    def step(self) -> None:
        self.steps += 1

    def advance(self, counts) -> None:
        """After a verify step (``Runner.verify``/``Runner.advance``): row ``i`` moved on by
        ``counts[i]`` (host ints) slots, each row by its own count; idle rows stay idle."""
        for i, c in enumerate(counts):
            if self.base[i] is not None:
                self.base[i] += c
        self._update()

    def off(self) -> None:
        self.on = False

    def needed(self, extra: int = 0) -> int | None:
        """One past the largest slot a live row writes in the next step (``None``: no live
        row); ``extra``: the step writes that many slots more per row (a verify step of
        ``extra + 1`` positions). Known while ``on``; a ``LengthSteps`` replay keeps it counted
        (``step``)."""
        if self.hi is None:
            return None
        return min(self.max_len, self.hi + self.steps + 1 + extra)

    def length(self, extra: int = 0) -> int | None:
        if not self.on or self.hi is None:
            return None
        g = self.granule
        return min(self.max_len, -(-(self.hi + self.steps + 1 + extra) // g) * g)

    def state(self):
        return self.steps, list(self.base), self.hi

    def set_state(self, saved) -> None:
        self.steps, base, self.hi = saved
        self.base = list(base)


class StaticKVCache:
    """Duck-typed stand-in for a transformers ``Cache``: the model calls ``update`` per layer.

    ``write_pos`` (int64 ``[T]``) says which cache slots a prefill's ``T`` tokens go to (the
    same for every row). ``row_pos`` (int64 ``[N]``, or ``None``) is set for one-token decode
    steps: row ``i`` writes slot ``row_pos[i]`` (a per-row scatter; ``[N, T]`` for a verify
    step's ``T`` tokens per row, ``Runner.verify``); the runner points it at its static slot
    buffer, so a captured graph keeps writing through the same tensor. Storage is
    made on the first update (dtype, heads and head size come from the model's own key states),
    or by ``adopt``/``admit``: views of ``pool`` (``KVPool``) for ``rows`` rows when given,
    else its own zeroed buffers (a prefill's temporary cache). ``read_len`` (host int or
    ``None``): ``update`` writes into the whole cache but returns only slots ``[0, read_len)``,
    the slots the forward attends over (its mask must have as many columns).
    """

    is_compileable = True

    def __init__(self, max_len: int, pool: KVPool | None = None, rows: int | None = None):
        self.max_len = max_len
        self.pool, self.rows = pool, rows
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.write_pos: Tensor | None = None
        self.row_pos: Tensor | None = None
        self.read_len: int | None = None

    def _layer(self, i: int, like_k: Tensor, like_v: Tensor, n: int):
        """Layer ``i``'s ``(k, v)`` storage, made for ``n`` rows (or ``rows``) on first use."""
        if i == len(self.keys):
            n = self.rows or n
            if self.pool is not None:
                k, v = self.pool.view(i, n, self.max_len, like_k, like_v)
            else:
                h = like_k.shape[1]
                k = like_k.new_zeros((n, h, self.max_len, like_k.shape[3]))
                v = like_v.new_zeros((n, h, self.max_len, like_v.shape[3]))
            self.keys.append(k)
            self.values.append(v)
        return self.keys[i], self.values[i]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._layer(layer_idx, key_states, value_states, key_states.shape[0])
        if self.row_pos is None:
            k.index_copy_(2, self.write_pos, key_states)
            v.index_copy_(2, self.write_pos, value_states)
        else:  # one token per row (row_pos [N]) or T (a verify step: [N, T]), own slots
            n, h, t, _ = key_states.shape
            at = self.row_pos.view(n, 1, t, 1)
            k.scatter_(2, at.expand(n, h, t, k.shape[3]), key_states)
            v.scatter_(2, at.expand(n, h, t, v.shape[3]), value_states)
        n = self.read_len
        return (k, v) if n is None else (k[:, :, :n], v[:, :, :n])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # a forward that asks derives its positions (or its mask) from one cache length for
        # the whole batch, which left-padded rows in their own slots do not have
        raise CacheLengthAsked("aad_fast's StaticKVCache needs explicit position_ids")

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
        for i, (tk, tv) in enumerate(zip(other.keys, other.values)):
            k, v = self._layer(i, tk, tv, rows.shape[0])
            k[:, :, :length].copy_(tk.index_select(0, rows))
            v[:, :, :length].copy_(tv.index_select(0, rows))

    def admit(self, other: "StaticKVCache", dst: Tensor, n_rows: int) -> None:
        """Rows ``dst`` (int64 ``[U]``, distinct) take ``other``'s ``U`` rows in their first
        ``other.max_len`` slots; the other rows are untouched (a new prompt refills a slot row
        while the rest of the batch goes on). The rows' later slots keep stale keys, which the
        runner's mask hides until the row writes them. Storage for ``n_rows`` rows is made on
        first use, else written in place."""
        length = other.max_len
        for i, (tk, tv) in enumerate(zip(other.keys, other.values)):
            k, v = self._layer(i, tk, tv, n_rows)
            k[:, :, :length].index_copy_(0, dst, tk)
            v[:, :, :length].index_copy_(0, dst, tv)

