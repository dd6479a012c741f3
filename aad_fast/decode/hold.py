"""One decode at a time on a ``Decoder``'s buffers: the hold its calls take.

A decode reuses the Decoder's static buffers (caches, state, captured graphs), so its calls must
not overlap: each holds the Decoder for a whole ``generate()``/``stream()`` (the server's loop for
one burst). The hold is not owned by a thread: a stream suspended at a yield may be resumed,
closed or garbage-collected in any thread, and that releases it (an RLock across the yields could
only be released by the thread that took it). While held, calls run with the Decoder's intra-op
thread count (``threads``; ``None``: the process's), the caller's put back after.
"""
from __future__ import annotations

import contextlib
import threading

import torch


class Hold:
    """The hold of one Decoder (module docstring)."""

    def __init__(self) -> None:
        self._free = threading.Condition(threading.Lock())
        self._depth = 0         # nested holds (0: free)
        self._running = None    # the thread running inside the hold; None while a stream waits
        self._home = None       # a waiting stream's thread, while it has run in that one only
        self._caller_threads = None  # the caller's thread count while a call changed it

    def acquire(self) -> None:
        """Hold this Decoder: wait while another call holds it; re-entry from the thread
        running inside the hold nests. A stream left open at a yield in this very thread (and
        only ever run in it) would never be resumed while this thread waits: refused."""
        me = threading.get_ident()
        with self._free:
            while self._depth and self._running != me:
                if self._running is None and self._home == me:
                    raise RuntimeError("this Decoder is already decoding in this thread (a "
                                       "stream() that is still open?); exhaust or close() the "
                                       "stream first")
                self._free.wait()
            self._depth += 1
            self._running = me

    def release(self) -> None:
        """Let go of one hold; from any thread (a stream may end in another than began it)."""
        with self._free:
            self._depth -= 1
            if not self._depth:
                self._running = self._home = None
                self._free.notify_all()

    @contextlib.contextmanager
    def locked(self, threads):
        """Hold this Decoder (other threads' calls wait for it), with ``threads`` intra-op
        threads while it is held (the process's count put back after)."""
        self.acquire()
        try:
            before = torch.get_num_threads()
            change = threads is not None and threads != before
            if change:
                torch.set_num_threads(threads)
            self._caller_threads = before if change else None
            try:
                yield
            finally:
                self._caller_threads = None
                if change:
                    torch.set_num_threads(before)
        finally:
            self.release()

    @contextlib.contextmanager
    def caller_turn(self, threads):
        """Around a ``stream`` yield: the hold stays the stream's, but no thread runs inside it
        (the stream may be resumed from any thread, which then runs inside it); the caller's
        code between two pieces runs with its own intra-op thread count, the Decoder's is set
        again when the stream resumes."""
        me = threading.get_ident()
        with self._free:
            self._home = me if self._home in (None, me) and self._running == me else -1
            self._running = None
        before = self._caller_threads
        if before is not None:
            torch.set_num_threads(before)
        try:
            yield
        finally:
            with self._free:
                self._running = threading.get_ident()
                if self._home != self._running:
                    self._home = -1  # resumed elsewhere: driven by several threads (a pool)
            if before is not None:
                torch.set_num_threads(threads)
