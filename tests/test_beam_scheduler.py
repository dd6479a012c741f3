"""Beam AAD on the scheduler (``search.BeamSearch`` slots of a ``scheduler.Scheduler``): every
beam request's tokens, finish_reason and score equal that prompt searched alone and an
independent brute-force search (``brute``: every live beam x every candidate, full recompute),
whatever else is in the batch and whenever it was admitted: more prompts than fit (refill),
requests admitted mid-decode with their own alpha, length_penalty, stop ids and
max_new_tokens, two-model and LoRA pairs, cancellation; bad input names the argument."""
import copy

import pytest
import torch
from conftest import EOS, brute_beam, random_lora, tiny_model

from aad_fast import AAD, BeamAAD, Decoder
from aad_fast.decode import steps as engine

# mixed lengths, more prompts than the rows below hold
PROMPTS7 = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22], [1, 4], [1, 30, 31, 32, 33, 34, 35, 2],
            [1, 11, 12], [1, 40]]


@pytest.fixture(scope="module")
def two():
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    return {"models": (ma, mr), "brute": (ma, mr)}


@pytest.fixture(scope="module")
def lora():
    base = tiny_model("llama", 0)
    pm = random_lora(copy.deepcopy(base), seed=5)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    return {"models": (pm,), "brute": (merged, base)}


def _alone(dec, prompt, rule, max_new, stop):
    got = dec.generate(input_ids=[prompt], rule=rule, max_new_tokens=max_new, stop=stop)
    return got.tokens[0], got.finish_reason[0], got.scores[0]


def _check(got, want_alone, want_brute):
    """Tokens and finish_reason exactly; the score (a float64 sum of float32 token scores) to
    float32 rounding: a batch of other rows (other widths, another left padding) rounds the
    forward's last bits differently, as does brute's full recompute."""
    assert got[:2] == want_alone[:2] == want_brute[:2]
    tol = 1e-5 * (len(got[0]) + 1)  # float32 rounding of each token's score la - lr
    assert got[2] == pytest.approx(want_alone[2], rel=0, abs=tol)
    assert got[2] == pytest.approx(want_brute[2], rel=0, abs=tol)


@pytest.mark.parametrize("pair", ["two", "lora"])
def test_more_prompts_than_rows_refill_beam_slots(two, lora, pair):
    """7 prompts x 2 beams through 4 rows (2 slots): finished slots are refilled with the next
    prompt while the other slot goes on."""
    p = {"two": two, "lora": lora}[pair]
    dec = Decoder(*p["models"], max_batch_size=5, max_seq_len=48, check_every=3)
    rule = BeamAAD(2, 0.2, length_penalty=1.0)
    stops = [EOS, 17, 42]
    got = dec.generate(input_ids=PROMPTS7, rule=rule, max_new_tokens=7, stop=stops[1:])
    assert got.stats["rows"] == 4 and got.stats["batch"] == 7 and got.stats["num_beams"] == 2
    assert got.stats["pair"] == ("two" if pair == "two" else "lora")
    for i, prompt in enumerate(PROMPTS7):
        _check((got.tokens[i], got.finish_reason[i], got.scores[i]),
               _alone(dec, prompt, rule, 7, stops[1:]),
               brute_beam(p["brute"], prompt, 2, 0.2, None, 7, 1.0, stops))
    assert set(got.finish_reason) == {"stop", "length"}  # slots really ended at different steps


@pytest.mark.parametrize("pair", ["two", "lora"])
def test_beam_requests_with_own_values_admitted_mid_decode(two, lora, pair):
    """A beam scheduler of 7 rows (3 slots of 2 beams, one padding row): requests with their
    own alpha, length_penalty, stop ids and max_new_tokens, some submitted while others
    decode, each landing in a freed slot."""
    p = {"two": two, "lora": lora}[pair]
    dec = Decoder(*p["models"], max_batch_size=7, max_seq_len=48, check_every=2)
    sched = dec.scheduler(BeamAAD(2, 0.1, tau=0.8))
    specs = [(PROMPTS7[0], BeamAAD(2, 0.1, tau=0.8), 9, []),
             (PROMPTS7[1], BeamAAD(2, 0.5, tau=0.8, length_penalty=1.0), 3, [5]),
             (PROMPTS7[2], BeamAAD(2, 0.0, tau=0.8), 12, [17, 9]),
             (PROMPTS7[3], BeamAAD(2, 1.0, tau=0.8), 5, []),
             (PROMPTS7[4], BeamAAD(2, 0.3, tau=0.8, length_penalty=2.0), 10, [42, 7]),
             (PROMPTS7[5], BeamAAD(2, 0.2, tau=0.8), 1, []),
             (PROMPTS7[6], BeamAAD(2, 0.05, tau=0.8), 14, [])]

    def submit(i):
        pr, r, m, s = specs[i]
        return sched.submit(dec.request(input_ids=pr, rule=r, max_new_tokens=m, stop=s, tag=i))
    handles = [submit(i) for i in range(4)]  # one waits for a slot
    sched.admit()
    assert len(sched.live) == 3 and len(sched.waiting) == 1
    sched.step_burst()
    sched.step_burst()
    handles += [submit(i) for i in range(4, 7)]  # mid-decode
    sched.run_until_idle()
    assert not sched.busy and sorted(sched.free) == [0, 1, 2]
    assert max(h.admitted for h in handles[:3]) < min(h.admitted for h in handles[4:])
    for h, (pr, r, m, s) in zip(handles, specs):
        got = (h.tokens, h.finish_reason, h.score)
        _check(got, _alone(dec, pr, r, m, s),
               brute_beam(p["brute"], pr, 2, r.alpha, r.tau, m, r.length_penalty, (EOS, *s)))
        assert len(h.tokens) <= m and h.done


def test_cancelling_a_beam_request_frees_its_slot_and_spares_the_others(two):
    dec = Decoder(*two["models"], max_batch_size=4, max_seq_len=48, check_every=2)
    sched = dec.scheduler(BeamAAD(2, 0.2))
    rule = BeamAAD(2, 0.2)
    hs = [sched.submit(dec.request(input_ids=p, rule=rule, max_new_tokens=10, stop=[]))
          for p in PROMPTS7[:3]]
    sched.step_burst()
    sched.cancel(hs[0])
    assert hs[0].finish_reason == "cancelled" and hs[0].tokens == []
    sched.run_until_idle()
    for h, p in zip(hs[1:], PROMPTS7[1:3]):
        want = _alone(dec, p, rule, 10, [])
        assert (h.tokens, h.finish_reason) == want[:2]
        assert h.score == pytest.approx(want[2], rel=0, abs=1e-5 * (len(h.tokens) + 1))
    assert hs[2].admitted > hs[1].admitted  # it took the cancelled request's slot


@pytest.mark.parametrize("backend", [None, "torch"])  # torch: the reference's ops inspected
def test_beam_step_after_a_mid_decode_admission_is_capture_safe(two, backend):
    from _capture import CaptureChecker
    dec = Decoder(*two["models"], max_batch_size=4, max_seq_len=48, check_every=2,
                  backend=backend)
    sched = dec.scheduler(BeamAAD(2, 0.2))
    rule = BeamAAD(2, 0.2)
    for p, m in zip(PROMPTS7[:3], (2, 9, 9)):  # the third is admitted into the first's slot
        sched.submit(dec.request(input_ids=p, rule=rule, max_new_tokens=m, stop=[]))
    sched.step_burst()
    sched.step_burst()
    assert len(sched.live) == 2 and sched.free == []
    slots = sched.pair.a.slot.tolist()
    assert slots[0] != slots[2]  # the slots' rows write different cache slots
    lo = min(r.width for r in sched.live.values())
    hi = max(r.width + r.steps - 1 for r in sched.live.values())
    with torch.inference_mode(), CaptureChecker() as chk:
        engine.beam_step(sched.pair, sched.sel, lo, hi)
    chk.assert_safe("beam_step after a refill")


def test_bad_beam_input_names_the_argument(two):
    dec = Decoder(*two["models"], max_batch_size=3, max_seq_len=48)
    with pytest.raises(ValueError, match=r"num_beams=4 exceeds max_batch_size=3"):
        dec.generate(input_ids=PROMPTS7[:1], rule=BeamAAD(4, 0.1), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"num_beams=3 exceeds rows=2"):
        dec.scheduler(BeamAAD(3, 0.1), rows=2)
    sched = dec.scheduler(BeamAAD(2, 0.1))
    with pytest.raises(ValueError, match="is of kind"):  # tau is the scheduler's
        sched.submit(dec.request(input_ids=[1, 2], rule=BeamAAD(2, 0.1, tau=1.0), max_new_tokens=4))
    with pytest.raises(ValueError, match="is of kind"):  # and so is num_beams
        sched.submit(dec.request(input_ids=[1, 2], rule=BeamAAD(3, 0.1), max_new_tokens=4))
    with pytest.raises(ValueError, match="is of kind"):
        sched.submit(dec.request(input_ids=[1, 2], rule=AAD(0.1), max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens=47 exceeds"):
        sched.submit(dec.request(input_ids=[1, 2], rule=BeamAAD(2, 0.1), max_new_tokens=47))


def test_server_backend_runs_beam_requests_on_one_beam_scheduler(two):
    """``loop.DecodeLoop``: beam requests with their own alpha, length_penalty, stop ids and
    max_new_tokens share one beam scheduler (more of them than it has slots: they queue and
    refill), and each answer equals that request searched alone."""
    import threading

    from test_search import word_tokenizer

    from aad_fast.serve.loop import DecodeLoop, DecodeRequest
    dec = Decoder(*two["models"], tokenizer=word_tokenizer(), max_batch_size=4, max_seq_len=48,
                  check_every=2)
    decode_loop = DecodeLoop(dec, max_batch_size=4, max_queue=16)
    specs = [(PROMPTS7[i], BeamAAD(2, a, length_penalty=lp), m, s) for i, (a, lp, m, s) in
             enumerate([(0.1, 0.0, 9, ()), (0.5, 1.0, 3, (5,)), (0.0, 0.0, 12, (17, 9)),
                        (0.3, 2.0, 10, (42,)), (0.2, 0.0, 6, ())])]
    events = [[] for _ in specs]
    done = threading.Semaphore(0)

    def sink(i):
        def put(ev):
            events[i].append(ev)
            if ev[0] != "delta":
                done.release()
        return put
    decode_loop.pause()  # all five arrive together: one scheduler of 4 rows (2 slots)
    for i, (p, r, m, s) in enumerate(specs):
        decode_loop.submit(DecodeRequest(rule=r, max_new_tokens=m, ids=p, stop=s), sink(i))
    decode_loop.resume()
    try:
        for _ in specs:
            assert done.acquire(timeout=60)
        stats = decode_loop.stats()
    finally:
        decode_loop.close()
    assert [x["kind"] for x in stats["schedulers"]] == ["beam-aad-2-None"]
    assert stats["schedulers"][0]["rows"] == 4 and stats["rows_peak"] == 4
    for ev, (p, r, m, s) in zip(events, specs):
        assert ev[-1][0] == "done", ev
        want = dec.generate(input_ids=[p], rule=r, max_new_tokens=m, stop=list(s))
        assert (ev[-1][1].tokens, ev[-1][1].finish_reason) == (want.tokens[0],
                                                               want.finish_reason[0])


def test_generate_prompts_file_refills_beam_slots_in_one_call(tmp_path, monkeypatch):
    """``aad-fast generate --prompts-file`` with beam-aad: ``--batch-size 1`` (one prompt's
    beams at a time) hands all prompts to one ``Decoder.generate``, whose slot is refilled;
    every row equals that prompt searched alone."""
    import json

    from aad_fast.cli import main
    root = _saved_pair(tmp_path)
    prompts = ["what is 2 plus 3 ?", "hello", "please , what is 8 plus 8 ?", "a b c", "why ?"]
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                          for i, p in enumerate(prompts)))
    calls = []
    real = Decoder.generate

    def counting(self, *a, **kw):
        calls.append(len(a[0]) if a else None)
        return real(self, *a, **kw)
    monkeypatch.setattr(Decoder, "generate", counting)
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--aligned", str(root / "dpo"), "--reference", str(root / "sft"),
                 "--prompts-file", str(pf), "--max-new-tokens", "6", "--rule", "beam-aad",
                 "--num-beams", "2", "--batch-size", "1", "--out", str(out)]) == 0
    assert calls == [len(prompts)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    dec = Decoder(str(root / "dpo"), str(root / "sft"), max_batch_size=2)
    for row, p in zip(rows, prompts):
        want = real(dec, [p], rule=BeamAAD(2, 0.1), max_new_tokens=6)
        assert (row["tokens"], row["finish_reason"]) == (want.tokens[0], want.finish_reason[0])


def _saved_pair(tmp_path):
    """The toy pair saved as model directories (as tests/test_cli.py saves it)."""
    from aad_fast.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    for name, seed in (("dpo", 0), ("sft", 1)):
        m = tiny_model("llama", seed, vocab=len(tok))
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return tmp_path
