"""``aad-fast bench --speculative`` (``bench/speculative.py``, ``toy/spec_bench.py``): the clock
and its aggregation, the method names, and the oracle sweep on the tiny shape (the tokens of
every speculative row equal the non-speculative ones; the mean accepted length of an oracle
that is always right or always wrong is known exactly)."""
import argparse
import json

import pytest
import torch

from aad_fast.bench.speculative import (add_spec_ratios, oracle_sweep, plot_oracle,
                                        spec_markdown, time_methods)
from aad_fast.bench.shapes import default_config_dir
from aad_fast.toy.spec_bench import _label, split_name


def test_time_methods_sums_wall_time_over_emitted_tokens_and_takes_the_median():
    calls = []
    clocks = {"a": iter([1, 1, 10, 30, 20, 20, 40, 40]), "b": iter([5] * 8)}

    def method(name, emitted):
        def run(prompt):
            calls.append(name)
            return [prompt], emitted, next(clocks[name]), ({"mean_accepted": 1.5} if name == "b"
                                                          else {})
        return run

    res = time_methods({"a": method("a", 2), "b": method("b", 5)}, [7, 8], rounds=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] \
        + ["a", "a", "b", "b"]  # warm-up, then rounds in a rotated order
    # decode ms over the tokens after each prompt's first: (10 + 30) / (1 + 1), ...
    assert res["a"]["ms_per_token_runs"] == [20.0, 20.0, 40.0]
    assert res["a"]["ms_per_token"] == 20.0 and res["b"]["ms_per_token"] == 10 / 8
    assert res["a"]["tokens"] == [[7], [8]] and res["a"]["emitted"] == 4
    assert res["b"]["mean_accepted"] == 1.5 and res["a"]["mean_accepted"] is None
    rows = [{"method": m, "ms_per_token": r["ms_per_token"]} for m, r in res.items()]
    add_spec_ratios(rows, "b", "a")
    assert [(r["x_greedy"], r["x_aad"]) for r in rows] == [(16.0, 1.0), (1.0, 1 / 16)]


def test_method_names_of_the_toy_rows():
    assert split_name("aad_lora_ngram_k4") == ("aad_lora", "ngram", 4)
    assert split_name("aad_two_draft_k6") == ("aad_two", "draft", 6)
    assert split_name("greedy_sft") == ("greedy_sft", None, None)
    assert split_name("hf_assisted_sft_k2") == ("hf_greedy_sft", "HF assistant_model=draft", 2)
    assert _label("aad_two_draft_k6") == "engine AAD, two models, draft"


def test_oracle_sweep_on_the_tiny_shape(tmp_path):
    args = argparse.Namespace(configs=default_config_dir(), seed=0, decode_prompt_len=8,
                              new_tokens=4, spec_prompts=2, repeats=1)
    rows = oracle_sweep(args, torch.device("cpu"), torch.float32, "tiny", ps=(0.0, 1.0), ks=(2,))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"greedy", "aad_lora", "aad_two", "aad_lora_oracle_p0.0_k2",
                       "aad_lora_oracle_p1.0_k2"}
    assert by["aad_lora_oracle_p0.0_k2"]["same_tokens_as_aad_lora"] is True
    assert by["aad_lora_oracle_p1.0_k2"]["same_tokens_as_aad_lora"] is True
    # 4 tokens: the first at the prefill, then an always-right oracle drafts 2, all accepted,
    # plus the rule's own: one verify step; an always-wrong one accepts none in 3 steps
    assert by["aad_lora_oracle_p1.0_k2"]["mean_accepted"] == 2.0
    assert by["aad_lora_oracle_p0.0_k2"]["mean_accepted"] == 0.0
    assert by["greedy"]["x_greedy"] == 1.0 and by["aad_lora"]["x_aad"] == 1.0
    result = {"device": {"name": "a CPU", "threads": 2, "load_average_at_start": [0, 0, 0]},
              "dtype": "float32", "date": "2026-12-06T00:00:00", "commit": "abc",
              "notes": ["clock"], "oracle": rows}
    md = spec_markdown(result)
    assert md.startswith("# Speculative decoding: a CPU, float32")
    assert "| aad_lora_oracle_p1.0_k2 | 2 | 1.00 |" in md
    json.dumps(result)
    pytest.importorskip("matplotlib")
    assert plot_oracle(rows, tmp_path / "o.png", "tiny") and (tmp_path / "o.png").stat().st_size


def test_spec_targets_take_the_best_draft_and_the_oracle_point():
    from aad_fast.bench.speculative import spec_targets
    toy = [{"method": "aad_lora", "k": None, "x_greedy": 2.0},
           {"method": "aad_lora_ngram_k2", "k": 2, "x_greedy": 1.5},
           {"method": "aad_lora_draft_k6", "k": 6, "x_greedy": 0.65},
           {"method": "aad_two_draft_k4", "k": 4, "x_greedy": 1.2}]
    oracle = [{"model": "m", "method": "aad_lora_oracle_p0.7_k4", "k": 4, "p": 0.7,
               "x_greedy": 0.9},
              {"model": "m", "method": "aad_lora_oracle_p0.7_k2", "k": 2, "p": 0.7,
               "x_greedy": 0.5}]
    got = spec_targets({"toy": toy, "oracle": oracle})
    assert [(t["method"], t["value"], t["bound"], t["met"]) for t in got] == [
        ("aad_lora_draft_k6", 0.65, 0.7, True), ("aad_two_draft_k4", 1.2, 1.0, False),
        ("aad_lora_oracle_p0.7_k4", 0.9, 0.8, False)]
