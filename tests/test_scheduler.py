"""Continuous batching (``aad_fast.decode.scheduler``): every request's tokens equal decoding its prompt
alone (the naive SPEC loop and ``Decoder`` on that prompt alone), whatever else is in the batch
and whenever it was admitted: mixed lengths, stops at different steps, more prompts than rows,
per-row values and seeds, two-model / LoRA / prompt (OPAD, CFG) pairs, sampled Mix."""
import copy

import pytest
import torch
from conftest import EOS, aad_pick, naive_decode, random_lora, tiny_model
from test_rules import mix_pick, opad_pick

from aad_fast import AAD, CFG, EFT, OPAD, BestOfN, Decoder, Greedy, Mix
from aad_fast.decode import steps as engine
from aad_fast.ops.reference import gumbel_noise
from aad_fast.decode.scheduler import Request
from aad_fast.decode.selectors import row_seeds, unmix32

# seven prompts of mixed lengths: more than the rows of the batches below
PROMPTS7 = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22], [1, 4], [1, 30, 31, 32, 33, 34, 35, 2],
            [1, 11, 12], [1, 40]]
PRINCIPLE = [30, 31, 32]


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


def _alone(dec, prompts, **kw):
    return [dec.generate(input_ids=[p], **kw).tokens[0] for p in prompts]


def test_more_prompts_than_rows_refill_and_equal_decoding_alone(models):
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48)
    free = dec.generate(input_ids=PROMPTS7, rule=AAD(0.2), max_new_tokens=12, stop=[])
    # a stop id per prompt taken from its own free run, so rows end at different steps
    stops = [toks[k] for toks, k in zip(free.tokens, (2, 9, 5, 0, 7, 3, 11))]
    got = dec.generate(input_ids=PROMPTS7, rule=AAD(0.2), max_new_tokens=12, stop=stops)
    assert got.stats["rows"] == 2 and got.stats["batch"] == 7
    want = naive_decode(aad_pick(0.2), models, PROMPTS7, 12, stops=(EOS, *stops))
    assert got.tokens == want
    assert got.tokens == _alone(dec, PROMPTS7, rule=AAD(0.2), max_new_tokens=12, stop=stops)
    assert got.finish_reason == ["stop" if len(w) < 12 else "length" for w in want]
    assert len({len(t) for t in got.tokens}) > 2  # the rows really ended at different steps
    # a static batch of all seven (rows for everyone) gives the same tokens
    wide = Decoder(*models, max_batch_size=8, max_seq_len=48)
    assert wide.generate(input_ids=PROMPTS7, rule=AAD(0.2), max_new_tokens=12,
                         stop=stops).tokens == want


def test_requests_with_their_own_values_limits_and_stops_admitted_mid_decode(models):
    """Per-row alpha, max_new_tokens and stop ids in one batch; later requests are submitted
    while the first ones are decoding and land in freed rows."""
    dec = Decoder(*models, max_batch_size=3, max_seq_len=48, check_every=2)
    sched = dec.scheduler(AAD(0.1))
    specs = [(PROMPTS7[0], AAD(0.1), 9, []), (PROMPTS7[1], AAD(0.5), 3, []),
             (PROMPTS7[2], AAD(0.0), 12, [17]), (PROMPTS7[3], AAD(1.0), 5, []),
             (PROMPTS7[4], AAD(0.3), 10, [42, 7]), (PROMPTS7[5], AAD(0.2), 1, []),
             (PROMPTS7[6], AAD(0.05), 14, [])]
    handles = [sched.submit(dec.request(input_ids=p, rule=r, max_new_tokens=m, stop=s, tag=i))
               for i, (p, r, m, s) in enumerate(specs[:3])]
    assert sched.step_burst() and not handles[0].done
    for i, (p, r, m, s) in enumerate(specs[3:], start=3):
        handles.append(sched.submit(dec.request(input_ids=p, rule=r, max_new_tokens=m, stop=s,
                                                tag=i)))
        sched.step_burst()
    sched.run_until_idle()
    assert not sched.busy and all(h.done for h in handles)
    assert {h.row for h in handles} == {0, 1, 2}  # seven requests through three rows
    assert any(h.admitted > handles[0].first_token for h in handles[3:])  # admitted later
    for h, (p, r, m, s) in zip(handles, specs):
        want = naive_decode(aad_pick(r.alpha), models, [p], m, stops=(EOS, *s))[0]
        assert h.tokens == want, (p, r)
        assert h.finish_reason == ("stop" if len(want) < m else "length")
        assert h.tokens == dec.generate(input_ids=[p], rule=r, max_new_tokens=m,
                                        stop=s).tokens[0]
        assert h.submitted <= h.admitted <= h.first_token <= h.finished


def test_sampled_mix_per_row_seeds_reproducible_whenever_admitted(models):
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, check_every=3)
    rule = EFT(2.0, temperature=0.8, top_p=0.9, seed=0)
    seeds = [5, 6, 7, 5, 9]
    prompts = PROMPTS7[:5]

    def run():
        sched = dec.scheduler(rule)
        hs = [sched.submit(Request(ids_a=p, rule=rule, max_new_tokens=10, stop_ids=(EOS,),
                                   seed=s)) for p, s in zip(prompts, seeds)]
        sched.run_until_idle()
        return [h.tokens for h in hs]

    got = run()
    assert got == run()  # reproducible
    for p, s, toks in zip(prompts, seeds, got):
        want = naive_decode(mix_pick(2.0, -1.0, temperature=0.8, top_p=0.9, seed=s), models,
                            [p], 10)[0]
        assert toks == want
        alone = dec.generate(input_ids=[p], rule=EFT(2.0, temperature=0.8, top_p=0.9, seed=s),
                             max_new_tokens=10)
        assert alone.tokens[0] == toks
    assert got[0] != got[3] or prompts[0] != prompts[3]


def test_lora_pair_refill_equals_merged_pair_alone():
    base = tiny_model("llama", 0)
    sft = copy.deepcopy(base)
    pm = random_lora(base)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    with Decoder(pm, max_batch_size=2, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS7, rule=AAD(0.1), max_new_tokens=10)
        alone = _alone(dec, PROMPTS7, rule=AAD(0.1), max_new_tokens=10)
        greedy = dec.generate(input_ids=PROMPTS7, rule=Greedy("a"), max_new_tokens=8).tokens
    assert got.stats["pair"] == "lora"
    assert got.tokens == naive_decode(aad_pick(0.1), (merged, sft), PROMPTS7, 10) == alone
    argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731
    assert greedy == naive_decode(argmax, (merged,), PROMPTS7, 8)


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_opad_prompt_pair_refill_equals_alone(models, k):
    model = models[0]
    dec = Decoder(model, max_batch_size=3, max_seq_len=48, check_every=2)
    rule = OPAD(k, principle_ids=PRINCIPLE)
    got = dec.generate(input_ids=PROMPTS7, rule=rule, max_new_tokens=9)
    want = naive_decode(opad_pick(k), (model, model), [PRINCIPLE + p for p in PROMPTS7], 9,
                        prompts_r=PROMPTS7)
    assert got.tokens == want == _alone(dec, PROMPTS7, rule=rule, max_new_tokens=9)


def test_opad_per_row_k_in_one_batch(models):
    model = models[0]
    dec = Decoder(model, max_batch_size=2, max_seq_len=48, check_every=2)
    sched = dec.scheduler(OPAD(1.0, principle_ids=PRINCIPLE))
    ks = [1.0, 0.25, 2.0, 0.5]
    hs = [sched.submit(dec.request(input_ids=p, rule=OPAD(k, principle_ids=PRINCIPLE),
                                   max_new_tokens=7 + i))
          for i, (p, k) in enumerate(zip(PROMPTS7, ks))]
    sched.run_until_idle()
    for i, (h, p, k) in enumerate(zip(hs, PROMPTS7, ks)):
        assert h.tokens == naive_decode(opad_pick(k), (model, model), [PRINCIPLE + p], 7 + i,
                                        prompts_r=[p])[0]


def test_cfg_prompt_pair_refill_equals_alone(models):
    model = models[0]
    dec = Decoder(model, max_batch_size=2, max_seq_len=48)
    rule = CFG(1.5, negative_ids=[1])
    got = dec.generate(input_ids=PROMPTS7, rule=rule, max_new_tokens=8)
    want = naive_decode(mix_pick(1.5, -0.5), (model, model), PROMPTS7, 8,
                        prompts_r=[[1]] * len(PROMPTS7))
    assert got.tokens == want == _alone(dec, PROMPTS7, rule=rule, max_new_tokens=8)


def test_a_group_too_wide_for_the_cache_is_admitted_apart(models):
    """A short prompt with many new tokens and a long prompt admitted together would not fit
    the cache if left-padded to one width: each gets its own prefill, both exact."""
    dec = Decoder(*models, max_batch_size=2, max_seq_len=20)
    sched = dec.scheduler(AAD(0.1))
    long, short = list(range(1, 15)), [1, 9]
    h1 = sched.submit(dec.request(input_ids=long, max_new_tokens=5, stop=[]))
    h2 = sched.submit(dec.request(input_ids=short, max_new_tokens=17, stop=[]))
    sched.run_until_idle()
    assert h1.tokens == naive_decode(aad_pick(0.1), models, [long], 5, stops=())[0]
    assert h2.tokens == naive_decode(aad_pick(0.1), models, [short], 17, stops=())[0]
    with pytest.raises(ValueError, match="max_new_tokens=19 exceeds"):
        sched.submit(dec.request(input_ids=short, max_new_tokens=19))
    with pytest.raises(ValueError, match="is of kind"):
        sched.submit(dec.request(input_ids=short, rule=Mix(1.0, 0.0), max_new_tokens=2))
    with pytest.raises(ValueError, match="not a per-token rule"):
        dec.scheduler(BestOfN(2, picker="unused"))  # beam search runs on it (tests/test_beam_scheduler.py)


def test_the_step_after_a_refill_is_capture_safe(models, monkeypatch):
    from _capture import CaptureChecker
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, check_every=2)
    sched = dec.scheduler(EFT(2.0, temperature=0.8, seed=1))
    for p, m in zip(PROMPTS7[:3], (2, 9, 9)):  # the third is admitted into the first's row
        sched.submit(Request(ids_a=p, max_new_tokens=m, stop_ids=()))  # no stop: fixed ends
    sched.step_burst()
    sched.step_burst()
    assert len(sched.live) == 2 and sched.free == []
    slots = sched.pair.a.slot.tolist()
    assert slots[0] != slots[1]  # the rows write different cache slots now
    with torch.inference_mode(), CaptureChecker() as chk:
        engine.decode_one(sched.pair, sched.sel, sched.st)
    chk.assert_safe("decode_one after a refill")


def test_row_seeds_fold_each_rows_step_into_its_seed_exactly():
    g = torch.Generator().manual_seed(0)
    seed = torch.randint(0, 2**40, (64,), generator=g)
    step = torch.randint(0, 2**33, (64,), generator=g)
    x = torch.randint(0, 2**32, (1000,), generator=g)
    from aad_fast.ops.reference import mix32
    assert torch.equal(unmix32(mix32(x)), x)
    folded = row_seeds(seed, step)
    zero = torch.zeros((), dtype=torch.int64)
    for i in range(0, 64, 7):
        assert torch.equal(gumbel_noise(folded[i:i + 1], zero, 50),
                           gumbel_noise(seed[i:i + 1], step[i], 50))


def test_schedulers_of_two_kinds_and_generate_interleave_without_interference(models):
    """Each scheduler owns its cache, selector and state: bursts of an AAD and a sampled-Mix
    scheduler interleaved with a generate() call all stay exact."""
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, check_every=2)
    mix = Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=4)
    s_aad, s_mix = dec.scheduler(AAD(0.3)), dec.scheduler(mix)
    ha = [s_aad.submit(dec.request(input_ids=p, rule=AAD(0.3), max_new_tokens=8))
          for p in PROMPTS7[:3]]
    hm = [s_mix.submit(dec.request(input_ids=p, rule=mix, max_new_tokens=8))
          for p in PROMPTS7[3:6]]
    s_aad.step_burst()
    s_mix.step_burst()
    mid = dec.generate(input_ids=PROMPTS7[6:], rule=AAD(0.3), max_new_tokens=8).tokens
    while s_aad.busy or s_mix.busy:
        s_aad.step_burst()
        s_mix.step_burst()
    assert [h.tokens for h in ha] == naive_decode(aad_pick(0.3), models, PROMPTS7[:3], 8)
    assert mid == naive_decode(aad_pick(0.3), models, PROMPTS7[6:], 8)
    assert [h.tokens for h in hm] == naive_decode(
        mix_pick(1.0, 0.0, temperature=1.0, top_p=0.9, seed=4), models, PROMPTS7[3:6], 8)


def test_throughput_benchmark_runs_end_to_end_on_tiny_settings(tmp_path):
    """bench/bench_scheduler.py writes its JSON; continuous and static batching agree on every
    request's tokens and the continuous one runs fewer steps. No timing is asserted."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_scheduler.py"
    spec = importlib.util.spec_from_file_location("bench_scheduler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = [str(tmp_path), "--device", "cpu", "--prompts", "6", "--batch", "2",
            "--prompt-len", "4", "--min-new", "1", "--max-new", "9", "--check-every", "4"]
    assert mod.main(argv) == 0
    (out,) = tmp_path.glob("scheduler-cpu-*.json")
    res = json.loads(out.read_text())
    assert res["same_tokens"] and res["settings"]["prompts"] == 6
    for mode in ("static", "continuous"):
        assert res[mode]["generated_tokens"] == sum(res["completion_lengths"])
        assert res[mode]["tokens_per_s"] > 0
    assert res["continuous"]["steps"] < res["static"]["steps"]
    assert res["ratio"] > 0


def test_a_cancelled_request_frees_its_row_and_the_others_stay_exact(models):
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, check_every=2)
    sched = dec.scheduler(AAD(0.1))
    hs = [sched.submit(Request(ids_a=p, max_new_tokens=10, stop_ids=())) for p in PROMPTS7[:4]]
    sched.step_burst()
    sched.cancel(hs[0])  # live: its row goes to the next waiting request
    sched.cancel(hs[3])  # still waiting: never admitted
    assert hs[0].finish_reason == "cancelled" and len(hs[0].tokens) == 3
    assert hs[3].done and hs[3].row is None and hs[3].tokens == []
    sched.run_until_idle()
    assert hs[2].row == hs[0].row
    want = naive_decode(aad_pick(0.1), models, PROMPTS7[:3], 10, stops=())
    assert hs[0].tokens == want[0][:3]
    assert [hs[1].tokens, hs[2].tokens] == want[1:]


def test_per_row_beta_and_per_row_mix_weights_temperatures_top_p(models):
    from aad_fast import Contrastive
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, check_every=3)
    cases = {
        Contrastive(0.1, 0.5): [(Contrastive(0.1, 0.5), aad_pick(0.1, 0.5)),
                                (Contrastive(0.3, 0.0), aad_pick(0.3, 0.0)),
                                (Contrastive(0.2, 2.0), aad_pick(0.2, 2.0))],
        EFT(2.0, temperature=0.7, top_p=0.8, seed=3): [
            (EFT(2.0, temperature=0.7, top_p=0.8, seed=3),
             mix_pick(2.0, -1.0, temperature=0.7, top_p=0.8, seed=3)),
            (EFT(1.5, temperature=1.0, top_p=0.95, seed=8),
             mix_pick(1.5, -0.5, temperature=1.0, top_p=0.95, seed=8)),
            (EFT(3.0, temperature=0.5, top_p=0.6, seed=1),
             mix_pick(3.0, -2.0, temperature=0.5, top_p=0.6, seed=1))]}
    for default, rows in cases.items():
        sched = dec.scheduler(default)
        hs = [sched.submit(Request(ids_a=p, rule=r, max_new_tokens=9, stop_ids=(EOS,)))
              for p, (r, _) in zip(PROMPTS7, rows)]
        sched.run_until_idle()
        for h, p, (r, pick) in zip(hs, PROMPTS7, rows):
            assert h.tokens == naive_decode(pick, models, [p], 9)[0], r
