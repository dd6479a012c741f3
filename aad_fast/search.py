"""Rules that search over several continuations: beam AAD and best-of-n with a picker.

Both run on the same runners as the per-token rules: beams (or samples) are rows of one batch.
"""
from __future__ import annotations

import math
import os
import time

import torch

from . import backends, engine
from .ops import aad_beam_topk
from .prompts import left_pad, Rows
from .rules import BeamAAD, BestOfN, Mix


def beam_aad(dec, rule: BeamAAD, rows, max_new: int, stop_ids):
    """docs/rules.md BeamAAD. Each prompt gets ``k = num_beams`` rows; per step every live beam proposes
    its best candidates by the AAD token score (``ops.aad_beam_topk`` on the Decoder's backend),
    the ``k`` best continuations by summed score survive (a candidate that is a stop id ends its
    beam when it ranks among the ``k`` best), caches are reordered on device. A prompt is
    finished once it has ``k`` ended beams or no live one, or after ``max_new`` tokens; the
    result is the ended beam with the best ``sum(s) / len**length_penalty`` (``len`` counts the
    stop token), else the best live beam. The bookkeeping lives on the device
    (``BeamSearch``): a step (``engine.beam_step``) has no host sync, and the host looks only
    every ``check_every`` steps (all prompts finished? a prompt with no candidate?).
    """
    from .generation import Generation

    k, b = rule.num_beams, len(rows.a)
    n = b * k
    dec._check_lengths(rows, max_new, n)
    longest = max(len(r) for r in rows.a)
    pair = dec._pair(dec._bucket(n) if dec.use_graphs else n, "ar", longest + max_new)
    n_rows = pair.runners[0].n_rows if not pair.shared else pair.n
    # each prompt is encoded once; its k beams (and any bucket padding rows) copy its cache
    ids, real = left_pad(rows.a, b, dec.device)
    width = ids.shape[1]
    which = torch.arange(n_rows, device=dec.device).div(k, rounding_mode="floor").clamp(max=b - 1)
    be = backends.pick_backend(dec.device, dec.backend)
    bs = BeamSearch(rule, b, n_rows, max_new, stop_ids, dec.vocab, be, dec.device)
    dev = dec.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits_a, logits_r = pair.prefill(ids, real, ids, real, rows=which)
        sync()
        t1 = time.perf_counter()
        bs.select(logits_a, logits_r)
        done = 1  # selections made; the next step writes cache slot width + done - 1
        while done < max_new and not bs.check():
            for _ in range(min(dec.check_every, max_new - done)):
                engine.beam_step(pair, bs, width, width + done - 1)
                done += 1
        bs.check()
        sync()
    decode_s = time.perf_counter() - t1
    tokens, reasons, scores, steps = bs.result()
    text = dec.tokenizer.batch_decode(tokens, skip_special_tokens=True) if dec.tokenizer else None
    stats = {"prefill_ms": (t1 - t0) * 1e3, "steps": steps,
             # every step after the first is one forward of all b*k beams plus the bookkeeping
             "ms_per_token": decode_s * 1e3 / max(done - 1, 1),
             "tokens_per_s": (b * (done - 1) / decode_s if done > 1 and decode_s > 0
                              else float("nan")),
             # aad_beam_topk has a fused C++ step; every other backend runs the reference
             "backend": "cpp" if be == "cpp" else "torch",
             "cuda_graphs": False, "pair": dec.kind, "batch": b, "num_beams": k,
             "device": str(dev)}
    return Generation(tokens=tokens, text=text, finish_reason=reasons, scores=scores,
                      stats=stats)


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
        from transformers import AutoModelForSequenceClassification

        from .hf import check_dir, load_tokenizer
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


def best_of_n(dec, rule: BestOfN, rows, max_new: int, stop_ids):
    """docs/rules.md BestOfN: ``n`` samples per prompt from stream ``a`` (nucleus ``top_p`` at
    ``temperature``, seeds ``rule.seed + j``) as one batch; the picker scores prompt +
    completion, batched; the highest score wins, ties to the first sample."""
    b, n = len(rows.a), rule.n
    sample = Mix(w_a=1.0, w_r=0.0, temperature=rule.temperature, top_p=rule.top_p, seed=rule.seed)
    rep = [r for r in rows.a for _ in range(n)]
    seeds = torch.tensor([rule.seed + j for _ in range(b) for j in range(n)], dtype=torch.int64)
    n_rows = dec._bucket(b * n)
    seeds = torch.cat([seeds, seeds.new_zeros(n_rows - b * n)]).to(dec.device)
    for gen in dec._decode(sample, Rows(rep, rep), max_new, stop_ids, seeds=seeds):
        pass
    model, ptok = load_picker(rule.picker, dec.device, dec._pickers)
    scores = score_with_picker(model, ptok or dec.tokenizer, dec.tokenizer, rep, gen.tokens)
    tokens, reasons, best_scores, cands = [], [], [], []
    for p in range(b):
        sc = scores[p * n:(p + 1) * n]
        j = max(range(n), key=lambda i: (sc[i], -i))
        tokens.append(gen.tokens[p * n + j])
        reasons.append(gen.finish_reason[p * n + j])
        best_scores.append(sc[j])
        cands.append([{"tokens": gen.tokens[p * n + i], "score": sc[i],
                       "text": gen.text[p * n + i] if gen.text else None,
                       "finish_reason": gen.finish_reason[p * n + i]} for i in range(n)])
    text = dec.tokenizer.batch_decode(tokens, skip_special_tokens=True) if dec.tokenizer else None
    stats = dict(gen.stats, n=n)
    from .generation import Generation
    return Generation(tokens=tokens, text=text, finish_reason=reasons, stats=stats,
                      scores=best_scores, candidates=cands)


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
