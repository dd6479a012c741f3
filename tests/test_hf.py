"""hf.py and processor.py: a LoRA adapter's base checked against the reference whichever way each
arrives, relative base paths, and AADLogitsProcessor across generate() calls, padding and modes."""
import copy
import json
import shutil

import pytest
import torch
from conftest import EOS, PROMPTS, tiny_model

from aad_fast import AAD, AADLogitsProcessor, Decoder


def _lora(base, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.4)
    return pm.eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """``sft/`` (the base), ``dpo/`` (an adapter recording sft/ as its base, absolute path) and
    ``other/`` (a different model of the same shapes)."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("lora")
    tiny_model("llama", 0).save_pretrained(root / "sft")
    tiny_model("llama", 7).save_pretrained(root / "other")
    base = AutoModelForCausalLM.from_pretrained(root / "sft", local_files_only=True)
    _lora(base).save_pretrained(root / "dpo")
    cfg = json.loads((root / "dpo" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(root / "sft")
    return root


# ------------------------------------------------------------------------ item 1: wrong reference
def test_adapter_path_with_wrong_reference_path_is_refused(adapter_dirs):
    with pytest.raises(ValueError, match=r"not the base model.*tensor model\.\S+ differs"):
        Decoder(str(adapter_dirs / "dpo"), str(adapter_dirs / "other"))


def test_adapter_path_with_wrong_reference_object_is_refused(adapter_dirs):
    with pytest.raises(ValueError, match=r"not the base model.*tensor model\.\S+ differs"):
        Decoder(str(adapter_dirs / "dpo"), tiny_model("llama", 7))


def test_adapter_object_with_wrong_reference_path_is_refused(adapter_dirs):
    from transformers import AutoModelForCausalLM
    from aad_fast.model.loading import load_adapter
    base = AutoModelForCausalLM.from_pretrained(adapter_dirs / "sft", local_files_only=True)
    pm = load_adapter(base, adapter_dirs / "dpo")
    with pytest.raises(ValueError, match=r"not the base model.*tensor model\.\S+ differs"):
        Decoder(pm, str(adapter_dirs / "other"))
    Decoder(pm, str(adapter_dirs / "sft")).close()  # its true base, as a path


def test_adapter_with_its_true_base_is_accepted_every_way(adapter_dirs):
    with Decoder(str(adapter_dirs / "dpo"), max_seq_len=32) as ref:  # base from its record
        want = ref.generate(input_ids=PROMPTS[:1], max_new_tokens=5).tokens
    for reference in (str(adapter_dirs / "sft"), tiny_model("llama", 0)):
        with Decoder(str(adapter_dirs / "dpo"), reference, max_seq_len=32) as dec:
            assert dec.generate(input_ids=PROMPTS[:1], max_new_tokens=5).tokens == want
    # the check is exact: the base rounded through bfloat16 and back is another model
    rounded = tiny_model("llama", 0).to(torch.bfloat16).float()
    with pytest.raises(ValueError, match="not the base model"):
        Decoder(str(adapter_dirs / "dpo"), rounded)


def test_first_difference_names_the_tensor():
    from aad_fast.model.weights import first_difference
    a, b = tiny_model("llama", 0), tiny_model("llama", 0)
    assert first_difference(a, b) is None
    with torch.no_grad():
        b.model.layers[-1].input_layernorm.weight[3] += 1e-3
    assert "model.layers.1.input_layernorm.weight" in first_difference(a, b)


# --------------------------------------------------------------- item 2: relative recorded base
def test_relative_base_is_resolved_against_the_adapter_dir(tmp_path, monkeypatch):
    """The shipped default_pair/dpo records "../sft". From a directory whose ../sft is another
    model of the same shapes, the adapter must still get its own base."""
    from aad_fast.toy.assets import default_pair_dir, load_default_pair
    root = default_pair_dir()
    assert json.loads((root / "dpo" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../sft"
    shutil.copytree(root / "sft", tmp_path / "sft")  # a decoy: same shapes, other weights
    from transformers import AutoModelForCausalLM
    decoy = AutoModelForCausalLM.from_pretrained(tmp_path / "sft", local_files_only=True)
    with torch.no_grad():
        for p in decoy.parameters():
            p.mul_(1.5)
    decoy.save_pretrained(tmp_path / "sft")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    _, dpo, tok, _, _ = load_default_pair("cpu")
    prompts = ["what is 2 plus 3 ?", "name the capital of peru ."]
    with Decoder(dpo, tokenizer=tok, max_seq_len=64) as dec:
        want = dec.generate(prompts, chat=True, max_new_tokens=8).tokens
    with Decoder(str(root / "dpo"), device="cpu", max_seq_len=64) as dec:
        assert dec.generate(prompts, chat=True, max_new_tokens=8).tokens == want
    # the correct reference, given explicitly, is accepted from here too
    Decoder(str(root / "dpo"), str(root / "sft"), device="cpu").close()


# ------------------------------------------------------------------- item 4: the logits processor
def _hf_aad(ma, proc, ids, mask=None, max_new=6, **kw):
    from transformers import LogitsProcessorList
    kw.setdefault("do_sample", False)
    out = ma.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                      logits_processor=LogitsProcessorList([proc]),
                      max_new_tokens=max_new, pad_token_id=0, eos_token_id=EOS, **kw)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(EOS)] if EOS in r else r for r in rows]


def _dec_aad(pair, prompts, max_new=6):
    with Decoder(*pair, max_batch_size=4, max_seq_len=40) as dec:
        return dec.generate(input_ids=prompts, rule=AAD(0.1), max_new_tokens=max_new).tokens


def test_processor_reused_across_generate_calls_starts_fresh(pair):
    """Call 1 ends on ids of length 3 + 6 - 1 = 8; call 2's prompt has length 9 = 8 + 1, the
    length a stale cache would be continued at."""
    ma, mr = pair
    proc = AADLogitsProcessor(mr, 0.1)
    p1, p2 = [1, 5, 6], [1, 40, 41, 42, 43, 44, 45, 46, 47]
    assert _hf_aad(ma, proc, torch.tensor([p1])) == _dec_aad(pair, [p1])
    assert _hf_aad(ma, proc, torch.tensor([p2])) == _dec_aad(pair, [p2])


def test_processor_handles_a_batch_size_change(pair):
    ma, mr = pair
    proc = AADLogitsProcessor(mr, 0.1)
    two = [[1, 5, 6], [1, 7, 8]]
    assert _hf_aad(ma, proc, torch.tensor(two)) == _dec_aad(pair, two)
    one = [[1, 40, 41, 42, 43, 44, 45, 46, 47]]
    assert _hf_aad(ma, proc, torch.tensor(one)) == _dec_aad(pair, one)


def test_processor_takes_padding_from_the_attention_mask(pair):
    """Unpadded prompts that start with the pad id (0 here, as where pad = BOS) are tokens."""
    ma, mr = pair
    prompts = [[0, 5, 6, 7], [0, 9, 10, 11]]
    assert _hf_aad(ma, AADLogitsProcessor(mr, 0.1), torch.tensor(prompts)) == \
        _dec_aad(pair, prompts)
    # and real padding, marked by the mask, is still padding
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    assert _hf_aad(ma, AADLogitsProcessor(mr, 0.1), ids, mask) == _dec_aad(pair, PROMPTS)


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(do_sample=True),
                                dict(do_sample=True, num_return_sequences=2)])
def test_processor_refuses_modes_it_cannot_do(pair, kw):
    ma, mr = pair
    with pytest.raises(ValueError, match="greedy AAD choices only.*" + next(iter(kw))):
        _hf_aad(ma, AADLogitsProcessor(mr, 0.1), torch.tensor([[1, 5, 6]]), **kw)


def test_processor_outside_generate_needs_the_mask_for_ambiguous_batches(pair):
    ma, mr = pair
    ids = torch.tensor([[0, 5, 6], [1, 7, 8]])
    scores = ma(ids).logits[:, -1].float()
    with pytest.raises(ValueError, match="set_attention_mask"):
        AADLogitsProcessor(mr, 0.1)(ids, scores)
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        AADLogitsProcessor(mr, 0.1).set_attention_mask(torch.full((2, 3), 0.5))
    proc = AADLogitsProcessor(mr, 0.1).set_attention_mask(torch.ones(2, 3, dtype=torch.long))
    got = proc(ids, scores).argmax(1).tolist()
    assert got == [t[0] for t in _dec_aad(pair, ids.tolist(), max_new=1)]


def test_processor_reports_a_nan_reference(pair):
    ma, mr = pair
    bad = copy.deepcopy(mr)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="reference model's logits are all -inf/NaN"):
        _hf_aad(ma, AADLogitsProcessor(bad, 0.1), torch.tensor([[1, 5, 6]]))


def test_processor_with_a_float64_reference(pair):
    ma, mr = pair
    got = _hf_aad(ma, AADLogitsProcessor(copy.deepcopy(mr).double(), 0.1),
                  torch.tensor([[1, 5, 6]]))
    assert got == _dec_aad(pair, [[1, 5, 6]])
