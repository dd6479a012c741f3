"""Rule -> op: a selector turns one step's logits of both streams into the chosen ids.

Selectors own their per-row tensors (``log_rel``, ``floor``, seeds), allocated once per batch
size, so the call is graph-safe: no host sync, no allocation that changes between replays.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from .ops import mix_floor, select_core
from .rules import OPAD, Contrastive, Greedy, Mix, Rule


class CoreSelector:
    """AAD, Contrastive, Mix (EFT/DeRa/CFG) and Greedy through the fused selection core."""

    def __init__(self, rule: Rule, n_rows: int, vocab: int, device, backend: str | None):
        self.rule = rule
        self.vocab = vocab
        self.backend = backends.pick_backend(torch.device(device), backend)
        self.ma, self.mr, self.sa, self.sr, log_rel = rule.coefficients()
        self.log_rel = torch.full((n_rows,), log_rel, dtype=torch.float32, device=device)
        self.floor = torch.full((n_rows,), -math.inf, dtype=torch.float32, device=device)
        self.sampled = rule.sampled
        self.seed = None
        if self.sampled:
            self.seed = torch.full((n_rows,), rule.seed, dtype=torch.int64, device=device)
        self.filtered = isinstance(rule, Mix) and self.sampled and (
            rule.top_k > 0 or rule.top_p < 1.0)

    def buffers(self) -> list:
        """Tensors that carry state from one step to the next (none: ``floor`` is rewritten)."""
        return []

    def set_seeds(self, seeds: Tensor) -> None:
        """Per-row seeds (int64 ``[n_rows]``), e.g. ``seed + i`` for best-of-n samples."""
        self.seed.copy_(seeds)

    def first(self, la: Tensor, lr: Tensor | None, step: Tensor) -> Tensor:
        return self(la, lr, step)

    def __call__(self, la: Tensor, lr: Tensor | None, step: Tensor) -> Tensor:
        if lr is None:  # single stream: r is a dummy with zero weight
            lr = la
        if self.filtered:
            self.floor.copy_(mix_floor(la, lr, self.vocab, self.ma, self.mr, self.rule.top_k,
                                       self.rule.top_p))
        return select_core(la, lr, self.vocab, self.ma, self.mr, self.sa, self.sr, self.log_rel,
                           self.floor, self.seed, step if self.sampled else None, self.backend)


class OPADSelector:
    """docs/rules.md OPAD in logit space (per-row constants dropped):
    step 1 ``argmax a_1``; step t ``argmax (1+k) a_t - k r_t + k (a_{t-1} - r_{t-1})``."""

    def __init__(self, rule: OPAD, n_rows: int, vocab: int, device):
        self.k = float(rule.k)
        self.vocab = vocab
        self.prev = torch.zeros((n_rows, vocab), dtype=torch.float32, device=device)

    def buffers(self) -> list:
        return [self.prev]

    def _remember(self, a: Tensor, r: Tensor) -> None:
        self.prev.copy_(a - r)

    def first(self, la: Tensor, lr: Tensor, step: Tensor) -> Tensor:
        a, r = la[:, : self.vocab].float(), lr[:, : self.vocab].float()
        self._remember(a, r)
        return _argmax(a)

    def __call__(self, la: Tensor, lr: Tensor, step: Tensor) -> Tensor:
        a, r = la[:, : self.vocab].float(), lr[:, : self.vocab].float()
        k = self.k
        z = (1.0 + k) * a - k * r + k * self.prev
        self._remember(a, r)
        return _argmax(z)


def _argmax(z: Tensor) -> Tensor:
    """Row argmax with NaN as -inf and ties to the lowest id; -1 where nothing is finite."""
    z = torch.where(torch.isnan(z), z.new_full((), -math.inf), z)
    idx = z.argmax(dim=1)
    ok = (z > -math.inf).any(dim=1)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def make_selector(rule: Rule, n_rows: int, vocab: int, device, backend: str | None = None):
    if isinstance(rule, OPAD):
        return OPADSelector(rule, n_rows, vocab, device)
    if isinstance(rule, (Contrastive, Mix, Greedy)):
        return CoreSelector(rule, n_rows, vocab, device, backend)
    raise TypeError(f"rule {rule!r} is not a per-token rule (beam search and best-of-n have "
                    "their own drivers)")
