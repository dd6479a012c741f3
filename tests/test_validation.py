"""Bad input where it enters the Python API (issue 11 items 5-7): threads on one Decoder, empty
or whitespace prompts, silently coerced ids and masks, device/dtype/tokenizer arguments, float64
models, and a reference model whose logits are all NaN."""
import copy
import sys
import threading

import pytest
import torch
from conftest import PROMPTS, aad_pick, naive_decode, tiny_model

from aad_fast import AAD, EFT, BeamAAD, Contrastive, Decoder, Greedy, aad_select


@pytest.fixture(scope="module")
def lora_pair():
    from aad_fast.toy.assets import load_default_pair
    _, dpo, tok, _, _ = load_default_pair("cpu")
    return dpo, tok


QUESTIONS = ["what is 2 plus 3 ?", "name the capital of peru .", "what sound does a cow make ?",
             "what is 7 minus 4 ?"]


# ------------------------------------------------------------------------ item 5: two threads
@pytest.mark.parametrize("other", [Greedy("r"), BeamAAD(2), AAD(0.1)],
                         ids=["greedy_r", "beam_aad2", "aad_other_prompts"])
def test_two_threads_on_one_lora_decoder_equal_single_threaded_runs(lora_pair, other):
    """AAD in one thread, another rule (or AAD on other prompts) in the other, on one Decoder
    over a LoRA pair: every result equals the single-threaded run."""
    dpo, tok = lora_pair
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=8, max_seq_len=96, check_every=2)
    kw = dict(chat=True, max_new_tokens=16)
    jobs = {"aad": (AAD(0.1), QUESTIONS), "other": (other, QUESTIONS[::-1][:3])}
    want = {name: dec.generate(qs, rule=rule, **kw).tokens for name, (rule, qs) in jobs.items()}
    got = {name: [] for name in jobs}
    errors = []
    start = threading.Barrier(2)

    def work(name):
        rule, qs = jobs[name]
        try:
            start.wait()
            for _ in range(8):
                got[name].append(dec.generate(qs, rule=rule, **kw).tokens)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so unguarded calls would interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    for name in got:
        assert got[name] == [want[name]] * 8


def test_generate_inside_an_open_stream_is_refused(lora_pair):
    dpo, tok = lora_pair
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=2, max_seq_len=96, check_every=1)
    it = dec.stream("what is 2 plus 3 ?", chat=True, max_new_tokens=12)
    next(it)
    with pytest.raises(RuntimeError, match="already decoding in this thread"):
        dec.generate("what is 2 plus 3 ?", chat=True, max_new_tokens=2)
    it.close()
    dec.generate("what is 2 plus 3 ?", chat=True, max_new_tokens=2)  # free again


# ---------------------------------------------------------------- item 6: messages, not crashes
def test_whitespace_only_prompt_is_refused(lora_pair):
    dpo, tok = lora_pair
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"prompts\[1\]='   ' encodes to no tokens"):
        dec.generate(["hello", "   "], max_new_tokens=2)


def test_empty_prompt_lists_are_refused(pair):
    dec = Decoder(*pair, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match=r"prompts=\[\] is empty"):
        dec.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids has no rows"):
        dec.generate(input_ids=[], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids has no rows"):
        dec.generate(input_ids=torch.zeros((0, 3), dtype=torch.long), max_new_tokens=2)


def test_float_ids_and_fractional_masks_are_refused_not_coerced(pair):
    dec = Decoder(*pair, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match=r"input_ids\[0\] holds 5.7"):
        dec.generate(input_ids=[[1, 5.7]], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold integer ids"):
        dec.generate(input_ids=torch.tensor([[1.0, 5.0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must hold 0 .* got \[0.5\]"):
        dec.generate(input_ids=torch.tensor([[1, 5]]), attention_mask=torch.tensor([[0.5, 1]]),
                     max_new_tokens=2)


def test_stop_string_outside_the_vocabulary_is_text_and_empty_is_refused(lora_pair):
    """A stop string the vocabulary has no token for is matched on the text (it may be made of
    several tokens); it never occurs here, so the decode is the plain one. An empty one is
    refused."""
    dpo, tok = lora_pair
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    assert dec.stops(["zebrafish"])[1] == ("zebrafish",)
    got = dec.generate("what is 2 plus 3 ?", stop=["zebrafish"], max_new_tokens=4)
    assert got.tokens == dec.generate("what is 2 plus 3 ?", max_new_tokens=4).tokens
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        dec.generate("what is 2 plus 3 ?", stop=[""], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop string 'zebrafish' is not in the vocabulary"):
        dec.stop_ids(["zebrafish"])  # stop_ids: single-token strings only


def test_tokenizer_given_as_a_string(tmp_path, pair):
    from aad_fast.toy.tokenizer import build_tokenizer
    with pytest.raises(ValueError, match="tokenizer='gpt2' is not a local tokenizer directory"):
        Decoder(*pair, tokenizer="gpt2")
    build_tokenizer().save_pretrained(tmp_path / "tok")
    with Decoder(*pair, tokenizer=str(tmp_path / "tok")) as dec:
        assert dec.tokenizer is not None and len(dec.tokenizer) == len(build_tokenizer())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_a_message(tmp_path, pair):
    pair[0].save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        Decoder(str(tmp_path / "a"), device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        Decoder(str(tmp_path / "a"), device="gpu")


def test_float64_models_decode_as_the_float32_reference_does(pair):
    """docs/rules.md: the choice is computed in float32 whatever the dtype; the C++ backend takes
    float64 logits as the PyTorch reference does (cast to float32)."""
    a, r = (copy.deepcopy(m).double() for m in pair)
    for rule in (AAD(0.1), EFT(4.0), BeamAAD(2)):
        with Decoder(a, r, max_batch_size=8, max_seq_len=40) as fast, \
                Decoder(a, r, max_batch_size=8, max_seq_len=40, backend="torch") as ref:
            assert fast.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=6).tokens == \
                ref.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=6).tokens
    x, y = torch.randn(4, 61, dtype=torch.float64), torch.randn(4, 61, dtype=torch.float64)
    assert torch.equal(aad_select(x, y, 0.1), aad_select(x, y, 0.1, backend="torch"))


def test_float64_aad_matches_the_naive_loop(pair):
    a, r = (copy.deepcopy(m).double() for m in pair)
    with Decoder(a, r, max_batch_size=4, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=6).tokens
    assert got == naive_decode(aad_pick(0.1), (a, r), PROMPTS, 6)


# ----------------------------------------------------------- item 7: a NaN reference is named
@pytest.mark.parametrize("rule", [AAD(0.1), Contrastive(0.1, 0.5), EFT(4.0), Greedy("r")],
                         ids=["aad", "contrastive", "eft", "greedy_r"])
def test_nan_reference_is_reported_naming_the_reference(pair, rule):
    ma, mr = pair
    bad = copy.deepcopy(mr)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    with Decoder(ma, bad, max_batch_size=4, max_seq_len=40) as dec:
        with pytest.raises(RuntimeError, match=r"row\(s\) \[0, 1\]: the reference model"):
            dec.generate(input_ids=PROMPTS[:2], rule=rule, max_new_tokens=4)
        # the aligned model alone is fine
        dec.generate(input_ids=PROMPTS[:2], rule=Greedy("a"), max_new_tokens=4)
