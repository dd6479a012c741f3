"""One causal LM over static buffers: prefill and a graph-safe one-token step, run on the
engine's own view of the model.

The runner owns every buffer a decode step touches, sized once: the KV cache
(``cache.StaticKVCache``, a view of a ``cache.KVPool`` it may share with the other runners of
the same weights), the token input ``[N, 1]``, the per-row positions ``[N, 1]``, the per-row
cache write slots ``[N]`` and an additive attention mask ``[N, 1, 1, max_len]``. Rows are slots:
each row has its own length, write slot and positions, so between decode steps one row can be
refilled with a new prompt (``admit``: a prefill of just that prompt, copied into the row, and the
row's mask rebuilt) while the other rows go on. A static batch (``prefill``) is left-padded, so
there every row starts at the same slot. Hugging Face models accept the prepared 4D mask as-is and
only call ``cache.update`` (we always pass ``position_ids``), so the same runner serves Llama,
Qwen2/3, Mistral, OLMo2 and other standard decoder-only models.

Sliding-window attention (``sliding_layers``: Mistral, Phi-3, Gemma 2/3, OLMo 3, Qwen2 with
``use_sliding_window``) keeps a second mask ``smask`` whose rows see only their last ``window``
positions; a step masks the slot that leaves the window (a row's slots hold consecutive
positions from its first real token). The model gets ``{"full_attention": mask,
"sliding_attention": smask}`` where its layers mix the two (HF's per-layer-type masks), or
``smask`` alone where every layer slides.

``engine_view`` is the model the runner calls: a copy of the module tree that shares every
parameter and buffer (no weight is copied) with the decode-path layers replaced once, for the
runner's life: LoRA layers by ``lora_rows.RowLoRALinear`` (adapter on the aligned rows only), and
on CPU each plain fp32 ``nn.Linear`` by ``cpu_linear.FewRowLinear`` or
``cpu_linear.PackedLinear`` where ``cpu_linear.plan_linears`` measured that layout faster for the runner's row
count. Nothing is swapped around a forward, so two runners (or two threads) never see each
other's layers, and ``torch.compile`` can trace the step.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools

import torch
from torch import Tensor, nn

from .cache import CacheLengthAsked, KVPool, ReadBound, StaticKVCache
from .cpu_linear import FewRowLinear, PackedLinear, fits_in_memory, packed_bytes
from .forward import TYPES as FAST_TYPES, FastDecoder
from .lora_rows import RowCount, RowLoRALinear
from . import cpu_linear as linear_layouts
from . import forward as fast_forward


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


MASKED_ATTENTION = ("eager", "sdpa")  # HF attention implementations that take a 4-D float mask


def masked_attention(view: nn.Module) -> None:
    """Switch ``view`` (the engine's own copy, config included) to an attention implementation
    that applies the engine's prepared per-row 4-D masks, where the model was loaded with one
    that expects a padding mask or a block mask instead (``flash_attention_2``/``_3``,
    ``flex_attention``, hub kernels): ``sdpa``, else ``eager``. Same maths; the user's model
    keeps its own."""
    cfg = getattr(view, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl is None or impl in MASKED_ATTENTION:
        return
    for want in ("sdpa", "eager"):
        try:
            if hasattr(view, "set_attn_implementation"):
                view.set_attn_implementation(want)
            else:  # older transformers read the config's field at each forward
                cfg._attn_implementation = want
        except (ValueError, ImportError, AttributeError):
            continue
        if getattr(view.config, "_attn_implementation", None) == want:
            return
    raise ValueError(f"{type(view).__name__} was loaded with attn_implementation={impl!r}, which "
                     "does not apply aad_fast's per-row attention masks, and cannot be switched to "
                     "'sdpa' or 'eager'; load it with attn_implementation='sdpa'")


def engine_view(model: nn.Module, n_rows: int, lora=None, lora_rows: int = 0,
                cpu_linear: str | None = None):
    """``(view, plan)``: ``model``'s module tree with shared weights and the engine's layers.

    ``lora``: a ``lora_rows.RowLoRA`` of ``model``'s LoRA layers (``model`` is then the
    ``PeftModel``'s base model); the adapter goes on the first ``lora_rows`` rows (the view's
    ``aad_rows.n``, changeable per forward). ``cpu_linear``: ``linear_layouts.linear_mode`` switch.
    ``plan``: ``linear_layouts.plan_linears`` of the view's plain linears for ``n_rows`` rows."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, shared)
    masked_attention(view)
    view.aad_rows = RowCount(lora_rows)
    if lora is not None:
        names = {id(m): n for n, m in model.named_modules()}
        for _, mod, a_w, b_w, scale in lora.layers:
            name = names[id(mod)]
            base = view.get_submodule(name).base_layer
            _set_module(view, name, RowLoRALinear(base, a_w, b_w, scale, view.aad_rows))
    plan = linear_layouts.plan_linears(view, n_rows, cpu_linear)
    linears = [(name, mod) for name, mod in view.named_modules() if type(mod) is nn.Linear]
    packs = [mod.weight for _, mod in linears
             if plan.get(tuple(mod.weight.shape), {}).get("choice") == "packed"]
    if packs and not fits_in_memory(packed_bytes(packs)):
        for shape, rec in plan.items():  # a second copy of these weights would not fit
            if rec["choice"] == "packed":
                plan[shape] = dict(rec, choice="plain", source="memory: no room for packed copies")
    layouts = {shape: rec["choice"] for shape, rec in plan.items() if rec["choice"] != "plain"}
    if not layouts:
        return view.eval(), plan
    plain = copy.deepcopy(view, shared) if linear_layouts.linear_mode(cpu_linear) == "auto" else None
    kinds = {"few_row": FewRowLinear, "packed": PackedLinear}
    for name, mod in linears:
        layout = layouts.get(tuple(mod.weight.shape))
        if layout is not None:
            _set_module(view, name, kinds[layout](mod, n_rows))
    if plain is not None and not linear_layouts.plan_pays(view.eval(), plain.eval(), n_rows, layouts):
        # per-shape timings chose a layout, the whole step says no: plain everywhere
        for shape in layouts:
            plan[shape] = dict(plan[shape], choice="plain", source="whole-step check")
        return plain, plan
    return view.eval(), plan


class SplitHead:
    """A view's decoder and vocabulary projection apart, for a step that needs a stream's logits
    on a few ids only (``engine.reference_logits``): ``head`` is the view's own output layer
    (what the full forward runs), ``weight``/``bias`` its parameters, whose rows give single
    logits. Only for the architectures ``fast_decoder.TYPES`` writes out (their logits are
    exactly ``lm_head(decoder(x))``: no softcap or logit scale; tests/test_ref_head.py checks
    each) and a plain (not LoRA) head."""

    def __init__(self, decoder, head):
        self.decoder, self.head, self.weight, self.bias = decoder, head, head.weight, head.bias

    @classmethod
    def of(cls, view) -> "SplitHead | None":
        if getattr(view.config, "model_type", None) not in FAST_TYPES:
            return None
        head, decoder = view.get_output_embeddings(), getattr(view, "model", None)
        if not isinstance(head, (nn.Linear, FewRowLinear, PackedLinear)) or decoder is None:
            return None
        return cls(decoder, head)

    def base_logits(self, hidden: Tensor) -> Tensor:
        """The projection of every id, ``[R, V]``."""
        return self.head(hidden)


SLIDING_TYPES = ("full_attention", "sliding_attention")


def _biting_window(config, max_len: int) -> int | None:
    """The config's sliding window where it is on and shorter than ``max_len`` slots."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_len or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def sliding_layers(config, max_len: int):
    """``(window, kinds)`` of a model config whose sliding-window attention can bite within
    ``max_len`` slots: ``window`` (int) and ``kinds`` (per-layer ``SLIDING_TYPES`` names, or
    ``None``: every layer slides). ``(None, None)``: full attention everywhere, or a window of
    at least ``max_len`` (then the same thing). Layer types other than these two are left to
    the caller (``sliding_unsupported``)."""
    window = _biting_window(config, max_len)
    kinds = getattr(config, "layer_types", None)
    if window is None or kinds is None:
        return window, None
    kinds = tuple(kinds)
    if "sliding_attention" not in kinds or not set(kinds) <= set(SLIDING_TYPES):
        return None, None
    return window, kinds


def sliding_unsupported(config, max_len: int) -> int | None:
    """The window of a model whose attention ``sliding_layers`` cannot express (layer types
    other than full and sliding attention) and that bites within ``max_len``, else ``None``."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None or set(kinds) <= set(SLIDING_TYPES):
        return None
    return _biting_window(config, max_len)


def cut_masks(masks, n: int):
    """``masks`` (a mask ``[N, 1, Q, S]`` or a dict of them) over their first ``n`` slots."""
    if isinstance(masks, dict):
        return {k: v[..., :n] for k, v in masks.items()}
    return masks[..., :n]


@functools.cache
def cache_kwarg(cls) -> str:
    """The name the model's forward takes its cache under: ``cache`` (transformers >= 5.24,
    which deprecates ``past_key_values``) or ``past_key_values``."""
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Runner:
    """One causal LM over ``n_rows`` rows with static buffers (see module docstring).

    ``lora``/``lora_rows``/``cpu_linear``: as ``engine_view``. ``pool``: the ``cache.KVPool``
    (of at least ``n_rows`` rows x ``max_len`` slots) whose views are this runner's KV cache;
    runners of one set of weights that are never live at the same time share one (a
    ``Decoder``'s buckets). Default: a pool of its own."""

    def __init__(self, model, n_rows: int, max_len: int, lora=None, lora_rows: int = 0,
                 cpu_linear: str | None = None, pool: KVPool | None = None,
                 forward: str | None = None):
        self.model, self.plan = engine_view(model, n_rows, lora, lora_rows, cpu_linear)
        self.lora, self.lora_rows = lora, lora_rows
        self.n_rows = n_rows
        self.max_len = max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.neg = torch.finfo(self.dtype).min
        self.pool = KVPool(n_rows, max_len) if pool is None else pool
        self.cache = StaticKVCache(max_len, self.pool, n_rows)
        self._cache_kw = cache_kwarg(type(self.model))
        dev = self.device
        self.ids = torch.zeros((n_rows, 1), dtype=torch.int64, device=dev)
        self.pos = torch.zeros((n_rows, 1), dtype=torch.int64, device=dev)
        self.slot = torch.zeros((n_rows,), dtype=torch.int64, device=dev)
        self.mask = torch.full((n_rows, 1, 1, max_len), self.neg, dtype=self.dtype, device=dev)
        self.window, self.layer_types = sliding_layers(getattr(self.model, "config", None), max_len)
        self.smask = None if self.window is None else self.mask.clone()
        # host mirror of the live rows' slots: an eager step attends over the written ones only
        self.bound = ReadBound(n_rows, max_len)
        # the read length of a captured/compiled step (engine.LengthSteps sets it around its
        # build and replays; None: eager, read_len() decides per step)
        self.fixed_len: int | None = None
        self.reads: dict = {}  # host counts: steps run per read length (Decoder stats)
        self.cols = torch.arange(max_len, dtype=torch.int64, device=dev)  # slot indices
        self._verify: dict = {}  # per verify width T: ids, positions, write slots [N, T]
        self.split = SplitHead.of(self.model)
        fast = FastDecoder.of(self.model)
        self.fast = fast if fast_forward.decoder_pays(self.model, fast, n_rows, mode=forward) else None

    def _masks(self, mask: Tensor, smask: Tensor | None):
        """What the model's ``attention_mask`` gets (see the module docstring)."""
        if smask is None:
            return mask
        if self.layer_types is None:
            return smask
        return {"full_attention": mask, "sliding_attention": smask}

    def _window(self, smask: Tensor, real: Tensor) -> None:
        """Open in ``smask`` (``[U, 1, 1, S]``, all masked) the prompts' real tokens ``real``
        ``[U, L]`` that the next position (``len(prompt)``) sees within the window."""
        kpos = real.long().cumsum(1) - 1
        near = kpos > real.long().sum(1, keepdim=True) - self.window
        smask[:, 0, 0, :real.shape[1]].masked_fill_(real & near, 0.0)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache=None) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: self.cache if cache is None else cache})
        return out.logits[:, -1, :]

    def _encode(self, ids: Tensor, real: Tensor, cache: StaticKVCache,
                lora_rows: int | None) -> Tensor:
        """Forward left-padded prompts ``ids``/``real`` ``[U, L]`` (on the device) into the
        first ``L`` slots of ``cache`` (one slot per position, shared by the rows), attending
        over those ``L`` slots only; the last position's logits ``[U, V]``."""
        dev = self.device
        u, length = ids.shape
        slots = length
        keys = torch.zeros((u, slots), dtype=torch.bool, device=dev)
        keys[:, :length] = real
        causal = torch.ones((length, slots), dtype=torch.bool, device=dev).tril()
        allowed = causal[None] & keys[:, None, :]
        mask4 = torch.full((u, 1, length, slots), self.neg, dtype=self.dtype, device=dev)
        mask4.masked_fill_(allowed[:, None], 0.0)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        smask4 = None
        if self.window is not None:
            near = (pos[:, :, None] - pos[:, None, :]) < self.window  # [U, query, key]
            smask4 = torch.full_like(mask4, self.neg).masked_fill_((allowed & near)[:, None], 0.0)
        cache.write_pos = torch.arange(length, device=dev)
        cache.row_pos, cache.read_len = None, length
        counts = self.model.aad_rows
        counts.n = self.lora_rows if lora_rows is None else lora_rows
        try:
            return self._forward(ids, self._masks(mask4, smask4), pos, cache)
        except CacheLengthAsked:
            cfg = getattr(self.model, "config", None)
            raise ValueError(
                f"{type(self.model).__name__} (model_type {getattr(cfg, 'model_type', '?')!r}) "
                "is not supported as aligned or reference model: its forward derives positions "
                "from the cache's length (ALiBi or learned positions, as Bloom, Falcon, MPT and "
                "OPT do) where aad_fast gives every row its own position_ids. Supported are "
                "decoder-only models whose forward takes position_ids (Llama, Qwen, Mistral, "
                "Gemma, Phi, OLMo, GPT-NeoX, ...)") from None
        finally:
            counts.n = self.lora_rows
            cache.read_len = None

    def _check_width(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"prompt length {length} exceeds max_seq_len={self.max_len}")

    def prefill(self, ids: Tensor, real: Tensor, rows: Tensor | None = None,
                lora_rows: int | None = None) -> Tensor:
        """Encode left-padded prompts into every row. ``ids``, ``real`` int64/bool
        ``[n_rows, L]`` (``real`` marks non-padding). Returns the last position's logits
        ``[n_rows, V]`` (model dtype).

        ``rows`` (int64 ``[n_rows]``, optional): ``ids``/``real`` then hold ``U`` distinct
        prompts and row ``i`` is prompt ``rows[i]``; each prompt is encoded once and its cache
        copied to its rows (beam search); ``lora_rows`` then replaces the runner's count of
        adapter rows for that forward (the aligned rows among the ``U`` prompts)."""
        n, length = (ids.shape if rows is None else (rows.shape[0], ids.shape[1]))
        if n != self.n_rows:
            raise ValueError(f"prefill got {n} rows, runner was built for {self.n_rows}")
        self._check_width(length)
        dev = self.device
        ids, real = ids.to(dev), real.to(dev).bool()
        # U distinct prompts go through a temporary cache of just the prompt's slots
        cache = self.cache if rows is None else StaticKVCache(length)
        logits = self._encode(ids, real, cache, lora_rows)
        if rows is not None:
            rows = rows.to(dev)
            self.cache.adopt(cache, rows)
            logits, real = logits.index_select(0, rows), real.index_select(0, rows)
        # Decode state: the prompt's real tokens are visible, the next token goes to slot L.
        self.mask.fill_(self.neg)
        self.mask[:, 0, 0, :length].masked_fill_(real, 0.0)
        if self.smask is not None:
            self.smask.fill_(self.neg)
            self._window(self.smask, real)
        self.pos.copy_(real.long().sum(1, keepdim=True))
        self.slot.fill_(length)
        self.cache.row_pos = self.slot
        self.bound.fill(None, length)
        return logits

    def admit(self, ids: Tensor, real: Tensor, dst: Tensor, lora_rows: int | None = None) -> Tensor:
        """Refill rows ``dst`` (int64 ``[U]``, distinct) with ``U`` new left-padded prompts
        ``ids``/``real`` ``[U, L]``; the other rows keep their cache, positions, slots and mask.
        The prompts are encoded over a temporary cache of ``L`` slots, copied into the rows'
        first ``L`` slots; each row's mask is rebuilt (its prompt's real tokens only), its next
        token goes to slot ``L`` at position ``len(prompt)``. ``lora_rows``: as ``prefill``.
        Returns the last position's logits ``[U, V]``. Not graph-safe (host indices); it runs
        between captured steps and changes only buffer contents."""
        u, length = ids.shape
        self._check_width(length)
        dev = self.device
        ids, real, dst = ids.to(dev), real.to(dev).bool(), dst.to(dev)
        cache = StaticKVCache(length)
        logits = self._encode(ids, real, cache, lora_rows)
        self.cache.admit(cache, dst, self.n_rows)
        mask = torch.full((u, 1, 1, self.max_len), self.neg, dtype=self.dtype, device=dev)
        mask[:, 0, 0, :length].masked_fill_(real, 0.0)
        self.mask.index_copy_(0, dst, mask)
        if self.smask is not None:
            mask.fill_(self.neg)
            self._window(mask, real)
            self.smask.index_copy_(0, dst, mask)
        self.pos.index_copy_(0, dst, real.long().sum(1, keepdim=True))
        self.slot.index_fill_(0, dst, length)
        self.cache.row_pos = self.slot
        if self.bound.on:  # (a host read of dst: admission is not graph-safe anyway)
            self.bound.fill(dst.tolist(), length)
        return logits

    def read_len(self, extra: int = 0) -> int | None:
        """Cache slots the next step attends over: ``fixed_len`` when set (a step of
        ``engine.LengthSteps``, made for that length, whose replays the host counts); else
        ``None`` (all ``max_len``) inside a CUDA-graph capture or a ``torch.compile`` trace,
        whose fixed shapes are replayed without this host bookkeeping (so the runner reads its
        whole cache from then on: ``ReadBound.off``), else one past the largest slot a live
        row writes in it (``ReadBound``; ``extra`` slots more per row for a verify step of
        ``extra + 1`` positions), when known."""
        if self.fixed_len is not None:
            return self.fixed_len
        if torch.compiler.is_compiling() or (
                self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.bound.off()
            return None
        return self.bound.length(extra) if extra else self.bound.length()

    def idle(self, rows, period: int | None = None) -> None:
        """Rows ``rows`` (host ints) are idle until refilled (``admit``): their outputs are not
        read, so the step's attention need not cover their slots. ``period``: this runner
        stacks streams of ``period`` rows (a shared pair's ``B``); row ``j`` of every stream is
        idled."""
        period = period or self.n_rows
        rows = [j + m for j in rows for m in range(0, self.n_rows, period)]
        self.bound.idle(rows)
        if self.bound.on and rows:
            # an idle row's own slots may all lie past what a step reads: open slot 0 to it, so
            # its attention is never fully masked (kernels that give NaN there would write NaN
            # keys that a later occupant of the row reads under its mask); admit rebuilds it
            with torch.inference_mode():  # (the mask may have been made in inference mode)
                idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
                for m in (self.mask, self.smask):
                    if m is not None:
                        m[:, 0, 0, 0].index_fill_(0, idx, 0.0)

    def _bounded(self, forward, ids: Tensor, mask, pos: Tensor) -> Tensor:
        """``forward(ids, mask, pos)`` of a one-token step, attending over the first
        ``read_len()`` slots only (the mask's and the cache's views; all of them when
        ``None``). With ``fixed_len`` set nothing on the host is touched (the step may be traced
        or captured; ``engine.LengthSteps`` counts its replays), else the step is counted."""
        n = self.read_len()
        if n is None:
            out = forward(ids, mask, pos)
        else:
            self.cache.read_len = n
            try:
                out = forward(ids, cut_masks(mask, n), pos)
            finally:
                self.cache.read_len = None
        if self.fixed_len is None and not torch.compiler.is_compiling():
            if n is not None:
                self.bound.step()
            self.count_read(n)
        return out

    def count_read(self, n: int | None) -> None:
        """Host count of one step that read ``n`` slots (``None``: all ``max_len``)."""
        n = self.max_len if n is None else n
        self.reads[n] = self.reads.get(n, 0) + 1

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (int64 ``[n_rows]``, valid ids) and return the next logits
        ``[n_rows, V]``. Graph-safe: only in-place updates of the runner's own buffers. Run
        eagerly, attention reads only the first ``read_len()`` slots (the mask's and the
        cache's views), which hold everything a live row has written."""
        if self.fast is not None:
            return self._step(tokens, self._fast_logits)
        return self._step(tokens, self._forward)

    def _fast_logits(self, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(self.fast(ids, mask, pos, self.cache))

    def step_hidden(self, tokens: Tensor) -> Tensor:
        """``step`` without the vocabulary projection: the last hidden state ``[n_rows, H]``
        (what ``head`` turns into ``step``'s logits). Only where ``split`` is set."""
        return self._step(tokens, self._hidden)

    def _step(self, tokens: Tensor, forward) -> Tensor:
        self.ids.copy_(tokens.view(-1, 1))
        slot = self.slot.view(-1, 1, 1, 1)
        self.mask.scatter_(3, slot, 0.0)
        if self.smask is not None:
            # the position leaving the window is ``window`` slots back (none yet: write the
            # open current slot instead, a no-op)
            old = slot - self.window
            gone = old >= 0
            self.smask.scatter_(3, torch.where(gone, old, slot), gone.to(self.dtype) * self.neg)
            self.smask.scatter_(3, slot, 0.0)
        out = self._bounded(forward, self.ids, self._masks(self.mask, self.smask), self.pos)
        # a finished or idle row keeps stepping until it is refilled: keep it in the cache
        # (a live row never gets there: prompt + max_new fits max_len)
        last = self.max_len - 1
        self.pos.add_(1).clamp_(max=last)
        self.slot.add_(1).clamp_(max=last)
        return out

    def _hidden(self, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        if self.fast is not None:
            return self.fast(ids, mask, pos, self.cache)
        decoder = self.split.decoder
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{cache_kwarg(type(decoder)): self.cache})
        return out.last_hidden_state[:, -1, :]

    # ------------------------------------------------------------------ verify steps
    def verify(self, tokens: Tensor) -> Tensor:
        """Feed ``T`` tokens per row (int64 ``[n_rows, T]``, valid ids: the last accepted
        token, then the drafted ones) at each row's own next ``T`` positions and cache slots,
        causal within the block, and return the logits of every position ``[n_rows, T, V]``
        (position ``j`` predicts the token after ``tokens[:, j]``). Positions, slots and masks
        are *not* moved on: ``advance`` does that once the accepted counts are known; the KV
        written at the slots of rejected positions is masked until a later step overwrites
        it. Slots and positions past the cache's last are clamped to it (only positions past a
        row's ``max_new_tokens`` get there, whose logits are never read). Graph-safe like
        ``step`` (per-width buffers made on the first call of a width); eagerly, attention
        reads the first ``read_len(T - 1)`` slots."""
        t = tokens.shape[1]
        if t not in self._verify:
            self._verify[t] = tuple(torch.zeros((self.n_rows, t), dtype=torch.int64,
                                                device=self.device) for _ in range(3))
        ids, pos, slots = self._verify[t]
        ids.copy_(tokens)
        last = self.max_len - 1
        ahead = self.cols[:t]
        torch.add(self.pos, ahead, out=pos).clamp_(max=last)
        torch.add(self.slot.view(-1, 1), ahead, out=slots).clamp_(max=last)
        n = self.read_len(t - 1)
        width = self.max_len if n is None else n
        masks = self._masks(*self._verify_masks(t, width))
        self.cache.row_pos, self.cache.read_len = slots, n
        try:
            out = (self._fast_every if self.fast is not None else self._forward_every)(
                ids, masks, pos)
        finally:
            self.cache.row_pos, self.cache.read_len = self.slot, None
        if self.fixed_len is None and not torch.compiler.is_compiling():
            self.count_read(n)
        return out

    def _verify_masks(self, t: int, width: int):
        """The ``[N, 1, T, width]`` masks of a verify step: query ``j`` of a row at slot ``s``
        sees what the row's mask shows plus slots ``s .. s + j`` (the block's causal part);
        where the model slides, its window ``(s + j - window, s + j]`` over ``smask`` (which
        shows the row's last ``window - 1`` slots before ``s``). A query that sees nothing (an
        idle row past the read length) sees slot 0, as ``idle`` arranges for the one-token
        step, so no attention row is all masked (NaN)."""
        d = (self.cols[:width].view(1, 1, -1) - self.slot.view(-1, 1, 1))  # [N, 1, W]: c - s
        j = self.cols[:t].view(1, -1, 1)
        new = ((d >= 0) & (d <= j))[:, None]  # [N, 1, T, W]
        full = torch.where(new, 0.0, self.mask[..., :width])
        slide = None
        if self.smask is not None:
            near = (d > j - self.window)[:, None]
            slide = torch.where(near, torch.where(new, 0.0, self.smask[..., :width]), self.neg)
        for m in (full, slide):
            if m is not None:
                dead = (m == self.neg).all(dim=-1, keepdim=True)
                m[..., :1].masked_fill_(dead, 0.0)
        return full, slide

    def _forward_every(self, ids: Tensor, mask, pos: Tensor) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=0, **{self._cache_kw: self.cache})
        return out.logits

    def _fast_every(self, ids: Tensor, mask, pos: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(self.fast(ids, mask, pos, self.cache, True))

    def advance(self, count: Tensor, host=None) -> None:
        """After a ``verify``: row ``i`` keeps its first ``count[i]`` positions (int64
        ``[n_rows]``, ``0 .. T``), as ``count[i]`` one-token steps would have: its mask opens
        those slots (``smask``: and closes the slots that leave its window), its position and
        slot move on by ``count[i]``. ``host``: the same counts as host ints (the
        ``ReadBound``'s bookkeeping; ``None`` where the caller replays a captured step and
        counts on its own). Graph-safe."""
        d = self.cols.view(1, -1) - self.slot.view(-1, 1)  # [N, max_len]: c - s
        c = count.view(-1, 1)
        kept = ((d >= 0) & (d < c)).view(self.n_rows, 1, 1, -1)
        self.mask.masked_fill_(kept, 0.0)
        if self.smask is not None:
            # each kept step at slot s + i closed slot s + i - window, then opened its own
            w = self.window
            gone = ((d >= -w) & (d < c - w)).view(self.n_rows, 1, 1, -1)
            self.smask.masked_fill_(kept, 0.0).masked_fill_(gone, self.neg)
        last = self.max_len - 1
        self.pos.add_(c).clamp_(max=last)
        self.slot.add_(count).clamp_(max=last)
        if host is not None:
            self.bound.advance(host)

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        """Row ``i`` continues from row ``index[i]`` (beam search): cache slots
        ``[start, stop)`` (default all), positions and mask."""
        self.cache.reorder(index, start, stop)
        self.bound.merge()
        self.pos.copy_(self.pos.index_select(0, index))
        self.slot.copy_(self.slot.index_select(0, index))
        self.mask.copy_(self.mask.index_select(0, index))
        if self.smask is not None:
            self.smask.copy_(self.smask.index_select(0, index))

    def snapshot(self) -> list:
        """Copies of the small decode buffers and the host bound (graph warm-up must not change
        the decode)."""
        return [t.clone() for t in self._small()] + [self.bound.state()]

    def restore(self, saved: list) -> None:
        small = self._small()
        for t, s in zip(small, saved):
            t.copy_(s)
        self.bound.set_state(saved[len(small)])

    def _small(self) -> tuple:
        return (self.pos, self.slot, self.mask) + (() if self.smask is None else (self.smask,))
