"""``aad-fast evaluate`` and ``make-pairs`` on the shipped pair: numbers recomputed from decodes
and the oracle, pairs in TRL's preference format."""
import json

import pytest

from aad_fast.cli import main
from aad_fast.toy import task


def test_evaluate_recomputes_rewards(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--limit", "6", "--json", str(out), "--max-new-tokens", "24"]) == 0
    res = json.loads(out.read_text())
    assert res["prompts"] == 6
    names = [r["method"] for r in res["rows"]]
    for want in ("greedy SFT", "greedy DPO", "best-of-2 (picker)", "EFT (beta 4)",
                 "AAD (alpha 0.05)", "AAD (alpha 0.1)", "AAD (alpha 0.2)", "AAD (alpha 0.5)"):
        assert want in names
    assert "| AAD (alpha 0.1) |" in capsys.readouterr().out
    # recompute two rows independently (greedy DPO and AAD(0.1) through the Decoder and the
    # oracle) and from them greedy DPO's mean reward and AAD's win rate against it
    from aad_fast import AAD, Decoder, Greedy
    from aad_fast.toy.assets import load_default_pair
    from aad_fast.toy.tokenizer import stop_ids
    _, dpo, tok, _, _ = load_default_pair()
    problems = task.split_problems()[1][:6]
    rewards = {}
    with Decoder(dpo, tokenizer=tok, max_batch_size=8, max_seq_len=128) as dec:
        for name, rule in (("greedy DPO", Greedy("a")), ("AAD (alpha 0.1)", AAD(0.1))):
            texts = dec.generate([p.prompt for p in problems], rule=rule, chat=True,
                                 max_new_tokens=24, stop=stop_ids(tok)).text
            rewards[name] = [task.oracle_reward(p, t) for p, t in zip(problems, texts)]
    rows = {r["method"]: r for r in res["rows"]}
    for name, rs in rewards.items():
        assert rows[name]["mean_reward"] == pytest.approx(sum(rs) / 6, abs=1e-12), name
    aad, greedy = rewards["AAD (alpha 0.1)"], rewards["greedy DPO"]
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(aad, greedy)) / 6
    assert rows["greedy DPO"]["aad_win_rate"] == pytest.approx(wins, abs=1e-12)
    assert rows["AAD (alpha 0.1)"]["aad_win_rate"] is None  # AAD is not compared with itself


def test_make_pairs_resumes_and_loads_as_trl_dataset(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p.prompt})
                                 for p in task.split_problems()[0][:3]) + "\n")
    out = tmp_path / "pairs.jsonl"
    args = ["make-pairs", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "16"]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    # chosen is AAD's completion, rejected a nucleus sample (p 0.9) of the aligned model
    from aad_fast import AAD, Decoder, Mix
    from aad_fast.toy.assets import load_default_pair
    from aad_fast.toy.tokenizer import stop_ids
    _, dpo, tok, _, _ = load_default_pair()
    texts = [p.prompt for p in task.split_problems()[0][:3]]
    kw = dict(chat=True, max_new_tokens=16, stop=stop_ids(tok))
    with Decoder(dpo, tokenizer=tok, max_batch_size=8, max_seq_len=128) as dec:
        chosen = dec.generate(texts, rule=AAD(0.1), **kw).text
        rejected = dec.generate(texts, rule=Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=0),
                                **kw).text
    assert [r["chosen"][0]["content"] for r in rows] == chosen
    assert [r["rejected"][0]["content"] for r in rows] == rejected
    assert [r["prompt"][0]["content"] for r in rows] == texts
    out.write_text(json.dumps(rows[0]) + "\n")
    assert main(args) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 1, 2]
    datasets = pytest.importorskip("datasets")
    trl_utils = pytest.importorskip("trl.data_utils")
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert trl_utils.is_conversational(ds[0])
    from aad_fast.toy.assets import load_default_pair
    tok = load_default_pair()[2]
    ex = trl_utils.maybe_apply_chat_template(ds[0], tok)
    assert set(ex) >= {"prompt", "chosen", "rejected"}
    assert ex["prompt"].rstrip().endswith("<assistant>")
