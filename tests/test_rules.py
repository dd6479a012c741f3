"""Every rule on the engine against a naive loop written from docs/rules.md (full recompute,
fp32)."""
import math

import pytest
import torch
from conftest import (PROMPTS, aad_pick, brute_beam, mix_pick, naive_decode, opad_pick,
                      tiny_model)

from aad_fast import AAD, CFG, EFT, OPAD, BeamAAD, BestOfN, Contrastive, DeRa, Decoder, Greedy, Mix


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture(scope="module")
def dec(models):
    return Decoder(*models, max_batch_size=8, max_seq_len=48)


@pytest.mark.parametrize("rule,pick", [
    (AAD(0.1), aad_pick(0.1)),
    (AAD(0.0), aad_pick(0.0)),
    (AAD(1.0), aad_pick(1.0)),
    (Contrastive(0.1, 0.5), aad_pick(0.1, 0.5)),
    (EFT(4.0), mix_pick(4.0, -3.0)),
    (DeRa(0.5), mix_pick(0.5, 0.5)),
    (DeRa(2.0), mix_pick(2.0, -1.0)),
    (CFG(1.5), mix_pick(1.5, -0.5)),
], ids=["aad", "aad-a0", "aad-a1", "contrastive", "eft", "dera-0.5", "dera-2", "cfg-two"])
def test_greedy_rules_match_naive_loop(dec, models, rule, pick):
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    assert got.tokens == naive_decode(pick, models, PROMPTS, 10)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8),
                                dict(temperature=1.3, min_p=0.2)], ids=["t", "top-p", "min-p"])
def test_sampled_mix_matches_naive_loop_with_the_same_noise(dec, models, kw):
    rule = EFT(2.0, seed=11, **kw)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    want = naive_decode(mix_pick(2.0, -1.0, seed=11, **kw), models, PROMPTS, 10)
    assert got.tokens == want
    again = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    assert again.tokens == got.tokens  # a fixed seed reproduces
    other = dec.generate(input_ids=PROMPTS, rule=EFT(2.0, seed=12, **kw), max_new_tokens=10)
    assert other.tokens != got.tokens


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_opad_one_model_two_prompts(models, k):
    model = models[0]
    principle = [30, 31, 32]
    dec = Decoder(model, max_batch_size=4, max_seq_len=48)
    got = dec.generate(input_ids=PROMPTS, rule=OPAD(k, principle_ids=principle), max_new_tokens=10)
    want = naive_decode(opad_pick(k), (model, model), [principle + p for p in PROMPTS], 10,
                        prompts_r=PROMPTS)
    assert got.tokens == want
    assert got.stats["pair"] == "one"


def test_cfg_one_model_with_unconditional_prompt(models):
    model = models[0]
    dec = Decoder(model, max_batch_size=4, max_seq_len=48)
    got = dec.generate(input_ids=PROMPTS, rule=CFG(1.5, negative_ids=[1]), max_new_tokens=8)
    assert got.tokens == naive_decode(mix_pick(1.5, -0.5), (model, model), PROMPTS, 8,
                                      prompts_r=[[1]] * len(PROMPTS))
    default = dec.generate(input_ids=PROMPTS, rule=CFG(1.5), max_new_tokens=8)  # last token
    assert default.tokens == naive_decode(mix_pick(1.5, -0.5), (model, model), PROMPTS, 8,
                                          prompts_r=[p[-1:] for p in PROMPTS])


# ------------------------------------------------------------------------------ beam search
@pytest.mark.parametrize("k,alpha,tau,lp", [(2, 0.1, None, 0.0), (3, 0.3, 1.0, 1.0),
                                            (4, 0.05, 0.5, 0.0)])
def test_beam_aad_matches_brute_force(models, k, alpha, tau, lp):
    dec = Decoder(*models, max_batch_size=16, max_seq_len=48)
    got = dec.generate(input_ids=PROMPTS, rule=BeamAAD(k, alpha, tau, lp), max_new_tokens=6)
    want = [brute_beam(models, p, k, alpha, tau, 6, lp)[0] for p in PROMPTS]
    assert got.tokens == want
    assert len(got.scores) == len(PROMPTS)
    st = got.stats
    assert st["num_beams"] == k and st["batch"] == len(PROMPTS) and 1 <= st["steps"] <= 6
    assert st["prefill_ms"] > 0 and st["ms_per_token"] > 0


def test_beam_aad_on_a_lora_pair_matches_brute_force_on_the_merged_pair():
    """The shared-weight pair: beams of one prompt share its single prefill, the adapter stays
    on the aligned rows through prefill, steps and cache reorders."""
    import copy

    from peft import LoraConfig, get_peft_model
    base = tiny_model("llama", 0)
    sft = copy.deepcopy(base)
    torch.manual_seed(5)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.4)
    pm.eval()
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    with Decoder(pm, max_batch_size=16, max_seq_len=48) as dec:
        assert dec.kind == "lora"
        got = dec.generate(input_ids=PROMPTS, rule=BeamAAD(3, 0.2), max_new_tokens=6)
    assert got.tokens == [brute_beam((merged, sft), p, 3, 0.2, None, 6, 0.0)[0] for p in PROMPTS]


def test_beam_ranking_orders_best_first_ties_low_nan_last():
    from aad_fast.decode.search import rank_continuations
    inf = math.inf
    score = torch.tensor([[inf, -inf]], dtype=torch.float64)
    s = torch.tensor([[[1.0, -inf, 0.5], [inf, 2.0, -inf]]], dtype=torch.float64)
    total, order = rank_continuations(score, s)
    # inf + -inf and -inf + inf are not continuations (-inf), not NaN ranked first
    assert total[0] == [inf, -inf, inf, -inf, -inf, -inf]
    assert order[0] == [0, 2, 1, 3, 4, 5]
    torch.manual_seed(0)
    score = torch.randn(3, 4, dtype=torch.float64).round()
    s = torch.randn(3, 4, 5, dtype=torch.float64).round()
    total, order = rank_continuations(score, s)
    for p in range(3):
        assert order[p] == sorted(range(20), key=lambda i: (-total[p][i], i))


def test_beam_of_one_is_aad(dec):
    a = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    b = dec.generate(input_ids=PROMPTS, rule=BeamAAD(1, 0.1), max_new_tokens=10)
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason


# ------------------------------------------------------------------------------ best-of-n
def test_best_of_n_picks_the_best_exposed_candidate(dec, models):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(3)
    picker = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)).eval()
    got = dec.generate(input_ids=PROMPTS[:2], rule=BestOfN(3, top_p=0.9, picker=picker, seed=5),
                       max_new_tokens=6)
    for p, prompt in enumerate(PROMPTS[:2]):
        cands = got.candidates[p]
        assert len(cands) == 3
        for j, c in enumerate(cands):
            alone = dec.generate(input_ids=[prompt], max_new_tokens=6,
                                 rule=Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=5 + j))
            assert c["tokens"] == alone.tokens[0]
            with torch.no_grad():
                direct = picker(torch.tensor([prompt + c["tokens"]])).logits[0, 0].item()
            assert c["score"] == pytest.approx(direct, rel=1e-5, abs=1e-6)
        best = max(range(3), key=lambda j: (cands[j]["score"], -j))
        assert got.tokens[p] == cands[best]["tokens"]


def test_mix_sampling_matches_naive_single_stream(dec, models):
    got = dec.generate(input_ids=PROMPTS, max_new_tokens=8,
                       rule=Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=5))
    want = naive_decode(mix_pick(1.0, 0.0, 1.0, top_p=0.9, seed=5), models[:1], PROMPTS, 8)
    assert got.tokens == want


# ------------------------------------------------------------------------------ bad input
def test_rule_arguments_are_checked(models):
    with pytest.raises(ValueError, match="principle"):
        OPAD(1.0)
    with pytest.raises(ValueError, match="picker"):
        BestOfN(2)
    with pytest.raises(ValueError, match="num_beams"):
        BeamAAD(0)
    with pytest.raises(ValueError, match="n must be"):
        BestOfN(0, picker="x")
    with pytest.raises(ValueError, match="beta"):
        Contrastive(0.1, -1.0)
    with pytest.raises(ValueError, match="top_p"):
        EFT(4.0, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        DeRa(0.5, temperature=-1.0)
    with pytest.raises(ValueError, match="stream"):
        Greedy("x")
    with pytest.raises(ValueError, match="OPAD runs one model"):
        Decoder(*models).generate(input_ids=PROMPTS, rule=OPAD(1.0, principle_ids=[2]))
    with pytest.raises(ValueError, match="needs a reference model"):
        Decoder(models[0]).generate(input_ids=PROMPTS, rule=AAD(0.1))
