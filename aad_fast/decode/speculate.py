"""Exact speculative decoding of the per-token rules (docs/speculative.md).

A *draft* (``Draft``, host-side) proposes up to ``k`` next ids per row; one *verify step*
(``verify_one``) feeds every row's last chosen token and its drafted ids through both streams
in one forward of ``T = 1 + drafted`` positions per row (``pairs.*.verify``), runs the rule's
selection at every position (``choose``: position ``j`` of a row at step counter ``t`` is the
rule's step ``t + j``: the Gumbel noise of sampled rules is keyed on it, and OPAD's
previous-step term at position ``j > 0`` is position ``j - 1``'s), keeps the longest prefix
where the draft equals the rule's choice plus the rule's own token at the first mismatch
(``settle``), and records those ``e`` tokens exactly as ``e`` one-token steps would
(``steps.record``: output columns, stop ids and ``max_new_tokens`` ending the row exactly
there, the next input, the counter). Every position's logits are those of the one-token step
on the same prefix (up to the float32 summation order of the batched matmuls, as for a batch
against one row), so the tokens are the rule's own, whatever the draft proposes: a wrong
draft costs speed, never a token.

Rows advance by their own counts (``pairs.*.advance``: positions, slots, masks); the KV of a
rejected position stays in its slot, masked, until a later step writes it. The host reads the
emitted tokens once per verify step (``Speculator.step``: one sync, which the draft needs
anyway) and keeps the runners' read bound (``cache.ReadBound.advance``) with it.

BeamAAD and BestOfN are refused (``check_speculate``): their steps rank beams or sample
whole completions, not one token per row.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..rules import BeamAAD, BestOfN
from .selectors import OPADSelector, _argmax, ban_
from .steps import DecodeState, _stopped, early_stops

MAX_SPECULATE = 8


@runtime_checkable
class Draft(Protocol):
    """What proposes the tokens a verify step checks (host-side lists of ids). Rows are the
    scheduler's rows: ``start`` when a request's prompt (stream ``a``'s ids) fills one,
    ``accept`` with the tokens the rule emitted for it (the first token at admission, then
    each verify step's, in order), ``free`` when it is retired or cancelled. ``propose``
    returns, per row of ``rows``, ``0 .. k`` proposed next ids (fewer or none: less or no
    speculation for that row this step)."""

    def start(self, row: int, prompt: list) -> None: ...

    def propose(self, rows: list, k: int) -> list: ...

    def accept(self, row: int, tokens: list) -> None: ...

    def free(self, row: int) -> None: ...


class FixedDraft:
    """A ``Draft`` from a function ``fn(row, context, k) -> ids``, ``context`` the row's
    prompt plus every token emitted so far (host list): tests, oracles, prompt lookup."""

    def __init__(self, fn: Callable[[int, list, int], list]):
        self.fn = fn
        self.context: dict = {}

    def start(self, row: int, prompt: list) -> None:
        self.context[row] = list(prompt)

    def propose(self, rows: list, k: int) -> list:
        return [list(self.fn(row, self.context[row], k))[:k] for row in rows]

    def accept(self, row: int, tokens: list) -> None:
        self.context[row].extend(tokens)

    def free(self, row: int) -> None:
        self.context.pop(row, None)


def check_speculate(speculate, draft, rule=None) -> int:
    """``speculate`` as an int in ``0 .. MAX_SPECULATE`` (0: off), consistent with ``draft``
    and ``rule``; ``ValueError`` naming the argument otherwise."""
    if isinstance(speculate, bool) or not isinstance(speculate, int) or \
            not 0 <= speculate <= MAX_SPECULATE:
        raise ValueError(f"speculate must be an int in [0, {MAX_SPECULATE}] (the drafted tokens "
                         f"per verify step; 0: off), got {speculate!r}")
    if speculate and draft is None:
        raise ValueError(f"speculate={speculate} needs a draft: pass draft='ngram', a draft "
                         "model, or an object with start/propose/accept/free")
    if draft is not None and not speculate:
        raise ValueError(f"draft={draft!r} given with speculate=0: pass speculate=k "
                         f"(1..{MAX_SPECULATE}) drafted tokens per verify step")
    if draft is not None and not isinstance(draft, (str, Draft)):
        raise ValueError(f"draft must be a name ('ngram', a model path) or an object with "
                         f"start/propose/accept/free methods, got {draft!r}")
    if speculate and isinstance(rule, (BeamAAD, BestOfN)):
        raise ValueError(f"speculate={speculate}: {type(rule).__name__} cannot be speculated "
                         "(it ranks beams or samples whole completions, not one token per row); "
                         "pass speculate=0 for it")
    return speculate


def resolve_draft(draft, decoder):
    """``draft`` as a ``Draft``: ``None`` and objects with the protocol's methods as they
    are; a name (``"ngram"``) or a draft model (an object or a local path) through
    ``drafts.make_draft(draft, decoder)``, which knows the decoder's tokenizer and device."""
    if draft is None or isinstance(draft, Draft):
        return draft
    try:
        from . import drafts  # the drafts (n-gram, draft models) live beside this module
    except ImportError:
        raise ValueError(f"draft={draft!r}: named drafts and draft models need "
                         "aad_fast.decode.drafts (make_draft), which this build lacks; pass an "
                         "object with start/propose/accept/free") from None
    return drafts.make_draft(draft, decoder)


def choose(selector, logits_a: Tensor, logits_r: Tensor | None, t: Tensor,
           rows: Tensor, ban=None) -> Tensor:
    """The rule's choice at every position, int64 ``[N, T]``, of logits ``[N, T, V]``; row
    ``i``'s position ``j`` is its step ``t[i] + j``. ``rows``: int64 ``[N * T]``, ``i``
    repeated ``T`` times (the per-row values of each flattened position). OPAD: position
    ``j``'s previous-step term is position ``j - 1``'s (position 0: the selector's ``prev``).
    ``ban``: per flattened position, the ids it may not choose (``position_bans``).
    Graph-safe."""
    n, width, vocab = logits_a.shape
    ahead = torch.arange(width, dtype=torch.int64, device=t.device)
    step = (t.view(-1, 1) + ahead).view(-1)
    if isinstance(selector, OPADSelector):
        return _opad_choose(selector, logits_a, logits_r, ban)
    flat_r = None if logits_r is None else logits_r.reshape(n * width, -1)
    return selector(logits_a.reshape(n * width, vocab), flat_r, step, rows,
                    ban=ban).view(n, width)


def position_bans(st: DecodeState, width: int):
    """``min_tokens`` at every verify position (``steps.early_stops`` of ``width`` steps):
    ``(idx, on)`` ``[N * width, S]``, row ``i``'s stop ids banned at position ``j`` while
    ``t[i] + j < min_new[i]`` (the token it chooses there is the row's ``t + j``-th);
    ``None`` for a state without ``min_new``. Graph-safe."""
    now = early_stops(st)
    if now is None:
        return None
    idx = now[0]
    ahead = torch.arange(width, dtype=torch.int64, device=st.t.device)
    early = (st.t.view(-1, 1) + ahead) < st.min_new.view(-1, 1)  # [N, width]
    stop = st.stop if st.stop.dim() == 2 else st.stop.expand(st.t.shape[0], -1)
    on = early & (stop[:, :1] >= 0)  # a row with no stop ids bans nothing
    return (idx.repeat_interleave(width, dim=0),
            on.reshape(-1, 1).expand(-1, idx.shape[1]))


def _opad_choose(sel: OPADSelector, logits_a: Tensor, logits_r: Tensor, ban=None) -> Tensor:
    v = sel.vocab
    a, r = logits_a[..., :v].float(), logits_r[..., :v].float()
    prev = torch.cat([sel.prev[:, None], (a - r)[:, :-1]], dim=1)
    k, k1 = sel.k[:, None], sel.k1[:, None]
    z = k1 * a - k * r + k * prev
    n, width = z.shape[:2]
    return _argmax(ban_(z.reshape(n * width, v), ban)).view(n, width)


def _opad_keep(sel: OPADSelector, logits_a: Tensor, logits_r: Tensor, count: Tensor) -> None:
    """OPAD's ``prev`` after a verify: the difference at the last emitted position of each row
    that emitted any (``count`` int64 ``[N]``)."""
    v = sel.vocab
    at = (count - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, v)
    a = logits_a[..., :v].float().gather(1, at)[:, 0]
    r = logits_r[..., :v].float().gather(1, at)[:, 0]
    sel.prev.copy_(torch.where((count > 0).view(-1, 1), a - r, sel.prev))


def settle(st: DecodeState, c: Tensor, draft: Tensor, ndraft: Tensor):
    """Record the tokens a verify step emits; ``(count, run)``: their number per row and the
    drafted ids accepted per row (before stop ids and limits cut), int64 ``[N]`` each.

    ``c`` int64 ``[N, T]``: the rule's choices; ``draft`` int64 ``[N, >= T - 1]``: the
    drafted ids (position ``j + 1`` was fed ``draft[:, j]``); ``ndraft`` int64 ``[N]``: how
    many of them are real. A row emits ``c[:, :e]``: the choices up to and including the first
    whose draft differs (or the last drafted), cut after a stop id and at ``max_new_tokens``;
    a done row emits nothing. Recorded as ``steps.record`` would over ``e`` steps. Graph-safe."""
    n, width = c.shape
    ahead = torch.arange(width, dtype=torch.int64, device=c.device)
    match = (draft[:, :width - 1] == c[:, :width - 1]) & (ahead[:-1] < ndraft.view(-1, 1))
    run = torch.cumprod(match.long(), dim=1).sum(dim=1)  # drafted ids accepted
    hit = _stopped(st, c.reshape(-1), _row_stops(st, width)).view(n, width)
    before = (torch.cumsum(hit.long(), dim=1) - hit.long()) > 0  # a stop id earlier on
    valid = (ahead <= run.view(-1, 1)) & ~before & \
        ((st.t.view(-1, 1) + ahead) < st.lim.view(-1, 1)) & ~st.done.view(-1, 1)
    count = valid.sum(dim=1)
    st.bad.logical_or_(((c < 0) & valid).any(dim=1))
    last = st.out.shape[1] - 1
    for j in range(width):  # one column per scatter: clamped columns never collide
        col = (st.t + j).clamp(max=last).view(-1, 1)
        keep = st.out.gather(1, col)
        st.out.scatter_(1, col, torch.where(valid[:, j:j + 1], c[:, j:j + 1], keep))
    st.done.logical_or_((hit & valid).any(dim=1))
    end = c.gather(1, (count - 1).clamp(min=0).view(-1, 1))[:, 0]
    st.tok.copy_(torch.where(count > 0, end.clamp(min=0), st.tok))
    st.t.add_(count)
    st.done.logical_or_(st.t >= st.lim)
    return count, run


def _row_stops(st: DecodeState, width: int) -> Tensor:
    """The stop ids of every flattened position (row ``i`` repeated ``width`` times)."""
    if st.stop.dim() == 1:
        return st.stop
    n, s = st.stop.shape
    return st.stop.view(n, 1, s).expand(n, width, s).reshape(n * width, s)


def flag_reference(st: DecodeState, logits_r: Tensor | None, valid: Tensor) -> None:
    """``steps.flag_reference`` over the positions a verify step emitted (``valid`` bool
    ``[N, T]``)."""
    if logits_r is not None:
        dead = ~(logits_r > -math.inf).any(dim=2)
        st.bad_r.logical_or_((dead & valid).any(dim=1))


def verify_one(pair, selector, st: DecodeState, buf: dict, width: int):
    """One verify step of ``width`` positions for every row: forward the last token and the
    first ``width - 1`` drafted ids of ``buf["draft"]`` (``buf["ndraft"]`` real per row),
    choose at every position, record what is emitted. Returns ``(count, run, c)``: tokens
    emitted per row, drafted ids accepted per row, the choices ``[N, width]``. The rows'
    positions are not moved on (``pair.advance``, once the counts are read). Graph-safe."""
    width_buffers(buf, st, width)
    tokens, rows = buf["tokens", width], buf["rows", width]
    tokens[:, 0].copy_(st.tok)
    tokens[:, 1:].copy_(buf["draft"][:, :width - 1])
    logits_a, logits_r = pair.verify(tokens)
    c = choose(selector, logits_a, logits_r, st.t, rows, position_bans(st, width))
    count, run = settle(st, c, buf["draft"], buf["ndraft"])
    ahead = torch.arange(width, dtype=torch.int64, device=c.device)
    flag_reference(st, logits_r, ahead < count.view(-1, 1))  # (a done row emits nothing)
    if isinstance(selector, OPADSelector):
        _opad_keep(selector, logits_a, logits_r, count)
    return count, run, c


def width_buffers(buf: dict, st: DecodeState, width: int) -> None:
    """The buffers of verify steps of ``width`` positions in ``buf``, made once (a captured
    or compiled step keeps their addresses): ``tokens`` int64 ``[N, width]`` (the forward's
    input), ``rows`` int64 ``[N * width]`` (each flattened position's row), ``got`` int64
    ``[N, 4 + width]`` (what the host reads: ``verify_advance``)."""
    if ("got", width) not in buf:
        n = st.tok.shape[0]
        buf["tokens", width] = st.tok.new_zeros((n, width))
        buf["rows", width] = torch.arange(n * width, device=st.tok.device) // width
        buf["got", width] = st.tok.new_zeros((n, 4 + width))


def verify_advance(pair, selector, st: DecodeState, buf: dict, width: int) -> Tensor:
    """``verify_one``, then the device part of ``pair.advance`` (positions, slots, masks moved
    on by each row's count), then everything the host reads packed into ``buf["got", width]``
    int64 ``[N, 4 + width]``: per row the tokens emitted, the drafted ids accepted, the done
    and bad flags, the choices. Returned. The runners' read bounds (host) are not moved
    (``advance_bounds``, after the read). Graph-safe: the step a ``verify_steps.VerifySteps``
    captures or compiles, per width; ``buf["draft"]``/``buf["ndraft"]`` are its inputs and
    must keep their addresses across replays."""
    count, run, c = verify_one(pair, selector, st, buf, width)
    pair.advance(count)
    got = buf["got", width]
    for j, col in enumerate((count, run, st.done, st.bad)):
        got[:, j].copy_(col)
    got[:, 4:].copy_(c)
    return got


def advance_bounds(pair, counts: list) -> None:
    """The host part of ``pair.advance``: each runner's ``ReadBound`` moves row ``i`` on by
    ``counts[i]`` (host ints, one per row of the pair). A runner with a multiple of
    ``len(counts)`` rows stacks that many streams of the pair's rows (a shared pair's ``2B``:
    stream a, then r), each row of each stream moving by its row's count."""
    for r in pair.runners:
        r.bound.advance(list(counts) * (r.n_rows // len(counts)))


class Speculator:
    """The host side of speculative decoding for one scheduler's rows: the draft (``Draft``),
    ``k`` (drafted ids per row and step, at most), the device buffers of the drafted ids and
    per-request counts (``stats``: ``id`` of a ``scheduler.Request`` -> ``(request,
    [drafted, accepted, emitted, verify steps])``; ``emitted`` counts the first token, chosen at admission, and a stop id).
    ``vocab``: drafted ids must lie in ``[0, vocab)``. ``steps``: the built verify steps
    (``verify_steps.VerifySteps``: captured and/or compiled per width and read length, whose
    buffers this uses), or ``None`` for the eager step (``verify_advance``); ``ran``: the
    ``(captured, compiled)`` modes of the steps run."""

    def __init__(self, draft, k: int, pair, selector, st: DecodeState, vocab: int, steps=None):
        self.draft, self.k, self.vocab = draft, k, vocab
        self.pair, self.sel, self.st, self.steps = pair, selector, st, steps
        n = st.tok.shape[0]
        self.buf = steps.buf if steps is not None else \
            {"draft": st.tok.new_zeros((n, k)), "ndraft": st.tok.new_zeros(n)}
        self._host = torch.zeros((n, k), dtype=torch.int64)
        self.ran: set = set()
        self.stats: dict = {}
        self.ended: set = set()  # rows whose request ended (not yet retired)

    def admitted(self, rows, requests) -> None:
        """Rows just admitted (host ints) with their ``scheduler.Request``s: the draft starts
        each with its prompt and takes its first token (one read, beside the admission's own
        syncs)."""
        idx = torch.tensor(rows, dtype=torch.int64, device=self.st.out.device)
        first, done = torch.stack([self.st.out[:, 0].index_select(0, idx),
                                   self.st.done.index_select(0, idx).long()]).tolist()
        for row, req, y, end in zip(rows, requests, first, done):
            self.draft.start(row, list(req.ids_a))
            self.draft.accept(row, [y])
            self.stats[id(req)] = (req, [0, 0, 1, 0])
            self.ended.discard(row)
            if end:
                self.ended.add(row)

    def free(self, row: int) -> None:
        """Row ``row`` was retired or cancelled."""
        self.ended.discard(row)
        self.draft.free(row)

    def _proposals(self, live: dict) -> tuple:
        """``(rows, ndraft)``: the rows that verify drafts this step and the drafted count of
        every row (host list), the ids written to ``_host``."""
        rows = [row for row in live if row not in self.ended]
        props = self.draft.propose(rows, self.k) if rows else []
        if len(props) != len(rows):
            raise ValueError(f"draft.propose returned {len(props)} lists for {len(rows)} rows")
        nd = [0] * self._host.shape[0]
        for row, ids in zip(rows, props):
            res = live[row]
            ids = [_draft_id(v, self.vocab) for v in list(ids)[:self.k]]
            ids = ids[:max(res.request.max_new_tokens - res.steps - 1, 0)]
            if ids:
                self._host[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            nd[row] = len(ids)
        return rows, nd

    def step(self, live: dict) -> bool:
        """One verify step of every row (``live``: row -> ``scheduler.Result``); each live
        request's ``steps`` grows by what it emitted. One host sync. Returns whether a row
        ended (or got no candidate: the scheduler's check then raises)."""
        rows, nd = self._proposals(live)
        width = 1 + max(nd, default=0)
        self.buf["draft"].copy_(self._host)
        self.buf["ndraft"].copy_(torch.tensor(nd, dtype=torch.int64))
        got = self.steps(width) if self.steps is not None else None
        if got is None:  # eager (or the built steps failed)
            got = verify_advance(self.pair, self.sel, self.st, self.buf, width)
            self.ran.add((False, False))
        else:
            self.ran.add(self.steps.last)
        got = got.tolist()  # the sync
        advance_bounds(self.pair, [g[0] for g in got])
        stop = False
        for row, res in live.items():
            e, r, done, bad = got[row][:4]
            if e:
                self.draft.accept(row, got[row][4:4 + e])
                res.steps += e
            s = self.stats[id(res.request)][1]
            s[0], s[1], s[2] = s[0] + nd[row], s[1] + min(r, e), s[2] + e
            s[3] += row in rows
            if done or bad:
                stop = True
                self.ended.add(row)
        return stop

    def summary(self, results) -> dict:
        """``Generation.stats`` entries of ``results`` (in order): per request ``drafted``,
        ``accepted`` (drafted ids the rule chose), ``emitted`` (tokens, the first and a stop id
        included), ``verify_steps``; ``mean_accepted``: accepted drafted ids per verify step
        of a row; ``cuda_graphs``/``compiled``: whether a captured/compiled verify step ran."""
        rows = [self.stats.get(id(res.request), (None, [0, 0, 0, 0]))[1] for res in results]
        steps = sum(r[3] for r in rows)
        return {"speculate": self.k, "drafted": [r[0] for r in rows],
                "accepted": [r[1] for r in rows], "emitted": [r[2] for r in rows],
                "verify_steps": [r[3] for r in rows],
                "cuda_graphs": any(g for g, _ in self.ran),
                "compiled": any(c for _, c in self.ran),
                "mean_accepted": sum(r[1] for r in rows) / steps if steps else 0.0}


class SpecExecutor:
    """A ``scheduler.Scheduler``'s executor for speculative decoding: ``rows`` (an
    ``executors.RowExecutor``) admits, checks and reads the rows; ``spec`` (``Speculator``)
    runs verify steps in place of one-token steps (``run`` returns how many ran: it stops
    after the step in which a row ended, so it is retired and refilled at once) and hears of
    admissions and of rows retired or cancelled (the draft's ``start``/``free``)."""

    def __init__(self, rows, spec: Speculator):
        self.rows, self.spec = rows, spec
        self.width, self.kind, self.kind_of = rows.width, rows.kind, rows.kind_of
        self.max_new, self.max_stop = rows.max_new, rows.max_stop

    def admit(self, slots, requests, rules, prompts, stop, lim) -> None:
        self.rows.admit(slots, requests, rules, prompts, stop, lim)
        self.spec.admitted(list(slots), requests)

    def run(self, n: int, live: dict, step=None) -> int:
        for i in range(n):
            if self.spec.step(live):
                return i + 1
        return n

    def finished(self, live: dict) -> dict:
        ended = self.rows.finished(live)
        for slot in ended:
            self.spec.free(slot)
        return ended

    def stop(self, slot: int) -> None:
        self.rows.stop(slot)
        self.spec.free(slot)

    def partial(self, res) -> list:
        return self.rows.partial(res)


def _draft_id(v, vocab: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
        if hasattr(v, "__index__") and not isinstance(v, bool):
            v2 = v.__index__()
            if 0 <= v2 < vocab:
                return v2
        raise ValueError(f"draft proposed {v!r}: drafted ids must be ints in [0, {vocab})")
    return v
