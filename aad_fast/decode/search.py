"""Rules that search over several continuations: beam AAD and best-of-n with a picker.

Neither has a decode loop of its own: both run on ``scheduler.Scheduler`` and know nothing of
the ``Decoder`` (it calls them):

- ``BeamSearch`` is beam AAD's bookkeeping and ranking, on the device: a beam request takes a
  group of ``num_beams`` rows of a scheduler, admitted together (its prompt encoded once and
  copied to the group's rows: ``engine.beam_admit``), stepped with every other group
  (``engine.beam_step`` reorders the caches within each group, on device, before the
  one-token forward) and retired as a whole when its search is finished.
- Best-of-n: ``samples`` says which rows to decode (``n`` per prompt, each an ordinary request
  with its own seed, decoded by the scheduler like any per-token rule) and ``pick_best`` keeps
  the picker's favourite of each prompt's samples.
"""
from __future__ import annotations

import math
import os

import torch

from ..ops import backends
from ..model.loading import check_dir, load_tokenizer
from ..ops import _no_f64
from ..ops.reference import aad_topk_ref
from ..rules import BeamAAD, BestOfN, Mix


class BeamSearch:
    """BeamAAD bookkeeping of a ``scheduler.Scheduler`` (docs/rules.md BeamAAD), on the device.

    The scheduler's ``n_rows`` rows form ``groups = n_rows // k`` groups of ``k = num_beams``
    rows (group ``g`` is rows ``g*k .. g*k + k - 1``; rows past ``groups * k`` are padding);
    one beam request runs in one group, which is admitted (``start``), stepped
    (``engine.beam_step``: ``src``/``tok`` feed the cache reorder and the forward, ``select``
    ranks) and retired (``flags``, ``result``) as a whole while other groups come and go.
    ``num_beams`` and ``tau`` are fixed per scheduler (``kind``; ``tau`` is a scalar of the
    fused op); alpha, length_penalty, stop ids (at most ``max_stop``) and ``max_new_tokens``
    (at most ``max_new``) are per group.

    Per step every live beam proposes its ``c = k + max_stop`` best candidates by the AAD token
    score (``ops.aad_beam_topk`` on ``backend``, ``None`` = the fastest), the ``k`` best
    continuations by summed score survive (a stop id ends its beam when it ranks among the
    ``k`` best), a group is finished once it has ``k`` ended beams, no live one, or
    ``max_new_tokens`` selections; its result is the ended beam with the best
    ``sum(s) / len**length_penalty`` (``len`` counts the stop token), else the best live beam.

    Tensors (fixed shapes, written in place, so ``select`` is graph-safe): per group ``score``
    float64 ``[G, k]`` (``-inf`` = no beam), ``finished``/``bad`` bool ``[G]`` (an idle group is
    finished), ``t``/``lim`` int64 ``[G]`` selections made / allowed, ``log_alpha`` float32
    ``[G]``, ``stop`` int64 ``[G, S]`` (``-2`` pads); back-pointers ``parent`` (the beam of the
    previous selection, ``0 .. k-1``) and ``token`` int64 ``[G, max_new + 1, k]`` (the last
    column takes inactive groups' writes); ended beams ``ended_sum`` float64,
    ``ended_step``/``ended_beam`` int64 ``[G, 2k + 1]`` (the last column a dump), ``n_ended``
    int64 ``[G]``; per row ``src`` int64 ``[n_rows]`` (the row whose cache it continues) and
    ``tok`` int64 ``[n_rows]`` (its next input).
    """

    def __init__(self, rule: BeamAAD, n_rows: int, max_new: int, max_stop: int, vocab: int,
                 backend: str | None, device):
        k = rule.num_beams
        if n_rows < k:
            raise ValueError(f"num_beams={k} needs {k} rows of one batch, this one has "
                             f"{n_rows}; use fewer beams or a larger max_batch_size")
        device = torch.device(device)
        self.rule, self.k, self.n_rows, self.groups = rule, k, n_rows, n_rows // k
        self.rows_per_request = k  # what tells a Scheduler it runs beam groups
        self.kind, self.tau, self.vocab = self.kind_of(rule), rule.tau, vocab
        self.backend = backends.pick_backend(device, backend)
        self.max_new, self.max_stop = max_new, max_stop
        self.c = min(k + max_stop, vocab)  # candidates per beam: k live ones survive any stops
        self.ended_cols = 2 * k  # < k ended before a step, at most k more in it
        g, c = self.groups, self.c
        i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
        self.stop = torch.full((g, max(max_stop, 1)), -2, **i64)
        self.log_alpha = torch.zeros(g, dtype=torch.float32, device=device)
        self.score = torch.full((g, k), -math.inf, **f64)
        self.finished = torch.ones(g, dtype=torch.bool, device=device)
        self.bad = torch.zeros(g, dtype=torch.bool, device=device)
        self.bad_r = torch.zeros(g, dtype=torch.bool, device=device)  # bad because of stream r
        self.t = torch.zeros(g, **i64)
        self.lim = torch.ones(g, **i64)
        self.src = torch.arange(n_rows, **i64)
        self.tok = torch.zeros(n_rows, **i64)
        self.parent = torch.zeros((g, max_new + 1, k), **i64)
        self.token = torch.zeros((g, max_new + 1, k), **i64)
        self.ended_sum = torch.zeros((g, self.ended_cols + 1), **f64)
        self.ended_step = torch.zeros((g, self.ended_cols + 1), **i64)
        self.ended_beam = torch.zeros((g, self.ended_cols + 1), **i64)
        self.n_ended = torch.zeros(g, **i64)
        self.rows = torch.arange(g * k, **i64).view(g, k)  # the rows of each group
        self.every = torch.arange(g, **i64)
        self.beams = torch.arange(k, **i64)
        self.rank = torch.arange(k * c, **i64)[None, :]
        self.length_penalty = [0.0] * g  # host: used by ``result`` only

    @staticmethod
    def kind_of(rule):
        """What one scheduler's requests share: ``("beam-aad", num_beams, tau)`` (other rules:
        their class name, never equal)."""
        if isinstance(rule, BeamAAD):
            return ("beam-aad", rule.num_beams, rule.tau)
        return type(rule).__name__

    # ------------------------------------------------------------------ admission
    def start(self, groups: list, logits_a, logits_r, rules: list, stop, lim) -> None:
        """Groups ``groups`` (host ints) begin a search: the last prompt position's logits
        ``[U, V]`` of their prompts (each encoded once), their ``rules`` (``BeamAAD`` values),
        stop ids int64 ``[U, S]`` and limits int64 ``[U]``; makes the first selection (only
        beam 0 is live). Host data, not graph-safe: it runs between steps."""
        dev, k, u = self.score.device, self.k, len(groups)
        g = torch.tensor(groups, dtype=torch.int64, device=dev)
        score = torch.full((u, k), -math.inf, dtype=torch.float64, device=dev)
        score[:, 0] = 0.0
        self.score.index_copy_(0, g, score)
        self.finished.index_fill_(0, g, False)
        self.bad.index_fill_(0, g, False)
        self.bad_r.index_fill_(0, g, False)
        self.n_ended.index_fill_(0, g, 0)
        self.t.index_fill_(0, g, 0)
        self.lim.index_copy_(0, g, lim.to(dev))
        self.stop.index_copy_(0, g, stop.to(dev)[:, :self.stop.shape[1]])
        alpha = torch.tensor([r.alpha for r in rules], dtype=torch.float32, device=dev)
        self.log_alpha.index_copy_(0, g, torch.log(alpha))
        for grp, r in zip(groups, rules):
            self.length_penalty[grp] = float(r.length_penalty)  # never an int power
        self._select(logits_a.repeat_interleave(k, 0), logits_r.repeat_interleave(k, 0), g)

    def stop_group(self, group: int) -> None:
        """End group ``group``'s search now (a cancelled request): it is no longer stepped."""
        self.finished[group] = True

    # ------------------------------------------------------------------ a step
    def select(self, logits_a, logits_r) -> None:
        """One step's bookkeeping from the logits ``[n_rows, V]`` of every row; graph-safe."""
        n = self.groups * self.k
        self._select(logits_a[:n], logits_r[:n], self.every)

    def _topk(self, la, lr, g):
        """``ops.aad_beam_topk`` with this scheduler's per-group ln(alpha) (a tensor the op's
        checks would read on the host)."""
        m = g.shape[0]
        log_alpha = self.log_alpha.index_select(0, g)[:, None].expand(m, self.k).reshape(-1)
        if self.backend == "cpp":
            return backends.load_cpp().aad_topk(_no_f64(la), _no_f64(lr), self.vocab,
                                                log_alpha, self.c, self.tau)
        return aad_topk_ref(la, lr, self.vocab, log_alpha, self.c, self.tau)

    def _select(self, la, lr, g) -> None:
        """The selection of groups ``g`` (int64 ``[m]``, on the device) from their rows'
        logits ``la``/``lr`` ``[m*k, V]``: every state tensor is read at ``g`` and written back
        there; inactive (finished) groups keep their state, their rows continue themselves."""
        k, c, m = self.k, self.c, g.shape[0]
        s, cand, *_ = self._topk(la, lr, g)
        score = self.score.index_select(0, g)
        total, order = _rank(score, s.double().view(m, k, c))
        tot = total.gather(1, order)
        tok = cand.reshape(m, k * c).gather(1, order)
        beam = order.div(c, rounding_mode="floor")
        # the continuations best first; the first that is no candidate (or -inf) ends the list
        valid = torch.cumprod(((tok >= 0) & (tot > -math.inf)).to(torch.int64), dim=1).bool()
        stop = self.stop.index_select(0, g)
        is_stop = (tok[:, :, None] == stop[:, None, :]).any(dim=2)
        active = ~self.finished.index_select(0, g)
        ended = valid & is_stop & (self.rank < k) & active[:, None]
        live = valid & ~is_stop
        live_at = live.cumsum(dim=1) - 1
        keep = live & (live_at < k)
        n_live = keep.sum(dim=1)
        slot = torch.where(keep, live_at, k)  # column k: a dump for the rest
        new_score = tot.new_full((m, k + 1), -math.inf).scatter(1, slot, tot)[:, :k]
        new_beam = beam.new_zeros((m, k + 1)).scatter(1, slot, beam)[:, :k]
        new_tok = tok.new_zeros((m, k + 1)).scatter(1, slot, tok)[:, :k]
        t = self.t.index_select(0, g)
        n_ended = self.n_ended.index_select(0, g)
        e_slot = torch.where(ended, n_ended[:, None] + ended.cumsum(dim=1) - 1, self.ended_cols)
        for dst, val in ((self.ended_sum, tot), (self.ended_step, t[:, None].expand_as(e_slot)),
                         (self.ended_beam, beam)):
            dst.index_copy_(0, g, dst.index_select(0, g).scatter(1, e_slot, val))
        n_ended = n_ended + ended.sum(dim=1)
        self.n_ended.index_copy_(0, g, n_ended)
        act = active[:, None]
        self.score.index_copy_(0, g, torch.where(act, new_score, score))
        parent = torch.where(act, new_beam, self.beams[None, :])
        rows = self.rows.index_select(0, g)
        self.src.index_copy_(0, rows.reshape(-1), (rows[:, :1] + parent).reshape(-1))
        nxt = torch.where(act, new_tok, 0)
        self.tok.index_copy_(0, rows.reshape(-1), nxt.reshape(-1))
        col = torch.where(active, t, self.max_new)[:, None, None].expand(m, 1, k)
        for dst, val in ((self.parent, parent), (self.token, nxt)):
            dst.index_copy_(0, g, dst.index_select(0, g).scatter(1, col, val[:, None, :]))
        t = t + active.to(torch.int64)
        self.t.index_copy_(0, g, t)
        dead = active & (n_live == 0) & (n_ended == 0)
        self.bad.index_copy_(0, g, self.bad.index_select(0, g) | dead)
        # dead although a live beam had candidates: every candidate's score was NaN (scored
        # -inf), i.e. the reference's logits were -inf/NaN there, not the aligned model's
        had = ((cand.reshape(m, k, c) >= 0) & (score > -math.inf)[:, :, None]).flatten(1).any(1)
        self.bad_r.index_copy_(0, g, self.bad_r.index_select(0, g) | (dead & had))
        done = (n_ended >= k) | (n_live == 0) | (t >= self.lim.index_select(0, g))
        self.finished.index_copy_(0, g, self.finished.index_select(0, g) | (active & done))

    # ------------------------------------------------------------------ the host's look
    def flags(self) -> tuple[list, list]:
        """One host sync: per group ``(finished, bad)`` (bad: a live group had no candidate)."""
        got = torch.stack([self.finished, self.bad]).tolist()
        return got[0], got[1]

    def result(self, group: int):
        """``(tokens, finish_reason, score, selections)`` of group ``group``, on the host, by
        the back-pointers (stop id excluded)."""
        parent, token = self.parent[group].tolist(), self.token[group].tolist()
        n_ended, t = int(self.n_ended[group]), int(self.t[group])
        lp = self.length_penalty[group]

        def seq(step, j):  # the tokens of beam ``j`` through selection ``step``
            out = []
            while step >= 0:
                out.append(token[step][j])
                j = parent[step][j]
                step -= 1
            return out[::-1]

        if n_ended:
            e_sum, e_step, e_beam = (x[group, :n_ended].tolist() for x in (
                self.ended_sum, self.ended_step, self.ended_beam))
            ended = [(_normalized(e_sum[i], e_step[i] + 1, lp), e_sum[i],
                      seq(e_step[i] - 1, e_beam[i]))
                     for i in range(n_ended)]
            best = max(ended, key=lambda e: e[0])
            return best[2], "stop", best[1], t
        score = self.score[group].tolist()
        j = max(range(self.k), key=lambda i: (score[i], -i))
        return seq(t - 1, j), "length", score[j], t


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
    """Reward of each prompt + completion (floats), scored as a reward model is trained: the
    whole conversation, chat markers included, as one finished turn (TRL's RewardTrainer ends
    every example with EOS; a chat template closes the assistant turn with it). With both
    tokenizers: ``prompt + completion`` ids and the picker tokenizer's EOS, where the two
    tokenizers map tokens to ids alike; else that text decoded in one piece with special tokens
    kept, tokenized by the picker's tokenizer (no second BOS), and its EOS. Without tokenizers
    the ids are used as they are. Sequences are right-padded with the picker's
    ``config.pad_token_id`` (which is how a sequence-classification head finds each row's last
    token) in one batch; a picker without a pad id scores one sequence at a time. Neither the
    tokenizer nor the model is changed (a model in training mode runs in eval mode for the call
    and is put back)."""
    dev = next(model.parameters()).device
    if picker_tok is not None and dec_tok is not None:
        eos = getattr(picker_tok, "eos_token_id", None)
        end = [] if eos is None else [eos]
        if picker_tok is dec_tok or picker_tok.get_vocab() == dec_tok.get_vocab():
            seqs = [list(p) + list(c) + end for p, c in zip(prompts_ids, completions)]
        else:
            texts = [dec_tok.decode(list(p) + list(c), skip_special_tokens=False)
                     for p, c in zip(prompts_ids, completions)]
            seqs = [list(picker_tok(t, add_special_tokens=False)["input_ids"]) + end
                    for t in texts]
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


def _normalized(total: float, length: int, lp: float) -> float:
    """``total / length**lp``; where ``length**lp`` leaves float's range (a large
    ``length_penalty``), its limit: 0 for an overflow, +-inf for an underflow."""
    try:
        return total / float(length) ** lp
    except OverflowError:
        return 0.0 * total
    except ZeroDivisionError:
        return math.copysign(math.inf, total) if total else 0.0
