"""Rule -> op: a selector turns one step's logits of both streams into the chosen ids.

A selector serves one *rule kind* (``rule_kind``): what a captured step bakes in (which ops
run, the constant coefficients of the selection core). Every value of the kind (``alpha``,
``beta``, the weights, ``temperature``, ``top_k``/``top_p``/``min_p``, ``seed``, OPAD's ``k``)
lives in per-row tensors the selector owns, allocated once per batch size and rewritten in
place by ``set_rule`` between calls, so one captured graph per (batch bucket, rule kind) serves
every value. The call is graph-safe: no host sync, no allocation that changes between replays.

How the values reach the core (``reference.py``) without a kernel change, exactly:
- ``aad`` (Contrastive with ``beta == 1``, AAD) and ``greedy``: the core's coefficients are
  constants of the kind; ``alpha`` is ``log_rel``.
- ``contrastive`` (``beta != 1``): the reference stream is folded, ``r' = fl(beta * r)``
  (0 where ``beta == 0``), and the core runs ``s = a - r'``; ``fl(-beta * r) = -fl(beta * r)``
  bit for bit, so this is the core's own ``a + (-beta) * r``.
- ``mix``: ``z = fl(fl(ca * a) + fl(cr * r))`` (``ca, cr = w / T``; a zero weight is a
  different kind, whose stream does not run) is computed here and the core runs with ``m = s = z``,
  which is what the core computes from ``(ca, cr, ca, cr)``. top-k/top-p become the ``floor``
  (``topk_topp_floor``, equal to ``ops.mix_floor``); ``min_p`` is ``log_rel``.
The float32 parameter tensors hold each value rounded to float32 once, as the kernels and the
reference do with their float arguments.

Rows are slots of a running batch (``scheduler.Scheduler``): ``set_rows`` writes one request's
values into its rows only, and ``first(..., rows=)`` chooses the first token of newly admitted
rows alone. The step counter is per row (``engine.DecodeState.t``), so a sampled row's noise is
keyed by its own step, not by the batch's: the kernels take one scalar step, and
``row_seeds`` folds each row's step into its seed exactly (see there).

``min_tokens``: a call's ``ban`` (``steps.early_stops``) names ids a row may not choose yet (its
stop ids). They get -inf in what the rule chooses from, before any filter (vLLM masks them in
the logits): the aligned logits ``a`` for the kinds whose candidates come from ``a`` (aad,
contrastive, greedy; in place), the mixed ``z`` for mix (before top-k/top-p), OPAD's combined
score (its remembered log-ratio stays the unmasked one). Masking both streams' logits instead
would make ``w_a * la + w_r * lr`` NaN for weights of opposite signs (EFT) and would carry
OPAD's mask one step past ``min_tokens``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops import backends
from ..ops import select_core
from ..ops.reference import MASK32, mix32
from ..rules import OPAD, Contrastive, Greedy, Mix, Rule, check_seed


def ban_(x: Tensor, ban) -> Tensor:
    """``x`` (``[n, V]``) with -inf, in place, where ``ban = (idx, on)`` says (int64 / bool
    ``[n, S]``: ids in ``[0, V)``, banned where ``on``; an id repeated in a row carries one
    flag: ``steps.early_stops``); ``ban=None``: ``x`` untouched. Graph-safe."""
    if ban is not None:
        idx, on = ban
        x.scatter_(1, idx, torch.where(on, x.new_full((), -math.inf), x.gather(1, idx)))
    return x


def rule_kind(rule: Rule) -> tuple:
    """The part of a per-token rule a captured step depends on (hashable); everything else is
    a per-row tensor value. Raises ``TypeError`` for beam search and best-of-n."""
    if isinstance(rule, OPAD):
        return ("opad",)
    if isinstance(rule, Contrastive):
        return ("aad",) if float(rule.beta) == 1.0 else ("contrastive",)
    if isinstance(rule, Greedy):
        return ("greedy", rule.stream)
    if isinstance(rule, Mix):
        filtered = rule.sampled and (rule.top_k > 0 or rule.top_p < 1.0)
        return ("mix", rule.streams, rule.sampled, filtered)
    raise TypeError(f"rule {rule!r} is not a per-token rule (beam search and best-of-n have "
                    "their own drivers)")


_CORE = {"aad": (1.0, 0.0, 1.0, -1.0), "contrastive": (1.0, 0.0, 1.0, -1.0),
         "greedy": (1.0, 0.0, 1.0, 0.0), "mix": (1.0, 0.0, 1.0, 0.0)}


class CoreSelector:
    """AAD, Contrastive, Mix (EFT/DeRa/CFG) and Greedy through the fused selection core.

    Per-row tensors (``n_rows`` rows): ``log_rel``, ``floor`` float32 ``[n]``; ``beta``,
    ``ca``, ``cr``, ``top_p`` float32 ``[n, 1]``; ``top_k`` int64 ``[n, 1]``; ``seed`` int64
    ``[n]`` (sampled kinds). They must stay the same tensors across graph replays."""

    def __init__(self, rule: Rule, n_rows: int, vocab: int, device, backend: str | None):
        self.kind = rule_kind(rule)
        self.vocab = vocab
        self.backend = backends.pick_backend(torch.device(device), backend)
        self.coef = _CORE[self.kind[0]]
        f32 = dict(dtype=torch.float32, device=device)
        self.log_rel = torch.full((n_rows,), -math.inf, **f32)
        self.floor = torch.full((n_rows,), -math.inf, **f32)
        self.beta = torch.ones((n_rows, 1), **f32)
        self.ca = torch.ones((n_rows, 1), **f32)
        self.cr = torch.zeros((n_rows, 1), **f32)
        self.top_k = torch.zeros((n_rows, 1), dtype=torch.int64, device=device)
        self.top_p = torch.ones((n_rows, 1), **f32)
        self.sampled = self.kind[0] == "mix" and self.kind[2]
        self.filtered = self.kind[0] == "mix" and self.kind[3]
        self.seed = torch.zeros((n_rows,), dtype=torch.int64, device=device) if self.sampled \
            else None
        self._step0 = torch.zeros((1,), dtype=torch.int64, device=device)
        self.set_rule(rule)

    def set_rule(self, rule: Rule) -> None:
        """Write ``rule``'s values into the per-row tensors (in place); same kind only."""
        self.set_rows(None, rule)

    def set_rows(self, rows: Tensor | None, rule: Rule, seed: int | None = None) -> None:
        """Write ``rule``'s values into rows ``rows`` (int64 ``[U]``; ``None`` = every row) of
        the per-row tensors, in place; same kind only. ``seed`` overrides the rule's seed (an
        int in ``[0, 2**63 - 1]``: ``fill_`` would truncate a float or wrap an overflow)."""
        if rule_kind(rule) != self.kind:
            raise ValueError(f"rule {rule!r} is of kind {rule_kind(rule)}, this selector "
                             f"serves {self.kind}")
        if seed is not None:
            seed = check_seed(seed)

        def put(t, value):
            if rows is None:
                t.fill_(value)
            else:
                t.index_fill_(0, rows, value)
        ma, mr, _, _, log_rel = rule.coefficients()
        put(self.log_rel, log_rel)
        if self.kind[0] == "contrastive":
            put(self.beta, float(rule.beta))
        if self.kind[0] == "mix":
            put(self.ca, ma)
            put(self.cr, mr)
            put(self.top_k, rule.top_k)
            put(self.top_p, rule.top_p)
        if self.sampled:
            put(self.seed, rule.seed if seed is None else seed)

    def buffers(self) -> list:
        """Tensors that carry state from one step to the next (none: ``floor`` is rewritten)."""
        return []

    def candidates(self, logits_a: Tensor, ban=None) -> Tensor:
        """The candidate set ``K`` of each row, bool ``[n, vocab]``, for the kinds whose mask
        reads ``a`` alone (``aad``, ``contrastive``: ``m = a``): exactly the core's
        ``(m > -inf) & (m >= max(floor, M + log_rel))`` in float32 (reference.select_ref).
        ``ban``: as ``__call__`` (applied to ``logits_a`` in place)."""
        if self.kind[0] not in ("aad", "contrastive"):
            raise ValueError(f"candidates() is for the aad/contrastive kinds, not {self.kind}")
        a = ban_(logits_a, ban)[:, : self.vocab].float()
        ninf = a.new_full((), -math.inf)
        big = torch.where(torch.isnan(a), ninf, a).amax(dim=1)
        rel = torch.where(self.log_rel == -math.inf, ninf, big + self.log_rel)
        t = torch.maximum(self.floor, rel)
        return (a > -math.inf) & (a >= t[:, None])

    def set_seeds(self, seeds: Tensor) -> None:
        """Per-row seeds (int64 ``[n_rows]``), e.g. ``seed + i`` for best-of-n samples."""
        self.seed.copy_(seeds)

    def first(self, logits_a: Tensor, logits_r: Tensor | None, step: Tensor,
              rows: Tensor | None = None, ban=None) -> Tensor:
        return self(logits_a, logits_r, step, rows, ban)

    def __call__(self, logits_a: Tensor, logits_r: Tensor | None, step: Tensor,
                 rows: Tensor | None = None, ban=None) -> Tensor:
        """Chosen ids int64 ``[n]`` of logits ``logits_a``/``logits_r`` ``[n, V]``; ``step``
        int64 ``[n]`` (or ``[1]``) the rows' step counters. ``rows`` (int64 ``[U]``): the logits are those of
        these rows only (admission), which use their own values; not graph-safe then.
        ``ban``: ids the rows may not choose (``min_tokens``: the module docstring)."""
        v = self.vocab
        if self.kind[0] != "mix":
            ban_(logits_a, ban)

        def mine(t):
            return t if rows is None else t.index_select(0, rows)
        log_rel, beta, ca, cr = mine(self.log_rel), mine(self.beta), mine(self.ca), mine(self.cr)
        floor = self.floor if rows is None else torch.full_like(log_rel, -math.inf)
        if logits_r is None:  # single stream: r is a dummy with zero weight
            logits_r = logits_a
        a, r = logits_a, logits_r
        if self.kind[0] == "contrastive":
            rb = logits_r[:, :v].float() * beta
            r = torch.where(beta == 0.0, torch.zeros_like(rb), rb)
        elif self.kind[0] == "mix":
            streams = self.kind[1]
            if streams == "a":
                z = logits_a[:, :v].float() * ca
            elif streams == "r":  # the single pair's one stream is the reference model
                z = logits_a[:, :v].float() * cr
            else:
                z = logits_a[:, :v].float() * ca + logits_r[:, :v].float() * cr
            a = r = ban_(z, ban)
            if self.filtered:
                floor.copy_(topk_topp_floor(z, mine(self.top_k), mine(self.top_p)))
        seed = step0 = None
        if self.sampled:
            seed = row_seeds(mine(self.seed), step.expand(log_rel.shape[0]))
            step0 = self._step0
        ma, mr, sa, sr = self.coef
        return select_core(a, r, v, ma, mr, sa, sr, log_rel, floor, seed, step0, self.backend)


def unmix32(x: Tensor) -> Tensor:
    """The inverse of ``reference.mix32`` (lowbias32 is a bijection of uint32): int64 tensors
    holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x43021123) & MASK32
    x = x ^ (x >> 15) ^ (x >> 30)
    x = (x * 0x1D69E2A5) & MASK32
    return x ^ (x >> 16)


def row_seeds(seed: Tensor, step: Tensor) -> Tensor:
    """Per-row seeds ``s'`` (int64 ``[n]``) that give at the kernels' step 0 the noise of
    ``seed`` at per-row ``step`` (int64 ``[n]``): the noise key is
    ``mix32(mix32(seed) ^ step)``, so ``s' = unmix32(mix32(seed) ^ step)`` has
    ``mix32(mix32(s') ^ 0)`` equal to it bit for bit. Graph-safe."""
    return unmix32(mix32(seed & MASK32) ^ (step & MASK32))


def topk_topp_floor(z: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """``ops.mix_floor`` on an already mixed ``z`` (float32 ``[B, V]``) with per-row ``top_k``
    (int64 ``[B, 1]``, 0 = off) and ``top_p`` (float32 ``[B, 1]``, 1 = off): top-k, then top-p
    on what top-k kept, ties at a boundary all kept. One sort serves both filters: the top-k
    kept values are a prefix of the sorted row. Graph-safe; float32 ``[B]``."""
    ninf = z.new_full((), -math.inf)
    z = torch.where(torch.isnan(z), ninf, z)
    vocab = z.shape[1]
    zs = torch.sort(z, dim=1, descending=True).values
    k_on = (top_k > 0) & (top_k < vocab)
    floor_k = torch.where(k_on, zs.gather(1, top_k.clamp(1, vocab) - 1), ninf)
    zs = torch.where(zs >= floor_k, zs, ninf)
    p = torch.softmax(zs, dim=1)
    before = torch.cumsum(p, dim=1) - p  # mass strictly above each sorted position
    n_keep = (before < top_p).sum(dim=1, keepdim=True).clamp(min=1)
    floor_p = torch.where(top_p < 1.0, zs.gather(1, n_keep - 1), ninf)
    return torch.maximum(floor_k, floor_p)[:, 0]


class OPADSelector:
    """docs/rules.md OPAD in logit space (per-row constants dropped):
    step 1 ``argmax a_1``; step t ``argmax (1+k) a_t - k r_t + k (a_{t-1} - r_{t-1})``.
    ``k`` and ``1 + k`` (rounded once from the double) are float32 ``[n, 1]`` tensors."""

    def __init__(self, rule: OPAD, n_rows: int, vocab: int, device):
        self.kind = rule_kind(rule)
        self.vocab = vocab
        self.k = torch.zeros((n_rows, 1), dtype=torch.float32, device=device)
        self.k1 = torch.ones((n_rows, 1), dtype=torch.float32, device=device)
        self.prev = torch.zeros((n_rows, vocab), dtype=torch.float32, device=device)
        self.set_rule(rule)

    def set_rule(self, rule: OPAD) -> None:
        self.set_rows(None, rule)

    def set_rows(self, rows: Tensor | None, rule: OPAD, seed: int | None = None) -> None:
        """``rule``'s ``k`` into rows ``rows`` (int64 ``[U]``; ``None`` = every row)."""
        if rule_kind(rule) != self.kind:
            raise ValueError(f"rule {rule!r} is not OPAD")
        for t, value in ((self.k, float(rule.k)), (self.k1, 1.0 + float(rule.k))):
            if rows is None:
                t.fill_(value)
            else:
                t.index_fill_(0, rows, value)

    def buffers(self) -> list:
        return [self.prev]

    def _remember(self, a: Tensor, r: Tensor) -> None:
        self.prev.copy_(a - r)

    def first(self, logits_a: Tensor, logits_r: Tensor, step: Tensor,
              rows: Tensor | None = None, ban=None) -> Tensor:
        """``rows`` (int64 ``[U]``): ``logits_a``/``logits_r`` are those rows' logits
        (admission); only their previous logits are reset. ``ban``: as ``__call__``."""
        a, r = logits_a[:, : self.vocab].float(), logits_r[:, : self.vocab].float()
        if rows is None:
            self._remember(a, r)
        else:
            self.prev.index_copy_(0, rows, a - r)
        return _argmax(a if ban is None else ban_(a.clone(), ban))

    def __call__(self, logits_a: Tensor, logits_r: Tensor, step: Tensor, ban=None) -> Tensor:
        """``ban``: ids the rows may not choose, -inf in the combined score only (the
        remembered ``a - r`` is the unmasked one)."""
        a, r = logits_a[:, : self.vocab].float(), logits_r[:, : self.vocab].float()
        z = self.k1 * a - self.k * r + self.k * self.prev
        self._remember(a, r)
        return _argmax(ban_(z, ban))


def _argmax(z: Tensor) -> Tensor:
    """Row argmax with NaN as -inf and ties to the lowest id; -1 where nothing is finite."""
    z = torch.where(torch.isnan(z), z.new_full((), -math.inf), z)
    idx = z.argmax(dim=1)
    ok = (z > -math.inf).any(dim=1)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def make_selector(rule: Rule, n_rows: int, vocab: int, device, backend: str | None = None):
    """The selector of ``rule``'s kind, holding ``rule``'s values (``set_rule`` for others)."""
    if rule_kind(rule)[0] == "opad":
        return OPADSelector(rule, n_rows, vocab, device)
    return CoreSelector(rule, n_rows, vocab, device, backend)
