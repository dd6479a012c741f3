"""The command line: generate (file in, JSONL out, resumable), demo, help, bad input."""
import json

import pytest
from conftest import tiny_model

from aad_fast.cli import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from aad_fast.toy.tokenizer import build_tokenizer
    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    for name, seed in (("dpo", 0), ("sft", 1)):
        m = tiny_model("llama", seed, vocab=len(tok))
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_generate_prompts_file_resumes(model_dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["what is 2 plus 3 ?", "name the capital of peru .",
                                  "what sound does a cow make ?"]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompts-file", str(prompts), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "2", "--chat"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert all(r["finish_reason"] in ("stop", "length") and r["rule"] == "aad" for r in rows)
    # a rerun skips what is done; a lost tail is redone
    out.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == [0, 1, 2] and again[2]["tokens"] == rows[2]["tokens"]


@pytest.mark.parametrize("rule", ["greedy", "eft", "contrastive", "beam-aad", "dera"])
def test_generate_rules_from_cli(model_dirs, rule, capsys):
    args = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompt", "what is 2 plus 3 ?", "--max-new-tokens", "4",
            "--rule", rule, "--num-beams", "2"]
    assert main(args) == 0
    assert "ms/token" in capsys.readouterr().err or rule == "beam-aad"


def test_bad_cli_input_names_the_argument(model_dirs, capsys):
    rc = main(["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
               str(model_dirs / "sft"), "--prompt", "hi", "--alpha", "2"])
    assert rc == 2 and "alpha" in capsys.readouterr().err
    rc = main(["generate", "--aligned", "/nonexistent/x", "--prompt", "hi"])
    assert rc == 2 and "aligned=" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "prompt:" in out and "AAD(alpha=0.1)" in out and "ms/token" in out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "demo", "bench", "evaluate", "make-pairs"):
        assert cmd in out
