"""The command line: generate (file in, JSONL out, resumable), demo, help, bad input."""
import json
import re

import pytest

from aad_fast import AAD, EFT, BeamAAD, Contrastive, Decoder, DeRa, Greedy
from aad_fast.cli import main


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
    want = Decoder(str(model_dirs / "dpo"), str(model_dirs / "sft"), max_batch_size=3).generate(
        [r["prompt"] for r in rows], rule=AAD(0.1), max_new_tokens=6, chat=True)
    assert [r["tokens"] for r in rows] == want.tokens
    assert [r["finish_reason"] for r in rows] == want.finish_reason
    assert [r["completion"] for r in rows] == want.text and {r["rule"] for r in rows} == {"aad"}
    # a rerun skips what is done; a lost tail is redone
    out.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == [0, 1, 2] and again[2]["tokens"] == rows[2]["tokens"]


def test_generate_stop_strings_min_tokens_ignore_eos(model_dirs, tmp_path, capsys):
    """``--stop`` of several tokens, ``--min-tokens`` and ``--ignore-eos`` decode what the API
    decodes with them (not ignored), are recorded in the sidecar only when given, and are
    refused with ``--ray``."""
    prompt = "what is 2 plus 3 ?"
    dec = Decoder(str(model_dirs / "dpo"), str(model_dirs / "sft"), max_batch_size=2)
    free = dec.generate([prompt], max_new_tokens=10).text[0]
    phrase = " ".join(free.split()[1:3])
    base = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompt", prompt, "--max-new-tokens", "10"]
    for extra, kw in ((["--stop", phrase], dict(stop=[phrase])),
                      (["--min-tokens", "4", "--ignore-eos"], dict(min_tokens=4, ignore_eos=True))):
        out = tmp_path / f"o{len(extra)}.jsonl"
        assert main(base + extra + ["--out", str(out)]) == 0
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        want = dec.generate([prompt], max_new_tokens=10, **kw)
        assert (row["tokens"], row["completion"]) == (want.tokens[0], want.text[0])
        meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
        assert ("min_tokens" in json.dumps(meta)) == ("min_tokens" in kw)
    assert main(base + ["--min-tokens", "-1"]) == 2
    assert "--min-tokens must be >= 0" in capsys.readouterr().err
    assert main(base + ["--ignore-eos", "--ray"]) == 2
    assert "not supported with --ray" in capsys.readouterr().err


@pytest.mark.parametrize("rule,want_rule", [("greedy", Greedy()), ("eft", EFT(4.0)),
                                            ("contrastive", Contrastive(0.1, 1.0)),
                                            ("beam-aad", BeamAAD(2, 0.1)), ("dera", DeRa(1.0))])
def test_generate_rules_from_cli(model_dirs, rule, want_rule, tmp_path):
    """Each --rule decodes what that rule decodes through the API (the flag is not ignored)."""
    out = tmp_path / "o.jsonl"
    prompt = "what is 2 plus 3 ?"
    args = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompt", prompt, "--max-new-tokens", "6",
            "--rule", rule, "--out", str(out)] + (["--num-beams", "2"] if rule == "beam-aad" else [])
    assert main(args) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    want = Decoder(str(model_dirs / "dpo"), str(model_dirs / "sft"), max_batch_size=2).generate(
        [prompt], rule=want_rule, max_new_tokens=6)
    assert row["tokens"] == want.tokens[0] and row["rule"] == rule


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


# ------------------------------------------------------------------ issue 11: files and resume
QUESTIONS = ["what is 2 plus 3 ?", "name the capital of peru .", "what sound does a cow make ?",
             "what is 7 minus 4 ?", "name a red fruit ."]


def _gen_args(model_dirs, prompts, out, *extra):
    return ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompts-file", str(prompts), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2", "--chat", *extra]


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory):
    """One uninterrupted ``generate --out`` run: (prompts file, the output bytes, its sidecar)."""
    root = tmp_path_factory.mktemp("full")
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n"
                               for i, q in enumerate(QUESTIONS)))
    out = root / "out.jsonl"
    assert main(_gen_args(model_dirs, prompts, out)) == 0
    return prompts, out.read_bytes(), (root / "out.jsonl.meta.json").read_bytes()


def test_crash_at_any_byte_then_rerun_gives_every_id_once(model_dirs, full_run,
                                                          tmp_path_factory):
    """Property: cut the output at a random byte (a crash), rerun: every id exactly once, with
    the same text as the uninterrupted run."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    prompts, data, meta = full_run
    want = {r["id"]: r for r in map(json.loads, data.decode().splitlines())}
    root = tmp_path_factory.mktemp("crash")

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cut=st.integers(0, len(data)))
    def check(cut):
        out = root / "out.jsonl"
        out.write_bytes(data[:cut])
        (root / "out.jsonl.meta.json").write_bytes(meta)
        assert main(_gen_args(model_dirs, prompts, out)) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(want)
        assert all(r["completion"] == want[r["id"]]["completion"] and
                   r["tokens"] == want[r["id"]]["tokens"] for r in rows)

    check()


def test_resume_with_another_rule_is_refused(model_dirs, full_run, tmp_path, capsys):
    prompts, data, meta = full_run
    out = tmp_path / "out.jsonl"
    out.write_bytes(data[: data.index(b"\n") + 1])
    (tmp_path / "out.jsonl.meta.json").write_bytes(meta)
    assert main(_gen_args(model_dirs, prompts, out, "--rule", "greedy")) == 2
    assert re.search(r"other settings \(rule: 'AAD\(alpha=0.1.* in the file, .*Greedy", capsys.readouterr().err)
    assert out.read_bytes() == data[: data.index(b"\n") + 1]


def test_resume_with_a_changed_prompt_is_refused(model_dirs, full_run, tmp_path, capsys):
    prompts, data, meta = full_run
    out = tmp_path / "out.jsonl"
    out.write_bytes(data[: data.index(b"\n") + 1])
    (tmp_path / "out.jsonl.meta.json").write_bytes(meta)
    other = tmp_path / "p.jsonl"
    other.write_text(prompts.read_text().replace("2 plus 3", "2 plus 4"))
    assert main(_gen_args(model_dirs, other, out)) == 2
    assert "id 'q0' was made from the prompt" in capsys.readouterr().err


def test_two_runs_on_one_out_cannot_both_write(model_dirs, full_run, tmp_path, capsys):
    from aad_fast.cli import generate_settings, build_parser
    from aad_fast.jobs.outfile import ResultsFile
    prompts, _, _ = full_run
    out = tmp_path / "out.jsonl"
    args = _gen_args(model_dirs, prompts, out)
    with ResultsFile(out, generate_settings(build_parser().parse_args(args), None), {}):
        assert main(args) == 2
    assert "being written by another run" in capsys.readouterr().err
    assert main(args) == 0  # once the first run is gone


@pytest.mark.parametrize("content, message", [
    ('{"id": [1], "prompt": "hi"}', "'id' must be an int or a string, got \\[1\\]"),
    ('{"id": 1.0, "prompt": "hi"}', "'id' must be an int or a string, got 1.0"),
    ('{"id": 1, "prompt": "hi"}\n{"id": 1, "prompt": "ho"}', "id 1 is also on line 1"),
    ('{"prompt": 5}', "'prompt' must be a non-empty string"),
])
def test_bad_prompts_file_rows_are_named(model_dirs, tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content + "\n")
    assert main(_gen_args(model_dirs, prompts, tmp_path / "o.jsonl")) == 2
    assert re.search(message, capsys.readouterr().err)


def test_prompts_file_and_out_paths_are_checked_first(model_dirs, tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    for prompts, out, message in ((tmp_path, tmp_path / "o.jsonl", "is not a file"),
                                  (tmp_path / "none.jsonl", tmp_path / "o.jsonl", "no such file"),
                                  (good, tmp_path, "--out=.* is a directory"),
                                  (good, tmp_path / "no" / "o.jsonl", "does not exist")):
        assert main(_gen_args(model_dirs, prompts, out)) == 2
        assert re.search(message, capsys.readouterr().err)


def test_evaluate_checks_json_before_the_run(tmp_path, capsys, monkeypatch):
    import aad_fast.toy.evaluate as ev
    monkeypatch.setattr(ev, "evaluate", lambda a: pytest.fail("ran before checking --json"))
    assert main(["evaluate", "--limit", "1", "--json", str(tmp_path)]) == 2
    assert "--json=" in capsys.readouterr().err


def test_make_pairs_resumes_after_a_torn_row(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(QUESTIONS[:3]) + "\n")
    out = tmp_path / "pairs.jsonl"
    args = ["make-pairs", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "2"]
    assert main(args) == 0
    data = out.read_bytes()
    out.write_bytes(data[:-7])  # a crash inside the last row
    assert main(args) == 0
    assert "dropped a torn last row" in capsys.readouterr().err
    assert out.read_bytes() == data  # same rows, the redone one with the same rejected sample
    out.write_bytes(data)
    assert main(args[:-2] + ["--batch-size", "3"]) == 2
    assert "other settings (batch_size: 2" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--rule", "aad", "--top-k", "3"], "--top-k not used by --rule aad; it takes --alpha"),
    (["--rule", "greedy", "--alpha", "0.2"], "--alpha not used by --rule greedy"),
    (["--rule", "eft", "--top-p", "0.9"], "--top-p not used by --rule eft \\(greedy without"),
    (["--rule", "opad", "--principle", "be kind", "--seed", "3"], "--seed not used by --rule opad"),
    (["--rule", "beam-aad", "--n", "3"], "--n not used by --rule beam-aad"),
])
def test_a_rule_flag_the_rule_does_not_read_is_refused(model_dirs, capsys, argv, message):
    """Before, such a flag was silently ignored (the run went on without it)."""
    rc = main(["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
               str(model_dirs / "sft"), "--prompt", "hi"] + argv)
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


def test_rule_flags_the_rule_reads_are_taken(model_dirs, tmp_path):
    from aad_fast.cli import build_parser, rule_from_args
    base = ["generate", "--aligned", "x", "--prompt", "hi"]
    a = build_parser().parse_args(base + ["--rule", "eft", "--temperature", "0.7", "--top-k",
                                          "5", "--seed", "3", "--beta", "2"])
    rule = rule_from_args(a)
    assert (rule.temperature, rule.top_k, rule.seed) == (0.7, 5, 3)
    a = build_parser().parse_args(base + ["--rule", "eft", "--temperature", "0"])  # greedy
    assert rule_from_args(a).temperature == 0.0


def test_generate_with_a_tokenizer_from_its_own_directory(tmp_path, capsys):
    """A model saved without its tokenizer: --tokenizer DIR (before, only Python's
    tokenizer= could give one, and the error said so)."""
    from aad_fast.toy.assets import default_pair_dir, load_default_pair
    sft, _, tok, _, _ = load_default_pair("cpu")
    sft.save_pretrained(tmp_path / "sft")  # no tokenizer files
    out = tmp_path / "o.jsonl"
    prompt = "what is 2 plus 3 ?"
    argv = ["generate", "--aligned", str(tmp_path / "sft"), "--rule", "greedy", "--prompt",
            prompt, "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 2 and "--tokenizer" in capsys.readouterr().err
    assert main(argv + ["--tokenizer", str(default_pair_dir() / "sft")]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    want = Decoder(sft, tokenizer=tok, max_batch_size=1).generate([prompt], rule=Greedy(),
                                                                  max_new_tokens=6)
    assert row["tokens"] == want.tokens[0]


# ------------------------------------------------------------------ issue 23: files not ours, Unicode
def test_out_on_a_file_that_is_not_a_results_file_is_left_byte_for_byte(model_dirs, tmp_path,
                                                                         capsys):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"a\nb")
    args = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompt", "hi", "--out", str(notes)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "left as it is" in err and "will be redone" not in err
    assert notes.read_bytes() == b"a\nb"
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "hi"}\n{"prompt": "ho"}')  # --out the prompts file itself
    assert main(_gen_args(model_dirs, prompts, prompts)) == 2
    assert "is the prompts file" in capsys.readouterr().err
    assert prompts.read_bytes() == b'{"prompt": "hi"}\n{"prompt": "ho"}'


def test_prompts_with_line_separators_are_read_and_their_rows_resume(model_dirs, tmp_path,
                                                                     capsys):
    from aad_fast.cli import read_prompts_file
    prompts = tmp_path / "p.jsonl"
    texts = ["what is 2 plus 3 ?\u2028", "name\u2029 a red fruit .", "a cow\u0085 says ?"]
    prompts.write_bytes(("\ufeff" + "\r\n".join(json.dumps({"prompt": t}, ensure_ascii=False)
                                                 for t in texts) + "\n").encode())
    assert [r["prompt"] for r in read_prompts_file(prompts)] == texts
    out = tmp_path / "o.jsonl"
    assert main(_gen_args(model_dirs, prompts, out)) == 0
    first = out.read_bytes()
    assert "\u2028".encode() in first  # written raw (ensure_ascii=False)
    assert main(_gen_args(model_dirs, prompts, out)) == 0  # a rerun resumes: nothing to do
    assert "3 prompt(s) already done, 0 to go" in capsys.readouterr().err
    assert out.read_bytes() == first


def test_out_of_range_flags_are_refused_before_a_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "no-model")  # a model load would fail differently
    for argv, message in ((["--stop-id", "-1"], "--stop-id must be a token id >= 0"),
                          (["--rule", "eft", "--temperature", "1", "--top-k", str(10 ** 30)],
                           "top_k must be"),
                          (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1")):
        assert main(["generate", "--aligned", missing, "--prompt", "hi", *argv]) == 2
        assert message in capsys.readouterr().err
