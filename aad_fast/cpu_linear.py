"""Few-row fp32 linears on CPU, for the engine's decode steps.

A decode step multiplies every weight matrix by a few rows (batch x streams x beams). There,
PyTorch's ``F.linear`` on CPU (MKL) streams the weights far below the memory bandwidth: on the
2-core EPYC this project is measured on, 200 MB of fp32 weights take ~22 ms with one row and
40-50 ms with two, while ``W @ X^T`` with ``X^T`` a column-major view takes 8-10 ms for two
rows (~22 GB/s, near the ~29 GB/s of a plain read). So inside the engine's forward passes every
plain ``nn.Linear`` computes ``(W @ X^T)^T``; one row is doubled to take the same path. It is
the same product with another fp32 summation order. Bigger inputs (prefill of long prompts)
and other dtypes keep ``F.linear``.

``FewRowLinears(model)`` swaps the forward of the model's ``nn.Linear`` modules (exact type,
so quantised subclasses are left alone) only inside ``with``; outside it the model is untouched.
The layout was measured on a 2-core EPYC; ``AAD_FAST_CPU_FEW_ROW_LINEAR=0`` in the environment
switches it off (plain ``F.linear``) for CPUs where MKL's own small-row path is faster.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; for at most ``MAX_ROWS`` rows of fp32 on CPU computed as
    ``(W @ X^T)^T`` (module docstring). ``x`` ``[..., K]``, ``weight`` ``[N, K]``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if (m > MAX_ROWS or not x.is_cpu or x.dtype != torch.float32
            or weight.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if m == 1:
        x2 = x2.expand(2, k)
    y = torch.mm(weight, x2.contiguous().t())[:, :m].t()
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], y.shape[-1])


def _few_row_forward(self: nn.Linear, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's name
    return linear(input, self.weight, self.bias)


class FewRowLinears:
    """Context manager: the model's ``nn.Linear`` layers use the few-row path inside ``with``.

    Enabled only for a CPU model with fp32 weights (elsewhere ``with`` does nothing). A layer
    whose instance already has its own ``forward`` (an accelerate offload hook, a user's patch)
    is left alone."""

    def __init__(self, model: nn.Module):
        p = next(model.parameters())
        on = (p.device.type == "cpu" and p.dtype == torch.float32
              and os.environ.get("AAD_FAST_CPU_FEW_ROW_LINEAR", "1") != "0")
        self.linears = [m for m in model.modules() if type(m) is nn.Linear] if on else []
        self._swapped: list = []

    def __enter__(self):
        self._swapped = [m for m in self.linears if "forward" not in m.__dict__]
        for m in self._swapped:
            m.__dict__["forward"] = types.MethodType(_few_row_forward, m)
        return self

    def __exit__(self, *exc):
        for m in self._swapped:
            m.__dict__.pop("forward", None)
        self._swapped = []
        return False
