"""GPU checks of issue 10 (``pytest -m gpu``; skipped without CUDA): the graph-replayed step
equals the eager step token for token on every tiny architecture and pair kind, one captured
graph serves every value of a rule kind, one graph per read length of the ladder
(``engine.LengthSteps``) gives the eager tokens as rows grow past a rung and come and go, and
the beam/mix helpers keep their exact order on CUDA tensors. (Kernel backends against the
reference: ``tests/test_kernels.py``.)"""
import copy
import math

import pytest
import torch
from conftest import PROMPTS, random_lora, tiny_model

from aad_fast import AAD, CFG, EFT, OPAD, BeamAAD, Contrastive, Decoder, Greedy, Mix
from aad_fast.model import cache
from aad_fast.decode import steps as engine

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


def _no_eos(models):
    for m in models:
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        for cfg in (base.config, base.generation_config):
            cfg.eos_token_id = None
    return models


def _counted_graphs(monkeypatch):
    """``engine.StepGraph`` that records the read length each graph is captured for."""
    made = []
    real = engine.StepGraph

    class Counting(real):
        def __init__(self, pair, *a):
            made.append(pair.runners[0].fixed_len)
            super().__init__(pair, *a)
    monkeypatch.setattr(engine, "StepGraph", Counting)
    return made


@pytest.mark.parametrize("kind,rule", [("two", AAD(0.1)), ("lora", AAD(0.2)),
                                       ("single", Greedy("a")), ("two", SAMPLED)])
def test_one_graph_per_read_length_equals_eager(kind, rule, monkeypatch):
    monkeypatch.setitem(cache.MIN_READ, "cuda", 32)  # 128 slots: graphs of 32, 64 and 128
    made = _counted_graphs(monkeypatch)
    args = _no_eos(models_for("llama", kind))
    kw = dict(max_batch_size=4, max_seq_len=128)
    want = Decoder(*args, cuda_graphs=False, **kw).generate(input_ids=PROMPTS, rule=rule,
                                                            max_new_tokens=100)
    dec = Decoder(*args, cuda_graphs=True, **kw)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=100)
    assert got.stats["cuda_graphs"] and got.tokens == want.tokens
    # width 6: step k writes slot 6 + k; 26 steps read 32 slots, 32 read 64, 41 read 128
    assert got.stats["read_lengths"] == {32: 26, 64: 32, 128: 41}
    assert made == [32, 64, 128]
    assert got.stats["kv_read_bytes_per_step"] < got.stats["kv_cache_bytes"]
    again = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=40)  # replays only
    assert again.tokens == [t[:40] for t in want.tokens] and made == [32, 64, 128]
    assert again.stats["read_lengths"] == {32: 26, 64: 13}


def test_continuous_batching_over_the_ladder_equals_decoding_alone(monkeypatch):
    monkeypatch.setitem(cache.MIN_READ, "cuda", 16)  # 128 slots: 16, 32, 64, 128
    made = _counted_graphs(monkeypatch)
    args = _no_eos(models_for("llama", "two"))
    long = [1] + [(7 * i) % 50 + 5 for i in range(39)]
    prompts = [PROMPTS[0], long, PROMPTS[1], PROMPTS[2], long[:20]]
    dec = Decoder(*args, max_batch_size=2, max_seq_len=128, check_every=3)
    sched = dec.scheduler(AAD(0.2))
    hs = [sched.submit(dec.request(input_ids=p, rule=AAD(0.2), max_new_tokens=20 + 7 * i))
          for i, p in enumerate(prompts)]
    sched.run_until_idle()
    alone = Decoder(*args, max_batch_size=1, max_seq_len=128, cuda_graphs=False)
    for i, (p, h) in enumerate(zip(prompts, hs)):
        assert h.tokens == alone.generate(input_ids=[p], rule=AAD(0.2),
                                          max_new_tokens=20 + 7 * i).tokens[0], i
    assert {16, 32, 64, 128} >= set(made) >= {32, 64, 128}
    assert len(made) == len(set(made))  # each length captured once
    reads = sched.pair.runners[0].reads
    assert set(reads) == set(made) and sum(reads.values()) == sched.steps


def test_beam_of_one_is_aad_on_cuda():
    dec = Decoder(*models_for("llama", "two"), max_batch_size=8, max_seq_len=64)
    a = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    b = dec.generate(input_ids=PROMPTS, rule=BeamAAD(1, 0.1), max_new_tokens=12)
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason


def test_beam_topk_order_and_mix_floor_on_cuda():
    from test_reference import _topk_by_sort

    from aad_fast.ops import mix_floor
    from aad_fast.ops.reference import _best_ids
    from aad_fast.decode.selectors import topk_topp_floor
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
