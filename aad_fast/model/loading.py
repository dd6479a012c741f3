"""Hugging Face interop: loading models, adapters and tokenizers from local paths, device,
dtype and tokenizer checks, and (from ``processor.py``) ``AADLogitsProcessor`` for Hugging
Face's own ``generate()``.

Nothing here downloads: paths must exist locally (``local_files_only=True`` everywhere).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from .runner import sliding_unsupported


def check_dir(path, arg: str) -> Path:
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
    p = check_dir(path, arg)
    if not (p / "config.json").exists():
        raise ValueError(f"{arg}={str(path)!r} is a LoRA adapter directory; pass it as "
                         "`aligned` (with its base as `reference`)")
    try:
        # never the checkpoint's own code (no prompt asking to run it): a model that needs it
        # is loaded by the caller and passed as an object
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype or "auto",
                                                     local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as exc:
        hint = ""
        if "trust_remote_code" in str(exc):
            hint = (" (aad_fast never runs a checkpoint's own code; if you trust it, load the "
                    "model yourself with AutoModelForCausalLM.from_pretrained(path, "
                    "trust_remote_code=True) and pass the model object)")
        raise ValueError(f"{arg}={str(path)!r} could not be loaded as a causal LM: "
                         f"{exc}{hint}") from exc
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
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                             trust_remote_code=False)
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


def check_device(device):
    """``device`` as a ``torch.device`` (``None`` stays ``None``); refuses a CUDA device on a
    machine without one, instead of torch's bare assertion at the first ``.to()``."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device ('cpu', 'cuda', 'cuda:1'): "
                         f"{exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); pass "
                             "device='cpu' or leave device unset")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_dtype(dtype):
    """``dtype`` as a floating ``torch.dtype`` (names such as ``"bfloat16"`` accepted) or
    ``None`` (the checkpoint's own)."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (use "
                         "torch.float32, torch.bfloat16 or torch.float16)")
    return dt


def resolve_tokenizer(tokenizer):
    """A tokenizer object as given, or one loaded from a local directory path."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    tok = load_tokenizer(tokenizer) if Path(tokenizer).expanduser().is_dir() else None
    if tok is None:
        raise ValueError(f"tokenizer={str(tokenizer)!r} is not a local tokenizer directory "
                         "(aad_fast loads from local paths only, nothing is downloaded); pass "
                         "a tokenizer object or the directory it was saved to")
    return tok


def recorded_base(adapter_dir: Path, recorded) -> Path | None:
    """The adapter's ``base_model_name_or_path`` as a local directory: an absolute path, else
    relative to the adapter's own directory (how ``aad_fast/default_pair/dpo`` records
    ``../sft``), else relative to the current directory (how PEFT records a path given to
    ``from_pretrained`` at training time; a warning says so). ``None`` when it is not local."""
    if not recorded:
        return None
    rp = Path(recorded).expanduser()
    if rp.is_absolute():
        return rp if rp.is_dir() else None
    beside = adapter_dir / rp
    if beside.is_dir():
        return beside.resolve()
    if rp.is_dir():
        warnings.warn(f"the LoRA adapter {str(adapter_dir)!r} records its base as {recorded!r}, "
                      "which is not a directory beside the adapter; using "
                      f"{str(rp.resolve())!r} (relative to the current directory)", stacklevel=3)
        return rp.resolve()
    return None


def _refuse_wrong_base(base, reference, name_a, name_r, base_desc):
    """docs/stopping-and-input.md: a LoRA adapter whose base is not the given reference is refused (the check and
    its cost: ``weights.first_difference``)."""
    from .weights import first_difference
    diff = first_difference(base, reference)
    if diff is not None:
        raise ValueError(f"the reference model {name_r} is not the base model of the LoRA "
                         f"adapter {name_a}: {diff} (compared with {base_desc}); pass the "
                         "adapter's own base as reference (or omit reference to use it)")


def load_pair(aligned, reference=None, *, dtype=None, device=None, tokenizer=None):
    """Resolve ``aligned``/``reference`` (models or local paths) into
    ``(kind, model_a, model_r, tokenizer, names)`` with kind ``"lora"``, ``"two"`` or ``"one"``.

    ``kind == "lora"``: ``model_a`` is a ``PeftModel`` and ``model_r`` is ``None`` (the base).
    A reference given with a LoRA adapter (path or object) must hold the adapter's base
    weights (``weights.first_difference``); ``tokenizer`` may be a local directory path.
    """
    device, dtype = check_device(device), check_dtype(dtype)
    name_a = str(aligned) if isinstance(aligned, (str, os.PathLike)) else type(aligned).__name__
    name_r = (str(reference) if isinstance(reference, (str, os.PathLike))
              else (type(reference).__name__ if reference is not None else None))
    tok = resolve_tokenizer(tokenizer)
    tok_a = None
    # --- the aligned side: a model, a PeftModel, a model dir or an adapter dir
    if isinstance(aligned, (str, os.PathLike)):
        p = check_dir(aligned, "aligned")
        tok_a = load_tokenizer(p)
        if is_adapter_dir(p):
            return _adapter_dir_pair(p, reference, name_a, name_r, tok, tok_a, dtype, device)
        model_a = load_causal_lm(p, "aligned", dtype, device)
    else:
        model_a = aligned
    if is_peft_model(model_a):
        return _peft_pair(model_a, reference, name_a, name_r, tok, tok_a)
    return _plain_pair(model_a, reference, name_a, name_r, tok, tok_a, dtype, device)


def _adapter_dir_pair(p: Path, reference, name_a, name_r, tok, tok_a, dtype, device):
    """``load_pair`` of an adapter directory ``p``: its base is ``reference`` (a path or a
    model) or else the base it records."""
    tok_r = None
    cfg = json.loads((p / "adapter_config.json").read_text())
    recorded = cfg.get("base_model_name_or_path")
    base_dir = recorded_base(p, recorded)
    base_path = reference
    if base_path is None:
        if base_dir is None:
            raise ValueError(
                f"aligned={name_a!r} is a LoRA adapter whose base {recorded!r} is not a "
                "local directory (neither beside the adapter nor from here); pass "
                "reference=PATH_TO_BASE")
        base_path = base_dir
    same_dir = isinstance(base_path, (str, os.PathLike)) and base_dir is not None and \
        Path(base_path).resolve() == base_dir
    if isinstance(base_path, (str, os.PathLike)):
        check_dir(base_path, "reference")
        tok_r = load_tokenizer(base_path)
        base = load_causal_lm(base_path, "reference", dtype, device)
        name_r = str(base_path)
        if base_dir is not None and not same_dir:
            _check_same_config(base_dir, base.config, name_a, name_r)
    else:
        base = reference
    if base_dir is not None and not same_dir:
        _refuse_wrong_base(str(base_dir), base, name_a, name_r,
                           f"the adapter's recorded base {str(base_dir)!r}")
    try:
        model_a = load_adapter(base, p)
    except Exception as exc:
        raise ValueError(f"the LoRA adapter {name_a!r} does not fit the reference model "
                         f"{name_r!r}: {exc}") from exc
    if device is not None:
        model_a = model_a.to(device)
    check_same_tokenizer(tok_a, tok_r, name_a, name_r)
    check_same_tokenizer(tok, tok_a or tok_r, "tokenizer", name_a)
    tok = tok or tok_a or tok_r
    return "lora", model_a, None, tok, (name_a, name_r)


def _peft_pair(model_a, reference, name_a, name_r, tok, tok_a):
    """``load_pair`` of a ``PeftModel``: a reference given must be its base."""
    tok_r = None
    if reference is not None:
        if isinstance(reference, (str, os.PathLike)):
            check_dir(reference, "reference")
            tok_r = load_tokenizer(reference)
            _refuse_wrong_base(model_a, str(reference), name_a, name_r, "its checkpoint")
        elif model_a.get_base_model() is not reference:
            _refuse_wrong_base(model_a, reference, name_a, name_r, "the adapter's base")
    check_same_tokenizer(tok, tok_a or tok_r, "tokenizer", name_a)
    tok = tok or tok_a or tok_r
    return "lora", model_a, None, tok, (name_a, name_r or "its base model")


def _plain_pair(model_a, reference, name_a, name_r, tok, tok_a, dtype, device):
    """``load_pair`` of a plain model: a second model or none (one model, two prompts)."""
    if reference is None:
        check_same_tokenizer(tok, tok_a, "tokenizer", name_a)
        return "one", model_a, None, tok or tok_a, (name_a, None)
    tok_r = None
    if isinstance(reference, (str, os.PathLike)):
        check_dir(reference, "reference")
        tok_r = load_tokenizer(reference)
        model_r = load_causal_lm(reference, "reference", dtype, device)
    else:
        model_r = reference
    check_same_tokenizer(tok_a, tok_r, name_a, name_r)
    check_same_tokenizer(tok, tok_a or tok_r, "tokenizer", name_a)
    return "two", model_a, model_r, tok or tok_a or tok_r, (name_a, name_r)


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


# AAD for Hugging Face's own generate() lives in processor.py; it is part of this interop layer.
def check_positions(models, max_seq_len: int) -> None:
    """Refuse ``max_seq_len`` past a learned position table of ``models`` (``None`` entries
    skipped); warn where sliding-window attention is mixed with layer types that are not
    masked."""
    models = [m for m in models if m is not None]
    for model in models:
        limit = position_limit(model)
        if limit is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds {type(model).__name__}'s "
                             f"{limit} learned positions (its position table has no row "
                             f"beyond position {limit - 1}); pass "
                             f"Decoder(max_seq_len<={limit})")
    for model in models:
        window = sliding_unsupported(getattr(model, "config", None), max_seq_len)
        if window is not None:
            warnings.warn(f"{type(model).__name__} mixes sliding-window attention ({window} "
                          f"tokens) with layer types aad_fast does not mask "
                          f"({sorted(set(model.config.layer_types))}); it attends over the "
                          f"full cache, so sequences longer than {window} tokens will differ "
                          f"from the model's own generate(). Pass max_seq_len<={window} to "
                          f"rule this out.", stacklevel=3)


def pair_vocab(base, model_r, tokenizer) -> int:
    """The ids a decode may choose: the smaller output layer of the pair, cut to the
    tokenizer's id range (ids beyond it are padding rows: never chosen)."""
    sizes = [base.get_output_embeddings().weight.shape[0]]
    if model_r is not None:
        sizes.append(model_r.get_output_embeddings().weight.shape[0])
    v = min(sizes)
    n_tok = _tokenizer_ids(tokenizer) if tokenizer is not None else None
    if n_tok is not None and n_tok < v:
        v = n_tok
    return v


def _tokenizer_ids(tokenizer) -> int | None:
    """The size of ``tokenizer``'s id range: 1 + its largest id (vocabulary and added tokens),
    at least ``len(tokenizer)``; ids may have gaps, so ``len()`` alone can miss real ones."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    ids = []
    with contextlib.suppress(Exception):  # a tokenizer-like object without these
        ids += list(tokenizer.get_vocab().values())
    with contextlib.suppress(Exception):
        ids += list(tokenizer.added_tokens_decoder)
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    if ids:
        n = max(n or 0, 1 + max(ids))
    return n


def position_limit(model) -> int | None:
    """The number of positions of ``model``'s learned absolute position table (GPT-2's
    ``wpe``, OPT/BioGPT-style ``embed_positions``, ...), or ``None`` for models without one
    (rotary, ALiBi): an ``nn.Embedding`` besides the input embeddings whose name says
    "pos"/``wpe``. Its limit is the config's ``n_positions`` / ``max_position_embeddings``
    when given (a table may hold offset rows), else the table's rows."""
    model = getattr(model, "get_base_model", lambda: model)()
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = None
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(mod, torch.nn.Embedding) and mod is not inp and \
                ("pos" in leaf or leaf == "wpe"):
            table = mod
            break
    if table is None:
        return None
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and not isinstance(val, bool) and 0 < val <= table.num_embeddings:
            return val
    return table.num_embeddings
