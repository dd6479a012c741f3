"""Log-probabilities of given tokens under one stream of a pair: what the server's ``logprobs``,
``top_logprobs`` and ``echo`` report.

The decode path is not touched: after a request is decoded, one forward (a prefill, no cache) of
prompt + completion through the stream's model gives every position's next-token distribution
at once; position ``j - 1``'s log-softmax (float32, over all of the model's output rows, as a
plain Hugging Face forward or vLLM gives it) scores token ``j``; the alternatives (``top``) are
among the ids the Decoder can choose (below ``vocab``: no embedding padding rows). The stream's model: ``"a"`` the aligned model (a LoRA pair: the adapter on), ``"r"`` the
reference (a LoRA pair: the adapter off; one model with two prompts, OPAD / CFG: the same model,
which the caller gives the stream's own prompt). The rule's choice is not a probability of
either stream; these are the stream's own, as a single-model server would report them.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

STREAMS = ("a", "r")


@dataclass
class TokenLogprobs:
    """Per token of ``ids[start:]``: ``logprobs`` its log-probability under the stream given
    the tokens before it, ``top`` its position's ``k`` most likely ids as ``(id, logprob)``,
    best first, ties to the lower id. ``None`` at position 0 (nothing precedes it)."""

    ids: list
    logprobs: list
    top: list


@contextlib.contextmanager
def stream_model(kind: str, model_a, model_r, stream: str):
    """The model of ``stream`` (``"a"``/``"r"``) of a pair of ``kind`` (``"two"``: two models,
    ``"lora"``: a ``PeftModel``, whose adapter is disabled for ``"r"`` while the block runs,
    ``"one"``: one model for both)."""
    if stream not in STREAMS:
        raise ValueError(f"logprobs stream must be 'a' or 'r', got {stream!r}")
    if kind == "two":
        yield model_a if stream == "a" else model_r
    elif kind == "lora" and stream == "r":
        with model_a.disable_adapter():
            yield model_a
    else:
        yield model_a


def sequence_logprobs(model, ids: list, vocab: int, top: int = 0, start: int = 1):
    """``TokenLogprobs`` of ``ids[start:]`` under ``model`` (a causal LM): one forward of
    ``ids``, log-softmax over the model's output rows; ``top`` alternatives per position (0:
    none), among the ids below ``vocab``."""
    if start < 0 or start > len(ids):
        raise ValueError(f"start must be in [0, {len(ids)}], got {start}")
    first = max(start, 1)  # position 0 has no distribution
    dev = next(model.parameters()).device
    kw = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = len(ids) - first + 1  # the positions that score ids[first:]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=dev), use_cache=False,
                       **kw).logits[0]
    logits = logits[-(len(ids) - first + 1):-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    chosen = torch.tensor(ids[first:], dtype=torch.int64, device=lp.device)
    got = lp.gather(1, chosen[:, None])[:, 0].tolist() if len(chosen) else []
    best = []
    if top > 0 and len(chosen):
        val, idx = torch.sort(lp[:, :vocab], dim=1, descending=True, stable=True)
        val, idx = val[:, :top].tolist(), idx[:, :top].tolist()
        best = [list(zip(i, v)) for i, v in zip(idx, val)]
    else:
        best = [[] for _ in got]
    pad = [None] * (first - start)
    return TokenLogprobs(ids=list(ids[start:]), logprobs=pad + got, top=pad + best)
