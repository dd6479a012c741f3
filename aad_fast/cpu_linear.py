"""The few-row layout of a CPU linear: ``(W @ X^T)^T`` instead of ``F.linear``.

A decode step multiplies every weight matrix by a few rows (batch x streams x beams). Which
way of doing that streams the weights faster depends on the machine's BLAS and CPU: on a 2-core
AMD EPYC with MKL, ``F.linear`` with 1-2 rows read the weights at ~9 GB/s while ``W @ X^T``
with ``X^T`` a column-major view read them at ~22 GB/s; on a 2-core Intel Xeon (AVX-512) it was
the other way round (``F.linear`` 50-150 GB/s, ``W @ X^T`` 20-30 GB/s). So the layout is never
assumed: ``tuning.plan_linears`` times both on the machine, per weight shape and row count, and
the engine's view of the model (``runner.engine_view``) puts a ``FewRowLinear`` only where the
measurement chose it. Same product, another fp32 summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(W @ X^T)^T``; one row is doubled to take
    the same path. ``x`` float32 ``[..., K]`` (CPU), ``weight`` ``[N, K]``, ``bias`` ``[N]``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 1:
        x2 = x2.expand(2, k)
    y = torch.mm(weight, x2.contiguous().t())[:, :m].t()
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], y.shape[-1])


class FewRowLinear(nn.Module):
    """An ``nn.Linear``'s weights (shared, not copied) with the few-row layout for inputs of at
    most ``max_rows`` rows (the decode step the layout was measured for); larger inputs (a
    prefill) take ``F.linear``."""

    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // x.shape[-1] <= self.max_rows:
            return few_row_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, few-row layout up to {self.max_rows} rows"
