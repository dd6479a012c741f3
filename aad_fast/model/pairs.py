"""Where the two streams come from. Each pair gives a shared prefill and a one-token step that
returns the next logits of both streams (``[B, V]`` each, model dtype).

- ``TwoModelPair``: two separate models (full fine-tune, contrastive amateur): two runners,
  back to back.
- ``SharedPair``: one set of weights for both streams, run as ONE batch of ``2B`` rows:
  rows ``[0, B)`` are stream ``a``, rows ``[B, 2B)`` stream ``r``. Serves a LoRA pair (the
  adapter is applied to the ``a`` rows only) and a prompt pair (OPAD/CFG: one model, the two
  streams differ only in their prompts).
- ``SinglePair``: one stream only (``Greedy``): one runner, ``r`` is ``None``.

``step_split`` (two-model pairs: ``ref_split``, a ``runner.SplitHead`` of stream r) is ``step``
with stream r's last hidden state in place of its logits, for rules that need the reference's
logits on the aligned stream's candidates only (``engine.decode_one_split``): it skips the
reference's whole LM head. A shared pair reads one head for both streams anyway, so it has none.

``verify(tokens)`` (int64 ``[B, T]``) is ``step`` over ``T`` positions per row (a speculative
verify step, ``decode.speculate``): both streams' logits ``[B, T, V]``; ``advance(count,
host)`` then moves each row on by its own accepted count (``Runner.verify``/``advance``).

``admit(dst, ids_a, real_a, ids_r, real_r)`` refills rows ``dst`` (int64 ``[U]``) of a running
batch with ``U`` new prompts (``Runner.admit``) and returns their first logits ``[U, V]`` per
stream; the other rows go on untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora_rows import RowLoRA
from .runner import Runner


class TwoModelPair:
    """Two separate models, each with its own runner over the same ``B`` rows. ``pools``:
    the two runners' ``cache.KVPool``s (never one pool: both runners are live at once)."""

    shared = False

    def __init__(self, model_a, model_r, n_rows: int, max_len: int, cpu_linear=None,
                 pools=(None, None), forward=None):
        if pools[0] is not None and pools[0] is pools[1]:
            raise ValueError("TwoModelPair's runners are live at the same time: give each "
                             "its own KV pool")
        self.a = Runner(model_a, n_rows, max_len, cpu_linear=cpu_linear, pool=pools[0],
                        forward=forward)
        self.r = Runner(model_r, n_rows, max_len, cpu_linear=cpu_linear, pool=pools[1],
                        forward=forward)
        self.runners = (self.a, self.r)
        self.device = self.a.device
        self.ref_split = self.r.split

    def prefill(self, ids_a, real_a, ids_r, real_r, rows=None):
        return self.a.prefill(ids_a, real_a, rows), self.r.prefill(ids_r, real_r, rows)

    def admit(self, dst, ids_a, real_a, ids_r, real_r):
        return self.a.admit(ids_a, real_a, dst), self.r.admit(ids_r, real_r, dst)

    def step(self, tokens: Tensor):
        return self.a.step(tokens), self.r.step(tokens)

    def verify(self, tokens: Tensor):
        return self.a.verify(tokens), self.r.verify(tokens)

    def advance(self, count: Tensor, host=None) -> None:
        self.a.advance(count, host)
        self.r.advance(count, host)

    def step_split(self, tokens: Tensor):
        """``step`` with stream r's last hidden state ``[B, H]`` in place of its logits (its
        projection: ``ref_split``)."""
        return self.a.step(tokens), self.r.step_hidden(tokens)

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        self.a.reorder(index, start, stop)
        self.r.reorder(index, start, stop)


class SharedPair:
    """One model, both streams as one batch of ``2B`` rows (LoRA pair or prompt pair);
    ``pool``: its runner's ``cache.KVPool`` (``2B`` rows)."""

    shared = True

    def __init__(self, model, n_rows: int, max_len: int, lora: RowLoRA | None = None,
                 cpu_linear=None, pool=None, forward=None):
        self.n, self.lora = n_rows, lora
        self.runner = Runner(model, 2 * n_rows, max_len, lora, n_rows if lora else 0, cpu_linear,
                             pool, forward)
        self.runners = (self.runner,)
        self._tok2 = torch.zeros((2 * n_rows,), dtype=torch.int64, device=self.runner.device)
        self.device = self.runner.device
        # the r rows' projection shares the head's weights with the a rows, read once for
        # both at these batch sizes: computing it on the candidates only saved nothing measurable
        # (cpu-60m, batch 8: 28.2 vs 27.4 ms/token), so a shared pair projects every id
        self.ref_split = None

    def prefill(self, ids_a, real_a, ids_r, real_r, rows=None):
        """``rows`` (int64 ``[B]``, optional): the ``U`` prompts of ``ids_*`` are encoded once
        and row ``i`` of each stream continues prompt ``rows[i]`` (see ``Runner.prefill``)."""
        ids, real = _stack_left_padded(ids_a, real_a, ids_r, real_r)
        lora_rows = None
        if rows is not None:
            u = ids_a.shape[0]
            rows = torch.cat([rows, rows + u])
            lora_rows = u if self.lora is not None else 0
        logits = self.runner.prefill(ids, real, rows, lora_rows)
        return logits[: self.n], logits[self.n:]

    def admit(self, dst, ids_a, real_a, ids_r, real_r):
        """Stream a of prompt ``j`` goes to runner row ``dst[j]``, stream r to ``dst[j] + B``;
        one forward of ``2U`` rows, the adapter on the first ``U``."""
        ids, real = _stack_left_padded(ids_a, real_a, ids_r, real_r)
        u = ids_a.shape[0]
        dst = dst.to(self.runner.device)
        logits = self.runner.admit(ids, real, torch.cat([dst, dst + self.n]),
                                   u if self.lora is not None else 0)
        return logits[:u], logits[u:]

    def step(self, tokens: Tensor):
        self._tok2[: self.n].copy_(tokens)
        self._tok2[self.n:].copy_(tokens)
        logits = self.runner.step(self._tok2)
        return logits[: self.n], logits[self.n:]

    def verify(self, tokens: Tensor):
        """Both streams' ``T`` positions per row in one forward of ``2B`` rows."""
        logits = self.runner.verify(tokens.repeat(2, 1))
        return logits[: self.n], logits[self.n:]

    def advance(self, count: Tensor, host=None) -> None:
        self.runner.advance(count.repeat(2), None if host is None else list(host) * 2)

    def reorder(self, index: Tensor, start: int = 0, stop: int | None = None) -> None:
        self.runner.reorder(torch.cat([index, index + self.n]), start, stop)


class SinglePair:
    """One stream (``Greedy``): ``lora_rows`` is ``n_rows`` to run a LoRA model with its
    adapter on, ``0`` to run its base; ``pool``: its runner's ``cache.KVPool``."""

    shared = False

    def __init__(self, model, n_rows: int, max_len: int, lora: RowLoRA | None = None,
                 lora_rows: int = 0, cpu_linear=None, pool=None, forward=None):
        self.runner = Runner(model, n_rows, max_len, lora, lora_rows, cpu_linear, pool, forward)
        self.runners = (self.runner,)
        self.device = self.runner.device
        self.ref_split = None

    def prefill(self, ids, real, ids_r=None, real_r=None, rows=None):
        return self.runner.prefill(ids, real, rows), None

    def admit(self, dst, ids, real, ids_r=None, real_r=None):
        return self.runner.admit(ids, real, dst), None

    def step(self, tokens: Tensor):
        return self.runner.step(tokens), None

    def verify(self, tokens: Tensor):
        return self.runner.verify(tokens), None

    def advance(self, count: Tensor, host=None) -> None:
        self.runner.advance(count, host)


def _stack_left_padded(ids_a, real_a, ids_r, real_r):
    """Stack two left-padded batches of possibly different widths into one."""
    width = max(ids_a.shape[1], ids_r.shape[1])

    def pad(ids, real):
        extra = width - ids.shape[1]
        if extra == 0:
            return ids, real
        return (F.pad(ids, (extra, 0), value=0), F.pad(real, (extra, 0), value=False))

    ia, ra = pad(ids_a, real_a)
    ir, rr = pad(ids_r, real_r)
    return torch.cat([ia, ir]), torch.cat([ra, rr])
