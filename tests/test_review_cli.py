"""Fixes from the second review: the toy stop ids on another model's tokenizer (make-pairs on
your own models), the toy commands' size arguments checked before a model loads, BeamAAD's
stats carrying the same path keys as the per-token rules."""
import pytest
from conftest import PROMPTS, tiny_model

from aad_fast import AAD, BeamAAD, Decoder
from aad_fast.cli import main


def word_tokenizer(unk: str | None, eos: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(20)}
    t = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {k: v for k, v in (("unk_token", unk), ("eos_token", eos)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=t, **kw)


@pytest.mark.parametrize("unk", [None, "w1"])
def test_toy_stop_ids_on_another_tokenizer_are_its_eos_only(unk):
    """No ``<user>`` token there: before, it became ``None`` (a crash after the models loaded)
    or the unknown token's id (every completion cut at the first unknown word)."""
    from aad_fast.toy.tokenizer import stop_ids
    assert stop_ids(word_tokenizer(unk, "w9")) == [9]
    assert stop_ids(word_tokenizer(unk, None)) == []


def test_toy_stop_ids_on_the_toy_tokenizer():
    from aad_fast.toy.assets import load_default_pair
    from aad_fast.toy.tokenizer import USER, stop_ids
    tok = load_default_pair("cpu")[2]
    assert stop_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(USER)]


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--batch-size", "0"], "--batch-size: must be an int >= 1, got 0"),
    (["evaluate", "--limit", "-166"], "--limit: must be an int >= 0, got -166"),
    (["evaluate", "--max-new-tokens", "x"], "--max-new-tokens: must be an int >= 1, got 'x'"),
    (["make-pairs", "--out", "o.jsonl", "--batch-size", "-1"], "--batch-size: must be an int"),
])
def test_toy_command_sizes_are_checked_before_a_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_beam_stats_carry_the_path_keys_of_the_per_token_rules():
    dec = Decoder(tiny_model("llama", 0), tiny_model("llama", 1), max_batch_size=4,
                  max_seq_len=40)
    beam = dec.generate(input_ids=PROMPTS[:2], rule=BeamAAD(2), max_new_tokens=4).stats
    aad = dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=4).stats
    assert set(aad) - set(beam) == {"capture_ms", "reference_head"}
    assert set(beam) - set(aad) == {"num_beams"}
    assert set(beam["linear"]) == set(aad["linear"])  # every weight shape (rows differ)
    assert beam["forward"] in ("fast", "hf")
    assert sum(beam["read_lengths"].values()) == beam["steps"] - 1
