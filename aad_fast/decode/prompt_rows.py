"""Prompt preparation for ``Decoder``: prompts / ``input_ids`` / ``attention_mask`` / chat turned
into per-row id lists for both streams (OPAD's principle on stream a, CFG's negative prompt on
stream r), stop-id resolution, and left padding into the batch the engine prefills.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..rules import OPAD, CFGMix

MAX_STOP_IDS = 16


@dataclass
class Rows:
    """Prompt ids of both streams, one list of ints per row."""

    a: list
    r: list


def as_id(x):
    """``x`` as a Python int when it is one token id: an ``int``, a numpy integer, a 0-d integer
    tensor or anything else with ``__index__``; ``None`` for anything else, bools (Python,
    numpy or torch) included, so that they are refused, never read as 0/1."""
    if isinstance(x, bool) or isinstance(x, (str, bytes)):
        return None
    if isinstance(x, int):
        return int(x)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and (dtype == torch.bool or str(dtype) == "bool"):
        return None
    if not hasattr(x, "__index__"):
        return None
    try:
        return int(operator.index(x))
    except TypeError:  # e.g. a numpy array of several ids
        return None


EOS_SOURCES = ("the model's generation_config", "the model's config", "the tokenizer")


def resolve_stop_ids(stop, model, tokenizer, vocab: int, eos: bool = True) -> list:
    """``model``'s (and ``tokenizer``'s) end-of-sequence id(s) plus the caller's ``stop`` (ids or
    single-token strings), sorted; at most ``MAX_STOP_IDS``. Every id must be one the Decoder
    can choose (``[0, vocab)``): a stop id it can never choose would silently never stop.
    ``eos=False``: without the end-of-sequence ids (``ignore_eos``). A string of several tokens
    is refused here (``resolve_stops`` takes it as a stop string)."""
    ids, texts = resolve_stops(stop, model, tokenizer, vocab, eos)
    for s in texts:
        tid, _ = _stop_string_id(s, tokenizer)
        if tid is None:
            _stop_string_id(s, tokenizer, strict=True)  # raises, naming the string
    return ids


def resolve_stops(stop, model, tokenizer, vocab: int, eos: bool = True) -> tuple:
    """``(ids, strings)``: the stop ids (``resolve_stop_ids``: the model's EOS unless ``eos`` is
    false, the caller's ids and the ids of its single-token strings) and the stop strings
    matched on the decoded text (``stop_strings``): every caller string that can appear there,
    i.e. all but the special tokens (which decode to nothing), a single-token one included (its
    id stops on the device; the text catches the same phrase made of several tokens)."""
    ids = set(_eos_ids(model, tokenizer, vocab)) if eos else set()
    if stop is None:
        stop = []
    elif isinstance(stop, str) or as_id(stop) is not None:
        stop = [stop]
    elif not hasattr(stop, "__iter__"):
        raise ValueError(f"stop must be a token id, a string or a list of them, got {stop!r}")
    texts = []
    for s in stop:
        tid = as_id(s)
        as_text = False
        if tid is None and isinstance(s, str):
            if not s:
                raise ValueError("stop strings must be non-empty, got ''")
            tid, as_text = _stop_string_id(s, tokenizer)
        elif tid is None:
            raise ValueError(f"stop entries must be token ids or strings, got {s!r}")
        if as_text and s not in texts:
            texts.append(s)
        if tid is None:
            continue
        if not 0 <= tid < vocab:
            raise ValueError(f"stop {s!r} (id {tid}) is outside the vocabulary [0, {vocab}) the "
                             "Decoder chooses from, so no row could ever stop on it")
        ids.add(tid)
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(ids)}")
    return sorted(ids), tuple(texts)


def _eos_ids(model, tokenizer, vocab: int) -> set:
    """The end-of-sequence ids of ``model``'s generation config and config and of
    ``tokenizer``, each checked to be in ``[0, vocab)``."""
    ids = set()
    srcs = (getattr(model, "generation_config", None), model.config, tokenizer)
    for name, src in zip(EOS_SOURCES, srcs):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            tid = as_id(e)
            if tid is None:
                continue
            if not 0 <= tid < vocab:
                raise ValueError(
                    f"eos_token_id {tid} of {name} is outside the vocabulary the Decoder chooses "
                    f"from, [0, {vocab}) (the smaller of the models' output rows and the "
                    "tokenizer's id range), so no row could ever stop on it; fix that "
                    "eos_token_id, or give a tokenizer/model that has this id")
            ids.add(tid)
    return ids


def _stop_string_id(s: str, tokenizer, strict: bool = False) -> tuple:
    """``(id, as_text)`` of the stop string ``s``: its one token id (a token of the vocabulary,
    or a string that encodes to one known token) or ``None``, and whether it is matched on the
    text too (it can appear there: not a special token). ``strict``: a string that is not one
    token raises (the callers that take ids only)."""
    if tokenizer is None:
        raise ValueError(f"stop string {s!r} needs a tokenizer; pass ids instead")
    enc = tokenizer.encode(s, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(s)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not (isinstance(tid, int) and (tid != unk or s == getattr(tokenizer, "unk_token", None))):
        tid = enc[0] if len(enc) == 1 and enc[0] != unk else None
    if tid is not None:
        return tid, tokenizer.decode([tid], skip_special_tokens=True) == s
    if not strict:
        return None, True
    if len(enc) == 1:
        raise ValueError(f"stop string {s!r} is not in the vocabulary (it encodes to the "
                         f"unknown token {unk}); pass a string the tokenizer knows, or ids")
    raise ValueError(f"stop string {s!r} is {len(enc)} tokens {enc}; only "
                     "single-token stop strings are supported here; stop at one of its ids "
                     "instead (stop=[id] in Python, --stop-id N on the command line, "
                     "stop_token_ids on the server)")


def encode(tokenizer, vocab: int, prompts, input_ids, attention_mask, chat) -> list:
    """One id list per row from exactly one of ``prompts`` (strings, through the chat template
    when ``chat``) or ``input_ids`` (id lists, a ``[B, L]`` tensor with ``attention_mask``
    marking its real tokens, or a tokenizer's ``BatchEncoding``), each id in ``[0, vocab)``."""
    if (prompts is None) == (input_ids is None):
        raise ValueError("give exactly one of prompts= (strings) or input_ids=")
    if prompts is not None:
        rows = []
        for i, p in enumerate(prompt_texts(prompts, tokenizer)):
            ids = tokenize(tokenizer, p, chat)
            if not ids:
                raise ValueError(f"prompts[{i}]={p!r} encodes to no tokens (only whitespace?); "
                                 "give a prompt with some text (or chat=True)")
            rows.append(check_tokenized(ids, vocab, f"prompts[{i}]", tokenizer))
        return rows
    if chat:
        raise ValueError("chat=True applies to text prompts (prompts=, rendered through the "
                         "tokenizer's chat template); input_ids= are used as given. Pass "
                         "chat=False with input_ids=, or pass the text as prompts=")
    if isinstance(input_ids, Mapping) or hasattr(input_ids, "keys"):
        input_ids, attention_mask = _from_encoding(input_ids, attention_mask)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or \
                input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(input_ids.shape)}")
        m = attention_mask.cpu()
        if not bool(((m == 0) | (m == 1)).all()):
            odd = m[(m != 0) & (m != 1)][:4].tolist()
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token) only, got "
                             f"{odd}")
        rows = [ids[r.bool()].tolist() for ids, r in zip(input_ids.cpu(), m)]
    else:
        if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__len__"):
            raise ValueError(f"input_ids must be a list of id lists or a [batch, length] "
                             f"tensor, got {type(input_ids).__name__}")
        rows = [_id_list(r, i) for i, r in enumerate(input_ids)]
        if attention_mask is not None:
            rows = _apply_mask(rows, attention_mask)
    if not rows:
        raise ValueError("input_ids has no rows; give at least one prompt")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"input_ids[{i}] is an empty prompt")
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids[{i}] has ids {bad[:4]} outside [0, {vocab})")
    return rows


ROLES = ("system", "user", "assistant")


def prompt_texts(prompts, tokenizer) -> list:
    """``prompts`` (a string, a conversation, or a list of them) as a list of non-empty strings
    and conversations. A conversation (``chat=True`` only) is a list of ``{"role": system |
    user | assistant, "content": str}`` messages, rendered whole by the chat template."""
    if isinstance(prompts, str) or _is_conversation(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string or a list of strings, got "
                         f"{type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts=[] is empty; give at least one prompt")
    if tokenizer is None:
        raise ValueError("prompts= needs a tokenizer (none was found beside the models); "
                         "pass tokenizer= (--tokenizer DIR on the command line) or input_ids=")
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)):
            _check_conversation(p, f"prompts[{i}]")
            continue
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string or a conversation (a list of "
                             f"{{'role', 'content'}} messages), got {type(p).__name__}")
        if not p:
            raise ValueError(f"prompts[{i}] is empty")
    return list(prompts)


def _is_conversation(p) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and isinstance(p[0], Mapping)


def _check_conversation(msgs, where: str) -> None:
    if not msgs:
        raise ValueError(f"{where} is an empty conversation")
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{j}] must be {{'role': system|user|assistant, 'content': "
                             f"str}}, got {m!r}")


def check_tokenized(ids: list, vocab: int, what: str, tokenizer) -> list:
    """``ids`` (what the tokenizer made of ``what``) when every id has an embedding row of the
    models (``[0, vocab)``); a tokenizer with more ids than the models' embeddings is refused
    here rather than failing inside the forward."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        n = len(tokenizer) if tokenizer is not None else "?"
        raise ValueError(f"{what} tokenizes to ids {bad[:4]} outside [0, {vocab}): the model's "
                         f"embeddings are smaller than the tokenizer (len(tokenizer)={n}); "
                         "resize them with model.resize_token_embeddings(len(tokenizer)) or "
                         "use the tokenizer the model was trained with")
    return ids


def _from_encoding(enc, attention_mask):
    """``(input_ids, attention_mask)`` of a tokenizer's ``BatchEncoding`` (or a dict with an
    ``"input_ids"`` key: what ``apply_chat_template(..., tokenize=True)`` returns); one
    sequence of ids becomes one row."""
    if "input_ids" not in enc:
        raise ValueError(f"input_ids is a {type(enc).__name__} without an 'input_ids' key; pass "
                         "a list of id lists, a [batch, length] tensor or a tokenizer's output")
    ids = enc["input_ids"]
    if attention_mask is None and "attention_mask" in enc:
        attention_mask = enc["attention_mask"]
    if not isinstance(ids, torch.Tensor) and hasattr(ids, "__len__") and len(ids) and \
            as_id(ids[0]) is not None:  # one sequence: one row
        ids = [ids]
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            attention_mask = [attention_mask]
    return ids, attention_mask


def _apply_mask(rows: list, mask) -> list:
    """Keep the ids of each row of ``rows`` whose ``mask`` entry is 1 (0 marks padding)."""
    mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
    if len(mask) != len(rows):
        raise ValueError(f"attention_mask has {len(mask)} rows but input_ids has {len(rows)}")
    out = []
    for i, (r, m) in enumerate(zip(rows, mask)):
        m = _id_list(m, i, "attention_mask")
        if len(m) != len(r):
            raise ValueError(f"attention_mask[{i}] has {len(m)} entries but input_ids[{i}] has "
                             f"{len(r)}")
        if any(v not in (0, 1) for v in m):
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token) only, got "
                             f"{[v for v in m if v not in (0, 1)][:4]}")
        out.append([t for t, v in zip(r, m) if v == 1])
    return out


def _id_list(row, i: int, name: str = "input_ids") -> list:
    """``row`` as a list of Python ints; floats and bools are refused, never rounded."""
    if isinstance(row, torch.Tensor):
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"{name}[{i}] must hold integer ids, got dtype {row.dtype}")
        return row.reshape(-1).tolist()
    if isinstance(row, Mapping) or hasattr(row, "keys"):
        raise ValueError(f"{name}[{i}] is a {type(row).__name__} (a tokenizer's output?); pass "
                         "its ['input_ids'] (or the BatchEncoding itself as input_ids=)")
    if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
        raise ValueError(f"{name}[{i}] must be a list of ints, got {row!r}")
    out = []
    for t in row:
        tid = as_id(t)
        if tid is None:
            raise ValueError(f"{name}[{i}] holds {t!r} ({type(t).__name__}); token ids must "
                             "be ints")
        out.append(tid)
    return out


def tokenize(tokenizer, text, chat: bool, system: str | None = None) -> list:
    """Ids of ``text``; with ``chat`` a user turn (after an optional system message) through
    the tokenizer's chat template, with the generation prompt. ``text`` may be a conversation
    (``chat`` only): ``system`` then opens it, or opens its own system message."""
    tok = tokenizer
    if isinstance(text, (list, tuple)):
        if not chat:
            raise ValueError("a conversation (a list of messages) as a prompt needs chat=True")
        msgs = [dict(m) for m in text]
        if system and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
        elif system:
            msgs.insert(0, {"role": "system", "content": system})
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": text}]
    if chat:
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("chat=True but the tokenizer has no chat template")
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return tok(text)["input_ids"]


def rule_rows(rule, kind: str, tokenizer, vocab: int, prompts, input_ids, attention_mask,
              chat) -> Rows:
    """Both streams' prompt ids for ``rule`` on a pair of ``kind`` (``"two"``, ``"lora"`` or
    ``"one"``): the same prompt, or OPAD's principle before stream a's, or CFG's negative
    prompt (or a one-model pair's last prompt token) as stream r's."""
    a = encode(tokenizer, vocab, prompts, input_ids, attention_mask, chat)
    if isinstance(rule, CFGMix):
        if rule.negative_ids is not None:
            neg = _given_ids(rule.negative_ids, vocab, "negative_ids")
            return Rows(a, [neg] * len(a))
        if rule.negative_prompt is not None:
            if tokenizer is None:
                raise ValueError("CFG(negative_prompt=...) needs a tokenizer; pass negative_ids=")
            if not rule.negative_prompt:  # "": each row's own first token (its BOS, if any)
                return Rows(a, [r[:1] for r in a])
            neg = check_tokenized(tokenize(tokenizer, rule.negative_prompt, chat), vocab,
                                  "negative_prompt", tokenizer)
            if not neg:
                raise ValueError(f"negative_prompt={rule.negative_prompt!r} encodes to no "
                                 "tokens; give some text, '' (each prompt's first token) or "
                                 "negative_ids=")
            return Rows(a, [neg] * len(a))
        return Rows(a, a if kind != "one" else [r[-1:] for r in a])
    if not isinstance(rule, OPAD):
        return Rows(a, a)
    if chat:
        if rule.principle is None:
            raise ValueError("OPAD with chat=True needs principle= (a system message)")
        return Rows(_chat_principle(rule.principle, prompt_texts(prompts, tokenizer), a,
                                    tokenizer, vocab), a)
    if rule.principle_ids is not None:
        pre = _given_ids(rule.principle_ids, vocab, "principle_ids")
        return Rows([pre + r for r in a], a)
    if tokenizer is None:
        raise ValueError("OPAD(principle=...) needs a tokenizer; pass principle_ids=")
    pre = check_tokenized(tokenizer(rule.principle + "\n", add_special_tokens=False)["input_ids"],
                          vocab, "principle", tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    rows_a = [([r[0]] + pre + r[1:]) if (bos is not None and r[0] == bos) else pre + r
              for r in a]
    return Rows(rows_a, a)


def _principle_in_user_turn(principle: str, text):
    """``text`` (a prompt or a conversation) with ``principle`` opening its (first) user
    message."""
    if not isinstance(text, (list, tuple)):
        return f"{principle}\n\n{text}"
    msgs = [dict(m) for m in text]
    for m in msgs:
        if m["role"] == "user":
            m["content"] = f"{principle}\n\n{m['content']}"
            break
    return msgs


def _chat_principle(principle: str, texts: list, plain: list, tokenizer, vocab: int) -> list:
    """Stream a's rows for OPAD with ``chat``: each prompt after a system message holding the
    ``principle``. A template that ignores system messages renders that the same as the plain
    prompt (``plain``), which would make OPAD greedy on its own: such a row gets the principle
    at the start of the user message instead (``"{principle}\\n\\n{prompt}"``), with a
    warning; if even that renders the plain ids, the principle cannot reach the model."""
    rows, moved = [], False
    for i, (text, ids) in enumerate(zip(texts, plain)):
        pa = tokenize(tokenizer, text, True, system=principle)
        if pa == ids:
            moved = True
            pa = tokenize(tokenizer, _principle_in_user_turn(principle, text), True)
            if pa == ids:
                raise ValueError(f"principle={principle!r} does not change prompts[{i}]'s ids, "
                                 "neither as a system message nor at the start of the user "
                                 "message (the chat template drops both), so OPAD would be "
                                 "greedy decoding; use chat=False or principle_ids=")
        rows.append(check_tokenized(pa, vocab, f"prompts[{i}] with the principle", tokenizer))
    if moved:
        warnings.warn(f"OPAD: the tokenizer's chat template ignores system messages, so the "
                      f"principle {principle!r} was put at the start of the user message "
                      f"(principle + '\\n\\n' + prompt) instead", stacklevel=4)
    return rows


def _given_ids(ids, vocab: int, name: str) -> list:
    """A rule's id list (``principle_ids`` / ``negative_ids``), each id in ``[0, vocab)``."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} has ids {bad[:4]} outside the vocabulary [0, {vocab})")
    return list(ids)


def left_pad(rows: list, n: int, device):
    """Left-pad id lists into ``[n, L]`` ids and a ``real`` mask; rows beyond ``len(rows)``
    (bucket padding) get a single token 0."""
    rows = rows + [[0]] * (n - len(rows))
    width = max(len(r) for r in rows)
    ids = torch.zeros((n, width), dtype=torch.int64)
    real = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.int64)
        real[i, width - len(r):] = True
    return ids.to(device), real.to(device)
