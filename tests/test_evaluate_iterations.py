"""``aad-fast evaluate --iterations`` (the paper's Table 9 in miniature) on the shipped adapters:
numbers recomputed independently; the diagnostics' pieces against naive computations; the
iterative recipe at toy scale."""
import json

import pytest
import torch

from aad_fast.cli import main
from aad_fast.toy import iterations, task
from aad_fast.toy.assets import default_pair_dir, load_default_pair
from aad_fast.toy.tokenizer import render_prompt, stop_ids

N, NEW = 4, 16


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("iter") / "iter.json"
    assert main(["evaluate", "--iterations", "--limit", str(N), "--json", str(out),
                 "--max-new-tokens", str(NEW), "--no-diagnose"]) == 0
    return json.loads(out.read_text())


def test_shipped_iteration_adapters_are_small_lora_over_sft():
    root = default_pair_dir()
    total = 0
    for _, name in iterations.ITERATIONS:
        cfg = json.loads((root / name / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "../sft" and cfg["peft_type"] == "LORA"
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
        total += sum(f.stat().st_size for f in (root / name).iterdir())
    assert total < 2_000_000  # four adapters, a few hundred kB in all


def test_iterations_table_rows(result, capsys):
    assert result["prompts"] == N and "log_ratio_ranking" not in result
    cells = {(r["model"], r["decoder"], r["aad_reference"]) for r in result["rows"]}
    for label, _ in iterations.ITERATIONS:
        for dec in ("greedy", "best-of-2"):
            assert (label, dec, None) in cells
        assert (label, "AAD (0.1)", "sft") in cells
    assert ("iteration 1'", "AAD (0.1)", "iteration 0") in cells
    base = [r for r in result["rows"] if r["model"] == "iteration 0" and r["mean_reward"]
            is not None]
    assert base and all(r["win_rate_vs_iter0"] is None for r in base)


def _decode(dec, rule, prompts):
    return dec.generate(prompts, rule=rule, chat=True, max_new_tokens=NEW,
                        stop=stop_ids(dec.tokenizer)).text


def test_iteration1_aad_row_recomputed_independently(result):
    """Iteration 1's AAD row: its mean reward and its win rate against iteration 0's AAD, from
    decodes of the shipped adapters and the oracle; and AAD beats best-of-2 within iteration 1."""
    from aad_fast import AAD, BestOfN, Decoder
    problems = task.split_problems()[1][:N]
    prompts = [p.prompt for p in problems]
    rewards = {}
    for adapter in ("dpo", "dpo_iter1"):
        _, model, tok, picker, ptok = load_default_pair(adapter=adapter)
        with Decoder(model, tokenizer=tok, max_batch_size=8, max_seq_len=128) as dec:
            for name, rule in (("aad", AAD(0.1)), ("bo2", BestOfN(2, picker=(picker, ptok)))):
                texts = _decode(dec, rule, prompts)
                rewards[adapter, name] = [task.oracle_reward(p, t) for p, t in zip(problems, texts)]
    rows = {(r["model"], r["decoder"], r["aad_reference"]): r for r in result["rows"]}
    it1 = rewards["dpo_iter1", "aad"]
    row = rows[("iteration 1", "AAD (0.1)", "sft")]
    assert row["mean_reward"] == pytest.approx(sum(it1) / N, abs=1e-12)
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0
               for x, y in zip(it1, rewards["dpo", "aad"])) / N
    assert row["win_rate_vs_iter0"] == pytest.approx(wins, abs=1e-12)
    bo2 = rewards["dpo_iter1", "bo2"]
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(it1, bo2)) / N
    assert rows[("iteration 1", "AAD vs best-of-2", "sft")]["aad_over_bo2_win_rate"] == \
        pytest.approx(wins, abs=1e-12)


def test_iteration1p_against_iteration0_matches_naive_loop(result):
    """1' with iteration 0 as AAD's reference: the engine's row equals a naive full-recompute
    loop over the two PEFT models with ``aad_select`` (quick_eval's definition)."""
    from aad_fast import aad_select
    from aad_fast.toy.quick_eval import naive_decode
    _, it1p, tok, _, _ = load_default_pair(adapter="dpo_iter1p")
    _, it0, _, _, _ = load_default_pair(adapter="dpo")
    problems = task.split_problems()[1][:N]

    def pick(seq, *_):
        with torch.no_grad():
            return aad_select(it1p(input_ids=seq).logits[:, -1].float(),
                              it0(input_ids=seq).logits[:, -1].float(), 0.1,
                              vocab_size=len(tok))
    ids = naive_decode(pick, [p.prompt for p in problems], tok, max_new_tokens=NEW)
    rs = [task.oracle_reward(p, tok.decode(r, skip_special_tokens=True))
          for p, r in zip(problems, ids)]
    row = next(r for r in result["rows"] if r["aad_reference"] == "iteration 0")
    assert row["mean_reward"] == pytest.approx(sum(rs) / N, abs=1e-12)


def test_completion_logprob_matches_per_token_loop():
    sft, _, tok, _, _ = load_default_pair()
    q = task.split_problems()[1][0].prompt
    cands = ["cold .", "sure ! the opposite of hot is cold . hope this helps !"]
    got = iterations.completion_logprob(sft, tok, q, cands)
    for c, g in zip(cands, got.tolist()):
        prompt = tok(render_prompt(tok, q))["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": q},
                                        {"role": "assistant", "content": c}],
                                       tokenize=True)["input_ids"]
        want = 0.0
        for t in range(len(prompt), len(full)):  # one forward per token, no padding
            with torch.no_grad():
                logits = sft(input_ids=torch.tensor([full[:t]])).logits[0, -1].double()
            want += float(torch.log_softmax(logits, -1)[full[t]])
        # float32 forwards of different shapes (padded batch vs one prefix): ~1e-6 apart; an
        # off-by-one token (a missing <eos>, the prompt's last token) moves the sum by > 0.01
        assert g == pytest.approx(want, abs=1e-4)


def test_pair_accuracy_counts_kinds_and_ties():
    reward = [2.0, -1.0, 3.0, 3.0]
    parts = [{"correct": 2.0}, {"correct": -1.0}, {"correct": 2.0}, {"correct": 2.0}]
    score = [0.0, 1.0, 5.0, 0.0]
    acc = iterations._pair_accuracy(score, reward, parts)
    # pairs with different rewards (2, 3 have equal ones): correctness (0,1) miss, (1,2) hit,
    # (1,3) miss; style (0,2) hit, (0,3) a tie in score: one half
    assert acc["correctness"] == [0.0 + 1.0 + 0.0, 3]
    assert acc["style"] == [1.0 + 0.5, 2]
    assert acc["all"] == [2.5, 5]


def test_iterate_recipe_smoke(tmp_path):
    """The iterative recipe on a handful of prompts and a few DPO steps (~15 s): three adapters
    over ../sft, pair files in TRL's format with chosen = AAD of iteration 0, round 2 keeping
    round 1's rejected samples."""
    pytest.importorskip("trl")
    from aad_fast import AAD, Decoder
    from aad_fast.toy import iterate
    threads = torch.get_num_threads()
    try:
        iterate.main(["--out", str(tmp_path), "--limit", "6", "--threads", "1",
                      "--dpo-epochs", "0.2", "--max-new-tokens", "12"])
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((tmp_path / "iterate_meta.json").read_text())
    for name in ("dpo_iter1", "dpo_iter1p", "dpo_iter2"):
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "../sft"
        assert not (tmp_path / name / "_trainer").exists()
    assert "reference = iteration 0" in meta["dpo_iter1p"]["init"]
    rows1 = [json.loads(x) for x in (tmp_path / "iter_pairs1.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "iter_pairs2.jsonl").read_text().splitlines()]
    assert meta["pairs1"]["pairs"] == len(rows1) and meta["pairs1"]["prompts"] == 6
    prompts = [r["prompt"][0]["content"] for r in rows1]
    _, it0, tok, _, _ = load_default_pair(adapter="dpo")
    with Decoder(it0, tokenizer=tok, max_batch_size=8, max_seq_len=128) as dec:
        chosen = dec.generate(prompts, rule=AAD(0.1), chat=True, max_new_tokens=12,
                              stop=stop_ids(tok)).text
    assert [r["chosen"][0]["content"] for r in rows1] == chosen
    # round 2 keeps round 1's rejected samples
    rej1 = {r["prompt"][0]["content"]: r["rejected"] for r in rows1}
    assert all(r["rejected"] == rej1[r["prompt"][0]["content"]] for r in rows2
               if r["prompt"][0]["content"] in rej1)
    # the output directory is a whole pair for `evaluate --iterations --dir`
    res = tmp_path / "res.json"
    assert main(["evaluate", "--iterations", "--dir", str(tmp_path), "--limit", "2",
                 "--max-new-tokens", "8", "--no-diagnose", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["dir"] == "PAIR_DIR"  # no machine path in a result
