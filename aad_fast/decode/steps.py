"""The decode loop as small free functions (gpt-fast style) plus CUDA-graph capture.

``decode_one`` is the hot step: both streams' one-token forward, the selection op and the write of
the chosen token into the next step's input buffer and into the output buffer at each row's own step
counter (rows are slots that ``admit`` refills between steps: ``scheduler``). It has no host sync
and allocates nothing that changes between calls, so on CUDA it is captured once per (batch bucket,
rule kind) and replayed per token (the rule's values are tensors the selector rewrites in place
between calls). The host looks at the device state only every ``check_every`` steps (all rows
done? a row with no candidate?).
"""
from __future__ import annotations

import functools
import math
import os
import time
import types
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.cache import ladder_length


@dataclass
class DecodeState:
    """Device buffers of one decode, one row per slot. ``tok`` int64 ``[N]`` next input; ``out``
    int64 ``[N, W]`` chosen ids (``-1`` = no candidate), row ``i``'s ``j``-th token at column
    ``j``; ``done``/``bad`` bool ``[N]``; ``bad_r`` bool ``[N]``: a live row whose reference
    logits were all -inf/NaN at some step; ``t`` int64 ``[N]`` each row's step counter (tokens
    chosen since the row was filled; also the noise counter of sampled rules, so a row's samples
    do not depend on when it was admitted); ``lim`` int64 ``[N]`` each row's max_new_tokens (a
    row is done once ``t`` reaches it); ``stop`` int64 ``[S]`` stop ids of every row or
    ``[N, S]`` per row (``-2`` pads); ``min_new`` int64 ``[N]`` or ``None``: each row's
    ``min_tokens`` (its stop ids cannot be chosen while ``t`` is below it: ``early_stops``; a
    state without it never masks, and its step runs none of that). ``names``: what ``check``
    calls the streams whose logits reach the selector as ``a`` and ``r`` (a Greedy("r") decode
    feeds the reference as ``a``)."""

    tok: Tensor
    out: Tensor
    done: Tensor
    bad: Tensor
    t: Tensor
    stop: Tensor
    bad_r: Tensor = None
    lim: Tensor = None
    names: tuple = ("aligned", "reference")
    min_new: Tensor = None
    ref_head: dict = None  # host counts of decode_one_split: steps "sparse"/"full", "candidates"

    def __post_init__(self):
        if self.bad_r is None:
            self.bad_r = torch.zeros_like(self.bad)
        if self.lim is None:
            self.lim = torch.full_like(self.t, self.out.shape[1])
        if self.ref_head is None:
            self.ref_head = dict(sparse=0, full=0, candidates=0)

    @classmethod
    def new(cls, n_rows: int, max_new: int, device) -> "DecodeState":
        """Fresh buffers for ``n_rows`` rows of at most ``max_new`` tokens; no stop ids yet
        (the caller writes ``stop``)."""
        z = dict(device=device)
        stop = torch.full((1,), -2, dtype=torch.int64, **z)
        return cls(tok=torch.zeros(n_rows, dtype=torch.int64, **z),
                   out=torch.full((n_rows, max_new), -1, dtype=torch.int64, **z),
                   done=torch.zeros(n_rows, dtype=torch.bool, **z),
                   bad=torch.zeros(n_rows, dtype=torch.bool, **z),
                   t=torch.zeros(n_rows, dtype=torch.int64, **z), stop=stop)

    def tensors(self):
        return (self.tok, self.out, self.done, self.bad, self.bad_r, self.t)


def early_stops(st: DecodeState, rows: Tensor | None = None):
    """``min_tokens`` (vLLM's): the stop ids (EOS included) each row may not choose yet, as
    ``selectors.ban_`` takes them, ``(idx, on)`` int64/bool ``[N, S]``: row ``i``'s stop ids,
    banned while ``t[i] < min_new[i]``; ``None`` for a state without ``min_new``. A pad (``-2``)
    points at its row's first stop id with that id's flag, so every scattered entry of one id
    writes one value. ``rows`` (int64 ``[U]``): those rows only, at step 0 (an admission).
    Graph-safe."""
    if st.min_new is None:
        return None
    stop, t, lo = st.stop, st.t, st.min_new
    if stop.dim() == 1:
        stop = stop.expand(t.shape[0], -1)
    if rows is not None:
        stop, lo = stop.index_select(0, rows), lo.index_select(0, rows)
        t = torch.zeros_like(lo)
    first = stop[:, :1]
    idx = torch.where(stop >= 0, stop, first.clamp(min=0))
    on = ((t < lo)[:, None] & (first >= 0)).expand_as(idx)
    return idx, on


def flag_reference(st: DecodeState, logits_r: Tensor | None) -> None:
    """Mark live rows whose reference logits ``logits_r`` ``[N, V]`` have no value above -inf (all
    -inf or NaN: ``NaN > -inf`` is False). On device, no host sync; ``check`` reports them."""
    if logits_r is not None:
        st.bad_r.logical_or_(~(logits_r > -math.inf).any(dim=1) & ~st.done)


def _stopped(st: DecodeState, y: Tensor, stop: Tensor) -> Tensor:
    # a broadcast compare, not torch.isin: isin's sorting path (taken once the stop list is
    # longer than ~10 * N**0.145 ids, e.g. 16 ids at N = 1) calls unique, a host sync
    return (y[:, None] == (stop if stop.dim() == 2 else stop[None, :])).any(dim=1)


def record(st: DecodeState, y: Tensor) -> None:
    """Store the step's ids (row ``i`` at its own column ``t[i]``), update done/bad flags, feed
    the ids back, bump the counters. A finished row keeps running (its later ids are not
    read) until it is refilled."""
    st.bad.logical_or_(y.lt(0) & ~st.done)
    col = st.t.clamp(max=st.out.shape[1] - 1).view(-1, 1)
    st.out.scatter_(1, col, y.view(-1, 1))
    st.done.logical_or_(_stopped(st, y, st.stop))
    st.tok.copy_(y.clamp(min=0))
    st.t.add_(1)
    st.done.logical_or_(st.t >= st.lim)


def prefill(pair, selector, st: DecodeState, ids_a, real_a, ids_r, real_r) -> None:
    """Encode the prompts of both streams and choose the first token."""
    logits_a, logits_r = pair.prefill(ids_a, real_a, ids_r, real_r)
    flag_reference(st, logits_r)
    record(st, selector.first(logits_a, logits_r, st.t, ban=early_stops(st)))


def admit(pair, selector, st: DecodeState, dst: Tensor, ids_a, real_a, ids_r, real_r,
          stop: Tensor, lim: Tensor, min_new: Tensor | None = None) -> None:
    """Refill rows ``dst`` (int64 ``[U]``) of a running decode with ``U`` new prompts: prefill
    them into those rows only (``pair.admit``), reset the rows' state (counter, flags, output,
    stop ids ``stop`` int64 ``[U, S]``, limits ``lim`` int64 ``[U]``, ``min_tokens``
    ``min_new`` int64 ``[U]`` where the state has them) and choose their first
    token with the selector's values of those rows (``selector.first(..., rows=dst)``, which
    also resets a rule's own per-row state, OPAD's previous logits). The selector's values of
    the rows must already be set (``set_rows``). Host indices, not graph-safe: it runs between
    steps and changes only buffer contents."""
    logits_a, logits_r = pair.admit(dst, ids_a, real_a, ids_r, real_r)
    u = dst.shape[0]
    t0 = st.t.new_zeros(u)
    if st.stop.dim() == 2:
        st.stop.index_copy_(0, dst, stop.to(st.stop.device))
    if st.min_new is not None:
        st.min_new.index_copy_(0, dst, (t0 if min_new is None else min_new.to(t0.device)))
    y = selector.first(logits_a, logits_r, t0, rows=dst, ban=early_stops(st, dst))
    dead = y.lt(0)
    st.bad.index_copy_(0, dst, dead)
    bad_r = ~(logits_r > -math.inf).any(dim=1) if logits_r is not None else torch.zeros_like(dead)
    st.bad_r.index_copy_(0, dst, bad_r)
    st.out.index_fill_(0, dst, -1)
    st.out[:, 0].index_copy_(0, dst, y)
    st.lim.index_copy_(0, dst, lim.to(st.lim.device))
    st.t.index_fill_(0, dst, 1)
    done = _stopped(st, y, st.stop.index_select(0, dst) if st.stop.dim() == 2 else st.stop)
    st.done.index_copy_(0, dst, done | (lim.to(done.device) <= 1))
    st.tok.index_copy_(0, dst, y.clamp(min=0))


def decode_one(pair, selector, st: DecodeState) -> None:
    """One token for every row: forward both streams, select, record. Graph-safe."""
    logits_a, logits_r = pair.step(st.tok)
    flag_reference(st, logits_r)
    record(st, selector(logits_a, logits_r, st.t, ban=early_stops(st)))


# A step computes the reference's logits on the candidates only while they number at most
# 1/SPARSE_SHARE of the vocabulary (all rows together): below that the rows of the projection it
# gathers are far fewer bytes than the whole projection it skips; above it the full projection.
SPARSE_SHARE = 8
REF_HEAD_MODES = ("auto", "full")


def ref_head_mode() -> str:
    """``$AAD_FAST_REF_HEAD``: ``auto`` (default: the reference's logits on the candidates where
    the rule allows) or ``full`` (always the whole vocabulary)."""
    mode = os.environ.get("AAD_FAST_REF_HEAD", "auto").strip().lower() or "auto"
    if mode not in REF_HEAD_MODES:
        raise ValueError(f"AAD_FAST_REF_HEAD must be one of {REF_HEAD_MODES}, got {mode!r}")
    return mode


def splits_reference(pair, selector) -> bool:
    """Whether a step of ``pair`` with ``selector`` may use ``decode_one_split``: a rule that
    reads the reference only on the aligned stream's candidates (AAD, Contrastive: the
    candidates come from ``a`` alone and the choice is ``argmax a_v - beta r_v`` over them),
    a reference whose projection can be split off (``runner.SplitHead``), on CPU (the
    candidate count is read on the host each step: free on CPU, a sync on CUDA)."""
    return (getattr(pair, "ref_split", None) is not None and pair.device.type == "cpu"
            and getattr(selector, "kind", ("",))[0] in ("aad", "contrastive")
            and ref_head_mode() == "auto")


def decode_one_split(pair, selector, st: DecodeState, forward=None) -> None:
    """``decode_one`` for ``splits_reference`` pairs: stream r's logits only where the rule
    reads them (``reference_logits``). ``forward``: a compiled ``pair.step_split``."""
    logits_a, hidden_r = (forward or pair.step_split)(st.tok)
    logits_r = reference_logits(pair.ref_split, selector, st, logits_a, hidden_r)
    record(st, selector(logits_a, logits_r, st.t, ban=early_stops(st)))


def reference_logits(split, selector, st: DecodeState, logits_a: Tensor, hidden_r: Tensor):
    """Stream r's logits ``[N, V]`` for a rule that reads them on the candidates only: those
    are ``split``'s projection of ``hidden_r`` ``[N, H]`` on the candidate ids
    (``selector.candidates(logits_a)``), every other entry 0 (never read). With more than
    ``vocab / SPARSE_SHARE`` candidates, the whole projection. Flags the rows whose candidates'
    reference logits are all -inf/NaN (``flag_reference`` on what the rule reads). Host sync
    (the count): CPU only."""
    cand = selector.candidates(logits_a, early_stops(st))
    rows, ids = cand.nonzero(as_tuple=True)
    count = rows.numel()
    if count * SPARSE_SHARE > selector.vocab:
        st.ref_head["full"] += 1
        logits_r = split.base_logits(hidden_r)
        flag_reference(st, logits_r)
        return logits_r
    st.ref_head["sparse"] += 1
    st.ref_head["candidates"] += count
    val = (split.weight.index_select(0, ids).float()
           * hidden_r.index_select(0, rows).float()).sum(1)
    if split.bias is not None:
        val = val + split.bias.index_select(0, ids).float()
    val = val.to(hidden_r.dtype)  # what the full projection returns
    n = hidden_r.shape[0]
    logits_r = hidden_r.new_zeros((n, selector.vocab))
    logits_r.index_put_((rows, ids), val)
    finite = torch.zeros(n, dtype=torch.int64).index_add_(0, rows, (val > -math.inf).long())
    st.bad_r.logical_or_(cand.any(dim=1) & (finite == 0) & ~st.done)
    return logits_r


def default_step(pair, selector, st: DecodeState):
    """The eager one-token step of (pair, selector, state): ``decode_one_split`` where
    ``splits_reference``, else ``decode_one``."""
    fn = decode_one_split if splits_reference(pair, selector) else decode_one
    return functools.partial(fn, pair, selector, st)


def beam_step(pair, search, lo: int, hi: int) -> None:
    """One BeamAAD step of every group (``search.BeamSearch``), graph-safe like ``decode_one``:
    every row takes the cache of row ``search.src[i]`` (a row of its own group) in slots
    ``[lo, hi)`` with its positions and mask, on device; forward ``search.tok``; rank the
    continuations. ``lo``/``hi`` are host ints (no sync) covering the slots every live group
    wrote since its prompt (the scheduler's host counts); the prompt slots of a group's rows
    are equal and the unwritten ones masked, so moving more is harmless."""
    pair.reorder(search.src, lo, hi)
    logits_a, logits_r = pair.step(search.tok)
    search.select(logits_a, logits_r)


def beam_admit(pair, search, groups: list, ids_a, real_a, ids_r, real_r, rules: list,
               stop: Tensor, lim: Tensor) -> None:
    """Start beam searches in groups ``groups`` (host ints) of a running batch: each prompt
    (left-padded ``ids_*``/``real_*`` ``[U, L]``) is encoded once into its group's first row
    (``pair.admit``), copied to the group's other rows (``pair.reorder`` of slots ``[0, L)``,
    the other rows continuing themselves), and ``search.start`` makes the first selection.
    Host indices, not graph-safe: it runs between steps."""
    k, dev = search.k, pair.device
    first = torch.tensor([g * k for g in groups], dtype=torch.int64, device=dev)
    logits_a, logits_r = pair.admit(first, ids_a, real_a, ids_r, real_r)
    index = list(range(search.n_rows))
    for g in groups:
        index[g * k:(g + 1) * k] = [g * k] * k
    pair.reorder(torch.tensor(index, dtype=torch.int64, device=dev), 0,
                 max(ids_a.shape[1], ids_r.shape[1]))
    search.start(groups, logits_a, logits_r, rules, stop, lim)


def _own_code(fn, *args):
    """A function calling ``fn(*args, *more)`` with a code object of its own. Dynamo
    keeps its compiled graphs per code object, at most ``recompile_limit`` (8) of them, and a
    ``fullgraph`` compile past that raises: every compiled step (per batch bucket, rule kind
    and read length, in every Decoder of the process) would otherwise share ``decode_one``'s
    (or ``functools.partial``'s wrapper's) code and its limit, and each call would check the
    guards of the others' graphs first."""
    def call(*more):
        return fn(*args, *more)
    return types.FunctionType(call.__code__.replace(), call.__globals__, "compiled_step", None,
                              call.__closure__)


class CompiledStep:
    """``decode_one`` of one (pair, selector, state) through ``torch.compile`` (the whole step as
    one graph, static shapes: the gpt-fast way). Compiles on the first call, which
    ``compile_s`` times; on CUDA, ``StepGraph`` then captures the compiled step. The runners'
    ``fixed_len`` (the read length) is baked in: ``LengthSteps`` makes one per length."""

    def __init__(self, pair, selector, st: DecodeState):
        if splits_reference(pair, selector):  # the forward compiled, the host count eager
            forward = torch.compile(_own_code(pair.step_split), fullgraph=True, dynamic=False)
            self.fn = functools.partial(decode_one_split, pair, selector, st, forward)
        else:
            self.fn = torch.compile(_own_code(decode_one, pair, selector, st),
                                    fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        undone(pair, selector, st, self.fn)  # compile now, not inside a timed decode
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> None:
        self.fn()


def undone(pair, selector, st: DecodeState, fn) -> None:
    """Run ``fn()`` (warm-up steps, a compile) and put the decode state back as it was: the
    runners' positions/slot/mask, the state's tensors and the selector's buffers. The KV slot a
    warm-up step wrote is written again by the real step."""
    live = list(st.tensors()) + list(selector.buffers())
    saved = [r.snapshot() for r in pair.runners] + [[t.clone() for t in live]]
    fn()
    for r, s in zip(pair.runners, saved):
        r.restore(s)
    for t, s in zip(live, saved[-1]):
        t.copy_(s)


class StepGraph:
    """``step`` (default ``decode_one``) captured as one CUDA graph; warm-up runs are undone
    before use. ``pool``: a ``torch.cuda.graph_pool_handle()`` to capture into (the graphs of
    one ``LengthSteps`` share one: they never replay at once and no tensor made in one is read
    by another, so their temporaries may share addresses)."""

    def __init__(self, pair, selector, st: DecodeState, step=None, pool=None):
        step = step or functools.partial(decode_one, pair, selector, st)
        undone(pair, selector, st, lambda: self._capture(step, pool))

    def _capture(self, step, pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            step()

    def __call__(self) -> None:
        self.graph.replay()

    replay = __call__


_warned: set = set()


def _fell_back(what: str, name: str, exc: Exception) -> None:
    """Warn once per (what, model name) that ``what`` failed and the step runs eagerly."""
    if (what, name) not in _warned:
        _warned.add((what, name))
        warnings.warn(f"aad_fast: {what} failed for {name} ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); running the same step eagerly", stacklevel=4)


def try_capture(pair, selector, st: DecodeState, name: str, step=None, pool=None):
    """Capture ``step`` (default ``decode_one``; ``pool``: as ``StepGraph``); on failure warn
    once per model name and return ``None``."""
    try:
        return StepGraph(pair, selector, st, step, pool)
    except Exception as exc:  # an architecture that cannot be captured
        torch.cuda.synchronize()
        _fell_back("CUDA-graph capture", name, exc)
        return None


def try_compile(pair, selector, st: DecodeState, name: str):
    """``CompiledStep``; on failure warn once per model name and return ``None``."""
    try:
        return CompiledStep(pair, selector, st)
    except Exception as exc:  # an architecture or op torch.compile cannot trace
        _fell_back("torch.compile of the decode step", name, exc)
        return None


class LengthSteps:
    """The captured (``graphs``) and/or compiled (``compiled``) decode step of one (pair,
    selector, state), made per read length: one step for each rung of ``ladder``
    (``cache.read_ladder``) that a decode reaches, built on first use (``name``: the model's,
    for the fallback warning).

    A call picks the smallest rung ``L`` that covers one past the largest slot a live row
    writes in this step (``ReadBound.needed`` of every runner: host bookkeeping, no device
    sync), runs that length's step with the runners' ``fixed_len = L`` (its attention reads
    slots ``[0, L)`` under the mask; the step was traced or captured with that length), then
    counts the step on the host (``ReadBound.step``, ``Runner.count_read``): the bookkeeping a
    replayed graph or compiled step does not run. A row that grows past ``L`` moves the batch
    to the next rung at its next step. ``build_s``: seconds spent building so far (captures,
    compiles); ``compile_s``: the last compile's, ``compiles``: how many; ``modes``: per built
    length, whether it is a captured graph and whether it is compiled. A build that fails
    (``try_capture``/``try_compile`` warn once) leaves this object on the plain eager step for
    good (``default_step``, which bounds its own reads)."""

    def __init__(self, pair, selector, st: DecodeState, name: str, ladder, *, graphs: bool,
                 compiled: bool):
        self.pair, self.sel, self.st, self.name = pair, selector, st, name
        self.ladder = tuple(ladder)
        self.graphs, self.compiled = graphs, compiled
        self.steps: dict = {}
        self.modes: dict = {}
        self.build_s, self.compile_s, self.compiles = 0.0, None, 0
        self.failed = False
        # the lengths' graphs share one memory pool: one step's temporaries, not one per rung
        cuda = graphs and pair.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if cuda else None

    def length(self) -> int:
        """The rung the next step runs at."""
        need = [r.bound.needed() for r in self.pair.runners]
        need = [n for n in need if n is not None]
        return ladder_length(self.ladder, max(need) if need else None)

    def _fix(self, n: int | None) -> None:
        for r in self.pair.runners:
            r.fixed_len = n

    def build(self, n: int):
        """The step of read length ``n``, made now if new (``None``: it could not be)."""
        if n in self.steps:
            return self.steps[n]
        t0 = time.perf_counter()
        self._fix(n)
        try:
            inner = try_compile(self.pair, self.sel, self.st, self.name) \
                if self.compiled else None
            if inner is not None:
                self.compile_s, self.compiles = inner.compile_s, self.compiles + 1
            pool = {} if self.pool is None else {"pool": self.pool}  # (CPU: the old call)
            graph = try_capture(self.pair, self.sel, self.st, self.name, inner, **pool) \
                if self.graphs else None
        finally:
            self._fix(None)
        self.build_s += time.perf_counter() - t0
        step = graph or inner
        self.steps[n] = step
        self.modes[n] = (graph is not None, inner is not None)
        self.failed = self.failed or step is None
        return step

    def prepare(self) -> None:
        """Build the next step's length now (outside a timed decode)."""
        if not self.failed:
            self.build(self.length())

    def __call__(self) -> None:
        if not self.failed:
            n = self.length()
            step = self.build(n)
            if step is not None:
                self._fix(n)
                try:
                    step()
                finally:
                    self._fix(None)
                for r in self.pair.runners:
                    r.bound.step()
                    r.count_read(n)
                return
        default_step(self.pair, self.sel, self.st)()


def check(st: DecodeState, rows=None) -> bool:
    """One host sync: whether all rows are done; raises if a live row got no candidate. A reference
    stream with all -inf/NaN logits is reported first (it also empties the candidates of rules
    that weigh it into the mask, which would otherwise blame the aligned stream). ``rows``:
    what to call slot ``i`` in a message (``rows[i]``; default ``i``)."""
    flags = torch.stack([st.done.all(), st.bad.any(), st.bad_r.any()]).tolist()

    def named(mask):
        idx = mask.nonzero().flatten().tolist()
        return idx if rows is None else [rows[i] for i in idx]
    if flags[2]:
        raise RuntimeError(
            f"row(s) {named(st.bad_r)}: the {st.names[1]} model's logits (stream r) were all "
            "-inf/NaN at some step, so its distribution is undefined (check the reference "
            "model's dtype/weights)")
    if flags[1]:
        raise RuntimeError(
            f"row(s) {named(st.bad)}: the {st.names[0]} model's logits were all -inf/NaN at "
            "some step, so no token could be chosen (check the model's dtype/weights or the "
            "logits processors)")
    return bool(flags[0])
