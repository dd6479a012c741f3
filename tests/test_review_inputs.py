"""Prompt and id input found wrong by the fresh-eyes review (/tmp/review/REPORT.md items 2-6, 8,
11): chat with input_ids, OPAD under a chat template without system messages, CFG's empty
negative prompt, streaming through a split multi-byte character, tokenizers with id gaps or more
ids than the model, learned position tables, numpy ids and BatchEncodings. Tokens are compared
exactly against the naive loop (conftest) or against decoding the row alone."""
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import VOCAB, mix_pick, naive_decode, opad_pick, tiny_config, tiny_model

from aad_fast import AAD, CFG, EFT, OPAD, Decoder, Greedy
from aad_fast.decode.prompt_rows import rule_rows
from aad_fast.rules import CFGMix

CORPUS = ["héllo wörld, ça va? naïve café — 東京 日本語 😀 emoji",
          "the quick brown fox jumps over the lazy dog .",
          "what is 2 plus 3 ? it is five .", "Hello , world ! Don't stop ."] * 20


def byte_tokenizer(template: str | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 style) trained here on ``CORPUS``: no BOS added, every
    byte a token, so random models emit split multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def model_for(tok, seed: int, vocab: int | None = None):
    m = tiny_model("llama", seed, vocab=vocab or len(tok))
    m.config.eos_token_id = m.generation_config.eos_token_id = tok.eos_token_id
    return m


def greedy_pick(vocab=None):
    return lambda a, r, t, hist: int(a[:vocab].argmax())


def contains(seq, sub) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.fixture(scope="module")
def toy():
    from aad_fast.toy.assets import load_default_pair
    sft, _, tok, _, _ = load_default_pair("cpu")
    return sft, tok


# ------------------------------------------------------------------ 2a: chat with input_ids
@pytest.mark.parametrize("rule,two", [(OPAD(1.0, principle="be kind ."), False),
                                      (Greedy(), False), (CFG(1.5), False), (EFT(2.0), True)],
                         ids=["opad", "greedy", "cfg", "eft"])
def test_chat_with_input_ids_is_refused(toy, rule, two):
    """chat=True used to be dropped silently for input_ids (OPAD then ran as greedy)."""
    sft, tok = toy
    dec = Decoder(sft, sft if two else None, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    ids = tok("what is 2 plus 3 ?")["input_ids"]
    with pytest.raises(ValueError, match="chat=True applies to text prompts.*input_ids"):
        dec.generate(input_ids=[ids], rule=rule, chat=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="chat=True applies to text prompts.*input_ids"):
        dec.request(input_ids=ids, rule=rule, chat=True, max_new_tokens=3)
    dec.generate(input_ids=[ids], rule=rule, max_new_tokens=3)  # chat=False: used as given


# ---------------------------------------------------- 2b: a chat template without system turns
QUESTIONS = ["what is 2 plus 3 ?", "what sound does a cow make ?"]
PRINCIPLE = "be very polite ."


def test_opad_chat_template_without_system_puts_the_principle_in_the_user_message(toy):
    """The toy template drops system messages: stream a gets the principle at the start of the
    user message (with a warning), and the tokens are OPAD's on those two prompts, not greedy."""
    sft, tok = toy
    dec = Decoder(sft, tokenizer=tok, max_batch_size=2, max_seq_len=96)
    rule = OPAD(1.0, principle=PRINCIPLE)
    with pytest.warns(UserWarning, match="ignores system messages.*user message"):
        rows = rule_rows(rule, dec.kind, tok, dec.vocab, QUESTIONS, None, None, True)
    plain = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True)["input_ids"] for q in QUESTIONS]
    moved = [tok.apply_chat_template([{"role": "user", "content": f"{PRINCIPLE}\n\n{q}"}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
             for q in QUESTIONS]
    assert rows.r == plain and rows.a == moved
    principle_ids = tok(PRINCIPLE, add_special_tokens=False)["input_ids"]
    assert all(contains(a, principle_ids) and not contains(r, principle_ids)
               for a, r in zip(rows.a, rows.r))
    with pytest.warns(UserWarning, match="ignores system messages"):
        got = dec.generate(QUESTIONS, rule=rule, chat=True, max_new_tokens=12)
    want = naive_decode(opad_pick(1.0), (sft, sft), moved, 12, stops=(tok.eos_token_id,),
                        prompts_r=plain)
    assert got.tokens == want
    greedy = dec.generate(QUESTIONS, rule=Greedy(), chat=True, max_new_tokens=12)
    assert got.tokens != greedy.tokens  # the principle reaches the model


def test_opad_chat_template_with_system_turns_keeps_the_system_message():
    tok = byte_tokenizer("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + "
                         "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
                         "{% endif %}")
    m = model_for(tok, 0)
    dec = Decoder(m, tokenizer=tok, max_batch_size=2, max_seq_len=96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        rows = rule_rows(OPAD(1.0, principle="be kind"), dec.kind, tok, dec.vocab, ["hello"],
                         None, None, True)
    want = tok.apply_chat_template([{"role": "system", "content": "be kind"},
                                    {"role": "user", "content": "hello"}],
                                   add_generation_prompt=True, tokenize=True)["input_ids"]
    assert rows.a == [want] and rows.a != rows.r


def test_opad_principle_that_cannot_reach_the_prompt_is_refused():
    """A template that renders no message content: OPAD would be greedy, so it is refused."""
    tok = byte_tokenizer("{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    dec = Decoder(model_for(tok, 0), tokenizer=tok, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="principle=.*does not change prompts\\[0\\]"):
        dec.generate("hello", rule=OPAD(1.0, principle="be kind"), chat=True, max_new_tokens=2)


def test_cli_opad_chat_on_the_default_pair_uses_the_principle(tmp_path):
    from aad_fast.cli import main
    from aad_fast.toy.assets import default_pair_dir
    sft = str(default_pair_dir() / "sft")
    out = tmp_path / "o.jsonl"
    args = ["generate", "--aligned", sft, "--prompt", QUESTIONS[0], "--max-new-tokens", "12",
            "--rule", "opad", "--principle", PRINCIPLE, "--chat", "--out", str(out),
            "--device", "cpu"]
    with pytest.warns(UserWarning, match="ignores system messages"):
        assert main(args) == 0
    row = json.loads(out.read_text().splitlines()[0])
    dec = Decoder(sft, device="cpu", max_batch_size=1, max_seq_len=96)
    greedy = dec.generate(QUESTIONS[0], rule=Greedy(), chat=True, max_new_tokens=12)
    with pytest.warns(UserWarning):
        want = dec.generate(QUESTIONS[0], rule=OPAD(1.0, principle=PRINCIPLE), chat=True,
                            max_new_tokens=12)
    assert row["tokens"] == want.tokens[0] and row["tokens"] != greedy.tokens[0]


# ------------------------------------------------------------ 3: CFG with negative_prompt=""
def test_cfg_empty_negative_prompt_is_each_rows_first_token():
    """No BOS: the prompts start with different tokens; each row's unconditional prompt is its
    own first token, so a row decodes the same in any batch (it used to take prompt 0's)."""
    tok = byte_tokenizer()
    m = model_for(tok, 0)
    dec = Decoder(m, tokenizer=tok, max_batch_size=4, max_seq_len=64)
    ps = ["the quick brown fox", "what is 2 plus 3 ?", "Hello , world"]
    ids = [tok(p)["input_ids"] for p in ps]
    assert len({r[0] for r in ids}) == 3
    rule = CFG(2.0, negative_prompt="")
    got = dec.generate(ps, rule=rule, max_new_tokens=10).tokens
    alone = [dec.generate([p], rule=rule, max_new_tokens=10).tokens[0] for p in ps]
    want = naive_decode(mix_pick(2.0, -1.0), (m, m), ids, 10, stops=(tok.eos_token_id,),
                        prompts_r=[r[:1] for r in ids])
    assert got == alone == want


# ------------------------------------------------ 4: stream through split multi-byte characters
@pytest.fixture(scope="module")
def byte_pair():
    tok = byte_tokenizer()
    return tok, model_for(tok, 0), model_for(tok, 1)


def test_stream_pieces_join_to_the_generated_text(byte_pair):
    """Bursts of one token end inside multi-byte characters (checked below); the joined pieces
    equal generate()'s text exactly, also when the completion itself ends in U+FFFD."""
    tok, a, r = byte_pair
    dec = Decoder(a, r, tokenizer=tok, max_batch_size=2, max_seq_len=96, check_every=1)
    split = ends = 0
    cases = [(p, rule) for p in ["héllo wörld", "東京", "the quick brown fox"]
             for rule in [AAD(0.1), Greedy()] + [EFT(2.0, temperature=1.0, seed=s)
                                                  for s in range(4)]]
    for prompt, rule in cases:
        full = dec.generate(prompt, rule=rule, max_new_tokens=40)
        toks = full.tokens[0]
        texts = [tok.decode(toks[:n], skip_special_tokens=True) for n in range(1, len(toks) + 1)]
        split += any(t.endswith("\ufffd") and not texts[-1].startswith(t) for t in texts)
        # also stop right after a token that leaves a character unfinished
        cut = [n for n, t in enumerate(texts, 1) if t.endswith("\ufffd")]
        for n in [len(toks)] + cut[:1]:
            want = dec.generate(prompt, rule=rule, max_new_tokens=n)
            joined = "".join(dec.stream(prompt, rule=rule, max_new_tokens=n))
            assert joined == want.text[0], (prompt, rule, n)
            ends += want.text[0].endswith("\ufffd")
    assert split > 0 and ends > 0  # the cases the old stream got wrong did occur


# ----------------------------------------------------------------- 5: tokenizer ids with a gap
def gap_tokenizer():
    """Ids 0..49, then <eos>=55 and <unk>=56: len() is 52, the id range 57."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(50)}
    vocab.update({"<eos>": 55, "<unk>": 56})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def test_tokenizer_with_an_id_gap_can_choose_its_high_ids():
    tok = gap_tokenizer()
    assert len(tok) == 52
    a, r = tiny_model("llama", 0), tiny_model("llama", 1)  # 61 rows: 57..60 are padding
    for m in (a, r):
        m.config.eos_token_id = m.generation_config.eos_token_id = 55
    with torch.no_grad():  # make EOS (id 55 > len(tok)) the aligned model's choice soon
        a.lm_head.weight[55] = 3 * a.lm_head.weight[24]
        a.lm_head.weight[58] = 4 * a.lm_head.weight[24]  # a padding row: must never win
    dec = Decoder(a, r, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    assert dec.vocab == 57 and dec.stop_ids() == [55]
    prompts = ["w1 w5 w6", "w7 w9"]
    got = dec.generate(prompts, rule=Greedy(), max_new_tokens=12)
    want = naive_decode(greedy_pick(57), (a,), [tok(p)["input_ids"] for p in prompts], 12,
                        stops=(55,))
    assert got.tokens == want and "stop" in got.finish_reason


def test_stop_id_the_decoder_cannot_choose_is_refused():
    tok = gap_tokenizer()
    a, r = tiny_model("llama", 0), tiny_model("llama", 1)
    dec = Decoder(a, r, tokenizer=tok, max_batch_size=2, max_seq_len=64)  # vocab 57 of 61
    with pytest.raises(ValueError, match="stop 58 .*outside the vocabulary \\[0, 57\\)"):
        dec.generate("w1", rule=Greedy(), stop=[58], max_new_tokens=2)
    a.generation_config.eos_token_id = 59
    with pytest.raises(ValueError, match="eos_token_id 59 of the model's generation_config"):
        dec.generate("w1", rule=Greedy(), max_new_tokens=2)


# ------------------------------------------------- 6: a tokenizer with ids the model has not
@pytest.fixture(scope="module")
def grown():
    """A tokenizer with one added token (id 320) over models of 320 rows (not resized)."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert tok.convert_tokens_to_ids("<|im_start|>") == 320 == len(tok) - 1
    return tok, model_for(tok, 0, vocab=320), model_for(tok, 1, vocab=320)


@pytest.mark.parametrize("rule,what", [
    (AAD(0.1), "prompts\\[1\\]"),
    (OPAD(1.0, principle="<|im_start|> be kind"), "principle"),
    (CFG(1.5, negative_prompt="<|im_start|> no"), "negative_prompt"),
], ids=["prompt", "principle", "negative_prompt"])
def test_tokenized_ids_beyond_the_embeddings_are_refused(grown, rule, what):
    tok, a, r = grown
    dec = Decoder(a, None if isinstance(rule, (OPAD, CFGMix)) else r, tokenizer=tok,
                  max_batch_size=2, max_seq_len=64)
    ps = ["hello", "<|im_start|> hello"] if what.startswith("prompts") else ["hello"]
    with pytest.raises(ValueError, match=f"{what} tokenizes to ids \\[320\\] outside "
                                         "\\[0, 320\\).*resize_token_embeddings"):
        dec.generate(ps, rule=rule, max_new_tokens=2)


def test_rule_ids_beyond_the_vocabulary_are_refused(grown):
    tok, a, _ = grown
    dec = Decoder(a, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="principle_ids has ids \\[400\\]"):
        dec.generate("hello", rule=OPAD(1.0, principle_ids=[5, 400]), max_new_tokens=2)
    with pytest.raises(ValueError, match="negative_ids has ids \\[320\\]"):
        dec.generate("hello", rule=CFG(1.5, negative_ids=[320]), max_new_tokens=2)


# -------------------------------------------------------------- 8: learned position tables
def gpt2(seed, n_positions=32):
    import transformers as tf
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4,
                        n_positions=n_positions, eos_token_id=3, bos_token_id=1)
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(cfg).eval()


def test_max_seq_len_past_a_learned_position_table_is_refused():
    a, r = gpt2(0), gpt2(1)
    with pytest.raises(ValueError, match="max_seq_len=64 exceeds GPT2LMHeadModel's 32 learned "
                                         "positions.*max_seq_len<=32"):
        Decoder(a, r, max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="max_seq_len=33"):
        Decoder(gpt2(0, 256), r, max_batch_size=1, max_seq_len=33)  # the reference's table
    dec = Decoder(a, r, max_batch_size=1, max_seq_len=32)  # at the limit: fine
    p = [1] + list(range(5, 26))
    got = dec.generate(input_ids=[p], rule=Greedy(), max_new_tokens=10)
    assert got.tokens == naive_decode(greedy_pick(), (a,), [p], 10)
    # the default max_seq_len (2048) stops at the smaller table of the two models
    assert Decoder(gpt2(0, 256), r, max_batch_size=1).max_seq_len == 32
    assert Decoder(gpt2(0, 256), max_batch_size=1).max_seq_len == 256
    assert Decoder(tiny_model("llama", 0), max_batch_size=1).max_seq_len == 2048


def test_rotary_models_run_past_max_position_embeddings():
    import transformers as tf
    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 16
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    dec = Decoder(m, max_batch_size=1, max_seq_len=48)
    p = [1] + list(range(5, 20))
    got = dec.generate(input_ids=[p], rule=Greedy(), max_new_tokens=12)
    assert got.tokens == naive_decode(greedy_pick(), (m,), [p], 12)


# ------------------------------------------------------- 11: numpy ids and BatchEncodings
def test_numpy_integer_stop_ids_are_accepted(pair):
    dec = Decoder(*pair, max_batch_size=2, max_seq_len=48)
    p = [[1, 5, 6, 7]]
    free = dec.generate(input_ids=p, rule=Greedy(), max_new_tokens=8).tokens[0]
    stop = free[2]  # stop at the third token
    want = dec.generate(input_ids=p, rule=Greedy(), stop=stop, max_new_tokens=8)
    assert want.tokens[0] == free[:free.index(stop)] and want.finish_reason == ["stop"]
    for given in (np.int64(stop), [np.int64(stop)], np.array([stop]), [np.int32(stop)],
                  torch.tensor(stop)):
        got = dec.generate(input_ids=p, rule=Greedy(), stop=given, max_new_tokens=8)
        assert got.tokens == want.tokens and got.finish_reason == ["stop"], given
    assert dec.stop_ids(np.uint8(5)) == sorted({3, 5})
    for bad in (np.bool_(True), [torch.tensor(True)], 2.0, [5.0]):
        with pytest.raises(ValueError, match="stop"):
            dec.stop_ids(bad)


def test_batch_encoding_as_input_ids(toy):
    """What apply_chat_template(..., tokenize=True) returns in transformers 5."""
    sft, tok = toy
    dec = Decoder(sft, sft, tokenizer=tok, max_batch_size=2, max_seq_len=64)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert not isinstance(enc["input_ids"][0], list)  # one sequence
    want = dec.generate(QUESTIONS[0], rule=AAD(0.1), chat=True, max_new_tokens=8)
    got = dec.generate(input_ids=enc, rule=AAD(0.1), max_new_tokens=8)
    assert got.tokens == want.tokens
    pt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                 return_tensors="pt")
    assert dec.generate(input_ids=pt, rule=AAD(0.1), max_new_tokens=8).tokens == want.tokens
    # a padded batch: the mask drops the padding
    batch = tok(QUESTIONS, padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1
    got = dec.generate(input_ids=batch, rule=AAD(0.1), max_new_tokens=8)
    assert got.tokens == dec.generate(QUESTIONS, rule=AAD(0.1), max_new_tokens=8).tokens
    with pytest.raises(ValueError, match="input_ids\\[0\\] is a BatchEncoding.*\\['input_ids'\\]"):
        dec.request(input_ids=enc, rule=AAD(0.1), max_new_tokens=4)


def test_numpy_integers_size_the_decoder_and_the_call():
    import numpy as np
    m = tiny_model("llama", 0)
    dec = Decoder(m, max_batch_size=np.int64(2), max_seq_len=np.int32(40), check_every=np.int8(2))
    assert (type(dec.max_batch_size), type(dec.max_seq_len)) == (int, int)
    got = dec.generate(input_ids=[[1, 5, 6]], rule=Greedy(), max_new_tokens=np.int64(4))
    assert got.tokens == dec.generate(input_ids=[[1, 5, 6]], rule=Greedy(), max_new_tokens=4).tokens
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 4.0"):
        dec.generate(input_ids=[[1, 5, 6]], rule=Greedy(), max_new_tokens=4.0)
