"""``aad_fast.generate()``, the one-shot call, against ``Decoder.generate`` for the per-token rules
and for the rules whose prompts take several rows each (BeamAAD: one per beam, BestOfN: one per
sample), which the one-shot call must size its batch for."""
import pytest
import torch
from conftest import PROMPTS, tiny_model

import aad_fast as af


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture(scope="module")
def picker():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(3)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)).eval()


def rules(picker):
    return [af.AAD(0.1), af.BeamAAD(2, 0.1), af.BeamAAD(3, 0.2, tau=0.5),
            af.BestOfN(2, picker=picker, seed=4)]


@pytest.mark.parametrize("which", range(4), ids=["AAD", "BeamAAD2", "BeamAAD3-tau", "BestOfN2"])
def test_one_shot_generate_equals_decoder_generate(models, picker, which):
    rule = rules(picker)[which]
    got = af.generate(models[0], models[1], input_ids=PROMPTS, rule=rule, max_new_tokens=6)
    with af.Decoder(models[0], models[1], max_batch_size=16) as dec:
        want = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=6)
    assert len(got.tokens) == len(PROMPTS)
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    assert any(len(t) > 0 for t in got.tokens)


def test_one_shot_generate_still_honours_a_given_max_batch_size(models):
    """A caller's ``max_batch_size`` wins: more beams than fit at once queue for the rows
    (the same tokens); fewer rows than one prompt's beams is refused, naming both."""
    small = af.generate(models[0], models[1], input_ids=PROMPTS, rule=af.BeamAAD(2),
                        max_new_tokens=4, max_batch_size=len(PROMPTS))
    assert small.stats["rows"] == 2
    wide = af.generate(models[0], models[1], input_ids=PROMPTS, rule=af.BeamAAD(2),
                       max_new_tokens=4)
    assert small.tokens == wide.tokens and wide.stats["rows"] == 2 * len(PROMPTS)
    with pytest.raises(ValueError, match="num_beams=4 exceeds max_batch_size=3"):
        af.generate(models[0], models[1], input_ids=PROMPTS, rule=af.BeamAAD(4),
                    max_new_tokens=4, max_batch_size=len(PROMPTS))
