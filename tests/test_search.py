"""Beam search and best-of-n pieces (``aad_fast/search.py``): the Decoder's backend, the
device bookkeeping's error path and its run on a bare scheduler, and a picker that is loaded
once and never changed. Beam requests sharing a scheduler: tests/test_beam_scheduler.py."""
import copy

import pytest
import torch
from conftest import PROMPTS, VOCAB, tiny_model

from aad_fast import BeamAAD, BestOfN, Decoder


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


def tiny_picker(seed=3, pad_token_id=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1,
        pad_token_id=pad_token_id)).eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w2")


def test_beam_uses_the_decoders_backend_and_says_so(models):
    rule = BeamAAD(3, 0.2)
    runs = {}
    for be in ("torch", "cpp"):
        with Decoder(*models, max_batch_size=16, max_seq_len=48, backend=be) as dec:
            runs[be] = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=6)
    assert runs["torch"].stats["backend"] == "torch" and runs["cpp"].stats["backend"] == "cpp"
    assert runs["torch"].tokens == runs["cpp"].tokens


def test_beam_with_no_candidate_raises_naming_the_row(models):
    ma, mr = models
    bad = copy.deepcopy(ma)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    dec = Decoder(bad, mr, max_batch_size=8, max_seq_len=40)
    with pytest.raises(RuntimeError, match="row 0: no AAD candidate"):
        dec.generate(input_ids=PROMPTS[:2], rule=BeamAAD(2, 0.1), max_new_tokens=4)


def test_picker_path_is_loaded_once_per_decoder(models, tmp_path, monkeypatch):
    import transformers
    tiny_picker().save_pretrained(tmp_path / "picker")
    calls = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        counting)
    dec = Decoder(*models, max_batch_size=8, max_seq_len=40)
    rule = BestOfN(2, picker=str(tmp_path / "picker"), seed=1)
    first = dec.generate(input_ids=PROMPTS[:2], rule=rule, max_new_tokens=5)
    again = dec.generate(input_ids=PROMPTS[:2], rule=rule, max_new_tokens=5)
    assert len(calls) == 1
    assert first.tokens == again.tokens and first.scores == again.scores


def test_a_callers_picker_and_tokenizer_are_left_as_they_were(models):
    tok = word_tokenizer()
    assert tok.pad_token is None
    picker = tiny_picker().train()  # training mode: dropout is 0 here, the flag must survive
    dec = Decoder(*models, tokenizer=tok, max_batch_size=8, max_seq_len=40)
    got = dec.generate(input_ids=PROMPTS[:2], rule=BestOfN(2, picker=(picker, tok), seed=2),
                       max_new_tokens=5)
    assert tok.pad_token is None and picker.training
    assert next(picker.parameters()).device.type == "cpu"
    for p, prompt in enumerate(PROMPTS[:2]):
        for c in got.candidates[p]:
            # one tokenizer for both (and no EOS): the ids themselves
            with torch.no_grad():
                direct = picker.eval()(torch.tensor([prompt + c["tokens"]])).logits[0, 0]
            picker.train()
            assert c["score"] == pytest.approx(float(direct), rel=1e-5, abs=1e-6)


def test_a_picker_with_its_own_tokenizer_scores_the_text_in_one_piece_and_its_eos(models):
    """The decoder's ids decoded in one piece (a prompt's last word and the completion's first
    are not glued together, as decoding them apart did) and tokenized by the picker's own
    tokenizer, which maps words to other ids, then that tokenizer's EOS."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = word_tokenizer()
    vocab = {f"w{i}": (i * 7) % VOCAB for i in range(VOCAB)}  # another id per word
    # special tokens are matched inside words: "w0" and "w60" are the prefix of no other word
    t = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    picker_tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0", eos_token="w60")
    picker = tiny_picker()
    dec = Decoder(*models, tokenizer=tok, max_batch_size=8, max_seq_len=40)
    got = dec.generate(input_ids=PROMPTS[:2], rule=BestOfN(2, picker=(picker, picker_tok),
                                                             seed=2), max_new_tokens=5)
    for p, prompt in enumerate(PROMPTS[:2]):
        for c in got.candidates[p]:
            want = [vocab[f"w{i}"] for i in prompt + c["tokens"]] + [vocab["w60"]]
            with torch.no_grad():
                direct = picker(torch.tensor([want])).logits[0, 0]
            assert c["score"] == pytest.approx(float(direct), rel=1e-5, abs=1e-6)


def test_the_shipped_picker_scores_the_conversation_it_was_trained_on():
    """The embedded picker was trained (TRL RewardTrainer) on chat-rendered conversations that
    end with EOS: BestOfN scores exactly that rendering. Decoding prompt and completion apart
    with the chat markers skipped, as before, ranked "it is seven ." above "... is five ."."""
    from aad_fast.toy.assets import load_default_pair
    sft, dpo, tok, picker, picker_tok = load_default_pair("cpu")
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=4, max_seq_len=96)
    q = "what is 2 plus 3 ?"
    got = dec.generate([q], rule=BestOfN(2, picker=(picker, picker_tok), seed=1), chat=True,
                       max_new_tokens=16)
    for c in got.candidates[0]:
        conv = [{"role": "user", "content": q},
                {"role": "assistant", "content": tok.decode(c["tokens"])}]
        ids = tok.apply_chat_template(conv, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            direct = picker(torch.tensor([list(ids)])).logits[0, 0]
        assert c["score"] == pytest.approx(float(direct), rel=1e-5, abs=1e-6)


def test_picker_without_pad_id_scores_each_sequence_alone(models):
    picker = tiny_picker(pad_token_id=None)
    dec = Decoder(*models, max_batch_size=8, max_seq_len=40)
    got = dec.generate(input_ids=PROMPTS[:2], rule=BestOfN(3, picker=picker, seed=4),
                       max_new_tokens=5)
    for p, prompt in enumerate(PROMPTS[:2]):
        for c in got.candidates[p]:
            with torch.no_grad():
                direct = picker(torch.tensor([prompt + c["tokens"]])).logits[0, 0].item()
            assert c["score"] == pytest.approx(direct, rel=1e-5, abs=1e-6)


def test_a_picker_on_another_device_is_refused_not_moved(models):
    picker = tiny_picker().to("meta")
    dec = Decoder(*models, max_batch_size=8, max_seq_len=40)
    with pytest.raises(ValueError, match=r"picker is on meta .* does not move"):
        dec.generate(input_ids=PROMPTS[:1], rule=BestOfN(2, picker=picker), max_new_tokens=3)
    assert next(picker.parameters()).device.type == "meta"


def test_best_of_n_past_max_batch_size_is_each_seed_decoded_alone(models):
    """3 prompts x 4 samples through 4 rows: the samples are ordinary requests that the
    scheduler refills rows with, and each equals its prompt decoded alone with seed + j."""
    from aad_fast import Mix
    picker = tiny_picker()
    dec = Decoder(*models, max_batch_size=4, max_seq_len=40)
    rule = BestOfN(4, top_p=0.8, picker=picker, seed=7)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=7, stop=[5])
    assert got.stats["n"] == 4 and got.stats["batch"] == 12 and got.stats["rows"] == 4
    for p, prompt in enumerate(PROMPTS):
        cands = got.candidates[p]
        for j, c in enumerate(cands):
            alone = dec.generate(input_ids=[prompt], max_new_tokens=7, stop=[5],
                                 rule=Mix(1.0, 0.0, temperature=1.0, top_p=0.8, seed=7 + j))
            assert (c["tokens"], c["finish_reason"]) == (alone.tokens[0],
                                                         alone.finish_reason[0])
        best = max(range(4), key=lambda j: (cands[j]["score"], -j))
        assert got.tokens[p] == cands[best]["tokens"]
        assert got.finish_reason[p] == cands[best]["finish_reason"]
        assert got.scores[p] == cands[best]["score"]


def test_beam_search_on_a_bare_pair_with_padding_rows_matches_brute_force(models):
    """``search.BeamSearch`` on a ``Scheduler`` needs only a pair (no Decoder): 3 prompts x 3
    beams on a pair of 8 rows (2 slots, 2 padding rows as under a bucket), the third prompt
    refilling the first finished slot."""
    from conftest import brute_beam

    from aad_fast.decode import search
    from aad_fast.model.pairs import TwoModelPair
    from aad_fast.decode.scheduler import Request, Scheduler
    pair = TwoModelPair(*models, 8, 48)
    rule = BeamAAD(3, 0.2, length_penalty=1.0)
    bs = search.BeamSearch(rule, 8, 6, 1, VOCAB, None, "cpu")
    assert bs.groups == 2
    sched = Scheduler(pair, bs, None, rule, check_every=4)
    hs = [sched.submit(Request(ids_a=p, max_new_tokens=6, stop_ids=(3,))) for p in PROMPTS]
    sched.run_until_idle()
    assert [h.tokens for h in hs] == [brute_beam(models, p, 3, 0.2, None, 6, 1.0)[0]
                                      for p in PROMPTS]
    assert hs[2].admitted > min(hs[0].finished, hs[1].finished)


@pytest.mark.parametrize("module,never", [("search", {"scheduler"}), ("scheduler", {"search"})])
def test_no_import_circle(module, never):
    """decode/search.py and decode/scheduler.py, imports inside functions included, never reach
    each other (the scheduler takes a BeamSearch it is given); that neither reaches the Decoder
    above them is tests/test_layers.py's."""
    import ast
    import pathlib

    import aad_fast
    root = pathlib.Path(aad_fast.__file__).parent / "decode"
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        tree = ast.parse((root / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else \
                    [a.name for a in node.names]
                for name in names:
                    if name not in seen and (root / f"{name}.py").exists():
                        seen.add(name)
                        todo.append(name)
    assert not seen & never, sorted(seen)
