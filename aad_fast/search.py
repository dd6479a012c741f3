"""Rules that search over several continuations: beam AAD and best-of-n with a picker.

Both run on the Decoder's runners and know nothing of the ``Decoder`` itself (it calls them):

- ``beam_aad(pair, ...)`` drives a beam search on a ``pairs`` pair it is given: the beams are
  rows of one batch, each prompt is encoded once, and each step (``engine.beam_step``) reorders
  the caches on device before the one-token forward. Its bookkeeping is ``BeamSearch``.
- Best-of-n is no loop of its own: ``samples`` says which rows to decode (``n`` per prompt,
  each an ordinary request with its own seed, decoded by the scheduler like any per-token rule)
  and ``pick_best`` keeps the picker's favourite of each prompt's samples.

Results come back as the fields of a ``generation.Generation`` (a dict), which the Decoder
completes with the text.
"""
from __future__ import annotations

import math
import os
import time

import torch

from . import backends, engine
from .hf import check_dir, load_tokenizer
from .ops import aad_beam_topk
from .prompts import left_pad
from .rules import BeamAAD, BestOfN, Mix
from .scheduler import pair_rows


def beam_aad(pair, rule: BeamAAD, prompts: list, max_new: int, stop_ids, *, vocab: int,
             backend: str | None = None, check_every: int = 8) -> dict:
    """docs/rules.md BeamAAD of ``prompts`` (``b`` id lists) on ``pair`` (a two-stream pair of
    ``pairs`` with at least ``b * k`` rows per stream, ``k = rule.num_beams``, and cache for
    the longest prompt plus ``max_new``; rows beyond ``b * k`` are bucket padding). Prompt
    ``p``'s beams are rows ``p*k .. p*k + k - 1``. Per step every live beam proposes its best
    candidates by the AAD token score (``ops.aad_beam_topk`` on ``backend``, ``None`` = the
    fastest), the ``k`` best continuations by summed score survive (a candidate that is a stop
    id ends its beam when it ranks among the ``k`` best), caches are reordered on device. A
    prompt is finished once it has ``k`` ended beams or no live one, or after ``max_new``
    tokens; the result is the ended beam with the best ``sum(s) / len**length_penalty``
    (``len`` counts the stop token), else the best live beam. The bookkeeping lives on the
    device (``BeamSearch``): a step has no host sync, and the host looks only every
    ``check_every`` steps (all prompts finished? a prompt with no candidate?).

    Returns ``tokens``, ``finish_reason``, ``scores`` and ``stats`` (a dict).
    """
    k, b = rule.num_beams, len(prompts)
    n_rows = pair_rows(pair)
    dev = pair.runners[0].device
    # each prompt is encoded once; its k beams (and any bucket padding rows) copy its cache
    ids, real = left_pad(prompts, b, dev)
    width = ids.shape[1]
    which = torch.arange(n_rows, device=dev).div(k, rounding_mode="floor").clamp(max=b - 1)
    be = backends.pick_backend(dev, backend)
    bs = BeamSearch(rule, b, n_rows, max_new, stop_ids, vocab, be, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits_a, logits_r = pair.prefill(ids, real, ids, real, rows=which)
        sync()
        t1 = time.perf_counter()
        bs.select(logits_a, logits_r)
        done = _beam_bursts(pair, bs, width, max_new, check_every)
        sync()
    decode_s = time.perf_counter() - t1
    tokens, reasons, scores, steps = bs.result()
    stats = {"prefill_ms": (t1 - t0) * 1e3, "steps": steps,
             # every step after the first is one forward of all b*k beams plus the bookkeeping
             "ms_per_token": decode_s * 1e3 / max(done - 1, 1),
             "tokens_per_s": (b * (done - 1) / decode_s if done > 1 and decode_s > 0
                              else float("nan")),
             # aad_beam_topk has a fused C++ step; every other backend runs the reference
             "backend": "cpp" if be == "cpp" else "torch",
             "cuda_graphs": False, "batch": b, "num_beams": k}
    return dict(tokens=tokens, finish_reason=reasons, scores=scores, stats=stats)


def _beam_bursts(pair, bs: "BeamSearch", width: int, max_new: int, check_every: int) -> int:
    """The beam loop after the first selection: bursts of up to ``check_every``
    ``engine.beam_step`` calls (the next step writes cache slot ``width + done - 1``), one host
    look (``bs.check``) after each, until every prompt is finished or ``max_new`` selections
    are made. Returns the selections made."""
    done = 1
    while done < max_new and not bs.check():
        for _ in range(min(check_every, max_new - done)):
            engine.beam_step(pair, bs, width, width + done - 1)
            done += 1
    bs.check()
    return done


class BeamSearch:
    """BeamAAD bookkeeping for ``b`` prompts x ``k`` beams, on the device (rows ``p*k + j``;
    rows ``>= b*k`` are bucket padding and keep their own state).

    Tensors (fixed for the search, so ``select`` can be captured): ``score`` float64 ``[b, k]``
    live beams' summed scores (``-inf`` = no beam); ``finished``/``bad`` bool ``[b]``;
    ``src`` int64 ``[n_rows]`` the row each row continues from and ``tok`` int64 ``[n_rows]``
    its next input (read by ``engine.beam_step``); back-pointers ``parent``/``token`` int64
    ``[max_new, n_rows]``; ended beams ``ended_sum`` float64, ``ended_step``/``ended_row`` int64
    ``[b, 2k + 1]`` (the last column takes the writes of non-ended continuations), ``n_ended``
    int64 ``[b]``; ``t`` int64 ``[1]`` the selection counter; ``steps`` int64 ``[1]`` the
    selections made while some prompt was unfinished.
    """

    def __init__(self, rule: BeamAAD, b: int, n_rows: int, max_new: int, stop_ids, vocab: int,
                 backend: str, device):
        k = rule.num_beams
        self.rule, self.k, self.b, self.vocab, self.backend = rule, k, b, vocab, backend
        self.c = min(k + len(set(stop_ids)), vocab)  # candidates per beam
        self.ended_cols = 2 * k  # < k ended before a step, at most k more in it
        i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
        self.stop = torch.tensor(sorted(set(stop_ids)) or [-2], **i64)
        self.score = torch.full((b, k), -math.inf, **f64)
        self.score[:, 0] = 0.0  # at the start only beam 0 is live
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.bad = torch.zeros(b, dtype=torch.bool, device=device)
        self.src = torch.arange(n_rows, **i64)
        self.tok = torch.zeros(n_rows, **i64)
        self.parent = torch.zeros((max_new, n_rows), **i64)
        self.token = torch.zeros((max_new, n_rows), **i64)
        self.ended_sum = torch.zeros((b, self.ended_cols + 1), **f64)
        self.ended_step = torch.zeros((b, self.ended_cols + 1), **i64)
        self.ended_row = torch.zeros((b, self.ended_cols + 1), **i64)
        self.n_ended = torch.zeros(b, **i64)
        self.t = torch.zeros(1, **i64)
        self.steps = torch.zeros(1, **i64)
        self.base = torch.arange(b, **i64)[:, None] * k  # first row of each prompt
        self.rank = torch.arange(k * self.c, **i64)[None, :]

    def select(self, logits_a, logits_r) -> None:
        """One step's bookkeeping from the logits ``[n_rows, V]`` of every row; graph-safe."""
        k, b, c, n = self.k, self.b, self.c, self.b * self.k
        s, cand, *_ = aad_beam_topk(logits_a[:n], logits_r[:n], self.rule.alpha, c,
                                    tau=self.rule.tau,
                                    vocab_size=self.vocab, backend=self.backend)
        total, order = _rank(self.score, s.double().view(b, k, c))
        tot = total.gather(1, order)
        tok = cand.reshape(b, k * c).gather(1, order)
        beam = order.div(c, rounding_mode="floor")
        # the continuations best first; the first that is no candidate (or -inf) ends the list
        valid = torch.cumprod(((tok >= 0) & (tot > -math.inf)).to(torch.int64), dim=1).bool()
        is_stop = (tok[:, :, None] == self.stop[None, None, :]).any(dim=2)
        active = ~self.finished
        ended = valid & is_stop & (self.rank < k) & active[:, None]
        live = valid & ~is_stop
        live_at = live.cumsum(dim=1) - 1
        keep = live & (live_at < k)
        n_live = keep.sum(dim=1)
        slot = torch.where(keep, live_at, k)  # column k: a dump for the rest
        new_score = tot.new_full((b, k + 1), -math.inf).scatter(1, slot, tot)[:, :k]
        new_beam = beam.new_zeros((b, k + 1)).scatter(1, slot, beam)[:, :k]
        new_tok = tok.new_zeros((b, k + 1)).scatter(1, slot, tok)[:, :k]
        e_slot = torch.where(ended, self.n_ended[:, None] + ended.cumsum(dim=1) - 1,
                             self.ended_cols)
        self.ended_sum.scatter_(1, e_slot, tot)
        self.ended_step.scatter_(1, e_slot, self.t.expand_as(e_slot))
        self.ended_row.scatter_(1, e_slot, self.base + beam)
        self.n_ended.add_(ended.sum(dim=1))
        act = active[:, None]
        self.score.copy_(torch.where(act, new_score, self.score))
        same = self.base + torch.arange(k, device=tok.device)[None, :]
        self.src[:n].copy_(torch.where(act, self.base + new_beam, same).reshape(-1))
        self.tok[:n].copy_(torch.where(act, new_tok, 0).reshape(-1))
        self.parent.index_copy_(0, self.t, self.src[None])
        self.token.index_copy_(0, self.t, self.tok[None])
        self.steps.add_(active.any().to(torch.int64))
        self.bad.logical_or_(active & (n_live == 0) & (self.n_ended == 0))
        self.finished.logical_or_(active & ((self.n_ended >= k) | (n_live == 0)))
        self.t.add_(1)

    def check(self) -> bool:
        """One host sync: whether every prompt is finished; raises for a prompt that had no
        candidate at all."""
        flags = torch.stack([self.finished.all(), self.bad.any()]).tolist()
        if flags[1]:
            p = int(self.bad.nonzero()[0, 0])
            raise RuntimeError(f"row {p}: no AAD candidate (all aligned logits -inf/NaN)")
        return bool(flags[0])

    def result(self):
        """``(tokens, finish_reasons, scores, steps)`` on the host, by the back-pointers."""
        parent, token = self.parent.tolist(), self.token.tolist()
        n_ended = self.n_ended.tolist()
        e_sum, e_step, e_row = (x.tolist() for x in (self.ended_sum, self.ended_step,
                                                      self.ended_row))
        score, last = self.score.tolist(), int(self.t) - 1
        lp = self.rule.length_penalty

        def seq(t, row):  # the tokens of ``row`` through selection ``t``
            out = []
            while t >= 0:
                out.append(token[t][row])
                row = parent[t][row]
                t -= 1
            return out[::-1]

        tokens, reasons, scores = [], [], []
        for p in range(self.b):
            if n_ended[p]:
                ended = [(e_sum[p][i] / (e_step[p][i] + 1) ** lp, e_sum[p][i],
                          seq(e_step[p][i] - 1, e_row[p][i])) for i in range(n_ended[p])]
                best = max(ended, key=lambda e: e[0])
                tokens.append(best[2])
                reasons.append("stop")
                scores.append(best[1])
            else:
                j = max(range(self.k), key=lambda i: (score[p][i], -i))
                tokens.append(seq(last, p * self.k + j))
                reasons.append("length")
                scores.append(score[p][j])
        return tokens, reasons, scores, int(self.steps)


def _rank(score, s):
    """``score`` float64 ``[b, k]`` summed scores of the live beams (``-inf`` = no beam), ``s``
    float64 ``[b, k, c]`` the candidates' token scores. Returns ``(total, order)``: ``total
    [b, k*c]`` the summed score of continuation ``i = beam * c + rank`` (a NaN, ``-inf + inf``,
    counts as ``-inf``) and ``order [b, k*c]`` the continuations best first, ties to the lower
    index (a stable sort of ``k*c`` values, not of the vocabulary). Graph-safe."""
    total = (score[:, :, None] + s).flatten(1)
    total = torch.where(torch.isnan(total), total.new_full((), -math.inf), total)
    return total, torch.sort(total, dim=1, descending=True, stable=True).indices


def rank_continuations(score, s):
    """``_rank`` with host lists (for tests and callers outside the engine)."""
    total, order = _rank(score, s)
    return total.tolist(), order.tolist()


def load_picker(picker, device, cache: dict | None = None):
    """``(model, tokenizer)`` of a picker reward model given as a path, a model, or a
    ``(model, tokenizer)`` pair.

    A path is loaded once per ``cache`` (the Decoder's) onto ``device``. A model the caller
    gives is used where it is and never moved: on another device than ``device`` it is
    refused (move it yourself, ``picker.to(...)``)."""
    if isinstance(picker, (str, os.PathLike)):
        key = os.path.realpath(os.fspath(picker))
        if cache is not None and key in cache:
            return cache[key]
        from transformers import AutoModelForSequenceClassification  # loaded on first use
        p = check_dir(picker, "picker")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:
            raise ValueError(f"picker={str(picker)!r} could not be loaded as a sequence "
                             f"classification model: {exc}") from exc
        _check_picker(model)
        loaded = (model.to(device).eval(), load_tokenizer(p))
        if cache is not None:
            cache[key] = loaded
        return loaded
    model, tok = picker if isinstance(picker, tuple) else (picker, None)
    _check_picker(model)
    where = next(model.parameters()).device
    if where != torch.device(device):
        raise ValueError(f"picker is on {where} but the decoder runs on {device}; aad_fast does "
                         f"not move a model you pass: call picker.to({str(device)!r}) first, "
                         "or pass the picker as a path")
    return model, tok


def _check_picker(model) -> None:
    n_out = getattr(model.config, "num_labels", 1)
    if n_out != 1:
        raise ValueError(f"picker must have one output (a reward model), it has {n_out}")


def samples(rule: BestOfN, prompts: list) -> tuple[Mix, list, list]:
    """What docs/rules.md BestOfN decodes: ``(sample, rows, seeds)``, the single-stream rule
    (stream ``a``, nucleus ``top_p`` at ``temperature``) and per sample row its prompt and seed:
    row ``p*n + j`` is prompt ``p``'s sample ``j``, seeded ``rule.seed + j``. Each row is an
    ordinary request (its tokens equal that prompt decoded alone with that seed)."""
    n = rule.n
    sample = Mix(w_a=1.0, w_r=0.0, temperature=rule.temperature, top_p=rule.top_p, seed=rule.seed)
    rows = [r for r in prompts for _ in range(n)]
    seeds = [rule.seed + j for _ in prompts for j in range(n)]
    return sample, rows, seeds


def pick_best(n: int, rows: list, got, model, picker_tok, dec_tok) -> dict:
    """BestOfN's choice among the samples ``got`` (a ``Generation`` of ``samples``'s rows,
    prompt ``p``'s ``n`` samples at ``p*n .. p*n + n - 1``): the picker ``model`` scores prompt +
    completion, batched (``score_with_picker``); the highest score wins, ties to the first
    sample. Returns ``tokens``, ``finish_reason``, ``scores`` (the winners') and
    ``candidates`` (per prompt every sample's tokens, score, text and finish reason)."""
    scores = score_with_picker(model, picker_tok, dec_tok, rows, got.tokens)
    tokens, reasons, best_scores, cands = [], [], [], []
    for p in range(len(rows) // n):
        sc = scores[p * n:(p + 1) * n]
        j = max(range(n), key=lambda i: (sc[i], -i))
        tokens.append(got.tokens[p * n + j])
        reasons.append(got.finish_reason[p * n + j])
        best_scores.append(sc[j])
        cands.append([{"tokens": got.tokens[p * n + i], "score": sc[i],
                       "text": got.text[p * n + i] if got.text else None,
                       "finish_reason": got.finish_reason[p * n + i]} for i in range(n)])
    return dict(tokens=tokens, finish_reason=reasons, scores=best_scores, candidates=cands)


def score_with_picker(model, picker_tok, dec_tok, prompts_ids, completions):
    """Reward of each prompt + completion (floats). Text goes through the picker's tokenizer
    (decoded with the decoder's); without tokenizers the ids are used as they are. Sequences
    are right-padded with the picker's ``config.pad_token_id`` (which is how a
    sequence-classification head finds each row's last token) in one batch; a picker without a
    pad id scores one sequence at a time. Neither the tokenizer nor the model is changed (a
    model in training mode runs in eval mode for the call and is put back)."""
    dev = next(model.parameters()).device
    if picker_tok is not None and dec_tok is not None:
        texts = [dec_tok.decode(p, skip_special_tokens=True) + dec_tok.decode(c, skip_special_tokens=True)
                 for p, c in zip(prompts_ids, completions)]
        seqs = [list(picker_tok(t)["input_ids"]) for t in texts]
    else:
        seqs = [list(p) + list(c) for p, c in zip(prompts_ids, completions)]
    pad = getattr(model.config, "pad_token_id", None)
    groups = [seqs] if pad is not None else [[s] for s in seqs]
    out, was_training = [], model.training
    model.eval()
    try:
        with torch.inference_mode():
            for group in groups:
                width = max(map(len, group))
                ids = torch.tensor([s + [pad or 0] * (width - len(s)) for s in group], device=dev)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in group],
                                    device=dev)
                logits = model(input_ids=ids, attention_mask=mask).logits
                out += logits[:, 0].float().cpu().tolist()
    finally:
        model.train(was_training)
    return out
