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


def _topk_by_sort(s, cand, k):
    """The ordering of ``aad_topk_ref`` written as two stable full sorts (its old body)."""
    key = torch.where(cand, s, torch.tensor(-math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank_c = torch.sort((~cand).to(torch.int8).gather(1, order), dim=1, stable=True).indices
    return order.gather(1, rank_c)[:, :k]


def test_beam_topk_key_orders_like_two_stable_sorts():
    """``_best_ids`` (one topk on a unique key) against the stable-sort definition on rows full
    of ties, -0.0 next to +0.0, candidates scored -inf/+inf and fewer candidates than k."""
    from aad_fast.reference import _best_ids
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        b, v = 5, int(torch.randint(1, 70, (1,), generator=g))
        s = (torch.randn(b, v, generator=g) * 2).round() / 2  # many equal scores
        s[torch.rand(b, v, generator=g) < 0.1] = -0.0
        s[torch.rand(b, v, generator=g) < 0.1] = 0.0
        s[torch.rand(b, v, generator=g) < 0.05] = -math.inf
        s[torch.rand(b, v, generator=g) < 0.05] = math.inf
        cand = torch.rand(b, v, generator=g) < (0.9 if trial % 2 else 0.2)
        s = torch.where(cand, s, torch.tensor(-math.inf))
        for k in {1, 3, v}:
            assert torch.equal(_best_ids(s, cand, min(k, v)), _topk_by_sort(s, cand, k))
