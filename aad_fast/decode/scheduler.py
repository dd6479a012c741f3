"""Continuous batching: the rows of a running batch are slots that requests come and go from.

A ``Scheduler`` runs one pair (``pairs``) with one selector, i.e. one rule kind
(``selectors.rule_kind``), over ``n`` rows. ``submit`` queues a ``Request`` (both streams'
prompt ids, the rule's values for that request, its stop ids and ``max_new_tokens``) and returns
its ``Result``. The scheduler plans and an executor runs the plan (``executors``), as vLLM's
``schedule() -> execute_model() -> update_from_output()``: ``schedule`` returns a ``Plan``
(waiting requests into free slots, then how many one-token steps), ``execute`` hands it to the
executor (a prefill of just the admitted prompts copied into their rows, then the steps: the
captured/compiled step given as ``step``, or ``engine.decode_one``), and ``update`` looks once at
the device state (the only host sync of a burst besides admission) and retires the finished
requests, whose slots the next plan refills. ``burst`` is the three in a row (``step_burst``:
whether it ran) and ``run_until_idle`` loops until every request is done. A static batch is the
special case "admit all, refill none".

Beam search runs here too, with a ``search.BeamSearch`` in place of the selector (and no
``DecodeState``; executor ``executors.BeamExecutor``, per-token rules
``executors.RowExecutor``): a request then takes a *slot* of ``num_beams`` rows (slot ``g`` = rows
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
from .executors import BeamExecutor, RowExecutor


@dataclass
class Request:
    """One prompt to decode. ``ids_a``/``ids_r``: the prompt ids of the streams the selector
    sees as ``a`` and ``r`` (``ids_r`` defaults to ``ids_a``); ``rule``: this request's values
    (its kind must be the scheduler's; ``None`` = the scheduler's ``rule``);
    ``stop_ids``: ids that end it (excluded from ``tokens``); ``seed`` overrides the rule's seed
    (sampled rules); ``tag``: the caller's name for it in error messages; ``min_new_tokens``:
    its stop ids cannot be chosen before this many tokens (a scheduler whose state has
    ``min_new``: ``new_state(min_tokens=True)``); ``stops``: a ``stop_strings.StopStrings`` of
    its own, matched on its text at every check (the match ends it, ``Result.text``)."""

    ids_a: list
    ids_r: list | None = None
    rule: object = None
    max_new_tokens: int = 128
    stop_ids: tuple = ()
    seed: int | None = None
    tag: object = None
    min_new_tokens: int = 0
    stops: object = None

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
            self.min_new_tokens = check_int("min_new_tokens", self.min_new_tokens, 0)
            if self.min_new_tokens > self.max_new_tokens:
                raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds "
                                 f"max_new_tokens={self.max_new_tokens}")
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
    text: str | None = None  # the output text when a stop string cut it (else decode tokens)
    stop_reason: str | None = None  # the stop string that ended it
    steps: int = field(default=0, repr=False)  # tokens chosen so far (host count)
    width: int = field(default=0, repr=False)  # beam search: the slots its prompt took


@dataclass
class Plan:
    """What one burst does (``Scheduler.schedule``): ``admit``, groups of ``(slot, Result)``
    each prefilled together (one left-padded prefill), then ``steps`` steps of every row."""

    admit: list
    steps: int


class Scheduler:
    """Continuous batching over ``pair``'s rows (see module docstring). It plans; an executor
    (``executors``) runs the plans on the device: ``schedule() -> execute(plan) -> update()``.

    ``selector``: made for the pair's row count (``selectors.make_selector``); ``state``: an
    ``engine.DecodeState`` of the same rows with per-row stop ids ``stop`` ``[N, S]`` and ``out`` at
    least as wide as the largest ``max_new_tokens`` accepted (``executors.RowExecutor``). Their
    tensors are written in place only (a captured step keeps pointing at them). ``step``: a
    zero-argument replacement of ``engine.decode_one`` for these buffers (a
    ``StepGraph``/``CompiledStep``), settable later as ``scheduler.step``; or ``prepare``, called
    once after the first admission (the buffers then exist) to return that step. ``rule``: the
    values a request without its own ``rule`` gets (of the selector's kind). ``rows``: how many
    of the rows to use (default all).

    Beam search: ``selector`` is a ``search.BeamSearch`` of the pair's rows and ``state`` is
    ``None`` (executor ``executors.BeamExecutor``; the search holds its own per-slot stop ids and
    limits); ``free``/``live`` then count slots of ``num_beams`` rows, and ``Result.row`` is
    the slot.
    """

    def __init__(self, pair, selector, state: engine.DecodeState, rule, *, check_every: int = 8,
                 step=None, rows: int | None = None, prepare=None):
        self.pair, self.sel, self.st, self.rule = pair, selector, state, rule
        runner = pair.runners[0]
        self.n = pair_rows(pair)
        beam = hasattr(selector, "rows_per_request")  # a search.BeamSearch
        self.executor = BeamExecutor(pair, selector, self.n) if beam else \
            RowExecutor(pair, selector, state, self.n)
        self.kind_of, self.width = self.executor.kind_of, self.executor.width  # rows per slot
        if self.kind_of(rule) != selector.kind:
            raise ValueError(f"rule {rule!r} is of kind {self.kind_of(rule)}, the selector "
                             f"serves {selector.kind}")
        self.max_len = runner.max_len
        self.device = runner.device
        self.check_every = check_every
        self.step, self.prepare = step, prepare
        self.max_new, self.max_stop = self.executor.max_new, self.executor.max_stop
        use = self.n if rows is None else min(rows, self.n)
        if use < self.width:
            raise ValueError(f"rows={use} cannot hold one request of num_beams={self.width}; "
                             "give the scheduler at least num_beams rows")
        self.free = list(range(use // self.width))
        self.live: dict = {}  # slot -> Result
        self.waiting: deque = deque()
        self.steps = 0  # one-token steps run (all rows at once)
        self.prefill_s = 0.0
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
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
        if r.min_new_tokens and getattr(self.st, "min_new", None) is None:
            raise ValueError(f"{who}min_new_tokens needs a scheduler built for it "
                             "(Decoder.scheduler(rule, min_tokens=True)); beam search has none")
        if r.stops is not None and isinstance(self.executor, BeamExecutor):
            raise ValueError(f"{who}stop strings are not supported with beam search")
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

    # ------------------------------------------------------------------ plan, execute, update
    def schedule(self) -> Plan | None:
        """The next burst: waiting requests into free slots (first come first; requests
        admitted together share one left-padded prefill, unless the group's width plus a
        request's ``max_new_tokens`` would not fit the cache: that one gets its own), then up
        to ``check_every`` steps, fewer when a row reaches its ``max_new_tokens`` sooner (so it
        is refilled on time; a row that ends at a stop id waits for the burst's end). ``None``
        once idle."""
        groups = self._admissions()
        rows = list(self.live.values()) + [res for g in groups for _, res in g]
        if not rows:
            return None
        admitted = {id(res) for g in groups for _, res in g}
        left = min(res.request.max_new_tokens - (1 if id(res) in admitted else res.steps)
                   for res in rows)
        return Plan(admit=groups, steps=max(0, min(self.check_every, left)))

    def _admissions(self) -> list:
        groups: list = []  # [width, [(slot, result)], largest max_new]
        while self.free and self.waiting:
            slot, res = self.free.pop(0), self.waiting.popleft()
            r = res.request
            w = max(len(r.ids_a), len(r.ids_r))
            for g in groups:
                if max(g[0], w) + max(g[2], r.max_new_tokens) <= self.max_len:
                    g[0], g[2] = max(g[0], w), max(g[2], r.max_new_tokens)
                    g[1].append((slot, res))
                    break
            else:
                groups.append([w, [(slot, res)], r.max_new_tokens])
        return [members for _, members, _ in groups]

    def execute(self, plan: Plan, on_admit=None) -> None:
        """Run ``plan`` on the executor: its admissions (then ``on_admit(results)`` when any
        were admitted: a stream's first token is there), then its steps."""
        with torch.inference_mode():
            self._admit(plan.admit)
            if plan.admit and on_admit is not None:
                on_admit([res for group in plan.admit for _, res in group])
            if plan.steps > 0 and self.live:
                ran = self.executor.run(plan.steps, self.live, self.step)
                self.steps += plan.steps if ran is None else ran  # (speculation may stop early)

    def update(self) -> list:
        """One look at the device (the executor's ``finished``): finished requests get their
        outcome and free their slots, which the next plan refills. Returns them."""
        with torch.inference_mode():
            ended = self.executor.finished(self.live)
        now = time.perf_counter()
        out = []
        for slot, (tokens, reason, score) in ended.items():
            res = self.live.pop(slot)
            res.tokens, res.finish_reason, res.score = tokens, reason, score
            res.done, res.finished = True, now
            self.free.append(slot)
            out.append(res)
        if out:
            self.free.sort()
            self._idle(list(ended))
        return out

    def admit(self) -> int:
        """Prefill what fits of the queue into the free slots now (the plan's admissions
        alone); returns how many."""
        groups = self._admissions()
        with torch.inference_mode():
            self._admit(groups)
        return sum(map(len, groups))

    def burst(self, on_admit=None) -> list | None:
        """One plan, executed and checked, the loop body of every caller (``Decoder``'s
        calls and the server's loop): admit what fits (``on_admit``: ``execute``), run its
        steps, retire the finished requests. Returns those, ``None`` once idle."""
        plan = self.schedule()
        if plan is None:
            return None
        self.execute(plan, on_admit)
        return self.update()

    def step_burst(self) -> bool:
        """``burst()``; whether anything ran (``False`` once idle)."""
        return self.burst() is not None

    def run_until_idle(self) -> None:
        """Decode until every submitted request is done."""
        while self.step_burst():
            pass

    def _admit(self, groups: list) -> None:
        for members in groups:
            self._admit_group(members)
        if groups and self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            self.step = prepare() or self.step

    def _admit_group(self, members) -> None:
        dev = self.device
        self.sync()
        t0 = time.perf_counter()
        slots = [slot for slot, _ in members]
        reqs = [res.request for _, res in members]
        u = len(reqs)
        ids_a, real_a = left_pad([list(r.ids_a) for r in reqs], u, dev)
        ids_r, real_r = left_pad([list(r.ids_r) for r in reqs], u, dev)
        stop = torch.full((u, self.max_stop), -2, dtype=torch.int64)
        for i, r in enumerate(reqs):
            ids = sorted(set(r.stop_ids))
            if ids:
                stop[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        lim = torch.tensor([r.max_new_tokens for r in reqs], dtype=torch.int64)
        rules = [self.rule if r.rule is None else r.rule for r in reqs]
        self.executor.admit(slots, reqs, rules, (ids_a, real_a, ids_r, real_r), stop, lim)
        self.sync()
        t1 = time.perf_counter()
        self.prefill_s += t1 - t0
        width = max(ids_a.shape[1], ids_r.shape[1])
        for slot, res in members:
            res.row, res.admitted, res.first_token, res.steps = slot, t0, t1, 1
            res.width = width
            self.live[slot] = res

    def _idle(self, slots) -> None:
        """Freed slots: the runners' eager steps need not attend over their rows' cache
        (``Runner.idle``)."""
        k = self.width
        rows = [s * k + j for s in slots for j in range(k)]
        for runner in self.pair.runners:
            runner.idle(rows, self.n)

    def cancel(self, res: Result) -> None:
        """Drop a request (a client gone): a waiting one leaves the queue, a live one frees its
        slot for the next admission. Its ``tokens`` are what it had, ``finish_reason``
        ``"cancelled"``. Call it between bursts; a done request is left as it is."""
        if res.done:
            return
        if res in self.waiting:
            self.waiting.remove(res)
            toks = []
        else:
            toks = self.partial(res)
            slot = res.row
            del self.live[slot]
            with torch.inference_mode():
                self.executor.stop(slot)
            self.free.append(slot)
            self.free.sort()
            self._idle([slot])
        res.tokens, res.finish_reason, res.done = toks, "cancelled", True
        res.finished = time.perf_counter()

    def partial(self, res: Result) -> list:
        """The tokens a live request has so far (a host sync; its final ``tokens`` once done).
        A beam search has none before it is finished (its best beam may still change)."""
        if res.done or res.row is None:
            return list(res.tokens or [])
        return self.executor.partial(res)


def new_state(n_rows: int, max_new: int, max_stop: int, device,
              min_tokens: bool = False) -> engine.DecodeState:
    """A ``DecodeState`` for a ``Scheduler``: ``n_rows`` rows, outputs up to ``max_new`` ids,
    per-row stop ids (up to ``max_stop``); ``min_tokens``: with per-row ``min_new`` (its step
    masks each row's stop ids until then: ``engine.early_stops``)."""
    st = engine.DecodeState.new(n_rows, max_new, device)
    st.stop = torch.full((n_rows, max_stop), -2, dtype=torch.int64, device=device)
    if min_tokens:
        st.min_new = torch.zeros(n_rows, dtype=torch.int64, device=device)
    return st


def pair_rows(pair) -> int:
    """Rows per stream of a ``pairs`` pair (a shared pair's one runner holds both streams' rows,
    ``2 * pair.n``)."""
    return pair.n if getattr(pair, "shared", False) else pair.runners[0].n_rows
