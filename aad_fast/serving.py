"""The decode backend behind ``aad-fast serve``: a bounded queue drained by one worker thread.

The server talks to a ``Backend`` through two calls only, ``submit(DecodeRequest) -> Ticket``
and ``Ticket.cancel()``, and receives ``("delta", text)``, ``("done", Completion)`` or
``("error", exception)`` events through the ticket's sink. A continuous-batching scheduler can
replace this class behind the same interface.

This backend batches *static*: the worker takes the oldest waiting request and every other
waiting non-streamed request with the same key (rule, stop ids, chat flag, input form; for the
search rules also ``max_new_tokens``) into one ``Decoder.generate`` call of at most
``max_batch_size`` rows, decoded to the group's largest ``max_new_tokens`` and cut back per
request. The rows of a batch are independent (SPEC "Stopping and output"; sampled rules draw
noise from ``(seed, step, id)``, never the row), so each request's tokens equal decoding it alone;
cutting a longer greedy/sampled decode at ``m`` tokens gives the ``m``-token decode. Beam search
and best-of-n rank whole continuations, so their groups also share ``max_new_tokens``.
A streamed request runs alone (``Decoder.stream`` is one prompt), and its cancel flag is checked
after every burst, so a client that goes away frees the Decoder at the next burst.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .rules import BeamAAD, BestOfN


class QueueFull(Exception):
    """The backend's queue holds ``max_queue`` waiting requests."""


@dataclass
class DecodeRequest:
    """One prompt to decode. Exactly one of ``text`` (tokenised by the Decoder, with the chat
    template when ``chat``) or ``ids`` (a list of ints, used as is) is set."""

    rule: object
    max_new_tokens: int
    text: str | None = None
    ids: list | None = None
    chat: bool = False
    stop: tuple = ()
    stream: bool = False

    def key(self):
        """Requests with equal keys may share one ``Decoder.generate`` call."""
        search = isinstance(self.rule, (BeamAAD, BestOfN))
        return (self.rule, self.stop, self.chat, self.text is None,
                self.max_new_tokens if search else None)

    def rows(self) -> int:
        """Decoder rows this request takes (beams or samples per prompt)."""
        if isinstance(self.rule, BeamAAD):
            return self.rule.num_beams
        if isinstance(self.rule, BestOfN):
            return self.rule.n
        return 1


@dataclass
class Completion:
    """A finished request: completion ids (stop id excluded), text, ``"stop"``/``"length"``."""

    tokens: list
    text: str
    finish_reason: str


@dataclass
class Ticket:
    """Handle of a submitted request. ``sink(event)`` is called from the worker thread."""

    request: DecodeRequest
    sink: object
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def cancel(self) -> None:
        """Stop decoding this request (a waiting one is dropped, a streamed one ends at its
        next burst)."""
        self.cancelled.set()


class Backend:
    """One worker thread that owns every call into ``decoder``.

    Args:
        decoder: an ``aad_fast.Decoder``.
        max_batch_size: rows per ``generate`` call (at most the Decoder's ``max_batch_size``).
        max_queue: waiting requests beyond which ``submit`` raises ``QueueFull``.
        on_piece: optional test hook, called with the ticket after each streamed burst.
    """

    def __init__(self, decoder, *, max_batch_size: int, max_queue: int, on_piece=None):
        for name, val in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        self.decoder = decoder
        self.max_batch_size = min(max_batch_size, decoder.max_batch_size)
        self.max_queue = max_queue
        self.on_piece = on_piece
        self._waiting: deque = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._closed = False
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0, "batches": 0,
                       "running": 0}
        self._thread = threading.Thread(target=self._work, name="aad-fast-backend", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ interface
    def submit(self, request: DecodeRequest, sink) -> Ticket:
        """Queue ``request``; ``sink`` receives its events. Raises ``QueueFull``."""
        ticket = Ticket(request, sink)
        with self._cond:
            if self._closed:
                raise RuntimeError("the backend is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting "
                                f"(--max-queue {self.max_queue})")
            self._waiting.append(ticket)
            self.counts["submitted"] += 1
            self._cond.notify()
        return ticket

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def pause(self) -> None:
        """Hold the worker before it takes the next request (tests, maintenance)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _take(self) -> list | None:
        """The next group of tickets, or ``None`` when closed."""
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()
                    self.counts["cancelled"] += 1
                if self._closed:
                    while self._waiting:  # answer, don't strand, what still waits
                        self._finish(self._waiting.popleft(),
                                     ("error", RuntimeError("the server is shutting down")))
                    return None
                if self._waiting and not self._paused:
                    break
                self._cond.wait()
            first = self._waiting.popleft()
            group = [first]
            if not first.request.stream:
                rows = first.request.rows()
                key = first.request.key()
                for t in list(self._waiting):
                    r = t.request
                    if not r.stream and not t.cancelled.is_set() and r.key() == key and \
                            rows + r.rows() <= self.max_batch_size:
                        self._waiting.remove(t)
                        group.append(t)
                        rows += r.rows()
            self.counts["running"] = len(group)
            return group

    def _work(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                if group[0].request.stream:
                    self._run_stream(group[0])
                else:
                    self._run_batch(group)
            except Exception as exc:  # never let one group stop the worker
                for t in group:
                    self._finish(t, ("error", exc))
            finally:
                with self._cond:
                    self.counts["running"] = 0

    def _finish(self, ticket, event) -> None:
        if ticket.finished:
            return
        ticket.finished = True
        kind = event[0]
        with self._cond:
            self.counts[{"done": "done", "error": "failed"}.get(kind, "cancelled")] += 1
        _send(ticket, event)

    def _run_batch(self, group: list) -> None:
        for t in group:
            if t.cancelled.is_set():
                self._finish(t, ("cancelled",))
        group = [t for t in group if not t.cancelled.is_set()]
        if not group:
            return
        with self._cond:
            self.counts["batches"] += 1
        req = group[0].request
        max_new = max(t.request.max_new_tokens for t in group)
        kw = dict(rule=req.rule, max_new_tokens=max_new, stop=list(req.stop) or None,
                  chat=req.chat)
        try:
            if req.text is not None:
                gen = self.decoder.generate([t.request.text for t in group], **kw)
            else:
                gen = self.decoder.generate(input_ids=[t.request.ids for t in group], **kw)
        except Exception as exc:
            if len(group) == 1:
                self._finish(group[0], ("error", exc))
            else:  # find the request at fault: the others must not fail with it
                for t in group:
                    self._run_batch([t])
            return
        for i, t in enumerate(group):
            toks, reason = gen.tokens[i], gen.finish_reason[i]
            m = t.request.max_new_tokens
            if len(toks) >= m:  # the group decoded further than this request asked for
                toks, reason = toks[:m], "length"
            text = gen.text[i] if len(toks) == len(gen.tokens[i]) else \
                self.decoder.tokenizer.decode(toks, skip_special_tokens=True)
            self._finish(t, ("done", Completion(toks, text, reason)))

    def _run_stream(self, ticket: Ticket) -> None:
        req = ticket.request
        shown = ""
        try:
            for piece in stream_generation(self.decoder, req):
                if isinstance(piece, str):
                    # hold back a trailing partial character (U+FFFD) until it is complete
                    stable = piece.rstrip("\ufffd")
                    if stable.startswith(shown) and len(stable) > len(shown):
                        _send(ticket, ("delta", stable[len(shown):]))
                        shown = stable
                    if self.on_piece is not None:
                        self.on_piece(ticket)
                    if ticket.cancelled.is_set():
                        break  # closes the generator: the Decoder is free again
                else:
                    text = piece.text[0]
                    if text.startswith(shown) and len(text) > len(shown):
                        _send(ticket, ("delta", text[len(shown):]))
                    self._finish(ticket, ("done", Completion(piece.tokens[0], text,
                                                             piece.finish_reason[0])))
                    return
        except Exception as exc:
            self._finish(ticket, ("error", exc))
            return
        self._finish(ticket, ("cancelled",))


def _send(ticket: Ticket, event) -> None:
    """Deliver ``event``; a sink that fails (its event loop closed) cancels its ticket only."""
    try:
        ticket.sink(event)
    except Exception:
        ticket.cancel()


def stream_generation(decoder, req: DecodeRequest):
    """Yield the full text of ``req``'s row after each burst, then its ``Generation``.

    ``Decoder.stream`` yields text deltas only, without the tokens and finish reason the
    OpenAI response needs, so this runs the same decode through ``Decoder._run(partial=True)``
    under the Decoder's lock (what ``stream`` itself does). A Decoder without ``_run`` is
    streamed with ``stream`` and then decoded once more with ``generate`` for the tokens."""
    kw = dict(rule=req.rule, max_new_tokens=req.max_new_tokens, stop=list(req.stop) or None,
              chat=req.chat)
    prompt = dict(prompts=req.text) if req.text is not None else dict(input_ids=[req.ids])
    run = getattr(decoder, "_run", None)
    if run is not None:
        with decoder._locked():
            yield from run(prompt.get("prompts"), prompt.get("input_ids"), None, kw["rule"],
                           kw["max_new_tokens"], kw["stop"], kw["chat"], partial=True)
        return
    one = dict(prompt=req.text) if req.text is not None else dict(input_ids=[req.ids])
    text = ""
    for delta in decoder.stream(**one, **kw):
        text += delta
        yield text
    yield decoder.generate(**prompt, **kw)
