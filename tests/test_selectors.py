"""Selectors with per-row parameter tensors (``aad_fast/selectors.py``) against the selection
core called with the rule's float coefficients (the definition), bit for bit, on logits with
ties, ``-inf`` and NaN; and one selector re-filled with another value of its kind."""
import math

import pytest
import torch

from aad_fast import AAD, CFG, EFT, Contrastive, DeRa, Greedy, Mix
from aad_fast.ops import backends
from aad_fast.ops import mix_floor, select_core
from aad_fast.decode.selectors import make_selector, rule_kind, topk_topp_floor

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in backends.available_backends("cpu")]


def logits(b, v, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(b, v, generator=g) * 3).round()  # ties
    r = (torch.randn(b, v, generator=g) * 3).round()
    a[0, :5] = -math.inf
    r[1 % b, 3] = -math.inf
    a[-1, 7] = math.nan
    r[-1, 9] = math.nan
    return a, r


def definition(rule, a, r, vocab, step, backend):
    """The core with the rule's own float coefficients, as before per-row tensors."""
    b = a.shape[0]
    ma, mr, sa, sr, log_rel = rule.coefficients()
    lr = torch.full((b,), log_rel)
    floor = torch.full((b,), -math.inf)
    seed = None
    if rule.sampled:
        seed = torch.full((b,), rule.seed, dtype=torch.int64)
        if rule.top_k or rule.top_p < 1.0:
            floor = mix_floor(a, r, vocab, ma, mr, rule.top_k, rule.top_p)
    return select_core(a, r, vocab, ma, mr, sa, sr, lr, floor, seed,
                       step if rule.sampled else None, backend)


RULES = [AAD(0.1), AAD(0.0), AAD(1.0), Contrastive(0.1, 0.5), Contrastive(0.3, 0.0),
         Contrastive(0.05, 2.7), EFT(4.0), DeRa(0.3), CFG(1.5), Mix(0.1, 0.7),
         EFT(2.0, temperature=0.7, top_p=0.8, seed=3), EFT(1.3, temperature=1.1, top_k=4, seed=8),
         Mix(0.9, 0.6, temperature=0.3, top_k=9, top_p=0.35, min_p=0.1, seed=2),
         Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=5), Mix(0.0, 2.0, temperature=0.5),
         Mix(3.0, 0.0), Greedy("a")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_selector_equals_the_core_with_float_coefficients(rule, backend):
    b, v = 6, 300
    step = torch.tensor(3)
    for seed in range(4):
        a, r = logits(b, v + 7, seed)
        sel = make_selector(rule, b, v, "cpu", backend)
        if rule.streams == "ar":
            want, got = definition(rule, a, r, v, step, backend), sel(a, r, step)
        else:  # one stream runs: the engine passes its logits as la and None
            want, got = definition(rule, a, a, v, step, backend), sel(a, None, step)
        assert torch.equal(got, want), (rule, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_selector_serves_every_value_of_its_kind(backend):
    a, r = logits(4, 200, 11)
    step = torch.tensor(1)
    groups = [[AAD(0.1), AAD(0.5), Contrastive(0.01, 1.0)],
              [Contrastive(0.1, 0.5), Contrastive(0.4, 3.0)],
              [EFT(2.0, temperature=0.7, top_p=0.8, seed=3),
               Mix(0.2, 1.1, temperature=1.7, top_k=3, top_p=0.6, min_p=0.3, seed=99)],
              [Greedy("a")]]
    for rules in groups:
        sel = make_selector(rules[0], 4, 200, "cpu", backend)
        for rule in rules + rules[:1]:
            assert rule_kind(rule) == sel.kind
            sel.set_rule(rule)
            assert torch.equal(sel(a, r, step), definition(rule, a, r, 200, step, backend)), rule
    with pytest.raises(ValueError, match="kind"):
        make_selector(AAD(0.1), 4, 200, "cpu").set_rule(Contrastive(0.1, 0.5))


def test_per_row_floor_equals_mix_floor():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        b, v = 3, int(torch.randint(1, 80, (1,), generator=g))
        z = (torch.randn(b, v, generator=g) * 2).round()
        z[0, : v // 3] = -math.inf
        z[-1, -1] = math.nan
        top_k = int(torch.randint(0, v + 2, (1,), generator=g))
        top_p = [1.0, 0.9, 0.5, 0.05][trial % 4]
        want = mix_floor(z, z, v, 1.0, 0.0, top_k, top_p)
        got = topk_topp_floor(z, torch.full((b, 1), top_k), torch.full((b, 1), top_p))
        assert torch.equal(got, want), (trial, top_k, top_p)
