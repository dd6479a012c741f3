"""An eager decode step attends only over the slots its live rows have written
(``cache.ReadBound``, ``Runner.read_len``, rounded up to 64 slots): the tokens of the
full-length step, through prefill, steps, admissions, idle rows and beam reorders; the full
length inside a ``torch.compile`` trace or a CUDA-graph capture, whose fixed shapes replay
without the host bookkeeping."""
import pytest
import torch
from conftest import aad_pick, naive_decode, tiny_model

from aad_fast import AAD, BeamAAD, Decoder
from aad_fast.model.cache import ReadBound
from aad_fast.decode.prompt_rows import left_pad
from aad_fast.model.runner import Runner

MAX_LEN = 200
PROMPTS7 = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22], [1, 4], [1, 30, 31, 32, 33, 34, 35, 2],
            [1, 11, 12], [1, 40]]
LONG = [1] + [(7 * i) % 50 + 5 for i in range(69)]  # 70 tokens: past the first 64 slots


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", 0)


def _spy(runner):
    """Record the key length every forward of ``runner`` attends over."""
    seen = []
    update = runner.cache.update

    def spy(k, v, layer_idx, *a, **kw):
        out = update(k, v, layer_idx, *a, **kw)
        if layer_idx == 0:
            seen.append(out[0].shape[2])
        return out
    runner.cache.update = spy
    return seen


def _same(got, want, rows=slice(None)):
    """The same next token per row; the logits equal up to the attention kernel's order of
    summation (bitwise on the machines we measured: the skipped slots add exact zeros)."""
    assert torch.equal(got[rows].argmax(-1), want[rows].argmax(-1))
    assert (got[rows] - want[rows]).abs().max() <= 1e-5


def test_steps_read_only_the_written_slots_and_equal_the_full_length_step(model):
    bounded, full = Runner(model, 3, MAX_LEN), Runner(model, 3, MAX_LEN)
    full.bound.off()
    seen, seen_full = _spy(bounded), _spy(full)
    ids, real = left_pad(PROMPTS7[:3], 3, "cpu")
    width = ids.shape[1]
    steps = 70  # crosses the 64-slot boundary
    with torch.inference_mode():
        got, want = bounded.prefill(ids, real), full.prefill(ids, real)
        assert torch.equal(got, want)
        for i in range(steps):
            tok = want.argmax(-1)
            got, want = bounded.step(tok), full.step(tok)
            _same(got, want)
    # the prefill attends over the prompt's slots only, each step over the next 64-slot bucket
    assert seen == [width] + [64 if width + 1 + i <= 64 else 128 for i in range(steps)]
    assert seen_full == [width] + [MAX_LEN] * steps


def test_admission_and_idle_rows_move_the_bound_and_live_rows_stay_exact(model):
    bounded, full = Runner(model, 3, MAX_LEN), Runner(model, 3, MAX_LEN)
    full.bound.off()
    seen = _spy(bounded)
    ids, real = left_pad([[1, 5, 6], [1, 9], [1, 4, 4]], 3, "cpu")
    long_ids, long_real = left_pad([LONG], 1, "cpu")
    live = torch.tensor([True, True, True])
    with torch.inference_mode():
        got, want = bounded.prefill(ids, real), full.prefill(ids, real)
        for i in range(8):
            if i == 2:  # row 1 takes a 70-token prompt: the bound jumps to 128 slots
                dst = torch.tensor([1])
                a = bounded.admit(long_ids, long_real, dst)
                _same(a, full.admit(long_ids, long_real, dst))
                want = want.clone()
                want[1] = a[0]
                assert bounded.read_len() == 128
            if i == 4:  # row 1 retires: rows 0 and 2 (slots < 64) are all that is read
                bounded.idle([1])
                live = torch.tensor([True, False, True])
                assert bounded.read_len() == 64
            tok = want.argmax(-1)
            got, want = bounded.step(tok), full.step(tok)
            _same(got, want, live)
    assert seen == [3, 64, 64, 128, 128, 64, 64, 64, 64]  # (admission: its own cache)


def test_an_idle_row_is_never_fully_masked_within_what_a_step_reads(model):
    """A short prompt admitted beside a long one sits at the group's last slots; once both
    retire and only a short row is live, the step reads 64 slots: the idle rows still see
    one (slot 0), so no kernel meets a fully masked row."""
    runner = Runner(model, 3, MAX_LEN)
    ids, real = left_pad([[1, 5, 6], [1, 9], [1, 4]], 3, "cpu")
    grp_ids, grp_real = left_pad([LONG, [1, 9]], 2, "cpu")
    with torch.inference_mode():
        runner.prefill(ids, real)
        runner.admit(grp_ids, grp_real, torch.tensor([1, 2]))
        runner.idle([1, 2])
        n = runner.read_len()
        assert n == 64
        seen = runner.mask[:, 0, 0, :n] == 0
        assert bool(seen.any(dim=1).all()) and bool(seen[2, 0])
        logits = runner.step(torch.tensor([5, 6, 7]))
    assert bool(torch.isfinite(logits).all())


def test_the_bound_of_stacked_streams_reorders_and_snapshots():
    b = ReadBound(4, 300)  # a shared pair: 2 rows per stream
    b.fill(None, 5)
    b.fill([1, 3], 90)
    assert b.length() == 128
    r = Runner.__new__(Runner)
    r.n_rows, r.bound, r.device = 4, b, torch.device("cpu")
    r.mask, r.smask = torch.zeros((4, 1, 1, 300)), None
    r.idle([1], period=2)  # scheduler row 1 is runner rows 1 and 3
    assert b.base == [5, None, 5, None] and b.length() == 64
    b.step()
    b.merge()  # beams: a row may now hold any live row's slots
    assert b.base == [5, 5, 5, 5]
    saved = b.state()
    b.step()
    b.fill([0], 200)
    assert b.length() == 256
    b.set_state(saved)
    assert b.length() == 64 and b.steps == 1
    b.off()
    assert b.length() is None


def test_compiled_or_captured_steps_read_the_whole_cache(model, monkeypatch):
    runner = Runner(model, 2, MAX_LEN)
    ids, real = left_pad(PROMPTS7[:2], 2, "cpu")
    with torch.inference_mode():
        runner.prefill(ids, real)
    assert runner.read_len() == 64
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert runner.read_len() is None
    monkeypatch.undo()
    # a traced step replays its full shape without this bookkeeping: full length from then on
    assert runner.read_len() is None
    with torch.inference_mode():
        runner.prefill(ids, real)
    assert runner.read_len() is None


def test_a_scheduler_over_max_seq_len_slots_reads_little_and_equals_the_naive_loop():
    models = tiny_model("llama", 0), tiny_model("llama", 1)
    dec = Decoder(*models, max_batch_size=2, max_seq_len=256, check_every=3)
    prompts = PROMPTS7[:4] + [LONG] + PROMPTS7[4:]

    def run(bounded):
        sched = dec.scheduler(AAD(0.2))
        if not bounded:
            for r in sched.pair.runners:
                r.bound.off()
        seen = _spy(sched.pair.runners[0])
        hs = [sched.submit(dec.request(input_ids=p, rule=AAD(0.2), max_new_tokens=6 + i))
              for i, p in enumerate(prompts)]
        sched.run_until_idle()
        return [h.tokens for h in hs], seen
    got, seen = run(True)
    assert got == [naive_decode(aad_pick(0.2), models, [p], 6 + i)[0]
                   for i, p in enumerate(prompts)]
    assert set(seen) - {len(p) for p in prompts} == {64, 128}  # 128 only while LONG is live
    assert seen.count(128) < seen.count(64)
    full, seen_full = run(False)
    assert full == got and set(seen_full) - {len(p) for p in prompts} == {256}


def test_beam_search_over_a_bounded_runner_equals_the_full_length_one(monkeypatch):
    models = tiny_model("llama", 0), tiny_model("llama", 1)
    rule = BeamAAD(num_beams=2, alpha=0.2)

    def run():
        dec = Decoder(*models, max_batch_size=4, max_seq_len=256)
        dec.use_graphs = True  # graph-mode bookkeeping: runners of 256 slots, stepped eagerly
        out = dec.generate(input_ids=PROMPTS7[:2], rule=rule, max_new_tokens=9)
        (pair,) = dec._runner_sets.values()
        return out, pair.runners[0]
    seen, length = [], ReadBound.length

    def record(self):
        seen.append(length(self))
        return seen[-1]
    monkeypatch.setattr(ReadBound, "length", record)
    got, runner = run()
    assert runner.max_len == 256 and set(seen) == {64}  # (retired rows are idle: None after)
    monkeypatch.setattr(ReadBound, "length", lambda self: None)  # every step reads 256 slots
    want, _ = run()
    assert got.tokens == want.tokens and got.scores == want.scores
    sized = Decoder(*models, max_batch_size=4, max_seq_len=256).generate(
        input_ids=PROMPTS7[:2], rule=rule, max_new_tokens=9)  # eager: 15 slots
    assert sized.tokens == got.tokens
