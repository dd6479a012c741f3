"""The verify step of speculative decoding built once per (width, read length): captured as a
CUDA graph and/or compiled with ``torch.compile``, as ``steps.LengthSteps`` builds the
one-token step per read length (docs/speculative.md, docs/engine.md).

A step is ``speculate.verify_advance`` of one (pair, selector, state) at one width with the
runners' ``fixed_len`` set to one rung of the read ladder: the forward of that many positions
per row, the rule's choice at each, the accepted runs recorded, the rows' device positions
moved on, what the host reads packed into one buffer. Two widths: ``k + 1`` for a step in
which any row drafted, ``1`` for one in which none did. A row that drafted fewer than ``k``
ids computes the spare positions and drops them (``settle`` accepts real drafted ids only), as
the rows of an eager step of width ``1 + max drafted`` already do for the widest row: two
builds per rung instead of ``k + 1`` (a compile on CPU costs tens of seconds; one more
position per row costs a decode step little, the weights being read once either way). Its inputs are the drafted ids in the static buffers ``buf["draft"]`` /
``buf["ndraft"]`` (``Speculator.step`` writes them before each replay) and the state's own
tensors; its output is ``buf["got", T]``, read by the host once per step (the step's one sync),
after which the host moves the runners' read bounds (``speculate.advance_bounds``): the part of
``pair.advance`` that is host bookkeeping stays outside the graph.
"""
from __future__ import annotations

import functools
import time

import torch

from ..model.cache import ladder_length
from . import steps as engine
from .speculate import verify_advance, width_buffers


def compile_verify(pair, selector, st, step: functools.partial, name: str):
    """``step`` (a ``verify_advance`` partial) through ``torch.compile`` (the whole step as one
    graph, static shapes), compiled now, its warm-up undone: ``(compiled, seconds)``; on
    failure warn once per model name and return ``(None, None)``."""
    try:
        fn = torch.compile(engine._own_code(step.func, *step.args), fullgraph=True,
                           dynamic=False)
        t0 = time.perf_counter()
        engine.undone(pair, selector, st, fn)
        return fn, time.perf_counter() - t0
    except Exception as exc:  # an architecture or op torch.compile cannot trace
        engine._fell_back("torch.compile of the verify step", name, exc)
        return None, None


class VerifySteps:
    """The captured (``graphs``, CUDA) and/or compiled (``compiled``) verify steps of one
    (pair, selector, state) with ``k`` drafted ids per row at most, one per (width, read
    length) that a decode reaches, built on first use (``name``: the model's, for the one-time
    fallback warning). ``buf``: the drafted ids' static buffers (``"draft"`` int64 ``[N, k]``,
    ``"ndraft"`` int64 ``[N]``) and the per-width ones (``speculate.width_buffers``).

    A call ``steps(T)`` (``T``: ``1 +`` the most ids a row drafted) runs the step of width
    ``W`` (``1`` if ``T`` is, else ``k + 1``) at the smallest rung of ``ladder`` that covers
    the last slot any live row writes in it (``ReadBound.needed(W - 1)``: host
    bookkeeping), runs that step with the runners' ``fixed_len`` set to it, counts the read
    (``Runner.count_read``) and returns ``buf["got", W]`` (``speculate.verify_advance``);
    ``last``: that step's ``(captured, compiled)`` mode. It returns ``None`` once a build has
    failed (``engine.try_capture`` / ``compile_verify`` warned): the caller runs the eager
    step from then on. ``build_s``: seconds spent building; ``compile_s``: the last compile's;
    ``compiles``: how many; ``modes``: per built ``(W, length)``, ``(captured, compiled)``."""

    def __init__(self, pair, selector, st, k: int, name: str, ladder, *, graphs: bool,
                 compiled: bool):
        self.pair, self.sel, self.st, self.name, self.k = pair, selector, st, name, k
        self.ladder, self.graphs, self.compiled = tuple(ladder), graphs, compiled
        n = st.tok.shape[0]
        self.buf = {"draft": st.tok.new_zeros((n, k)), "ndraft": st.tok.new_zeros(n)}
        self.steps: dict = {}
        self.modes: dict = {}
        self.last = None
        self.build_s, self.compile_s, self.compiles = 0.0, None, 0
        self.failed = False
        cuda = graphs and pair.device.type == "cuda"  # one pool: one step replays at a time
        self.pool = torch.cuda.graph_pool_handle() if cuda else None

    def length(self, width: int) -> int:
        """The rung a step of ``width`` positions runs at now."""
        need = [r.bound.needed(width - 1) for r in self.pair.runners]
        need = [n for n in need if n is not None]
        return ladder_length(self.ladder, max(need) if need else None)

    def _at(self, n: int, fn):
        """``fn()`` with the runners' ``fixed_len`` set to ``n`` (the step's read length)."""
        for r in self.pair.runners:
            r.fixed_len = n
        try:
            return fn()
        finally:
            for r in self.pair.runners:
                r.fixed_len = None

    def build(self, width: int, n: int):
        """The step of ``width`` positions and read length ``n``, made now if new (``None``:
        it could not be)."""
        if (width, n) in self.steps:
            return self.steps[width, n]
        t0 = time.perf_counter()
        width_buffers(self.buf, self.st, width)
        step = functools.partial(verify_advance, self.pair, self.sel, self.st, self.buf, width)
        inner, graph = self._at(n, lambda: self._make(step))
        self.build_s += time.perf_counter() - t0
        built = graph or inner
        self.steps[width, n] = built
        self.modes[width, n] = (graph is not None, inner is not None)
        self.failed = self.failed or built is None
        return built

    def _make(self, step: functools.partial) -> tuple:
        """``(compiled, captured)`` of ``step`` (each ``None`` where not asked for or failed),
        after one eager run (undone) that makes the runners' buffers of its width."""
        engine.undone(self.pair, self.sel, self.st, step)
        inner = None
        if self.compiled:
            inner, secs = compile_verify(self.pair, self.sel, self.st, step, self.name)
            if inner is not None:
                self.compile_s, self.compiles = secs, self.compiles + 1
        pool = {} if self.pool is None else {"pool": self.pool}
        graph = engine.try_capture(self.pair, self.sel, self.st, self.name, inner or step,
                                   **pool) if self.graphs else None
        return inner, graph

    def __call__(self, width: int):
        if self.failed:
            return None
        width = 1 if width == 1 else self.k + 1
        n = self.length(width)
        step = self.build(width, n)
        if step is None:
            return None
        self._at(n, step)
        for r in self.pair.runners:
            r.count_read(n)
        self.last = self.modes[width, n]
        return self.buf["got", width]
