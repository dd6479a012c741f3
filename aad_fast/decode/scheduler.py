"""Continuous batching: the rows of a running batch are slots that requests come and go from.

A ``Scheduler`` runs one pair (``pairs``) with one selector, i.e. one rule kind
(``selectors.rule_kind``), over ``n`` rows. ``submit`` queues a ``Request`` (both streams'
prompt ids, the rule's values for that request, its stop ids and ``max_new_tokens``) and returns
its ``Result``. ``step_burst`` admits waiting requests into free rows (a prefill of just those
prompts, copied into their rows: ``engine.admit``), runs up to ``check_every`` one-token steps
of the whole batch (``engine.decode_one``, or the captured/compiled step given as ``step``),
then looks once at the device state (the only host sync of a burst besides admission) and
retires the finished rows, which the next burst refills. ``run_until_idle`` loops until every
request is done. A static batch is the special case "admit all, refill none".

Beam search runs here too, with a ``search.BeamSearch`` in place of the selector (and no
``DecodeState``): a request then takes a *slot* of ``num_beams`` rows (slot ``g`` = rows
``g*k .. g*k + k - 1``), admitted together (its prompt encoded once and copied to the slot's
rows: ``engine.beam_admit``), stepped with the other slots (``engine.beam_step``: each row
takes the cache of a row of its own slot, then the one-token forward and the ranking, all on
device) and retired as a whole once its search is finished, when waiting requests refill it.
For per-token rules a slot is one row.

Every request's tokens equal decoding its prompt alone (tested, fp32): each row has its own
cache slots, positions, mask, step counter, limits and stop ids (``runner.Runner``,
``engine.DecodeState``) and its own rule values in the selector's per-row tensors; the noise of
a sampled rule is keyed by the row's own step (``selectors.row_seeds``).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from . import steps as engine
from .prompt_rows import left_pad
from ..rules import as_int, check_int, check_seed
from .selectors import rule_kind


@dataclass
class Request:
    """One prompt to decode. ``ids_a``/``ids_r``: the prompt ids of the streams the selector
    sees as ``a`` and ``r`` (``ids_r`` defaults to ``ids_a``); ``rule``: this request's values
    (its kind must be the scheduler's; ``None`` = the scheduler's ``rule``);
    ``stop_ids``: ids that end it (excluded from ``tokens``); ``seed`` overrides the rule's seed
    (sampled rules); ``tag``: the caller's name for it in error messages."""

    ids_a: list
    ids_r: list | None = None
    rule: object = None
    max_new_tokens: int = 128
    stop_ids: tuple = ()
    seed: int | None = None
    tag: object = None

    def __post_init__(self):
        self.check()

    def check(self, vocab: int | None = None) -> None:
        """Validate the fields (``ValueError`` naming the request and the field) and store its
        numbers as Python ints: integers only (numpy integers too), never a float or a bool,
        which a tensor of ids would silently truncate; prompt ids in ``[0, vocab)`` when
        ``vocab`` is given (``Scheduler.submit``). A seed is an int64: ``[0, 2**63 - 1]``."""
        who = "" if self.tag is None else f"request {self.tag!r}: "
        try:
            self.max_new_tokens = check_int("max_new_tokens", self.max_new_tokens, 1)
            if self.seed is not None:
                self.seed = check_seed(self.seed)
            self.stop_ids = tuple(_ids("stop_ids", self.stop_ids, None))
            self.ids_a = _ids("ids_a", self.ids_a, vocab)
            if self.ids_r is not None:
                self.ids_r = _ids("ids_r", self.ids_r, vocab)
        except ValueError as exc:
            raise ValueError(who + str(exc)) from None


def _ids(name: str, ids, vocab: int | None) -> list:
    """``ids`` (an iterable of token ids) as a list of Python ints in ``[0, vocab)``."""
    try:
        vals = list(ids)
    except TypeError:
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}") from None
    if all(type(v) is int for v in vals) and (not vals or min(vals) >= 0 and (
            vocab is None or max(vals) < vocab)):
        return vals  # the common case, checked at C speed (prompts are long)
    got = [as_int(v) for v in vals]
    for v, t in zip(vals, got):
        if t is None or t < 0 or (vocab is not None and t >= vocab):
            span = "ints >= 0" if vocab is None else f"ints in [0, {vocab})"
            raise ValueError(f"{name} must be token ids ({span}), got {v!r} in it")
    return got


@dataclass(eq=False)  # a handle: identity, not value
class Result:
    """A request's handle and, once ``done``, its outcome: ``tokens`` (stop id excluded),
    ``finish_reason`` (``"stop"``, ``"length"``, or ``"cancelled"`` after ``Scheduler.cancel``).
    Times (``time.perf_counter``): ``submitted``, ``admitted`` (prefill start), ``first_token``
    (prefill end), ``finished`` (when the burst that ended it was checked); ``row``: the slot it
    ran in."""

    request: Request
    tokens: list | None = None
    finish_reason: str | None = None
    done: bool = False
    row: int | None = None
    submitted: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    score: float | None = None  # beam search: the returned beam's summed score
    steps: int = field(default=0, repr=False)  # tokens chosen so far (host count)
    width: int = field(default=0, repr=False)  # beam search: the slots its prompt took


class Scheduler:
    """Continuous batching over ``pair``'s rows (see module docstring).

    ``selector``: made for the pair's row count (``selectors.make_selector``); ``state``: an
    ``engine.DecodeState`` of the same rows with per-row stop ids ``stop`` ``[N, S]`` and ``out`` at
    least as wide as the largest ``max_new_tokens`` accepted. Their tensors are written in place
    only (a captured step keeps pointing at them). ``step``: a zero-argument replacement of
    ``engine.decode_one`` for these buffers (a ``StepGraph``/``CompiledStep``), settable later as
    ``scheduler.step``; or ``prepare``, called once after the first admission (the buffers then
    exist) to return that step. ``rule``: the values a request without its own ``rule`` gets (of the
    selector's kind). ``rows``: how many of the rows to use (default all).

    Beam search: ``selector`` is a ``search.BeamSearch`` of the pair's rows and ``state`` is
    ``None`` (the search holds its own per-slot stop ids and limits); ``free``/``live`` then
    count slots of ``num_beams`` rows, and ``Result.row`` is the slot.
    """

    def __init__(self, pair, selector, state: engine.DecodeState, rule, *, check_every: int = 8,
                 step=None, rows: int | None = None, prepare=None):
        self.kind_of = getattr(selector, "kind_of", rule_kind)
        if self.kind_of(rule) != selector.kind:
            raise ValueError(f"rule {rule!r} is of kind {self.kind_of(rule)}, the selector "
                             f"serves {selector.kind}")
        self.pair, self.sel, self.st, self.rule = pair, selector, state, rule
        runner = pair.runners[0]
        self.n = pair_rows(pair)
        self.max_len = runner.max_len
        self.device = runner.device
        self.check_every = check_every
        self.step, self.prepare = step, prepare
        self.spec = None  # a speculate.Speculator: verify steps of drafted tokens instead
        self.beam = hasattr(selector, "rows_per_request")  # a search.BeamSearch
        self.width = selector.rows_per_request if self.beam else 1  # rows per slot
        if self.beam:
            if selector.n_rows != self.n:
                raise ValueError(f"the BeamSearch is for {selector.n_rows} rows, the pair "
                                 f"has {self.n}")
            self.max_new, self.max_stop = selector.max_new, selector.max_stop
        else:
            if state.stop.dim() != 2 or state.stop.shape[0] != self.n:
                raise ValueError(f"state.stop must be per row [{self.n}, S], got "
                                 f"{tuple(state.stop.shape)}")
            self.max_new, self.max_stop = state.out.shape[1], state.stop.shape[1]
        use = self.n if rows is None else min(rows, self.n)
        if use < self.width:
            raise ValueError(f"rows={use} cannot hold one request of num_beams={self.width}; "
                             "give the scheduler at least num_beams rows")
        self.free = list(range(use // self.width))
        self.live: dict = {}  # row -> Result
        self.waiting: deque = deque()
        self.steps = 0  # one-token steps run (all rows at once)
        self.prefill_s = 0.0
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        st = state
        if st is not None:
            with torch.inference_mode():  # every row starts idle
                st.done.fill_(True)
                for t in (st.bad, st.bad_r, st.t, st.tok):
                    t.zero_()
                st.lim.fill_(1)
                st.stop.fill_(-2)
        for runner in pair.runners:
            runner.idle(list(range(self.n)), self.n)

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Result:
        """Queue ``request``; returns its ``Result`` (filled in once it is done). Refuses what
        cannot run here, naming the field."""
        r = request
        r.check(getattr(self.sel, "vocab", None))  # its fields may have changed since made
        who = "request: " if r.tag is None else f"request {r.tag!r}: "
        if r.ids_r is None:
            r.ids_r = r.ids_a
        if not r.ids_a or not r.ids_r:
            raise ValueError(f"{who}empty prompt")
        longest = max(len(r.ids_a), len(r.ids_r))
        if r.max_new_tokens > self.max_new or longest + r.max_new_tokens > self.max_len:
            raise ValueError(f"{who}a prompt of {longest} tokens plus "
                             f"max_new_tokens={r.max_new_tokens} exceeds this scheduler's "
                             f"{self.max_len} cache slots; give fewer new tokens or build it "
                             "with a larger max_seq_len")
        if len(set(r.stop_ids)) > self.max_stop:
            raise ValueError(f"at most {self.max_stop} stop ids per request, got "
                             f"{len(set(r.stop_ids))}")
        if r.rule is not None and self.kind_of(r.rule) != self.sel.kind:
            raise ValueError(f"{who}rule {r.rule!r} is of kind {self.kind_of(r.rule)}, this "
                             f"scheduler runs {self.sel.kind} (built for {self.rule!r}); give "
                             "that rule a scheduler of its own: Decoder.scheduler(rule)")
        res = Result(request=r, submitted=time.perf_counter())
        self.waiting.append(res)
        return res

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting)

    def admit(self) -> int:
        """Prefill waiting requests (first come first) into the free rows; returns how many.
        Requests admitted together share one left-padded prefill, unless the group's width
        plus a request's ``max_new_tokens`` would not fit the cache: that one gets its own."""
        take = []
        while self.free and self.waiting:
            take.append((self.free.pop(0), self.waiting.popleft()))
        groups: list = []  # [width, [(row, result)], largest max_new]
        for row, res in take:
            r = res.request
            w = max(len(r.ids_a), len(r.ids_r))
            for g in groups:
                if max(g[0], w) + max(g[2], r.max_new_tokens) <= self.max_len:
                    g[0], g[2] = max(g[0], w), max(g[2], r.max_new_tokens)
                    g[1].append((row, res))
                    break
            else:
                groups.append([w, [(row, res)], r.max_new_tokens])
        with torch.inference_mode():
            for _, members, _ in groups:
                self._admit_group(members)
            if take and self.prepare is not None:
                prepare, self.prepare = self.prepare, None
                self.step = prepare() or self.step
        return len(take)

    def _admit_group(self, members) -> None:
        st, dev = self.st, self.device
        self.sync()
        t0 = time.perf_counter()
        rows = [row for row, _ in members]
        reqs = [res.request for _, res in members]
        if not self.beam:
            dst = torch.tensor(rows, dtype=torch.int64, device=dev)
            for row, r in zip(rows, reqs):
                one = torch.tensor([row], dtype=torch.int64, device=dev)
                self.sel.set_rows(one, self.rule if r.rule is None else r.rule, r.seed)
        u = len(reqs)
        ids_a, real_a = left_pad([list(r.ids_a) for r in reqs], u, dev)
        ids_r, real_r = left_pad([list(r.ids_r) for r in reqs], u, dev)
        s = self.max_stop
        stop = torch.full((u, s), -2, dtype=torch.int64)
        for i, r in enumerate(reqs):
            ids = sorted(set(r.stop_ids))
            if ids:
                stop[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        lim = torch.tensor([r.max_new_tokens for r in reqs], dtype=torch.int64)
        if self.beam:
            engine.beam_admit(self.pair, self.sel, rows, ids_a, real_a, ids_r, real_r,
                              [self.rule if r.rule is None else r.rule for r in reqs], stop, lim)
        else:
            engine.admit(self.pair, self.sel, st, dst, ids_a, real_a, ids_r, real_r, stop, lim)
        self.sync()
        t1 = time.perf_counter()
        self.prefill_s += t1 - t0
        width = max(ids_a.shape[1], ids_r.shape[1])
        for row, res in members:
            res.row, res.admitted, res.first_token, res.steps = row, t0, t1, 1
            res.width = width
            self.live[row] = res
        if self.spec is not None:
            self.spec.admitted(members)

    # ------------------------------------------------------------------ decoding
    def step_burst(self) -> bool:
        """Admit what fits, run up to ``check_every`` steps of every row (fewer when a row
        reaches its ``max_new_tokens`` sooner), retire the finished rows. Returns whether
        anything ran (``False`` once idle)."""
        self.admit()
        if not self.live:
            return False
        # up to the next row that reaches its max_new_tokens, so it is refilled on time (a row
        # that ends at a stop id waits for the burst's end)
        left = min(res.request.max_new_tokens - res.steps for res in self.live.values())
        burst = min(self.check_every, left)
        with torch.inference_mode():
            if burst > 0 and self.beam:
                for _ in range(burst):
                    # the slots every live search wrote since its prompt (host counts)
                    lo = min(res.width for res in self.live.values())
                    hi = max(res.width + res.steps - 1 for res in self.live.values())
                    engine.beam_step(self.pair, self.sel, lo, min(hi, self.max_len))
                    for res in self.live.values():
                        res.steps += 1
                self.steps += burst
            elif burst > 0 and self.spec is not None:
                for _ in range(burst):  # each emits 1 or more tokens per live row
                    self.steps += 1
                    if self.spec.step(self.live):
                        break  # a row ended: retire and refill it now
            elif burst > 0:
                step = self.step or engine.default_step(self.pair, self.sel, self.st)
                for _ in range(burst):
                    step()
                self.steps += burst
                for res in self.live.values():
                    res.steps += burst
            self._retire_beams() if self.beam else self._retire()
        return True

    def run_until_idle(self) -> None:
        """Decode until every submitted request is done."""
        while self.step_burst():
            pass

    def _retire(self) -> None:
        """One look at the device: raise for a row with no candidate (naming its request's
        tag), hand finished rows' tokens to their results and free the rows."""
        st = self.st
        flags = torch.stack([st.done, st.bad, st.bad_r]).tolist()
        if any(flags[1]) or any(flags[2]):
            tags = {row: res.request.tag if res.request.tag is not None else row
                    for row, res in self.live.items()}
            engine.check(st, rows=[tags.get(i, i) for i in range(self.n)])
        ended = [row for row in self.live if flags[0][row]]
        if not ended:
            return
        width = max(min(self.live[row].steps, self.live[row].request.max_new_tokens)
                    for row in ended)
        outs = st.out[ended, :width].tolist()
        now = time.perf_counter()
        for row, out in zip(ended, outs):
            res = self.live.pop(row)
            r = res.request
            toks = out[:min(res.steps, r.max_new_tokens)]
            stops = set(r.stop_ids)
            cut = next((i for i, t in enumerate(toks) if t in stops), None)
            res.tokens = toks if cut is None else toks[:cut]
            res.finish_reason = "length" if cut is None else "stop"
            res.done, res.finished, res.steps = True, now, len(toks)
            self.free.append(row)
            if self.spec is not None:
                self.spec.free(row)
        self.free.sort()
        self._idle(ended)

    def _retire_beams(self) -> None:
        """``_retire`` for beam slots: one look at the searches' flags (raise for a search
        with no candidate, naming its request's tag), then each finished slot's result."""
        fin, bad = self.sel.flags()
        dead = [slot for slot in self.live if bad[slot]]
        if dead:  # the error path: one more look, at which stream left a slot without a beam
            by_r = self.sel.bad_r.tolist()  # a beam had candidates, their scores were all NaN
            slot = next((g for g in dead if by_r[g]), dead[0])  # the reference first (as check)
            tag = self.live[slot].request.tag
            tag = slot if tag is None else tag
            if by_r[slot]:
                raise RuntimeError(
                    f"row {tag}: the reference model's logits (stream r) were all -inf/NaN at "
                    "some step (on every AAD candidate of every beam), so its distribution is "
                    "undefined (check the reference model's dtype/weights)")
            raise RuntimeError(
                f"row {tag}: no AAD candidate: the aligned model's logits were all -inf/NaN at "
                "some step, so no token could be chosen (check the model's dtype/weights)")
        ended = [slot for slot in self.live if fin[slot]]
        now = time.perf_counter()
        for slot in ended:
            res = self.live.pop(slot)
            res.tokens, res.finish_reason, res.score, res.steps = self.sel.result(slot)
            res.done, res.finished = True, now
            self.free.append(slot)
        if ended:
            self.free.sort()
            self._idle(ended)

    def _idle(self, slots) -> None:
        """Freed slots: the runners' eager steps need not attend over their rows' cache
        (``Runner.idle``)."""
        k = self.width
        rows = [s * k + j for s in slots for j in range(k)]
        for runner in self.pair.runners:
            runner.idle(rows, self.n)

    def cancel(self, res: Result) -> None:
        """Drop a request (a client gone): a waiting one leaves the queue, a live one frees its
        row for the next admission. Its ``tokens`` are what it had, ``finish_reason``
        ``"cancelled"``. Call it between bursts; a done request is left as it is."""
        if res.done:
            return
        if res in self.waiting:
            self.waiting.remove(res)
            toks = []
        else:
            toks = self.partial(res)
            row = res.row
            del self.live[row]
            with torch.inference_mode():  # an idle row: never flagged, never read
                if self.beam:
                    self.sel.stop_group(row)
                else:
                    self.st.done[row] = True
            if self.spec is not None:
                self.spec.free(row)
            self.free.append(row)
            self.free.sort()
            self._idle([row])
        res.tokens, res.finish_reason, res.done = toks, "cancelled", True
        res.finished = time.perf_counter()

    def partial(self, res: Result) -> list:
        """The tokens a live request has so far (a host sync; its final ``tokens`` once done).
        A beam search has none before it is finished (its best beam may still change)."""
        if res.done or res.row is None or self.beam:
            return list(res.tokens or [])
        toks = self.st.out[res.row, :min(res.steps, res.request.max_new_tokens)].tolist()
        stops = set(res.request.stop_ids)
        cut = next((i for i, t in enumerate(toks) if t in stops), None)
        return toks if cut is None else toks[:cut]


def new_state(n_rows: int, max_new: int, max_stop: int, device) -> engine.DecodeState:
    """A ``DecodeState`` for a ``Scheduler``: ``n_rows`` rows, outputs up to ``max_new`` ids,
    per-row stop ids (up to ``max_stop``)."""
    st = engine.DecodeState.new(n_rows, max_new, device)
    st.stop = torch.full((n_rows, max_stop), -2, dtype=torch.int64, device=device)
    return st


def pair_rows(pair) -> int:
    """Rows per stream of a ``pairs`` pair (a shared pair's one runner holds both streams' rows,
    ``2 * pair.n``)."""
    return pair.n if getattr(pair, "shared", False) else pair.runners[0].n_rows
