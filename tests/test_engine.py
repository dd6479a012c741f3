"""The decode engine against the naive docs/rules.md loop: architectures, ragged batches, stop
tokens, pairs (two models, LoRA, paths), Hugging Face interop, bad input."""
import copy

import pytest
import torch
from conftest import EOS, PROMPTS, aad_pick, naive_decode, tiny_model

from aad_fast import AAD, AADLogitsProcessor, BeamAAD, Decoder, Greedy


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "olmo2"])
def test_aad_two_models_matches_naive_loop(arch):
    ma, mr = tiny_model(arch, 0), tiny_model(arch, 1)
    dec = Decoder(ma, mr, max_batch_size=4, max_seq_len=40)
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
    want = naive_decode(aad_pick(0.1), (ma, mr), PROMPTS, 12)
    assert got.tokens == want
    assert got.finish_reason == ["stop" if len(w) < 12 else "length" for w in want]


def test_each_row_equals_decoding_it_alone(pair):
    dec = Decoder(*pair, max_batch_size=4, max_seq_len=40)
    batch = dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=10)
    for p, toks in zip(PROMPTS, batch.tokens):
        assert dec.generate(input_ids=[p], rule=AAD(0.2), max_new_tokens=10).tokens == [toks]


def test_stop_ids_end_rows_and_are_excluded(pair):
    dec = Decoder(*pair, max_batch_size=4, max_seq_len=40)
    free = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10, stop=[])
    stop_tok = free.tokens[0][3]
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10, stop=[stop_tok])
    want = naive_decode(aad_pick(0.1), pair, PROMPTS, 10, stops=(EOS, stop_tok))
    assert got.tokens == want
    assert got.tokens[0] == free.tokens[0][:3] and got.finish_reason[0] == "stop"


def test_greedy_runs_one_stream(pair):
    dec = Decoder(*pair, max_batch_size=4, max_seq_len=40)
    for stream, model in (("a", pair[0]), ("r", pair[1])):
        got = dec.generate(input_ids=PROMPTS, rule=Greedy(stream), max_new_tokens=8)
        want = naive_decode(lambda a, r, t, h: int(a.argmax()), (model,), PROMPTS, 8)
        assert got.tokens == want
        assert got.stats["pair"] == f"single:{stream}"


def _lora(base, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                            "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.4)  # PEFT starts B at 0: make the adapter matter
    return pm.eval()


def test_lora_pair_equals_two_model_pair_with_merged_adapter():
    base = tiny_model("llama", 0)
    sft = copy.deepcopy(base)
    pm = _lora(base)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    x = torch.tensor([PROMPTS[0], PROMPTS[0]])
    with Decoder(pm, max_batch_size=4, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=12)
        assert got.stats["pair"] == "lora"
        greedy_a = dec.generate(input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=8).tokens
        greedy_r = dec.generate(input_ids=PROMPTS, rule=Greedy("r"), max_new_tokens=8).tokens
        # the PeftModel itself is untouched between engine calls: adapter on every row
        with torch.no_grad():
            torch.testing.assert_close(pm(x).logits, merged(x).logits, rtol=1e-4, atol=1e-4)
    assert got.tokens == naive_decode(aad_pick(0.1), (merged, sft), PROMPTS, 12)
    argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731
    assert greedy_a == naive_decode(argmax, (merged,), PROMPTS, 8)
    assert greedy_r == naive_decode(argmax, (sft,), PROMPTS, 8)


@pytest.mark.parametrize("extra,match", [(dict(lora_bias=True), "lora_B bias"),
                                         (dict(modules_to_save=["lm_head"]), "modules_to_save")])
def test_lora_adapters_the_shared_pair_cannot_compute_are_refused(extra, match):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(tiny_model("llama", 0),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra)).eval()
    with pytest.raises(ValueError, match=match):
        Decoder(pm, max_batch_size=1, max_seq_len=40)


@pytest.mark.parametrize("layout", ["plain", "few_row", "packed"])
def test_engine_view_shares_weights_and_leaves_the_model_alone(layout):
    from peft.tuners.lora import LoraLayer

    from aad_fast.model.cpu_linear import FewRowLinear, PackedLinear, packed_supported
    if layout == "packed" and not packed_supported():
        pytest.skip("this torch build has no oneDNN packed linear")
    from aad_fast.model.lora_rows import RowLoRA, RowLoRALinear
    from aad_fast.model.runner import engine_view
    pm = _lora(tiny_model("llama", 0))
    base = pm.get_base_model()
    before = [type(m) for m in base.modules()]
    view, plan = engine_view(base, 2, RowLoRA(pm), lora_rows=1, cpu_linear=layout)
    assert [type(m) for m in base.modules()] == before  # the user's model is untouched
    assert isinstance(base.model.layers[0].self_attn.q_proj, LoraLayer)
    ptrs = {p.data_ptr() for p in base.parameters()}
    assert ptrs >= {p.data_ptr() for p in view.parameters()}  # no weight copied
    kinds = {type(m) for m in view.modules()}
    assert RowLoRALinear in kinds and not any(issubclass(k, LoraLayer) for k in kinds)
    assert (FewRowLinear in kinds) == (layout == "few_row")
    assert (PackedLinear in kinds) == (layout == "packed")
    assert {r["choice"] for r in plan.values()} == {layout}
    # row 0 gets the adapter, row 1 does not: the merged model and the base model
    x = torch.tensor([[5, 9, 2, 7], [5, 9, 2, 7]])
    with torch.no_grad():
        got = view(x).logits
        with pm.disable_adapter():
            plain = pm(x[:1]).logits
        adapted = pm(x[:1]).logits
    torch.testing.assert_close(got[:1], adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, plain, rtol=1e-3, atol=1e-3)  # the adapter does something


def test_merged_lora_adapter_is_refused():
    pm = _lora(tiny_model("llama", 0))
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged into its base weights"):
        Decoder(pm, max_batch_size=1, max_seq_len=40)


def test_paths_two_models_and_adapter_dir(tmp_path, pair):
    ma, mr = pair
    ma.save_pretrained(tmp_path / "a")
    mr.save_pretrained(tmp_path / "r")
    got = Decoder(tmp_path / "a", tmp_path / "r", max_batch_size=4, max_seq_len=40).generate(
        input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
    assert got.tokens == naive_decode(aad_pick(0.1), pair, PROMPTS, 8)

    base = tiny_model("llama", 2)
    base.save_pretrained(tmp_path / "sft")
    pm = _lora(copy.deepcopy(base))
    pm.save_pretrained(tmp_path / "dpo")
    merged = pm.merge_and_unload().eval()
    dec = Decoder(str(tmp_path / "dpo"), str(tmp_path / "sft"), max_batch_size=4, max_seq_len=40)
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
    assert dec.kind == "lora"
    assert got.tokens == naive_decode(aad_pick(0.1), (merged, base), PROMPTS, 8)


def test_logits_processor_equals_decoder(pair):
    from transformers import LogitsProcessorList
    ma, mr = pair
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    out = ma.generate(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False,
                      logits_processor=LogitsProcessorList([AADLogitsProcessor(mr, 0.1)]),
                      max_new_tokens=10, pad_token_id=0, eos_token_id=EOS)
    hf = []
    for row in out[:, width:].tolist():
        hf.append(row[: row.index(EOS)] if EOS in row else row)
    dec = Decoder(ma, mr, max_batch_size=4, max_seq_len=40)
    assert dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10).tokens == hf


def test_tensor_input_ids_with_attention_mask(pair):
    dec = Decoder(*pair, max_batch_size=4, max_seq_len=40)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    got = dec.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=6)
    assert got.tokens == dec.generate(input_ids=PROMPTS, max_new_tokens=6).tokens


# ----------------------------------------------------------------------------------- bad input
def test_bad_arguments_name_themselves(pair, tmp_path):
    dec = Decoder(*pair, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="alpha"):
        AAD(1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(input_ids=[[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"input_ids\[0\] is an empty prompt"):
        dec.generate(input_ids=[[]])
    with pytest.raises(ValueError, match="max_seq_len=16"):
        dec.generate(input_ids=[[1] * 10], max_new_tokens=8)
    with pytest.raises(ValueError, match="num_beams=3 exceeds max_batch_size=2"):
        dec.generate(input_ids=PROMPTS, rule=BeamAAD(3, 0.1), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        dec.generate(input_ids=[[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts= needs a tokenizer"):
        dec.generate("hello")
    with pytest.raises(ValueError, match="aligned=.*no such file"):
        Decoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model directory"):
        Decoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="max_batch_size"):
        Decoder(*pair, max_batch_size=0)


def test_all_nan_aligned_row_raises_naming_the_row(pair):
    ma, mr = pair
    bad = copy.deepcopy(ma)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    dec = Decoder(bad, mr, max_batch_size=4, max_seq_len=40)
    with pytest.raises(RuntimeError, match=r"row\(s\) \[0, 1\]"):
        dec.generate(input_ids=PROMPTS[:2], max_new_tokens=4)


def test_adapter_with_wrong_reference_is_refused():
    base = tiny_model("llama", 0)
    pm = _lora(copy.deepcopy(base))
    other = tiny_model("llama", 5)
    with pytest.raises(ValueError, match="not the base model"):
        Decoder(pm, other)
    Decoder(pm, base).close()  # the true base is accepted


def test_different_tokenizers_are_refused(pair, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="u"))
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="u")

    ma, mr = pair
    ma.save_pretrained(tmp_path / "a")
    mr.save_pretrained(tmp_path / "r")
    tok(["u", "x", "y"]).save_pretrained(tmp_path / "a")
    tok(["u", "y", "x"]).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match="tokenizers of .*a.* and .*r.* differ"):
        Decoder(tmp_path / "a", tmp_path / "r")


def test_import_loads_nothing():
    import subprocess
    import sys
    code = ("import sys, aad_fast; bad = [m for m in ('triton', 'aad_fast._C', 'aad_fast._cuda', "
            "'transformers', 'peft') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["two", "lora"])
def test_cuda_graph_step_equals_eager(kind):
    ma, mr = tiny_model("llama", 0).cuda(), tiny_model("llama", 1).cuda()
    args = (ma, mr) if kind == "two" else (_lora(copy.deepcopy(ma)).cuda(),)
    eager = Decoder(*args, max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    want = eager.generate(input_ids=PROMPTS, max_new_tokens=20).tokens
    eager.close()
    graphed = Decoder(*args, max_batch_size=4, max_seq_len=64, cuda_graphs=True)
    for _ in range(2):  # capture, then replay the captured graph on a second call
        got = graphed.generate(input_ids=PROMPTS, max_new_tokens=20)
        assert got.stats["cuda_graphs"] is True
        assert got.tokens == want


def test_the_cache_goes_under_the_name_the_forward_takes():
    import warnings

    from aad_fast.model.runner import cache_kwarg

    class Old(torch.nn.Module):  # transformers <= 5.23 signature
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            pass

    class New(torch.nn.Module):  # transformers >= 5.24 (past_key_values deprecated)
        def forward(self, input_ids=None, cache=None, **kwargs):
            pass

    assert cache_kwarg(Old) == "past_key_values" and cache_kwarg(New) == "cache"
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument on any version
        got = Decoder(ma, mr, max_batch_size=len(PROMPTS), max_seq_len=40).generate(
            input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=6)
    assert got.tokens == naive_decode(aad_pick(0.1), (ma, mr), PROMPTS, 6)


def test_eager_runners_are_resized_for_each_call(pair):
    """On CPU the eager runners are sized to each call's need: a longer call after a shorter
    one (other streams, other rule) must get a larger cache, not the previous one."""
    ma, mr = pair
    dec = Decoder(ma, mr, max_batch_size=2, max_seq_len=64)
    argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731
    short, long = [[5, 9]], [[5, 9, 2, 7, 7, 30, 4, 11, 12, 13, 14, 15]]
    for prompts, n in ((short, 3), (long, 20), (short, 4), (long, 30)):
        assert dec.generate(input_ids=prompts, rule=AAD(0.1), max_new_tokens=n).tokens == \
            naive_decode(aad_pick(0.1), pair, prompts, n)
        assert dec.generate(input_ids=prompts, rule=Greedy(), max_new_tokens=n).tokens == \
            naive_decode(argmax, (ma,), prompts, n)


def test_models_in_training_mode_are_decoded_in_eval_mode_and_left_training():
    """A caller evaluating mid-training: the engine's views run in eval mode (attention dropout
    0.5 would change every token otherwise) and the caller's models keep their mode, the LoRA
    pair's PeftModel included."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = tiny_config("llama")
        cfg.attention_dropout = 0.5
        models.append(AutoModelForCausalLM.from_config(cfg).float().eval())
    want = naive_decode(aad_pick(0.1), models, PROMPTS, 10)
    pm = _lora(copy.deepcopy(models[0]))
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    want_lora = naive_decode(aad_pick(0.1), (merged, models[0]), PROMPTS, 10)
    for m in models + [pm]:
        m.train()
    with Decoder(*models, max_batch_size=3, max_seq_len=40) as dec:
        assert dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10).tokens == want
    with Decoder(pm, max_batch_size=3, max_seq_len=40) as dec:
        assert dec.generate(input_ids=PROMPTS, rule=AAD(0.1),
                            max_new_tokens=10).tokens == want_lora
    assert all(m.training for m in models) and pm.training
