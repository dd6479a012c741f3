"""GPU checks of issue 10 (``pytest -m gpu``; skipped without CUDA): the graph-replayed step
equals the eager step token for token on every tiny architecture and pair kind, one captured
graph serves every value of a rule kind, and the beam/mix helpers keep their exact order on
CUDA tensors. (Kernel backends against the reference: ``tests/test_kernels.py``.)"""
import copy
import math

import pytest
import torch
from conftest import PROMPTS, random_lora, tiny_model

from aad_fast import (AAD, CFG, EFT, OPAD, BeamAAD, Contrastive, Decoder, Greedy, Mix, engine)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "olmo2"]
SAMPLED = EFT(2.0, temperature=0.7, top_p=0.8, seed=3)
KINDS = {"two": [AAD(0.1), Contrastive(0.1, 0.5), SAMPLED, CFG(1.5)],
         "lora": [AAD(0.1), SAMPLED],
         "prompt": [OPAD(1.0, principle_ids=[30, 31, 32]), CFG(1.5, negative_ids=[1])],
         "single": [Greedy("a"), Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=5)]}


def models_for(arch, kind):
    ma, mr = tiny_model(arch, 0).cuda(), tiny_model(arch, 1).cuda()
    if kind == "lora":
        return (random_lora(copy.deepcopy(ma)).cuda(),)
    if kind == "prompt":
        return (ma,)
    return (ma, mr)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_replay_equals_eager(arch, kind):
    args = models_for(arch, kind)
    kw = dict(max_batch_size=4, max_seq_len=64)
    eager = Decoder(*args, cuda_graphs=False, **kw)
    want = {r: eager.generate(input_ids=PROMPTS, rule=r, max_new_tokens=20).tokens
            for r in KINDS[kind]}
    eager.close()
    graphed = Decoder(*args, cuda_graphs=True, **kw)
    for _ in range(2):  # capture, then replay the kept graph on a second call
        for rule in KINDS[kind]:
            got = graphed.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=20)
            assert got.stats["cuda_graphs"] is True, (arch, kind, rule)
            assert got.tokens == want[rule], (arch, kind, rule)


def test_one_captured_graph_serves_every_value(monkeypatch):
    built = []
    real = engine.StepGraph

    class Counting(real):
        def __init__(self, *a):
            built.append(1)
            super().__init__(*a)
    monkeypatch.setattr(engine, "StepGraph", Counting)
    args = models_for("llama", "two")
    kw = dict(max_batch_size=4, max_seq_len=64)
    dec = Decoder(*args, cuda_graphs=True, **kw)
    groups = [[AAD(0.1), AAD(0.4), AAD(0.02)],
              [EFT(2.0, temperature=0.7, top_p=0.8, seed=1),
               EFT(3.0, temperature=1.1, top_p=0.5, seed=2)]]
    for i, rules in enumerate(groups):
        for rule in rules:
            got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=16)
            fresh = Decoder(*args, cuda_graphs=False, **kw).generate(
                input_ids=PROMPTS, rule=rule, max_new_tokens=16)
            assert got.stats["cuda_graphs"] and got.tokens == fresh.tokens, rule
        assert len(built) == i + 1
    assert len(dec._entries) == 2


def test_beam_of_one_is_aad_on_cuda():
    dec = Decoder(*models_for("llama", "two"), max_batch_size=8, max_seq_len=64)
    a = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    b = dec.generate(input_ids=PROMPTS, rule=BeamAAD(1, 0.1), max_new_tokens=12)
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason


def test_beam_topk_order_and_mix_floor_on_cuda():
    from test_reference import _topk_by_sort

    from aad_fast.ops import mix_floor
    from aad_fast.reference import _best_ids
    from aad_fast.selectors import topk_topp_floor
    g = torch.Generator(device="cuda").manual_seed(0)
    for v in (7, 1000, 128256):
        s = (torch.randn(4, v, generator=g, device="cuda") * 2).round()
        cand = torch.rand(4, v, generator=g, device="cuda") < 0.5
        s = torch.where(cand, s, -math.inf)
        assert torch.equal(_best_ids(s, cand, min(8, v)), _topk_by_sort(s, cand, 8))
        for top_k, top_p in ((0, 0.9), (5, 1.0), (50, 0.3)):
            want = mix_floor(s, s, v, 1.0, 0.0, top_k, top_p)
            got = topk_topp_floor(s, torch.full((4, 1), top_k, device="cuda"),
                                  torch.full((4, 1), top_p, device="cuda"))
            assert torch.equal(got, want), (v, top_k, top_p)
