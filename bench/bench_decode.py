"""pytest-benchmark view of the decode step on a small shape (CPU):
``pytest bench/bench_decode.py --benchmark-only``.

One ``Decoder.generate`` of ``NEW_TOKENS`` tokens per round, for this engine's single-model greedy,
AAD with two models and AAD with a LoRA pair, next to the naive Hugging Face two-model loop. The
full benchmark (ratios, time to first token, memory, JSON and plot) is ``aad-fast bench``.
"""
import copy

import pytest
import torch

from aad_fast import AAD, Decoder, Greedy, bench

SHAPE = "tiny"  # a config name in aad_fast/bench/configs
NEW_TOKENS = 16
PROMPT = 32


@pytest.fixture(scope="module")
def models():
    config = bench.make_config(bench.load_shape(SHAPE, bench.default_config_dir()))
    a = bench.random_model(config, torch.float32, "cpu", 0)
    r = bench.random_model(config, torch.float32, "cpu", 1)
    lora = bench.add_lora(copy.deepcopy(r), 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (1, PROMPT), generator=g)
    return {"a": a, "r": r, "lora": lora, "ids": ids}


CASES = {
    "engine_greedy": (lambda m: (m["a"], None), Greedy("a")),
    "engine_aad_two": (lambda m: (m["a"], m["r"]), AAD(0.1)),
    "engine_aad_lora": (lambda m: (m["lora"], None), AAD(0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_decode(benchmark, models, case):
    pair, rule = CASES[case]
    with Decoder(*pair(models), max_batch_size=1, max_seq_len=PROMPT + NEW_TOKENS) as dec:
        run = lambda: dec.generate(input_ids=models["ids"], rule=rule, max_new_tokens=NEW_TOKENS,
                                   stop=[])
        out = benchmark(run)
    assert all(len(t) == NEW_TOKENS for t in out.tokens)


def test_naive_hf_two_model_loop(benchmark, models):
    benchmark(lambda: bench.naive_hf_aad(models["a"], models["r"], models["ids"], NEW_TOKENS,
                                         torch.device("cpu")))
