"""``AADLogitsProcessor``: AAD inside Hugging Face's own ``generate()`` (greedy search), with the
reference model's cache kept by the processor. Re-exported by ``aad_fast.hf`` and ``aad_fast``.
"""
from __future__ import annotations

import sys

import torch


class AADLogitsProcessor:
    """AAD as a Hugging Face logits processor: ``aligned.generate(**enc, logits_processor=
    [AADLogitsProcessor(reference)], do_sample=False)`` picks docs/rules.md's AAD token at every step.

    The processor keeps its own cache of the reference model and feeds it only the newest token
    per call. Returns scores that are ``0`` at the chosen id and ``-inf`` elsewhere, so greedy
    search takes exactly that id.

    What it reads and what it refuses:

    - Inside ``generate()`` it reads two locals of transformers' decoding loop that calls it
      (``_sample``): ``generation_config`` and ``model_kwargs["attention_mask"]``. The mask is
      the one the aligned model gets, so the reference sees the same padding (a prompt that
      starts with the pad id is not mistaken for padding). ``num_beams > 1``, ``do_sample=True``,
      ``num_return_sequences > 1`` and assisted decoding are refused with a ``ValueError``: the
      processor can only make greedy AAD choices, which those modes would silently become.
    - Called from elsewhere (a custom loop), pass the prompt's mask with
      ``set_attention_mask(mask)`` before the first call of each generation (it is used once);
      without one, a batch of more than one row is refused unless no row starts with
      ``pad_token_id`` (then no row is padded).
    - A new generation is recognised when the calling loop changes or ``input_ids`` is not the
      previous call's ids plus one token per row (a new prompt, a new batch size); the cache is
      then rebuilt from the whole prompt, never continued.
    - A reference whose logits for a row are all -inf/NaN raises, naming the reference.
    - ``vocab_size``: the number of real token ids, ``len(tokenizer)``, where the models'
      embeddings have more rows than the tokenizer has tokens (padding rows, common in released
      checkpoints): ids at or beyond it are then never chosen (docs/rules.md). Without it every
      row of the logits is a token. (``Decoder`` reads this from the tokenizer itself.)
    - The reference model is put in eval mode (its forward runs here, every step).
    """

    def __init__(self, reference_model, alpha: float = 0.1, *, pad_token_id: int | None = None,
                 vocab_size: int | None = None, backend: str | None = None):
        from .ops import check_real
        self.model = reference_model.eval()
        self.alpha = check_real("alpha", alpha, 0.0, 1.0)
        self.pad = pad_token_id if pad_token_id is not None else getattr(
            reference_model.config, "pad_token_id", None)
        self.vocab_size, self.backend = vocab_size, backend
        self._next_mask = None
        self._reset()

    def _reset(self):
        self._cache = self._mask = self._pos = self._ids = self._loop = None

    def set_attention_mask(self, attention_mask):
        """The 0/1 mask ``[B, L]`` of the next generation's prompt (for callers other than
        Hugging Face's ``generate()``, which the processor reads itself). Returns ``self``."""
        self._next_mask = _check_mask(attention_mask, "attention_mask")
        return self

    @staticmethod
    def _caller():
        """``(generation_config, model_kwargs, function name, logits_processor)`` of the
        Hugging Face decoding loop up the stack, or ``None`` outside ``generate()``."""
        try:
            from transformers import GenerationConfig
        except ImportError:  # pragma: no cover
            return None
        f = sys._getframe(2)
        for _ in range(8):
            if f is None:
                return None
            loc = f.f_locals
            gc = loc.get("generation_config")
            if isinstance(gc, GenerationConfig):
                return gc, loc.get("model_kwargs") or {}, f.f_code.co_name, \
                    loc.get("logits_processor")
            f = f.f_back
        return None

    @staticmethod
    def _check_config(gc, fn: str) -> None:
        bad = [(k, v) for k, v, ok in (
            ("num_beams", gc.num_beams, gc.num_beams in (None, 1)),
            ("do_sample", gc.do_sample, not gc.do_sample),
            ("num_return_sequences", gc.num_return_sequences,
             gc.num_return_sequences in (None, 1))) if not ok]
        if fn != "_sample":
            bad.append(("decoding loop", fn))
        if bad:
            what = ", ".join(f"{k}={v!r}" for k, v in bad)
            raise ValueError(f"AADLogitsProcessor makes greedy AAD choices only, but generate() "
                             f"runs with {what}; pass do_sample=False, num_beams=1, "
                             "num_return_sequences=1 (for beam AAD or sampling rules use "
                             "aad_fast.Decoder with BeamAAD / Mix)")

    def _is_new(self, ids, loop) -> bool:
        if self._ids is None or (loop is not None and loop is not self._loop):
            return True
        prev = self._ids
        cont = ids.shape[0] == prev.shape[0] and ids.shape[1] == prev.shape[1] + 1 and \
            torch.equal(ids[:, :-1], prev)
        if not cont and loop is not None:
            raise RuntimeError("AADLogitsProcessor: input_ids is not the previous step's ids "
                               "plus one token inside one generate() call")
        return not cont

    def _prompt_mask(self, ids, caller):
        b, length = ids.shape
        if caller is not None:
            mask = caller[1].get("attention_mask")
            if mask is None:
                return torch.ones_like(ids)
            if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] < length:
                raise ValueError(f"generate()'s attention_mask has shape {tuple(mask.shape)}, "
                                 f"expected [{b}, >= {length}]")
            return _check_mask(mask[:, :length], "generate()'s attention_mask").to(ids.device)
        if self._next_mask is not None:
            mask, self._next_mask = self._next_mask, None
            if tuple(mask.shape) != (b, length):
                raise ValueError(f"set_attention_mask got shape {tuple(mask.shape)} but the "
                                 f"prompt is {(b, length)}; set the mask of this prompt")
            return mask.to(ids.device)
        if b == 1 or (self.pad is not None and not bool((ids[:, 0] == self.pad).any())):
            return torch.ones_like(ids)
        raise ValueError("AADLogitsProcessor called outside generate() on a batch of "
                         f"{b} rows whose padding it cannot tell from tokens (pad_token_id="
                         f"{self.pad}); call set_attention_mask(mask) before the first step")

    def _reference_logits(self, ids, caller):
        from transformers import DynamicCache

        from .model.runner import cache_kwarg
        kw = cache_kwarg(type(self.model))
        loop = caller[3] if caller is not None else None
        if self._is_new(ids, loop):
            real = self._prompt_mask(ids, caller).long()
            self._cache = DynamicCache()
            pos = (real.cumsum(1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=real, position_ids=pos,
                             use_cache=True, **{kw: self._cache})
            self._mask, self._pos, self._loop = real, pos[:, -1:], loop
        else:
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            self._pos = self._pos + 1
            out = self.model(input_ids=ids[:, -1:], attention_mask=self._mask,
                             position_ids=self._pos, use_cache=True, **{kw: self._cache})
        self._ids = ids
        return out.logits[:, -1, :]

    def __call__(self, input_ids, scores):
        from .ops import aad_select
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, length] tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or \
                scores.shape[0] != input_ids.shape[0]:
            raise ValueError(f"scores must be [batch={input_ids.shape[0]}, vocab], got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        caller = self._caller()
        if caller is not None:
            self._check_config(caller[0], caller[2])
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            ref = self._reference_logits(input_ids.to(dev), caller).to(scores.device).float()
        dead = (~(ref > -float("inf")).any(1)).nonzero().flatten().tolist()
        if dead:
            raise RuntimeError(f"row(s) {dead}: the reference model's logits are all -inf/NaN "
                               "(check the reference model's dtype/weights)")
        y = aad_select(scores.float(), ref, self.alpha, vocab_size=self.vocab_size,
                       backend=self.backend)
        bad = (y < 0).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"row(s) {bad}: the aligned logits are all -inf/NaN; no AAD "
                               "candidate")
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, y[:, None], 0.0)
        return out


def _check_mask(mask, name: str):
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [batch, length], got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)][:4].tolist()
        raise ValueError(f"{name} must hold 0 (padding) and 1 (token) only, got {odd}")
    return mask.long()
