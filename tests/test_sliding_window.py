"""Sliding-window attention (``runner.sliding_layers``): a window of 4 positions, far below the
prompts plus the new tokens, so the window bites on every step. The engine's tokens equal the
naive loop's (which recomputes with the model's own masks) on both forwards: the engine's
(Mistral: every layer slides; Qwen2 with ``use_sliding_window``: layers mixed) and the model's
own (Gemma 2/3, Phi-3), for two models, a LoRA pair, refilled rows, beams and the compiled step.
Each case first checks that the window changes the naive loop's tokens at all."""
import copy

import pytest
import torch
from conftest import EOS, VOCAB, aad_pick, brute_beam, naive_decode, random_lora

from aad_fast import AAD, BeamAAD, Decoder, Greedy

WINDOW = 4
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.35, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
              tie_word_embeddings=False)
ARCHS = {  # model_type -> fields over COMMON; "forward": the step the engine measures first
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, head_dim=12),
    "gemma3_text": dict(sliding_window=WINDOW, head_dim=12, sliding_window_pattern=2),
    "phi3": dict(sliding_window=WINDOW),
}
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 9], [1, 20, 21, 22, 23, 24]]


def model(arch: str, seed: int, window: int = WINDOW):
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = {**COMMON, **ARCHS[arch], "sliding_window": window}
    cfg = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def full_window(m):
    """``m`` with the same weights and a window longer than any sequence here."""
    arch = m.config.model_type
    plain = model(arch, 0, window=1000)
    plain.load_state_dict(m.state_dict())
    return plain.eval()


def test_the_window_is_read_from_the_config():
    from aad_fast.model.runner import sliding_layers
    assert sliding_layers(model("mistral", 0).config, 64) == (WINDOW, None)
    assert sliding_layers(model("qwen2", 0).config, 64) == (
        WINDOW, ("full_attention", "sliding_attention", "sliding_attention"))
    assert sliding_layers(model("mistral", 0).config, WINDOW) == (None, None)  # never bites
    assert sliding_layers(model("qwen2", 0, window=1000).config, 64) == (None, None)
    cfg = model("qwen2", 0).config
    cfg.use_sliding_window = False
    assert sliding_layers(cfg, 64) == (None, None)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_models_with_a_window_equal_the_naive_loop(arch):
    a, r = model(arch, 0), model(arch, 1)
    want = naive_decode(aad_pick(0.1), (a, r), PROMPTS, 12)
    assert want != naive_decode(aad_pick(0.1), (full_window(a), full_window(r)), PROMPTS, 12)
    # 2 rows for 3 prompts: the third is admitted into a refilled row mid-decode
    with Decoder(a, r, max_batch_size=2, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
        greedy = dec.generate(input_ids=PROMPTS, rule=Greedy("r"), max_new_tokens=12)
    assert got.tokens == want
    argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731
    assert greedy.tokens == naive_decode(argmax, (r,), PROMPTS, 12)


@pytest.mark.parametrize("arch,forward", [("mistral", "fast"), ("qwen2", "fast"),
                                          ("mistral", "hf"), ("gemma3_text", "hf")])
def test_lora_pair_with_a_window_equals_the_merged_adapter(arch, forward):
    base = model(arch, 0)
    sft = copy.deepcopy(base)
    pm = random_lora(base)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    want = naive_decode(aad_pick(0.1), (merged, sft), PROMPTS, 12)
    with Decoder(pm, max_batch_size=3, max_seq_len=40, forward=forward) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    assert got.stats["forward"] == forward
    assert got.tokens == want


def test_beams_with_a_window_equal_the_brute_force_search():
    a, r = model("qwen2", 0), model("qwen2", 1)
    rule = BeamAAD(2, 0.2, length_penalty=1.0)
    with Decoder(a, r, max_batch_size=4, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=9)
    for i, prompt in enumerate(PROMPTS):
        tokens, reason, score = brute_beam((a, r), prompt, 2, 0.2, None, 9, 1.0)
        assert (got.tokens[i], got.finish_reason[i]) == (tokens, reason)
        assert got.scores[i] == pytest.approx(score, rel=0, abs=1e-5 * (len(tokens) + 1))


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_compiled_step_with_a_window_gives_the_eager_tokens(arch):
    a, r = model(arch, 0), model(arch, 1)
    want = naive_decode(aad_pick(0.1), (a, r), PROMPTS, 10)
    with Decoder(a, r, max_batch_size=3, max_seq_len=40, compile=True) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert got.stats["compiled"]
    assert got.tokens == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_graph_replay_with_a_window_equals_the_naive_loop(arch):
    """The window's slot closing is part of the captured step (never run on a GPU so far)."""
    a, r = model(arch, 0), model(arch, 1)
    want = naive_decode(aad_pick(0.1), (a, r), PROMPTS, 12)
    with Decoder(a.cuda(), r.cuda(), max_batch_size=2, max_seq_len=40, cuda_graphs=True) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    assert got.stats["cuda_graphs"] is True
    assert got.tokens == want
