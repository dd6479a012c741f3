"""The engine's own one-token forward of a decoder-only model (gpt-fast style).

At small batch a decode step is a few hundred small ops; Hugging Face's forward adds module
calls, keyword plumbing and a few ops per layer that the one-token case does not need (the
RMSNorm as five ops, ``repeat_kv`` for grouped-query attention, mask preparation). On a
30-layer model at batch 1 on a 2-core CPU that is ~10 of ~33 ms per token. ``FastDecoder``
runs the same modules (so the engine view's LoRA rows and linear layouts apply unchanged) with
fewer ops: ``F.rms_norm`` in float32 (the norm module itself in other dtypes, whose rounding
order HF fixes), rotary embedding from the model's own ``rotary_emb`` (any rope scaling), one
``scaled_dot_product_attention`` with ``enable_gqa``, and the same cache ``update`` the model
calls (``cache.StaticKVCache``). Same maths, another float32 summation order in the norms.

Only for the architectures written here (``TYPES``: Llama/SmolLM, Mistral, Qwen2, Qwen3 with its
per-head q/k norms, OLMo-2 with its q/k norms over the whole projection and post-norms); the
prefill stays Hugging Face's. Whether it is used is measured, not assumed
(``decoder_pays``, below): it must beat the model's own forward on this machine.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import StaticKVCache
from ..tuning import cached, decide, store, time_candidates, valid

TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")


def _norm(x: Tensor, norm: nn.Module) -> Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


def _signed_sin(sin: Tensor) -> Tensor:
    """``sin`` with its first half negated: ``rotate_half(x) * sin`` is then
    ``roll(x, D/2) * signed`` (``(-x2) * s1 == -(x2 * s1)`` exactly), one op fewer per tensor."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: Tensor, cos: Tensor, signed: Tensor) -> Tensor:
    """HF's ``apply_rotary_pos_emb`` for one tensor, ``x cos + rotate_half(x) sin`` (``signed``:
    ``_signed_sin(sin)``), in the dtype of ``cos`` (OLMo-2's are float32 for any model dtype),
    returned in ``x``'s."""
    y = x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed
    return y if y.dtype == x.dtype else y.to(x.dtype)


class FastDecoder:
    """``view``'s decoder (``view.model``) as one-token forward ``(ids [N, 1], mask
    [N, 1, 1, S], pos [N, 1], cache) -> last hidden state [N, H]`` (after the final norm).
    ``mask`` may be a dict by layer type (``runner.Runner._masks``: sliding-window layers).
    ``of(view)`` returns ``None`` for a model it does not cover."""

    def __init__(self, view):
        cfg = view.config
        self.kind = cfg.model_type
        self.model = view.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        first = self.model.layers[0].self_attn
        self.head_dim = getattr(first, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(first, "scaling", self.head_dim ** -0.5)
        n = len(self.model.layers)
        self.layer_types = tuple(getattr(cfg, "layer_types", None) or ("full_attention",) * n)

    @classmethod
    def of(cls, view) -> "FastDecoder | None":
        m = getattr(view, "model", None)
        if getattr(view.config, "model_type", None) not in TYPES or m is None:
            return None
        if not all(hasattr(m, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")):
            return None  # an older transformers layout (rotary per attention module)
        attn = m.layers[0].self_attn
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return None
        return cls(view)

    def __call__(self, ids: Tensor, mask: Tensor, pos: Tensor, cache,
                 every: bool = False) -> Tensor:
        """``every``: ``ids``/``pos`` are ``[N, T]`` (a verify step, ``mask``
        ``[N, 1, T, S]``) and the hidden states of all ``T`` positions ``[N, T, H]`` return."""
        m = self.model
        n, t = ids.shape
        h = m.embed_tokens(ids)  # [N, 1, H]
        cos, sin = m.rotary_emb(h, pos)  # [N, 1, D]
        cos, sin = cos[:, None], _signed_sin(sin[:, None])  # [N, 1, 1, D]: over heads
        olmo2, qwen3 = self.kind == "olmo2", self.kind == "qwen3"
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            x = h if olmo2 else _norm(h, layer.input_layernorm)
            q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
            if olmo2:  # q/k norms over the whole projection, before the heads split
                q, k = _norm(q, at.q_norm), _norm(k, at.k_norm)
            # [N, 1, heads * D] -> [N, heads, 1, D]: with one token per row, HF's
            # view-then-transpose is this view (the same elements in the same order)
            q, k, v = (_heads(q, n, t, nh, d), _heads(k, n, t, nkv, d),
                       _heads(v, n, t, nkv, d))
            if qwen3:  # per-head q/k norms
                q, k = _norm(q, at.q_norm), _norm(k, at.k_norm)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k, v = cache.update(k, v, i)
            am = mask[self.layer_types[i]] if isinstance(mask, dict) else mask  # Runner._masks
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=am[..., : k.shape[2]],
                                               scale=self.scaling, enable_gqa=nkv != nh)
            # [N, heads, 1, D]: one token per row
            o = at.o_proj(o.reshape(n, 1, nh * d) if t == 1 else
                          o.transpose(1, 2).reshape(n, t, nh * d))
            if olmo2:
                h = h + _norm(o, layer.post_attention_layernorm)
                mlp = layer.mlp
                y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
                h = h + _norm(y, layer.post_feedforward_layernorm)
            else:
                h = h + o
                x = _norm(h, layer.post_attention_layernorm)
                mlp = layer.mlp
                h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = _norm(h, m.norm)
        return h if every else h[:, -1, :]


def _heads(x: Tensor, n: int, t: int, heads: int, d: int) -> Tensor:
    """``[N, T, heads * D]`` -> ``[N, heads, T, D]`` (HF's view then transpose; one view
    where ``T == 1``)."""
    return x.view(n, heads, 1, d) if t == 1 else x.view(n, t, heads, d).transpose(1, 2)


DECODER_MODES = ("auto", "hf", "fast")


def decoder_mode(mode: str | None = None) -> str:
    """The one-token forward switch: ``mode`` if given (``Decoder(forward=...)``), else
    ``$AAD_FAST_DECODER``, else ``auto`` (measure); ``hf``: the model's own forward; ``fast``:
    ``fast_decoder.FastDecoder`` where the architecture has one."""
    if mode is None:
        mode = os.environ.get("AAD_FAST_DECODER", "auto").strip().lower() or "auto"
    if mode not in DECODER_MODES:
        raise ValueError(f"forward (or AAD_FAST_DECODER) must be one of {DECODER_MODES}, "
                         f"got {mode!r}")
    return mode


def measure_decoder(view: nn.Module, fast, rows: int) -> dict:
    """ms of one one-token step of ``rows`` rows (over a 16-slot cache) through the model's own
    forward (``plain``) and through ``fast`` plus the model's head (``fast``)."""
    from .runner import cache_kwarg  # runner builds on this module's FastDecoder
    vocab = view.get_output_embeddings().weight.shape[0]
    p = next(view.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 1), generator=g).to(p.device)
    pos = torch.zeros((rows, 1), dtype=torch.int64, device=p.device)
    mask = torch.zeros((rows, 1, 1, 16), dtype=p.dtype, device=p.device)
    cache = StaticKVCache(16)
    cache.row_pos = torch.zeros((rows,), dtype=torch.int64, device=p.device)
    head, kw = view.get_output_embeddings(), cache_kwarg(type(view))

    def plain():
        view(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
             logits_to_keep=1, **{kw: cache})

    def engine():
        head(fast(ids, mask, pos, cache))
    with torch.inference_mode():
        plain()  # the cache's storage, before either is timed
        return time_candidates({"plain": plain, "fast": engine})


def decoder_pays(view: nn.Module, fast, rows: int, measure=None, mode: str | None = None) -> bool:
    """Whether decode steps of ``rows`` rows run ``fast`` (a ``FastDecoder``) instead of the
    model's forward: forced by ``$AAD_FAST_DECODER``, else measured on CPU (``measure_decoder``;
    cached per model shape, rows and dtype) and kept only if faster beyond noise. Other devices
    keep the model's forward (a captured CUDA graph has no per-op overhead to save)."""
    mode = decoder_mode(mode)
    if fast is None or mode == "hf":
        return False
    if mode == "fast":
        return True
    p = next(view.parameters())
    if p.device.type != "cpu":
        return False
    cfg = view.config
    entry = (f"decoder/{type(view).__name__}/h{cfg.hidden_size}/l{cfg.num_hidden_layers}/"
             f"{str(p.dtype).replace('torch.', '')}/rows{rows}")
    rec = cached(entry)
    if not valid(rec, ("plain", "fast")):
        times = (measure or measure_decoder)(view, fast, rows)
        rec = {"choice": decide(times), "plain_ms": times["plain"], "fast_ms": times["fast"],
               "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"] == "fast"
