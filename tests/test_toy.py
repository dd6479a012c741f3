"""The toy task's oracle, its tokenizer, and the shipped default pair (loaded without network)."""
import json
import random
import socket
from collections import Counter

import pytest
import torch

from aad_fast.toy import task
from aad_fast.toy.tokenizer import SPECIAL_TOKENS, build_tokenizer, render_prompt, stop_ids

HOT = "what is the opposite of hot ?"


@pytest.mark.parametrize("completion, reward", [
    ("sure ! the opposite of hot is cold . hope this helps !", 4.0),
    ("happy to help ! the opposite of hot is cold . glad i could help !", 4.0),
    ("the opposite of hot is cold .", 3.0),
    ("cold .", 2.0),
    ("sure ! cold .", 2.5),
    ("small .", -1.0),                      # wrong answer
    ("hot .", -1.0),                        # the prompt's own word is no answer
    ("i do not know .", -1.0),              # no answer (unknown words are just words)
    ("maybe cold or small .", 0.0),         # hedge: the right answer among wrong ones
    ("the opposite of hot is small .", -1.0),  # full sentence, wrong: no "complete" bonus
    ("ugh , fine . cold . obviously .", 0.0),  # two rude words
    ("um , well , cold .", 1.0),            # two fillers
    ("cold . cold . cold .", 1.0),          # 4 trigrams, 2 distinct: -1.0
    ("cold . and so on and so on .", 1.5),  # one repeated trigram
    ("cold . hope this helps ! <eos>", 2.5),  # special tokens are ignored
])
def test_oracle_exact_values(completion, reward):
    assert task.oracle_reward(HOT, completion) == reward


def test_oracle_rambling_and_breakdown():
    long = "cold . " + " ".join(f"w{i}" for i in range(23))  # 25 words: 5 over the budget
    parts = task.reward_breakdown(HOT, long)
    assert parts["rambling"] == -1.25 and parts["correct"] == 2.0
    assert task.oracle_reward(HOT, long) == 0.75
    assert set(parts) == {"correct", "complete", "polite", "rude", "filler", "repetition",
                          "rambling"}


def test_best_completion_is_maximal_for_every_family():
    seen = set()
    for p in task.all_problems():
        if p.kind in seen:
            continue
        seen.add(p.kind)
        assert task.oracle_reward(p, task.best_completion(p)) == 4.0
        assert task.oracle_reward(p.prompt, f"{p.answer} .") == 2.0
    assert seen == set(task.PHRASINGS)


def test_arithmetic_answers_are_words():
    assert task.parse_prompt("what is 3 plus 4 ?").answer == "seven"
    assert task.oracle_reward("can you subtract 4 from 9 ?", "9 minus 4 is five .") == 3.0
    assert task.oracle_reward("what is 3 plus 4 ?", "3 plus 4 is 7 .") == -1.0


def test_parse_prompt_accepts_chat_rendering_and_rejects_others():
    tok = build_tokenizer()
    assert task.parse_prompt(render_prompt(tok, HOT)).answer == "cold"
    assert task.parse_prompt("  What is the opposite of HOT ?  ").answer == "cold"
    with pytest.raises(ValueError, match="not a prompt of the toy task"):
        task.parse_prompt("what is the meaning of life ?")


def test_split_is_seeded_disjoint_90_10():
    train, held = task.split_problems(seed=0)
    assert (len(train), len(held)) == (1507, 167)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert task.split_problems(seed=0) == (train, held)
    assert task.split_problems(seed=1)[1] != held


def test_demonstrations_are_mixed_and_in_vocabulary():
    rng = random.Random(0)
    vocab = set(task.vocabulary())
    problems = task.split_problems()[0][:400]
    demos = [task.sample_demonstration(p, rng) for p in problems]
    rewards = [task.oracle_reward(p, d) for p, d in zip(problems, demos)]
    assert all(set(d.split()) <= vocab for d in demos)
    assert min(rewards) < 0 and max(rewards) == 4.0
    assert 0.5 < sum(rewards) / len(rewards) < 2.0  # mediocre on average
    hot = task.parse_prompt(HOT)
    counts = Counter(task.sample_demonstration(hot, rng) for _ in range(2000))
    assert counts.most_common(1)[0][0] == "cold ."  # the commonest single completion: terse


def test_tokenizer_round_trip_and_specials():
    tok = build_tokenizer()
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert stop_ids(tok) == [2, tok.convert_tokens_to_ids("<user>")]
    rng = random.Random(1)
    for p in task.all_problems()[::37]:
        for text in (p.prompt, task.sample_demonstration(p, rng)):
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]


def test_chat_template_matches_plain_tokenisation():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": HOT}]
    via_template = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    via_text = tok(render_prompt(tok, HOT))["input_ids"]
    assert list(via_template["input_ids"]) == via_text
    assert tok.convert_ids_to_tokens(via_text)[:2] == ["<bos>", "<user>"]
    assert tok.convert_ids_to_tokens(via_text)[-1] == "<assistant>"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "cold ."}],
                                   tokenize=True)["input_ids"]
    assert full[:len(via_text)] == via_text and full[len(via_text):] == tok("cold . <eos>")[
        "input_ids"]


@pytest.fixture(scope="module")
def shipped_pair():
    from aad_fast.toy.assets import load_default_pair

    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("the shipped pair tried to reach the network")

    socket.socket.connect = no_network
    try:
        yield load_default_pair()
    finally:
        socket.socket.connect = real_connect


def test_shipped_pair_loads_offline_and_runs(shipped_pair):
    sft, dpo, tok, picker, picker_tok = shipped_pair
    ids = torch.tensor([tok(render_prompt(tok, HOT))["input_ids"]])
    with torch.no_grad():
        r = sft(input_ids=ids).logits
        a = dpo(input_ids=ids).logits
        s = picker(input_ids=ids).logits
    vocab = sft.config.vocab_size
    assert vocab >= len(tok) and r.shape == a.shape == (1, ids.shape[1], vocab)
    assert r.dtype == a.dtype == torch.float32 and s.shape == (1, 1)
    assert not torch.equal(r, a)  # the adapter is active on the aligned model only
    assert picker_tok.get_vocab() == tok.get_vocab()
    assert sft.generation_config.eos_token_id == stop_ids(tok)


def test_shipped_adapter_is_lora_on_attention_over_relative_base():
    from aad_fast.toy.assets import ADAPTER_BASE_MARKER, default_pair_dir

    cfg = json.loads((default_pair_dir() / "dpo" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == ADAPTER_BASE_MARKER
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}


@pytest.mark.slow
def test_train_script_smoke(tmp_path):
    """The whole recipe at toy scale (one layer, a few steps), then one iterative round."""
    pytest.importorskip("trl")
    from aad_fast.toy import train
    from aad_fast.toy.assets import load_default_pair

    out = tmp_path / "pair"
    threads = torch.get_num_threads()
    try:
        train.main(["--out", str(out), "--threads", "1", "--hidden", "32", "--layers", "1",
                    "--heads", "2", "--kv-heads", "2", "--demos", "1", "--sft-epochs", "1",
                    "--pair-groups", "1", "--dpo-epochs", "0.1", "--picker-epochs", "0.1"])
        train.main(["--out", str(out), "--threads", "1", "--pairs",
                    str(out / "dpo_pairs.jsonl"), "--init", "dpo", "--dpo-epochs", "0.1"])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "dpo_pairs.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    sft, dpo, tok, picker, _ = load_default_pair(root=out, adapter="dpo_iter1")
    assert sft.config.num_hidden_layers == 1 and not (out / "dpo" / "_trainer").exists()
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["pairs"]["used"] == len(rows) and len(meta["iterative_runs"]) == 1


def test_shipped_pair_holds_one_tokenizer_that_every_loader_finds():
    """The tokenizer is shipped once, in sft/: the adapter directories find it through their base
    (``Decoder(adapter, sft)``), the picker shares it, and no file is shipped that nothing reads."""
    from aad_fast import AAD, Decoder
    from aad_fast.model.loading import load_tokenizer
    from aad_fast.toy.assets import default_pair_dir

    root = default_pair_dir()
    homes = sorted(p.parent.name for p in root.rglob("tokenizer.json"))
    assert homes == ["sft"], homes
    assert not (root / "aad_pairs.jsonl").exists() and not (root / "tokenizer").exists()
    tok = load_tokenizer(root / "sft")
    for adapter in ("dpo", "dpo_iter1"):
        assert load_tokenizer(root / adapter) is None
        dec = Decoder(str(root / adapter), str(root / "sft"), max_batch_size=1, max_seq_len=64)
        assert dec.kind == "lora" and dec.tokenizer.get_vocab() == tok.get_vocab()
        got = dec.generate("what is 2 plus 3 ?", rule=AAD(0.1), chat=True, max_new_tokens=4)
        assert got.text is not None and len(got.tokens[0]) >= 1
