"""Sanity of the reference selection core against SPEC written out naively with log-softmax."""
import math

import torch

from aad_fast.reference import select_ref


def test_reference_matches_log_space_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 300, generator=g) * 3
    r = torch.randn(8, 300, generator=g) * 3
    la, lr = a.log_softmax(1), r.log_softmax(1)
    alpha = 0.1
    cand = la >= la.max(1, keepdim=True).values + math.log(alpha)
    want = torch.where(cand, la - lr, torch.tensor(-math.inf)).argmax(1)
    lg = torch.full((8,), math.log(alpha))
    got = select_ref(a, r, 300, 1.0, 0.0, 1.0, -1.0, lg, torch.full((8,), -math.inf))
    assert torch.equal(got, want)
