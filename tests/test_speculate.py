"""Speculative decoding is exact (aad_fast/decode/speculate.py, docs/speculative.md): for every
pair kind and per-token rule, the tokens with a draft equal the tokens without one, whatever
the draft proposes (always right, always wrong, right at random, nothing), with stop ids and
``max_new_tokens`` inside an accepted run, ragged prompts and refilled rows; the verify step of
the runners equals their one-token steps; the step is capture-safe; bad input is refused
naming the argument."""
import copy
import random
import threading

import pytest
import torch
from _capture import CaptureChecker
from conftest import EOS, PROMPTS, aad_pick, naive_decode, random_lora, tiny_model

from aad_fast import (AAD, CFG, EFT, OPAD, BeamAAD, BestOfN, Contrastive, DeRa, Decoder,
                      Greedy, Mix, ops)
from aad_fast.decode import selectors
from aad_fast.decode import speculate as spec
from aad_fast.decode.prompt_rows import left_pad
from aad_fast.decode.steps import DecodeState
from aad_fast.model.runner import Runner

PRINCIPLE = [30, 31, 32]
KW = dict(max_batch_size=4, max_seq_len=64)
MAX_NEW = 14
SAMPLED = dict(temperature=0.8, seed=5)


@pytest.fixture(scope="module")
def models():
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    return {"two": (ma, mr), "lora": (random_lora(copy.deepcopy(ma)),), "prompt": (ma,),
            "single": (ma,)}


PAIR_RULES = [AAD(0.1), Contrastive(0.2, 0.5), EFT(2.0), DeRa(0.5), CFG(1.5),
              EFT(2.0, top_p=0.8, **SAMPLED), Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=3),
              Greedy("a"), Greedy("r")]
PROMPT_RULES = [OPAD(1.0, principle_ids=PRINCIPLE), OPAD(0.5, principle_ids=PRINCIPLE),
                CFG(1.5, negative_ids=[1]), CFG(1.5, top_p=0.8, negative_ids=[1], **SAMPLED)]
CASES = [(kind, r) for kind in ("two", "lora") for r in PAIR_RULES] + \
        [("prompt", r) for r in PROMPT_RULES] + [("single", Greedy("a"))]


class Oracle:
    """A draft that proposes the true continuation (from a run without speculation), each
    token replaced by a wrong one with probability ``1 - p`` (seeded). A row is matched to its
    prompt by suffix (OPAD prepends the principle to stream a)."""

    def __init__(self, prompts, gen, p=1.0, seed=0, stop=EOS):
        self.truth = [(list(pr), t + ([stop] if why == "stop" else []))
                      for pr, t, why in zip(prompts, gen.tokens, gen.finish_reason)]
        self.p, self.rng = p, random.Random(seed)
        self.rows: dict = {}

    def start(self, row, prompt):
        best = max((i for i, (pr, _) in enumerate(self.truth) if prompt[-len(pr):] == pr),
                   key=lambda i: len(self.truth[i][0]))
        self.rows[row] = [best, 0]  # tokens emitted so far (the first at admission)

    def propose(self, rows, k):
        out = []
        for row in rows:
            i, n = self.rows[row]
            true = self.truth[i][1][n:n + k]
            out.append([t if self.rng.random() < self.p else (t + 1) % 61 for t in true])
        return out

    def accept(self, row, tokens):
        self.rows[row][1] += len(tokens)

    def free(self, row):
        del self.rows[row]


def _wrong(row, context, k):
    return [(context[-1] + 1 + j) % 61 for j in range(k)]


def _decoder(models, kind, **kw):
    return Decoder(*models[kind], **KW, **kw)


@pytest.mark.parametrize("kind,rule", CASES, ids=lambda x: str(x)[:36].replace(" ", ""))
def test_speculative_tokens_equal_plain_for_every_pair_and_rule(models, kind, rule):
    plain = _decoder(models, kind).generate(input_ids=PROMPTS, rule=rule,
                                           max_new_tokens=MAX_NEW)
    drafts = {"right": Oracle(PROMPTS, plain), "random": Oracle(PROMPTS, plain, p=0.6, seed=1),
              "wrong": Oracle(PROMPTS, plain, p=0.0), "arbitrary": spec.FixedDraft(_wrong),
              "none": spec.FixedDraft(lambda r, c, k: [])}
    for name, draft in drafts.items():
        got = _decoder(models, kind, draft=draft, speculate=3).generate(
            input_ids=PROMPTS, rule=rule, max_new_tokens=MAX_NEW)
        assert got.tokens == plain.tokens, name
        assert got.finish_reason == plain.finish_reason, name
        emitted = [len(t) + (why == "stop") for t, why in zip(got.tokens, got.finish_reason)]
        assert got.stats["emitted"] == emitted, name
        if name == "right":  # every drafted token accepted: k + 1 tokens per verify step
            assert got.stats["accepted"] == got.stats["drafted"]
            assert got.stats["verify_steps"] == [-(-(e - 1) // 4) for e in emitted]
        if name in ("wrong", "none"):
            assert got.stats["accepted"] == [0, 0, 0]
            assert got.stats["verify_steps"] == [e - 1 for e in emitted]


def test_aad_two_models_equals_the_naive_loop_with_every_draft(models):
    want = naive_decode(aad_pick(0.1), models["two"], PROMPTS, MAX_NEW)
    plain = _decoder(models, "two").generate(input_ids=PROMPTS, rule=AAD(0.1),
                                            max_new_tokens=MAX_NEW)
    assert plain.tokens == want
    for draft in (Oracle(PROMPTS, plain), Oracle(PROMPTS, plain, p=0.5, seed=7),
                  spec.FixedDraft(_wrong)):
        got = _decoder(models, "two", draft=draft, speculate=5).generate(
            input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=MAX_NEW)
        assert got.tokens == want


@pytest.mark.parametrize("kind", ["two", "lora"])
def test_a_stop_id_inside_an_accepted_run_ends_the_row_there(models, kind):
    long = _decoder(models, kind).generate(input_ids=PROMPTS, rule=AAD(0.1),
                                          max_new_tokens=MAX_NEW)
    stop = long.tokens[0][5]  # row 0 ends at its 6th token, inside a run of 8
    plain = _decoder(models, kind).generate(input_ids=PROMPTS, rule=AAD(0.1),
                                           max_new_tokens=MAX_NEW, stop=[stop])
    assert plain.finish_reason[0] == "stop" and len(plain.tokens[0]) <= 5
    draft = Oracle(PROMPTS, long)  # proposes past the stop id: the rule's run is cut there
    got = _decoder(models, kind, draft=draft, speculate=8).generate(
        input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=MAX_NEW, stop=[stop])
    assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason
    assert got.stats["verify_steps"][0] == 1  # one step took the row to its stop id


@pytest.mark.parametrize("max_new", [1, 2, 5, 9])
def test_max_new_tokens_inside_a_run(models, max_new):
    long = _decoder(models, "two").generate(input_ids=PROMPTS, rule=AAD(0.1),
                                           max_new_tokens=MAX_NEW)
    plain = _decoder(models, "two").generate(input_ids=PROMPTS, rule=AAD(0.1),
                                            max_new_tokens=max_new)
    got = _decoder(models, "two", draft=Oracle(PROMPTS, long), speculate=8).generate(
        input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=max_new)
    assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason
    assert all(len(t) <= max_new for t in got.tokens)


@pytest.mark.parametrize("kind,rule", [("two", AAD(0.1)), ("lora", EFT(2.0, top_p=0.8, **SAMPLED)),
                                       ("prompt", OPAD(1.0, principle_ids=PRINCIPLE))],
                         ids=["two-aad", "lora-eft-sampled", "prompt-opad"])
def test_refilled_rows_continuous_batching(models, kind, rule):
    prompts = PROMPTS + [[1, 4], [1, 30, 31, 32, 33, 34, 35, 2], [1, 11, 12], [1, 40]]
    plain = Decoder(*models[kind], max_batch_size=2, max_seq_len=64).generate(
        input_ids=prompts, rule=rule, max_new_tokens=MAX_NEW)
    for draft in (Oracle(prompts, plain, p=0.7, seed=2), spec.FixedDraft(_wrong)):
        got = Decoder(*models[kind], max_batch_size=2, max_seq_len=64, draft=draft,
                      speculate=4).generate(input_ids=prompts, rule=rule,
                                            max_new_tokens=MAX_NEW)
        assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason


def test_a_speculative_scheduler_with_requests_over_time_and_a_cancel(models):
    ref = _decoder(models, "two")
    want = [ref.generate(input_ids=[p], rule=AAD(0.1), max_new_tokens=MAX_NEW).tokens[0]
            for p in PROMPTS]
    dec = _decoder(models, "two", draft=spec.FixedDraft(_wrong), speculate=2)
    sched = dec.scheduler(AAD(0.1), rows=2)
    first = [sched.submit(dec.request(input_ids=p, max_new_tokens=MAX_NEW)) for p in PROMPTS]
    gone = sched.submit(dec.request(input_ids=PROMPTS[0], max_new_tokens=MAX_NEW))
    sched.step_burst()
    sched.cancel(first[1])
    sched.run_until_idle()
    assert first[0].tokens == want[0] and first[2].tokens == want[2]
    assert first[1].finish_reason == "cancelled" and gone.tokens == want[0]


@pytest.mark.parametrize("arch,window,forward", [("llama", None, "hf"), ("llama", None, "fast"),
                                                 ("mistral", 4, "hf"), ("mistral", 2, "fast"),
                                                 ("qwen3", None, "fast")])
def test_runner_verify_equals_one_token_steps(arch, window, forward):
    """Blocks of 4 positions, each row keeping its own count, give the logits of the
    one-token steps on the same tokens (up to the batched matmuls' summation order)."""
    model = tiny_model(arch, 0)
    if window:
        model.config.sliding_window, model.config.use_sliding_window = window, True
    ids, real = left_pad(PROMPTS, 3, "cpu")
    one, blk = (Runner(model, 3, 100, forward=forward, cpu_linear="plain") for _ in range(2))
    rng = random.Random(0)
    with torch.inference_mode():
        toks = [one.prefill(ids, real).argmax(-1)]
        blk.prefill(ids, real)
        want = []
        for _ in range(14):
            want.append(one.step(toks[-1]))
            toks.append(want[-1].argmax(-1))
        toks, want = torch.stack(toks, 1), torch.stack(want, 1)
        cur = [0, 0, 0]
        while min(cur) < 12:
            block = torch.stack([toks[i, min(c, 11):min(c, 11) + 4] for i, c in enumerate(cur)])
            got = blk.verify(block)
            count = [min(rng.randint(1, 4), 12 - c) for c in cur]
            for i, (c, n) in enumerate(zip(cur, count)):
                if n > 0:
                    assert torch.equal(got[i, :n].argmax(-1), want[i, c:c + n].argmax(-1))
                    assert (got[i, :n] - want[i, c:c + n]).abs().max() <= 1e-4
            blk.advance(torch.tensor(count), count)
            cur = [c + n for c, n in zip(cur, count)]
        assert torch.equal(blk.pos, one.pos - 2) and torch.equal(blk.slot, one.slot - 2)
        seen = int(blk.slot.min())
        assert torch.equal(blk.mask[..., :seen], one.mask[..., :seen])


def test_sliding_window_decode_past_the_window(models):
    model = tiny_model("mistral", 0)
    model.config.sliding_window, model.config.use_sliding_window = 4, True
    plain = Decoder(model, **KW).generate(input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=20)
    got = Decoder(model, **KW, draft=Oracle(PROMPTS, plain, p=0.7, seed=3), speculate=6).generate(
        input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=20)
    assert got.tokens == plain.tokens


def test_settle_records_the_accepted_prefix_and_cuts_at_stops_and_limits():
    st = DecodeState.new(4, 6, "cpu")
    st.stop = torch.tensor([[9, -2]] * 4)
    st.t.copy_(torch.tensor([1, 1, 4, 1]))
    st.lim.copy_(torch.tensor([6, 6, 6, 6]))
    st.done[3] = True
    c = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    draft = torch.tensor([[5, 6, 0], [5, 9, 7], [5, 6, 7], [5, 6, 7]])
    count, run = spec.settle(st, c, draft, torch.tensor([3, 3, 3, 3]))
    # row 0: drafts 5, 6 right, 0 wrong: 5, 6, 7 (the rule's own at the mismatch)
    # row 1: the stop id 9 ends it after 5, 9; row 2: max_new_tokens after 2; row 3: done
    assert count.tolist() == [3, 2, 2, 0] and run.tolist() == [2, 3, 3, 3]
    assert st.out[0, 1:4].tolist() == [5, 6, 7] and st.out[1, 1:3].tolist() == [5, 9]
    assert st.out[2, 4:6].tolist() == [5, 6] and st.out[3].tolist() == [-1] * 6
    assert st.t.tolist() == [4, 3, 6, 1] and st.tok.tolist()[:3] == [7, 9, 6]
    assert st.done.tolist() == [False, True, True, True]


def test_errors_name_the_argument(models):
    draft = spec.FixedDraft(_wrong)
    for bad in (9, -1, 2.0, True):
        with pytest.raises(ValueError, match="speculate"):
            _decoder(models, "two", draft=draft, speculate=bad)
    with pytest.raises(ValueError, match="needs a draft"):
        _decoder(models, "two", speculate=2)
    with pytest.raises(ValueError, match="speculate=0"):
        _decoder(models, "two", draft=draft)
    with pytest.raises(ValueError, match="draft must be"):
        _decoder(models, "two", draft=3, speculate=2)
    dec = _decoder(models, "two", draft=draft, speculate=2)
    for rule in (BeamAAD(2, 0.1), BestOfN(2, picker=models["two"][1])):
        with pytest.raises(ValueError, match=f"{type(rule).__name__} cannot be speculated"):
            dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4)
    far = _decoder(models, "two", draft=spec.FixedDraft(lambda r, c, k: [61]), speculate=2)
    with pytest.raises(ValueError, match=r"drafted ids must be ints in \[0, 61\)"):
        far.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=4)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("kind,rule", [("two", AAD(0.1)), ("lora", EFT(2.0, top_p=0.8, **SAMPLED)),
                                       ("prompt", OPAD(1.0, principle_ids=PRINCIPLE)),
                                       ("single", Greedy("a"))],
                         ids=["two-aad", "lora-eft-sampled", "prompt-opad", "single"])
def test_the_verify_step_is_capture_safe(models, monkeypatch, backend, kind, rule):
    if backend == "torch":
        monkeypatch.setattr(selectors, "select_core",
                            lambda *a: ops._run_backend(a[-1], *a[:-1]))
    checks = []
    orig = spec.verify_advance  # the step a VerifySteps captures: verify_one, then advance

    def wrapped(*args):
        if checks:
            return orig(*args)
        with CaptureChecker() as chk:
            out = orig(*args)
        checks.append(chk)
        return out
    monkeypatch.setattr(spec, "verify_advance", wrapped)
    dec = _decoder(models, kind, backend=None if backend == "default" else "torch",
                   draft=spec.FixedDraft(_wrong), speculate=3)
    dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4)
    assert len(checks) == 1
    checks[0].assert_safe(f"verify_advance of {rule} on the {kind} pair ({backend} backend)")


def test_cli_draft_and_speculate_flags_reach_the_decoder(model_dirs, capsys):
    from aad_fast.cli import main
    base = ["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
            str(model_dirs / "sft"), "--prompt", "hi", "--max-new-tokens", "3"]
    assert main(base + ["--speculate", "2"]) == 2
    assert "speculate=2 needs a draft" in capsys.readouterr().err
    assert main(base + ["--draft", "ngram", "--speculate", "9"]) == 2
    assert "speculate must be an int in [0, 8]" in capsys.readouterr().err


def test_the_servers_decode_loop_speculates_exactly(models):
    """``aad-fast serve --draft/--speculate``: the server's loop runs the Decoder's speculative
    schedulers; requests of mixed lengths and values arriving together (a scheduler of 2 rows,
    refilled) get the tokens of the plain decode of each prompt alone."""
    from aad_fast.serve.loop import DecodeLoop, DecodeRequest
    from aad_fast.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()  # the loop sends text: any tokenizer covering the 61 ids
    plain = _decoder(models, "two", tokenizer=tok)
    dec = _decoder(models, "two", tokenizer=tok, draft=spec.FixedDraft(_wrong), speculate=3)
    loop = DecodeLoop(dec, max_batch_size=2, max_queue=16)
    jobs = [(p, AAD(a), m) for p, a, m in zip(PROMPTS * 2, (0.1, 0.3) * 4, (3, 9, 14, 5, 1, 7))]
    got = {}
    done = threading.Event()

    def sink(i):
        def put(event):
            got[i] = event
            if len(got) == len(jobs):
                done.set()
        return put
    loop.pause()  # all arrive together
    for i, (p, rule, m) in enumerate(jobs):
        loop.submit(DecodeRequest(rule=rule, max_new_tokens=m, ids=p, stop=(EOS,)), sink(i))
    loop.resume()
    try:
        assert done.wait(120)
    finally:
        loop.close()
    for i, (p, rule, m) in enumerate(jobs):
        want = plain.generate(input_ids=[p], rule=rule, max_new_tokens=m, stop=[EOS])
        assert got[i][0] == "done", got[i]
        assert got[i][1].tokens == want.tokens[0] and got[i][1].finish_reason == \
            want.finish_reason[0], i


def test_serve_draft_and_speculate_flags_reach_the_decoder(model_dirs):
    from aad_fast.cli import build_parser
    from aad_fast.cli import serve as serve_cli
    base = ["serve", "--aligned", str(model_dirs / "dpo"), "--reference", str(model_dirs / "sft"),
            "--max-seq-len", "64", "--device", "cpu"]
    with pytest.raises(ValueError, match="speculate=2 needs a draft"):
        serve_cli.load(build_parser().parse_args(base + ["--speculate", "2"]))
    draft = spec.FixedDraft(_wrong)
    a = build_parser().parse_args(base + ["--speculate", "3"])
    a.draft = draft  # a Draft object as --draft would resolve to one
    dec, _, _, _ = serve_cli.load(a)
    assert dec.speculate == 3 and dec.draft is draft


@pytest.mark.parametrize("kind,rule", [("two", AAD(0.1)), ("lora", EFT(2.0, top_p=0.8, **SAMPLED)),
                                       ("prompt", OPAD(1.0, principle_ids=PRINCIPLE))],
                         ids=["aad-two", "eft-sampled-lora", "opad-prompt"])
def test_min_tokens_masks_stop_ids_at_every_verify_position(models, kind, rule):
    """``min_tokens``: a stop id is not choosable at verify position ``j`` while the row's
    token ``t + j`` is below its minimum; tokens equal the plain decode's with the same
    ``min_tokens`` (stop ids that end every row early without it: its own 2nd and 3rd
    tokens)."""
    probe = _decoder(models, kind).generate(input_ids=PROMPTS, rule=rule, max_new_tokens=3,
                                            stop=[])
    stop = sorted({t for toks in probe.tokens for t in toks[1:3]})
    plain = _decoder(models, kind).generate(input_ids=PROMPTS, rule=rule, max_new_tokens=MAX_NEW,
                                            stop=stop, min_tokens=5)
    assert all(len(t) >= 5 for t in plain.tokens)
    for draft in (Oracle(PROMPTS, plain, p=0.7, seed=4), spec.FixedDraft(_wrong)):
        got = _decoder(models, kind, draft=draft, speculate=3).generate(
            input_ids=PROMPTS, rule=rule, max_new_tokens=MAX_NEW, stop=stop, min_tokens=5)
        assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason
    free = _decoder(models, kind).generate(input_ids=PROMPTS, rule=rule, max_new_tokens=MAX_NEW,
                                           stop=stop)
    assert free.tokens != plain.tokens  # the mask changed something: a real test
