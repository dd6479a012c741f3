"""The engine's own one-token forward (fast_decoder.FastDecoder) and its measured choice.

Forced on (``AAD_FAST_DECODER=fast``), every pair kind on every architecture it covers gives the
naive loop's tokens; its logits are the model's own forward's; ``forward.decoder_pays`` keeps the
model's forward unless the engine's is faster (fake timings), caches the answer, and the switch
forces either path."""
import copy

import pytest
import torch

from aad_fast import AAD, OPAD, Decoder, Greedy, tuning
from aad_fast.model.forward import TYPES, FastDecoder
from aad_fast.model.runner import Runner, engine_view
from conftest import PROMPTS, aad_pick, naive_decode, random_lora, tiny_model
from aad_fast.model import forward

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "olmo2"]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("AAD_FAST_DECODER", "fast")


def _uses_fast(dec, n, streams="ar"):
    return all(r.fast is not None for r in dec._pair(n, streams, 40).runners)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_model_aad_with_the_engine_forward_equals_the_naive_loop(fast, arch):
    assert arch in TYPES
    a, r = tiny_model(arch, 0), tiny_model(arch, 1)
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10).tokens
        assert _uses_fast(dec, 3)
    assert got == naive_decode(aad_pick(0.1), (a, r), PROMPTS, 10)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_pair_with_the_engine_forward_equals_the_merged_adapter(fast, arch):
    base = tiny_model(arch, 0, 512)
    pm = random_lora(copy.deepcopy(base), seed=2)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    with Decoder(pm, max_batch_size=4, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10).tokens
        assert _uses_fast(dec, 3)
    assert got == naive_decode(aad_pick(0.1), (merged, base), PROMPTS, 10)


def test_prompt_pair_and_single_stream_with_the_engine_forward(fast):
    model = tiny_model("olmo2", 3)
    principle = [30, 31, 32]
    with Decoder(model, max_batch_size=4, max_seq_len=48) as dec:
        opad = dec.generate(input_ids=PROMPTS, rule=OPAD(1.0, principle_ids=principle),
                            max_new_tokens=8).tokens
        greedy = dec.generate(input_ids=PROMPTS, rule=Greedy(), max_new_tokens=8).tokens
        assert _uses_fast(dec, 3) and _uses_fast(dec, 3, "a")
    with Decoder(model, max_batch_size=4, max_seq_len=48, forward="hf") as dec:
        want_opad = dec.generate(input_ids=PROMPTS, rule=OPAD(1.0, principle_ids=principle),
                                 max_new_tokens=8).tokens
        assert not _uses_fast(dec, 3)
    assert opad == want_opad
    assert greedy == naive_decode(lambda a, r, t, h: int(a.argmax()), (model,), PROMPTS, 8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_forward_logits_are_the_models(arch, dtype, tol):
    """One decode step after a prefill: the engine forward's logits against the model's own
    forward over the same cache state (float32: summation order only; bf16: its rounding)."""
    model = tiny_model(arch, 0).to(dtype)
    runs = [Runner(model, 2, 24) for _ in range(2)]
    ids = torch.tensor([[0, 1, 5, 9, 7], [1, 20, 21, 22, 23]])
    real = torch.tensor([[False, True, True, True, True], [True] * 5])
    fast = FastDecoder.of(runs[1].model)
    runs[0].fast, runs[1].fast = None, fast
    with torch.inference_mode():
        outs = []
        for run in runs:
            run.prefill(ids, real)
            outs.append([run.step(torch.tensor([4, 8])).float() for _ in range(3)])
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_architectures_without_an_engine_forward_keep_the_models():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)).eval()
    view, _ = engine_view(model, 1)
    assert FastDecoder.of(view) is None


def test_measurement_keeps_the_models_forward_unless_the_engine_is_faster(monkeypatch):
    tuning.forget()
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", "off")
    monkeypatch.delenv("AAD_FAST_DECODER", raising=False)
    view, _ = engine_view(tiny_model("llama", 0), 3)
    fd = FastDecoder.of(view)
    calls = []

    def timer(fast_ms):
        def measure(v, f, rows):
            calls.append(rows)
            return {"plain": 10.0, "fast": fast_ms, "stable": True}
        return measure
    assert not forward.decoder_pays(view, fd, 3, measure=timer(12.0))  # slower: the model's
    assert not forward.decoder_pays(view, fd, 3, measure=timer(5.0))   # cached: not re-timed
    assert calls == [3]
    assert not forward.decoder_pays(view, fd, 4, measure=timer(9.8))   # within noise
    assert forward.decoder_pays(view, fd, 5, measure=timer(5.0))       # faster beyond noise
    unstable = lambda v, f, rows: {"plain": 10.0, "fast": 5.0, "stable": False}
    assert not forward.decoder_pays(view, fd, 6, measure=unstable)     # a busy machine
    monkeypatch.setenv("AAD_FAST_DECODER", "fast")
    assert forward.decoder_pays(view, fd, 3, measure=timer(12.0))
    monkeypatch.setenv("AAD_FAST_DECODER", "hf")
    assert not forward.decoder_pays(view, fd, 5, measure=timer(5.0))
    assert not forward.decoder_pays(view, None, 5)
    monkeypatch.setenv("AAD_FAST_DECODER", "always")
    with pytest.raises(ValueError, match="AAD_FAST_DECODER"):
        forward.decoder_pays(view, fd, 3, measure=timer(5.0))
    tuning.forget()


def test_compiled_step_over_the_engine_forward_gives_the_eager_tokens(fast):
    """One compile (~10 s here): the two-model AAD step, sparse reference head included."""
    a, r = tiny_model("llama", 0, 512), tiny_model("llama", 1, 512)
    want = Decoder(a, r, max_batch_size=2, max_seq_len=48, compile=False).generate(
        input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=10)
    dec = Decoder(a, r, max_batch_size=2, max_seq_len=48, compile=True)
    got = dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=10)
    assert got.stats["compiled"] and _uses_fast(dec, 2)
    assert got.tokens == want.tokens


def test_decoder_forward_argument_forces_each_path_and_is_reported():
    a, r = tiny_model("qwen2", 0), tiny_model("qwen2", 1)
    outs = {}
    for mode in ("hf", "fast"):
        with Decoder(a, r, max_batch_size=4, max_seq_len=48, forward=mode) as dec:
            outs[mode] = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
    assert outs["hf"].stats["forward"] == "hf" and outs["fast"].stats["forward"] == "fast"
    assert outs["hf"].tokens == outs["fast"].tokens
    with pytest.raises(ValueError, match="forward"):
        Decoder(a, r, forward="engine")
