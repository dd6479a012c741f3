"""Prompt preparation for ``Decoder``: prompts / ``input_ids`` / ``attention_mask`` / chat turned
into per-row id lists for both streams (OPAD's principle on stream a, CFG's negative prompt on
stream r), stop-id resolution, and left padding into the batch the engine prefills.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rules import OPAD, CFGMix

MAX_STOP_IDS = 16


@dataclass
class Rows:
    """Prompt ids of both streams, one list of ints per row."""

    a: list
    r: list


def resolve_stop_ids(stop, model, tokenizer, vocab: int) -> list:
    """``model``'s (and ``tokenizer``'s) end-of-sequence id(s) plus the caller's ``stop`` (ids or
    single-token strings), sorted; at most ``MAX_STOP_IDS``."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    for s in ([] if stop is None else ([stop] if isinstance(stop, (int, str)) else stop)):
        if isinstance(s, bool):
            raise ValueError(f"stop entries must be token ids or strings, got {s!r}")
        if isinstance(s, int):
            if not 0 <= s < vocab:
                raise ValueError(f"stop id {s} is outside the vocabulary [0, {vocab})")
            ids.add(s)
        elif isinstance(s, str):
            if tokenizer is None:
                raise ValueError(f"stop string {s!r} needs a tokenizer; pass ids instead")
            enc = tokenizer.encode(s, add_special_tokens=False)
            tid = tokenizer.convert_tokens_to_ids(s)
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and (tid != unk or s == getattr(tokenizer, "unk_token", None)):
                ids.add(tid)
            elif len(enc) == 1 and enc[0] != unk:
                ids.add(enc[0])
            elif len(enc) == 1:
                raise ValueError(f"stop string {s!r} is not in the vocabulary (it encodes to the "
                                 f"unknown token {unk}); pass a string the tokenizer knows, or ids")
            else:
                raise ValueError(f"stop string {s!r} is {len(enc)} tokens {enc}; only "
                                 "single-token stop strings are supported (pass its ids)")
        else:
            raise ValueError(f"stop entries must be token ids or strings, got {s!r}")
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(ids)}")
    return sorted(ids)


def encode(tokenizer, vocab: int, prompts, input_ids, attention_mask, chat,
           system=None) -> list:
    """One id list per row from exactly one of ``prompts`` (strings) or ``input_ids`` (id lists
    or a ``[B, L]`` tensor, ``attention_mask`` marking its real tokens)."""
    if (prompts is None) == (input_ids is None):
        raise ValueError("give exactly one of prompts= (strings) or input_ids=")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string or a list of strings, got "
                             f"{type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts=[] is empty; give at least one prompt")
        if tokenizer is None:
            raise ValueError("prompts= needs a tokenizer (none was found beside the models); "
                             "pass tokenizer= or input_ids=")
        rows = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{i}] must be a string, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
            ids = tokenize(tokenizer, p, chat, system)
            if not ids:
                raise ValueError(f"prompts[{i}]={p!r} encodes to no tokens (only whitespace?); "
                                 "give a prompt with some text (or chat=True)")
            rows.append(ids)
        return rows
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
    if not rows:
        raise ValueError("input_ids has no rows; give at least one prompt")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"input_ids[{i}] is an empty prompt")
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids[{i}] has ids {bad[:4]} outside [0, {vocab})")
    return rows


def _id_list(row, i: int) -> list:
    """``row`` as a list of Python ints; floats and bools are refused, never rounded."""
    if isinstance(row, torch.Tensor):
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"input_ids[{i}] must hold integer ids, got dtype {row.dtype}")
        return row.reshape(-1).tolist()
    if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
        raise ValueError(f"input_ids[{i}] must be a list of ints, got {row!r}")
    out = []
    for t in row:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(f"input_ids[{i}] holds {t!r} ({type(t).__name__}); token ids must "
                             "be ints")
        out.append(int(t.__index__()))
    return out


def tokenize(tokenizer, text: str, chat: bool, system: str | None = None) -> list:
    """Ids of ``text``; with ``chat`` a user turn (after an optional system message) through
    the tokenizer's chat template, with the generation prompt."""
    tok = tokenizer
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": text}]
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
            return Rows(a, [list(rule.negative_ids)] * len(a))
        if rule.negative_prompt is not None:
            if tokenizer is None:
                raise ValueError("CFG(negative_prompt=...) needs a tokenizer; pass negative_ids=")
            neg = tokenize(tokenizer, rule.negative_prompt, chat) if rule.negative_prompt else \
                [r[0] for r in a[:1]]
            return Rows(a, [neg] * len(a))
        return Rows(a, a if kind != "one" else [r[-1:] for r in a])
    if not isinstance(rule, OPAD):
        return Rows(a, a)
    if chat:
        if rule.principle is None:
            raise ValueError("OPAD with chat=True needs principle= (a system message)")
        pa = encode(tokenizer, vocab, prompts, input_ids, attention_mask, chat,
                    system=rule.principle)
        return Rows(pa, a)
    if rule.principle_ids is not None:
        pre = list(rule.principle_ids)
        return Rows([pre + r for r in a], a)
    if tokenizer is None:
        raise ValueError("OPAD(principle=...) needs a tokenizer; pass principle_ids=")
    pre = tokenizer(rule.principle + "\n", add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    rows_a = [([r[0]] + pre + r[1:]) if (bos is not None and r[0] == bos) else pre + r
              for r in a]
    return Rows(rows_a, a)


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
