"""The decode loop behind ``aad-fast serve``: a bounded queue and one decode thread that runs
continuous-batching schedulers (``scheduler.Scheduler``).

The server talks to a ``DecodeLoop`` through ``submit(DecodeRequest, sink) -> Ticket`` and
``Ticket.cancel()`` only, and receives ``("delta", text, tokens so far)``, ``("done", Completion)``,
``("error", exception)`` or ``("cancelled",)`` events through the ticket's sink (called from the
decode thread; the server hands them to its event loop, which never waits on decoding).

The decode thread owns every call into the Decoder (holding its lock per burst, so a
``generate`` from another thread waits for the burst's end, never for a whole request).
Per-token rules (AAD, Contrastive, Mix/EFT/DeRa/CFG, OPAD, Greedy) run on ``Decoder.scheduler``s,
one per rule kind (``selectors.rule_kind``) in use, of at most ``max_batch_size`` rows: requests
of any values of that kind (alpha, beta, k, seed, stop ids, max_new_tokens, ...) share its rows;
a request is admitted into a free row at the next burst, so streams and non-streamed requests run
in one batch; a stream gets its new text after its admission and after every burst
(``Scheduler.partial``); a cancelled request (a client gone) frees its row before the next burst
(``Scheduler.cancel``). The kinds in use take turns, one burst each. Every request's tokens equal
decoding it alone (the scheduler's contract: per-row caches, limits, values and noise keys).

Beam search runs on schedulers too (``Decoder.scheduler(BeamAAD(...))``, one per
``(num_beams, tau)``): a request takes ``num_beams`` rows, with its own alpha,
length_penalty, stop ids and ``max_new_tokens``; a stream gets its text when its search ends.
Best-of-n runs through ``Decoder.generate`` between bursts (the batches wait meanwhile),
compatible waiting requests (same rule, stop ids and ``max_new_tokens``) sharing one call.
A burst that raises takes no request down with it: its scheduler is dropped, the requests it had admitted are
decoded again one by one through ``Decoder.generate`` (the same tokens; a stream goes on from
the text it has) and those it had not go to a new scheduler, so only the request at fault fails.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

from ..decode.driver import bucket, partial_text, text_delta
from ..rules import BeamAAD, BestOfN


class QueueFull(Exception):
    """The decode loop holds ``max_queue`` requests that wait for a row."""


class Unavailable(RuntimeError):
    """The decode loop is closed (the server is shutting down)."""


@dataclass
class DecodeRequest:
    """One prompt to decode. Exactly one of ``text`` (tokenised by the Decoder, with the chat
    template when ``chat``) or ``ids`` (a list of ints, used as is) is set. ``stop``: stop ids
    (the model's EOS among them unless ``ignore_eos``); ``stop_strings``: matched on the text
    (``stop_strings``); ``min_tokens``, ``ignore_eos``, ``include_stop``: as
    ``Decoder.generate``."""

    rule: object
    max_new_tokens: int
    text: str | None = None
    ids: list | None = None
    chat: bool = False
    stop: tuple = ()
    stream: bool = False
    #: both streams' prompt ids for ``rule`` (``prompt_rows.rule_rows``), when the server has
    #: tokenised the prompt already (``openai_api.parse_request``): used instead of text/ids
    prompt_rows: object = None
    stop_strings: tuple = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop: bool = False

    def ends(self) -> dict:
        """``Decoder.generate``/``request`` keywords of its stops and ends."""
        return dict(stop=list(self.stop) + list(self.stop_strings), min_tokens=self.min_tokens,
                    ignore_eos=self.ignore_eos, include_stop=self.include_stop)

    @property
    def search(self) -> bool:
        """Best-of-n: decoded through ``Decoder.generate``, not a scheduler."""
        return isinstance(self.rule, BestOfN)

    def key(self):
        """Search requests with equal keys may share one ``Decoder.generate`` call."""
        return (self.rule, self.stop, self.chat, self.text is None, self.max_new_tokens,
                self.stop_strings, self.min_tokens, self.ignore_eos, self.include_stop)

    def rows(self) -> int:
        """Decoder rows a search request takes (beams or samples per prompt)."""
        if isinstance(self.rule, BeamAAD):
            return self.rule.num_beams
        if isinstance(self.rule, BestOfN):
            return self.rule.n
        return 1


@dataclass
class Completion:
    """A finished request: completion ids (stop id excluded), text, ``"stop"``/``"length"``;
    ``stop_reason``: the stop string that ended it."""

    tokens: list
    text: str
    finish_reason: str
    stop_reason: str | None = None


@dataclass(eq=False)  # a handle: identity, not value
class Ticket:
    """Handle of a submitted request. ``sink(event)`` is called from the decode thread."""

    request: DecodeRequest
    sink: object
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    started: bool = False  # admitted into a row or taken by a generate call
    res: object = field(default=None, repr=False)  # its scheduler.Result while in a scheduler
    shown: str = ""  # text already sent (streams)

    def cancel(self) -> None:
        """Stop decoding this request: a waiting one is dropped, a running one frees its row
        before the next burst."""
        self.cancelled.set()


@dataclass(eq=False)
class _Batch:
    """A scheduler of one rule kind (``key``) and its tickets (waiting for a row or live)."""

    key: tuple
    sched: object
    members: list = field(default_factory=list)

    def room(self) -> int:
        """Rows that the requests already given to it leave free at the next admission."""
        return len(self.sched.free) - len(self.sched.waiting)


class DecodeLoop:
    """One decode thread that owns every call into ``decoder`` (see the module docstring).

    Rows: a rule kind's scheduler starts with the rows its first requests need (a power of
    two, at most ``max_batch_size``), so one request at a time runs in a one-row batch; when
    more requests come than it has rows, a scheduler of ``max_batch_size`` rows takes over the
    kind and the smaller one finishes what it runs. Idle schedulers are kept for reuse (each
    holds a KV cache and, on CUDA, a captured step), at most ``keep_idle``, least recently used
    dropped first.

    Args:
        decoder: an ``aad_fast.Decoder``.
        max_batch_size: the most rows of a rule kind's scheduler, and of one ``generate`` call
            of beam search / best-of-n (at most the Decoder's ``max_batch_size``).
        max_queue: requests waiting for a row beyond which ``submit`` raises ``QueueFull``.
        keep_idle: idle schedulers kept.
        on_piece: optional test hook, called with the ticket after each burst of a stream.
    """

    def __init__(self, decoder, *, max_batch_size: int, max_queue: int, keep_idle: int = 3,
                 on_piece=None):
        for name, val, low in (("max_batch_size", max_batch_size, 1),
                               ("max_queue", max_queue, 1), ("keep_idle", keep_idle, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
        self.decoder = decoder
        self.max_batch_size = min(max_batch_size, decoder.max_batch_size)
        self.max_queue, self.keep_idle, self.on_piece = max_queue, keep_idle, on_piece
        self._inbox: deque = deque()  # submitted, not yet taken by the decode thread
        self._waiting = 0  # submitted, neither started nor finished
        self._cond = threading.Condition()
        self._paused = self._closed = False
        # decode thread only: every scheduler (busy or kept idle, least recently used first),
        # the one of each kind that takes new requests, and the generate queue (search
        # requests, and requests of a failed burst decoded again alone)
        self._batches: list = []
        self._current: dict = {}
        self._generate: deque = deque()
        self._tags = itertools.count()
        self._rows_in_use: dict = {}  # rule kind's name -> rows in use (read by ``stats``)
        self._schedulers: list = []
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0,
                       "batches": 0,  # admissions (one prefill round) and generate calls
                       "bursts": 0, "running": 0,  # rows in use after the last burst
                       "rows_peak": 0, "retried": 0}
        self._thread = threading.Thread(target=self._work, name="aad-fast-decode-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ interface
    def submit(self, request: DecodeRequest, sink) -> Ticket:
        """Queue ``request``; ``sink`` receives its events. Raises ``QueueFull`` or
        ``Unavailable``."""
        ticket = Ticket(request, sink)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting "
                                f"(--max-queue {self.max_queue})")
            self._inbox.append(ticket)
            self._waiting += 1
            self.counts["submitted"] += 1
            self._cond.notify()
        return ticket

    def waiting(self) -> int:
        """Requests submitted and not yet admitted into a row (nor finished)."""
        with self._cond:
            return self._waiting

    def stats(self) -> dict:
        """``counts``, ``waiting``, the rows in use per rule kind and the schedulers (kind,
        rows, rows in use) as of the last burst (``/health``)."""
        with self._cond:
            return {"waiting": self._waiting, "max_batch_size": self.max_batch_size,
                    **self.counts, "rows_in_use": dict(self._rows_in_use),
                    "schedulers": [dict(x) for x in self._schedulers]}

    def pause(self) -> None:
        """Take no new request until ``resume`` (running ones go on; tests, maintenance)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the decode thread; what has not finished is answered with ``Unavailable``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ decode thread
    def _work(self) -> None:
        while True:
            new = self._next()
            if new is None:
                return self._shutdown()
            self._route(new)
            self._drop_cancelled()
            for b in [b for b in self._batches if b.sched.busy]:
                self._burst(b)
            if self._generate:
                self._run_group(self._take_group())

    def _next(self) -> list | None:
        """The newly submitted tickets (none while paused), once there is anything to do;
        ``None`` when closed."""
        with self._cond:
            while not self._closed:
                busy = self._generate or any(b.sched.busy for b in self._batches)
                if busy or (self._inbox and not self._paused):
                    break
                self._cond.wait()
            else:
                return None
            if self._paused:
                return []
            new = list(self._inbox)
            self._inbox.clear()
            return new

    def _route(self, tickets: list) -> None:
        """Hand each ticket to its kind's scheduler or to the generate queue."""
        from ..decode.search import BeamSearch
        from ..decode.selectors import rule_kind
        keys = {}
        for t in tickets:
            rule = t.request.rule
            if isinstance(rule, BeamAAD):
                keys[t] = (rule.streams, BeamSearch.kind_of(rule))
            elif not t.request.search:  # min_tokens: a scheduler whose step masks stop ids
                keys[t] = (rule.streams, rule_kind(rule), t.request.min_tokens > 0)
        for t in tickets:
            req = t.request
            if t.cancelled.is_set():
                self._finish(t, ("cancelled",))
            elif req.search:
                self._generate.append(t)
            else:
                try:
                    r = self.decoder.request(req.text, input_ids=req.ids, rule=req.rule,
                                             max_new_tokens=req.max_new_tokens, chat=req.chat,
                                             tag=f"request {next(self._tags)}",
                                             rows=req.prompt_rows, **req.ends())
                    b = self._place(keys[t], req.rule, req.rows() * sum(
                        k == keys[t] for k in keys.values()))
                    t.res = b.sched.submit(r)
                except Exception as exc:  # this request's input only: the others go on
                    self._finish(t, ("error", exc))
                    continue
                b.members.append(t)

    def _place(self, key, rule, arriving: int) -> _Batch:
        """The batch of ``key``'s kind that takes a new request (``arriving``: the rows the
        requests of that kind that came at once take, to size a new one)."""
        cur = self._current.get(key)
        if cur is not None and cur.sched.busy:
            if cur.room() > 0 or cur.sched.n >= self.max_batch_size:
                return self._used(cur)
            want = self.max_batch_size  # more than it has rows: the full batch takes over
        else:
            want = bucket(arriving, self.max_batch_size)
        same = [b for b in self._batches if b.key == key and b.sched.n == want]
        if same and not same[-1].sched.busy:
            self._current[key] = same[-1]
            return self._used(same[-1])
        if cur is not None and not cur.sched.busy and cur.sched.n >= want:
            return self._used(cur)  # larger than needed, but ready
        idle = [b for b in self._batches if not b.sched.busy]
        for b in idle[:max(0, len(idle) - self.keep_idle)]:
            self._drop(b)  # frees its KV cache
        with self._lock():
            b = _Batch(key, self.decoder.scheduler(rule, rows=want,
                                                   min_tokens=len(key) > 2 and key[2]))
        self._batches.append(b)
        self._current[key] = b
        return b

    def _used(self, b: _Batch) -> _Batch:
        self._batches.remove(b)
        self._batches.append(b)
        return b

    def _drop(self, b: _Batch) -> None:
        self._batches.remove(b)
        if self._current.get(b.key) is b:
            del self._current[b.key]

    def _lock(self):
        """The Decoder's lock, held per burst (a ``generate`` from another thread waits)."""
        locked = getattr(self.decoder, "_locked", None)
        return locked() if locked is not None else contextlib.nullcontext()

    def _drop_cancelled(self) -> None:
        for b in self._batches:
            for t in [t for t in b.members if t.cancelled.is_set()]:
                b.sched.cancel(t.res)
                b.members.remove(t)
                self._finish(t, ("cancelled",))
        for t in [t for t in self._generate if t.cancelled.is_set()]:
            self._generate.remove(t)
            self._finish(t, ("cancelled",))
        self._publish()

    def _burst(self, b: _Batch) -> None:
        """Admit what fits into ``b``'s scheduler, send streams their first text, run one
        burst, then send new text and finish what ended. A failure: see the module docstring."""
        sched, members = b.sched, b.members
        try:
            with self._lock():
                sched.burst(on_admit=lambda admitted: self._admitted(b, admitted))
                with self._cond:
                    self.counts["bursts"] += 1
                self._publish()  # before the answers: a client that then asks sees them gone
                ended = [t for t in members if t.res.done]
                texts = self.decoder.tokenizer.batch_decode(
                    [t.res.tokens for t in ended], skip_special_tokens=True) if ended else []
                texts = [x if t.res.text is None else t.res.text for t, x in zip(ended, texts)]
                self._stream(sched, [t for t in members if not t.res.done], hook=True)
        except Exception as exc:
            self._failed(b, exc)
            return self._publish()
        for t, text in zip(ended, texts):
            members.remove(t)
            if t.request.stream:
                self._delta(t, text, final=True, count=len(t.res.tokens))
            self._finish(t, ("done", Completion(t.res.tokens, text, t.res.finish_reason,
                                                t.res.stop_reason)))

    def _admitted(self, b: _Batch, admitted: list) -> None:
        """Requests just prefilled into ``b``'s rows: started, and streams sent their first
        token (before the burst's steps)."""
        with self._cond:
            self.counts["batches"] += 1
            self.counts["rows_peak"] = max(self.counts["rows_peak"], sum(
                len(x.sched.live) * x.sched.width for x in self._batches))
        new = [t for t in b.members if t.res in admitted]
        for t in new:
            self._start(t)
        self._stream(b.sched, new)

    def _stream(self, sched, members, hook=False) -> None:
        """Send each live stream of ``members`` the text it has gained."""
        for t in members:
            if t.request.stream and t.res.row is not None:
                # the text without an end that may begin a stop string (a match would cut it)
                self._delta(t, partial_text(sched, t.res, self.decoder.tokenizer),
                            count=min(t.res.steps, t.request.max_new_tokens))
                if hook and self.on_piece is not None:
                    self.on_piece(t)

    def _delta(self, t: Ticket, text: str, final: bool = False, count: int = 0) -> None:
        """Send ``t`` the part of ``text`` (its whole text so far) not yet shown, with
        ``count``, its tokens so far (``continuous_usage_stats``). While it is decoding, a
        trailing U+FFFD may be a character whose remaining bytes are still to come, so it is
        held back; the ``final`` text is sent whole (a U+FFFD it ends with stays), so the
        joined deltas equal the non-streamed text (``driver.text_delta``)."""
        piece, shown = text_delta(t.shown, text, final)
        if piece:
            _send(t, ("delta", piece, count))
            t.shown = shown

    def _failed(self, b: _Batch, exc) -> None:
        """A burst of ``b`` raised: drop its scheduler (its buffers may be mid-step). The
        requests it had not admitted go to another; each of the others is decoded again alone,
        or fails if it was the only one."""
        self._drop(b)
        queued = [t for t in b.members if t.res in b.sched.waiting]
        suspects = [t for t in b.members if t.res not in b.sched.waiting]
        if len(suspects) == 1:
            self._finish(suspects[0], ("error", exc))
        else:
            with self._cond:
                self.counts["retried"] += len(suspects)
            for t in suspects:
                t.res = None
            self._generate.extendleft(reversed(suspects))
        for t in queued:
            try:
                nb = self._place(b.key, t.request.rule, t.request.rows() * len(queued))
                t.res = nb.sched.submit(t.res.request)
            except Exception as exc2:
                self._finish(t, ("error", exc2))
                continue
            nb.members.append(t)

    def _publish(self) -> None:
        """Rows in use per rule kind and each scheduler's size, for ``stats``."""
        rows, scheds = {}, []
        for b in self._batches:
            name = "-".join(map(str, b.key[1]))
            used = len(b.sched.live) * b.sched.width  # a beam request takes num_beams rows
            rows[name] = rows.get(name, 0) + used
            scheds.append({"kind": name, "rows": b.sched.n, "in_use": used})
        with self._cond:
            self._rows_in_use, self._schedulers = rows, scheds
            self.counts["running"] = sum(rows.values())

    def _take_group(self) -> list:
        """The oldest generate ticket and the waiting ones that may share its call."""
        first = self._generate.popleft()
        group, rows = [first], first.request.rows()
        if first.request.search and not first.request.stream:
            for t in list(self._generate):
                r = t.request
                if r.search and not r.stream and r.key() == first.request.key() and \
                        rows + r.rows() <= self.max_batch_size:
                    self._generate.remove(t)
                    group.append(t)
                    rows += r.rows()
        return group

    def _run_group(self, group: list) -> None:
        """One ``Decoder.generate`` call for ``group`` (its requests share rule, stop ids, chat
        flag, input form and ``max_new_tokens``); on failure each runs alone."""
        for t in group:
            self._start(t)
        with self._cond:
            self.counts["batches"] += 1
        req = group[0].request
        kw = dict(rule=req.rule, max_new_tokens=req.max_new_tokens, chat=req.chat,
                  **req.ends())
        try:
            if all(t.request.prompt_rows is not None for t in group):
                # tokenised already (best-of-n reads stream a's ids): decoded as they are
                ids = [t.request.prompt_rows.a[0] for t in group]
                gen = self.decoder.generate(input_ids=ids, **{**kw, "chat": False})
            elif req.text is not None:
                gen = self.decoder.generate([t.request.text for t in group], **kw)
            else:
                gen = self.decoder.generate(input_ids=[t.request.ids for t in group], **kw)
        except Exception as exc:
            if len(group) == 1:
                self._finish(group[0], ("error", exc))
            else:  # find the request at fault: the others must not fail with it
                for t in group:
                    self._run_group([t])
            return
        for i, t in enumerate(group):
            if t.request.stream:
                self._delta(t, gen.text[i], final=True, count=len(gen.tokens[i]))
            self._finish(t, ("done", Completion(gen.tokens[i], gen.text[i],
                                                gen.finish_reason[i])))

    def _start(self, t: Ticket) -> None:
        if not t.started:
            t.started = True
            with self._cond:
                self._waiting -= 1

    def _finish(self, ticket, event) -> None:
        if ticket.finished:
            return
        self._start(ticket)
        ticket.finished = True
        with self._cond:
            self.counts[{"done": "done", "error": "failed"}.get(event[0], "cancelled")] += 1
        _send(ticket, event)

    def _shutdown(self) -> None:
        """Answer, don't strand, what has not finished."""
        with self._cond:
            left = list(self._inbox)
            self._inbox.clear()
        left += [t for b in self._batches for t in b.members] + list(self._generate)
        self._batches.clear()
        self._current.clear()
        self._generate.clear()
        for t in left:
            self._finish(t, ("error", Unavailable("the server is shutting down")))


def _send(ticket: Ticket, event) -> None:
    """Deliver ``event``; a sink that fails (its event loop closed) cancels its ticket only."""
    try:
        ticket.sink(event)
    except Exception:
        ticket.cancel()
