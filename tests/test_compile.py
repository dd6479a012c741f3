"""``Decoder(compile=...)``: the ``torch.compile``-d step gives the eager step's tokens, and
``"auto"`` compiles only where this machine's record says it pays for this call.

Compiling on CPU costs ~10 s per (model, pair, rule) here, so the token test runs one case per
pair kind (two models, LoRA pair, prompt pair, single stream), spread over the architectures
and rules of the eager tests (tests/test_engine.py, tests/test_rules.py check every
architecture and rule eagerly); each compiled case is compared with the eager decode of the
same Decoder settings and with the naive loop."""

import pytest
import torch

from aad_fast import AAD, EFT, OPAD, Decoder, Greedy, tuning
from aad_fast.model import cache
from aad_fast.decode import steps as engine
from aad_fast.model.cache import StaticKVCache
from conftest import aad_pick, naive_decode, tiny_model

PROMPTS = [[5, 9, 2], [7, 7, 30, 4, 11]]


def _lora(base):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)).eval()


def _case(kind):
    if kind == "two":
        # 512 ids: few enough candidates for the sparse reference projection, whose forward
        # is what gets compiled (engine.CompiledStep)
        return (tiny_model("llama", 0, 512), tiny_model("llama", 1, 512)), AAD(0.1)
    if kind == "lora":
        return (_lora(tiny_model("qwen2", 2, 512)),), AAD(0.2)
    if kind == "prompt":
        return (tiny_model("qwen3", 3),), OPAD(1.0, principle_ids=[30, 31, 32])
    return (tiny_model("olmo2", 4),), Greedy()


@pytest.mark.parametrize("kind", ["two", "lora", "prompt", "single"])
def test_compiled_step_gives_the_eager_tokens(kind):
    models, rule = _case(kind)
    eager = Decoder(*models, max_batch_size=2, max_seq_len=48, compile=False)
    want = eager.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=12)
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, compile=True)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=12)
    assert got.stats["compiled"] and not want.stats["compiled"]
    if kind == "two":
        assert got.stats["reference_head"]["sparse_steps"] > 0
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    # a second call reuses the compiled step (no compile time) and still matches
    again = dec.generate(input_ids=PROMPTS[::-1], rule=rule, max_new_tokens=12)
    assert again.stats["compiled"] and again.stats["capture_ms"] < got.stats["capture_ms"]
    assert again.tokens == want.tokens[::-1]
    if kind == "two":
        assert want.tokens == naive_decode(aad_pick(0.1), models, PROMPTS, 12)


def _no_eos(model):
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("kind", ["single", "two"])
def test_one_compiled_step_per_read_length_switches_as_rows_grow(kind, monkeypatch):
    """max_seq_len 128 with the ladder 32, 64, 128: the compiled step of each rung reads that
    many slots, the batch moves to 64 when its rows pass slot 31, never reaches 128."""
    monkeypatch.setitem(cache.MIN_READ, "cpu", 32)
    made, seen = [], []

    class Spied(engine.CompiledStep):
        def __init__(self, pair, *a):
            made.append(pair.runners[0].fixed_len)  # the length it is compiled for
            super().__init__(pair, *a)
    monkeypatch.setattr(engine, "CompiledStep", Spied)
    update = StaticKVCache.update

    @torch._dynamo.allow_in_graph  # runs when the graph is traced, unseen by dynamo's guards
    def note(keys):
        seen.append((torch.compiler.is_compiling(), keys.shape[2]))
        return keys

    def spy(self, k, v, layer_idx, *a, **kw):  # what the traced step attends over
        keys, values = update(self, k, v, layer_idx, *a, **kw)
        if layer_idx == 0 and k.shape[2] == 1:
            keys = note(keys)
        return keys, values
    monkeypatch.setattr(StaticKVCache, "update", spy)
    if kind == "two":
        models, rule = (_no_eos(tiny_model("llama", 0, 512)),
                        _no_eos(tiny_model("llama", 1, 512))), AAD(0.1)
    else:
        models, rule = (_no_eos(tiny_model("olmo2", 4)),), Greedy()
    kw = dict(max_batch_size=2, max_seq_len=128)
    want = Decoder(*models, compile=False, **kw).generate(input_ids=PROMPTS, rule=rule,
                                                          max_new_tokens=40)
    got = Decoder(*models, compile=True, **kw).generate(input_ids=PROMPTS, rule=rule,
                                                        max_new_tokens=40)
    assert got.stats["compiled"] and got.tokens == want.tokens
    if kind == "two":
        assert got.stats["reference_head"]["sparse_steps"] > 0
        assert want.tokens == naive_decode(aad_pick(0.1), models, PROMPTS, 40, stops=())
    # width 5: step k writes slot 5 + k, so 27 steps read 32 slots and 12 read 64
    assert got.stats["read_lengths"] == {32: 27, 64: 12}
    assert want.stats["read_lengths"] == {45: 39}  # eager: its 45 slots, rounded up to 64
    assert made == [32, 64]
    assert {n for traced, n in seen if traced} == {32, 64}


def test_compiled_sampled_rule_reproduces_the_eager_samples():
    models = (tiny_model("mistral", 5), tiny_model("mistral", 6))
    rule = EFT(2.0, temperature=0.8, top_p=0.9, seed=7)
    want = Decoder(*models, max_batch_size=2, max_seq_len=48, compile=False).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    got = Decoder(*models, max_batch_size=2, max_seq_len=48, compile=True).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    assert got.stats["compiled"] and got.tokens == want.tokens


def test_auto_compiles_only_where_the_record_says_it_pays(tmp_path, monkeypatch):
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", str(tmp_path / "t.json"))
    tuning.forget()
    dec = Decoder(tiny_model("llama", 0), tiny_model("llama", 1), max_batch_size=2,
                  max_seq_len=48, threads="keep")  # the record is per thread count
    assert dec.compile == "auto"
    key = dec._compile_key("ar", 2)
    assert not dec._wants_compile(key, 1000)  # nothing measured: eager
    out = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    assert not out.stats["compiled"]
    assert tuning.cached(key)["eager_ms"] == out.stats["ms_per_token"]  # the decode recorded it
    tuning.store(key, {"eager_ms": 10.0, "compiled_ms": 8.0, "compile_s": 2.0})
    assert not dec._wants_compile(key, 16)    # 16 steps save 32 ms < 2 s of compiling
    assert dec._wants_compile(key, 2000)      # 2000 steps save 4 s
    # one compile per read length the call reaches: 48 slots on CPU are the ladder (48,)...
    assert dec._wants_compile(key, 2000, longest=40)
    # ...4096 slots the ladder 64, 128, ..., 4096
    big = Decoder(tiny_model("llama", 0), tiny_model("llama", 1), max_batch_size=2,
                  max_seq_len=4096)
    tuning.store(key, {"eager_ms": 10.0, "compiled_ms": 8.0, "compile_s": 1.0})
    assert not big._wants_compile(key, 2000, longest=40)  # 64 .. 2048: 6 s > 4 s saved
    assert big._wants_compile(key, 2000, longest=1000)    # 1024, 2048, 4096: 3 s < 4 s
    tuning.store(key, {"eager_ms": 10.0, "compiled_ms": 9.8, "compile_s": 0.0})
    assert not dec._wants_compile(key, 10 ** 6)  # within noise: never
    for forced in (True, False):
        d = Decoder(tiny_model("llama", 0), compile=forced)
        assert d._wants_compile(d._compile_key("a", 1), 2) is forced
    with pytest.raises(ValueError, match="compile must be"):
        Decoder(tiny_model("llama", 0), compile="yes")
    tuning.forget()


def test_observations_keep_the_latest_of_each(tmp_path, monkeypatch):
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", str(tmp_path / "t.json"))
    tuning.forget()
    tuning.observe_step("k", False, 5.0, None)
    tuning.observe_step("k", True, 3.0, 12.0)
    tuning.observe_step("k", False, 4.0, None)
    tuning.forget()  # read back from the file
    assert tuning.cached("k") == {"eager_ms": 4.0, "compiled_ms": 3.0, "compile_s": 12.0}
    tuning.forget()
