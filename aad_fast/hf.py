"""Hugging Face interop: loading models, adapters and tokenizers from local paths, tokenizer
checks, and ``AADLogitsProcessor`` for Hugging Face's own ``generate()``.

Nothing here downloads: paths must exist locally (``local_files_only=True`` everywhere).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch


def _check_dir(path, arg: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{arg}={str(path)!r}: no such file or directory (aad_fast loads "
                         "models from local paths only; nothing is downloaded)")
    if not p.is_dir() or not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
        raise ValueError(f"{arg}={str(path)!r} is not a model directory (no config.json or "
                         "adapter_config.json in it)")
    return p


def is_adapter_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").exists()


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def load_causal_lm(path, arg: str, dtype=None, device=None):
    from transformers import AutoModelForCausalLM
    p = _check_dir(path, arg)
    if not (p / "config.json").exists():
        raise ValueError(f"{arg}={str(path)!r} is a LoRA adapter directory; pass it as "
                         "`aligned` (with its base as `reference`)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype or "auto",
                                                     local_files_only=True)
    except Exception as exc:
        raise ValueError(f"{arg}={str(path)!r} could not be loaded as a causal LM: {exc}") from exc
    return model.to(device) if device is not None else model


def load_adapter(base, path, **kwargs):
    """``PeftModel.from_pretrained`` from a local directory, without peft's call of a deprecated
    transformers property warning on every load."""
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        return PeftModel.from_pretrained(base, str(path), local_files_only=True, **kwargs)


def load_tokenizer(path):
    """The tokenizer saved beside a model or adapter, or ``None``."""
    if path is None:
        return None
    from transformers import AutoTokenizer
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                          "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception:
        return None


def check_same_tokenizer(tok_a, tok_r, name_a: str, name_r: str) -> None:
    """docs/stopping-and-input.md: two models whose tokenizers map tokens to ids differently
    are refused."""
    if tok_a is None or tok_r is None or tok_a is tok_r:
        return
    va, vr = tok_a.get_vocab(), tok_r.get_vocab()
    if va != vr:
        diff = next((t for t in va if vr.get(t) != va[t]), None)
        if diff is None:
            diff = next(t for t in vr if va.get(t) != vr[t])
        raise ValueError(
            f"the tokenizers of {name_a} and {name_r} differ (token {diff!r} has id "
            f"{va.get(diff)} in {name_a} and {vr.get(diff)} in {name_r}); both streams must "
            "share one vocabulary")


def _base_weights_match(peft_model, reference) -> bool:
    """True when ``reference`` holds the same weights as the adapter's base model."""
    base = peft_model.get_base_model()
    if base is reference:
        return True
    ref_params = dict(reference.named_parameters())
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        q = ref_params.get(key)
        if q is None or q.shape != p.shape or not torch.equal(q.to(p.device, p.dtype), p):
            return False
    return True


def load_pair(aligned, reference=None, *, dtype=None, device=None, tokenizer=None):
    """Resolve ``aligned``/``reference`` (models or local paths) into
    ``(kind, model_a, model_r, tokenizer, names)`` with kind ``"lora"``, ``"two"`` or ``"one"``.

    ``kind == "lora"``: ``model_a`` is a ``PeftModel`` and ``model_r`` is ``None`` (the base).
    """
    name_a = str(aligned) if isinstance(aligned, (str, os.PathLike)) else type(aligned).__name__
    name_r = (str(reference) if isinstance(reference, (str, os.PathLike))
              else (type(reference).__name__ if reference is not None else None))
    tok = tokenizer
    tok_a = tok_r = None
    # --- the aligned side: a model, a PeftModel, a model dir or an adapter dir
    if isinstance(aligned, (str, os.PathLike)):
        p = _check_dir(aligned, "aligned")
        tok_a = load_tokenizer(p)
        if is_adapter_dir(p):
            cfg = json.loads((p / "adapter_config.json").read_text())
            base_path = reference
            recorded = cfg.get("base_model_name_or_path")
            if base_path is None:
                if not recorded or not Path(recorded).expanduser().is_dir():
                    raise ValueError(
                        f"aligned={name_a!r} is a LoRA adapter whose base "
                        f"{recorded!r} is not a local directory; pass reference=PATH_TO_BASE")
                base_path = recorded
            if isinstance(base_path, (str, os.PathLike)):
                _check_dir(base_path, "reference")
                tok_r = load_tokenizer(base_path)
                base = load_causal_lm(base_path, "reference", dtype, device)
                name_r = str(base_path)
                if recorded and Path(recorded).expanduser().is_dir() and \
                        Path(recorded).resolve() != Path(base_path).resolve():
                    _check_same_config(recorded, base.config, name_a, name_r)
            else:
                base = reference
            try:
                model_a = load_adapter(base, p)
            except Exception as exc:
                raise ValueError(f"the LoRA adapter {name_a!r} does not fit the reference model "
                                 f"{name_r!r}: {exc}") from exc
            if device is not None:
                model_a = model_a.to(device)
            tok = tok or tok_a or tok_r
            check_same_tokenizer(tok_a, tok_r, name_a, name_r)
            return "lora", model_a.eval(), None, tok, (name_a, name_r)
        model_a = load_causal_lm(p, "aligned", dtype, device)
    else:
        model_a = aligned
    if is_peft_model(model_a):
        if reference is not None:
            ref = (load_causal_lm(reference, "reference", dtype, device)
                   if isinstance(reference, (str, os.PathLike)) else reference)
            if not _base_weights_match(model_a, ref):
                raise ValueError(f"the reference model {name_r} is not the base model of the "
                                 f"LoRA adapter {name_a}; pass the adapter's own base as "
                                 "reference (or omit reference to use it)")
            if isinstance(reference, (str, os.PathLike)):
                tok_r = load_tokenizer(reference)
        tok = tok or tok_a or tok_r
        return "lora", model_a.eval(), None, tok, (name_a, name_r or "its base model")
    # --- plain model: a second model or none (one model, two prompts)
    if reference is None:
        return "one", model_a.eval(), None, tok or tok_a, (name_a, None)
    if isinstance(reference, (str, os.PathLike)):
        _check_dir(reference, "reference")
        tok_r = load_tokenizer(reference)
        model_r = load_causal_lm(reference, "reference", dtype, device)
    else:
        model_r = reference
    check_same_tokenizer(tok_a, tok_r, name_a, name_r)
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, tok_a or tok_r, "tokenizer", name_a)
    return "two", model_a.eval(), model_r.eval(), tok or tok_a or tok_r, (name_a, name_r)


def _check_same_config(recorded, config, name_a, name_r):
    try:
        rec = json.loads((Path(recorded) / "config.json").read_text())
    except (OSError, ValueError):
        return
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if key in rec and getattr(config, key, rec[key]) != rec[key]:
            raise ValueError(
                f"the reference model {name_r} is not the base of the LoRA adapter {name_a}: "
                f"its {key} is {getattr(config, key)} but the adapter's base {recorded} has "
                f"{rec[key]}")


class AADLogitsProcessor:
    """AAD as a Hugging Face logits processor: ``aligned.generate(..., logits_processor=
    [AADLogitsProcessor(reference)], do_sample=False)`` picks docs/rules.md's AAD token at every
    step.

    The processor keeps its own cache of the reference model and feeds it only the newest token
    per call. Batches must be left-padded; pad positions are recognised by ``pad_token_id``
    (default: the reference's ``config.pad_token_id``) when they lead a row. Returns scores that
    are ``0`` at the chosen id and ``-inf`` elsewhere, so greedy search takes exactly that id.
    """

    def __init__(self, reference_model, alpha: float = 0.1, *, pad_token_id: int | None = None,
                 vocab_size: int | None = None, backend: str | None = None):
        from .ops import _check_real
        self.model = reference_model.eval()
        self.alpha = _check_real("alpha", alpha, 0.0, 1.0)
        self.pad = pad_token_id if pad_token_id is not None else getattr(
            reference_model.config, "pad_token_id", None)
        self.vocab_size, self.backend = vocab_size, backend
        self._reset()

    def _reset(self):
        self._cache = self._mask = self._pos = None
        self._seen = 0

    def _reference_logits(self, input_ids):
        from transformers import DynamicCache
        dev = next(self.model.parameters()).device
        ids = input_ids.to(dev)
        if self._cache is None or ids.shape[1] != self._seen + 1:
            if self.pad is None:
                real = torch.ones_like(ids, dtype=torch.long)
            else:
                real = ((ids != self.pad).long().cumsum(1) > 0).long()
            self._cache = DynamicCache()
            pos = (real.cumsum(1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=real, position_ids=pos,
                             past_key_values=self._cache, use_cache=True)
            self._mask, self._pos = real, pos[:, -1:]
        else:
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            self._pos = self._pos + 1
            out = self.model(input_ids=ids[:, -1:], attention_mask=self._mask,
                             position_ids=self._pos, past_key_values=self._cache, use_cache=True)
        self._seen = ids.shape[1]
        return out.logits[:, -1, :]

    def __call__(self, input_ids, scores):
        from .ops import aad_select
        with torch.inference_mode():
            ref = self._reference_logits(input_ids).to(scores.device)
        y = aad_select(scores, ref, self.alpha, vocab_size=self.vocab_size, backend=self.backend)
        bad = (y < 0).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"row(s) {bad}: the aligned logits are all -inf/NaN; no AAD "
                               "candidate")
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, y[:, None], 0.0)
        return out
