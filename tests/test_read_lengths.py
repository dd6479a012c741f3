"""A captured or compiled decode step reads only a rung of the read ladder
(``cache.read_ladder``, ``engine.LengthSteps``): the smallest rung covering the slots the live
rows write, chosen on the host before each step, one step built per rung on first use.

On CPU there is no CUDA graph, so these tests put a stand-in in ``engine.StepGraph``: it is
built with the runners' ``fixed_len`` as a graph would be captured with it (warm-up runs
undone), and each replay runs the step eagerly under that same length, after checking the
length against the device's write slots (the host bookkeeping must stay right while the
host, not the step, counts the steps). The compiled step of each rung is tested in
tests/test_compile.py, the real graphs in tests/test_gpu.py."""
import functools

import pytest
import torch
from conftest import aad_pick, naive_decode, tiny_model

from aad_fast import AAD, Decoder, Greedy
from aad_fast.model import cache
from aad_fast.decode import steps as engine
from aad_fast.model.cache import ReadBound, StaticKVCache, ladder_length, read_ladder

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22]]  # left-padded: width 6
LONG = [1] + [(7 * i) % 50 + 5 for i in range(39)]       # 40 tokens
MAX_LEN = 128
LADDER = (16, 32, 64, 128)
argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731


def no_eos(model):
    """Rows run to max_new_tokens (exact step counts per rung)."""
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def models():
    return no_eos(tiny_model("llama", 0)), no_eos(tiny_model("llama", 1))


class FakeGraph:
    """CPU stand-in of ``engine.StepGraph``: made like a capture (two warm-up runs and the
    capture run, undone), then each replay runs ``step`` under the length it was made for."""

    made: list = []   # read length of each graph made, in order
    runs: list = []   # read length of each replay

    def __init__(self, pair, selector, st, step=None, pool=None):
        self.pair = pair
        self.len = pair.runners[0].fixed_len
        assert self.len is not None and all(r.fixed_len == self.len for r in pair.runners)
        self.step = step or functools.partial(engine.decode_one, pair, selector, st)
        engine.undone(pair, selector, st, lambda: [self.step() for _ in range(3)])
        FakeGraph.made.append(self.len)

    def __call__(self):
        for r in self.pair.runners:
            assert r.fixed_len == self.len  # a graph replays its own length only
            live = [i for i, b in enumerate(r.bound.base) if b is not None]
            if live:  # device truth: the slots this step writes
                need = int(r.slot[live].max()) + 1
                assert self.len >= need, (self.len, need)             # covers every live row
                smaller = [n for n in LADDER if n < self.len]
                assert not smaller or smaller[-1] < need, (self.len, need)  # the smallest rung
        FakeGraph.runs.append(self.len)
        self.step()


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graph mode on CPU with ``FakeGraph`` for the capture and the ladder ``LADDER``."""
    FakeGraph.made, FakeGraph.runs = [], []
    monkeypatch.setattr(engine, "StepGraph", FakeGraph)
    monkeypatch.setitem(cache.MIN_READ, "cpu", LADDER[0])

    def make(*models, **kw):
        dec = Decoder(*models, max_seq_len=MAX_LEN, compile=False, **kw)
        dec.use_graphs = True
        return dec
    return make


def eager(models, prompts, rule, max_new, **kw):
    return Decoder(*models, max_seq_len=MAX_LEN, compile=False, **kw).generate(
        input_ids=prompts, rule=rule, max_new_tokens=max_new)


def test_the_ladder_doubles_up_to_max_seq_len():
    assert read_ladder(2048) == read_ladder(2048, "cuda:0") == (256, 512, 1024, 2048)
    assert read_ladder(3000) == (256, 512, 1024, 2048, 3000)
    assert read_ladder(256) == (256,) and read_ladder(48) == (48,)
    assert read_ladder(2048, "cpu") == (64, 128, 256, 512, 1024, 2048)
    assert read_ladder(128, first=32) == (32, 64, 128)
    assert len(read_ladder(32768)) == 8
    assert [ladder_length(LADDER, n) for n in (None, 1, 16, 17, 64, 65, 128)] == \
        [16, 16, 16, 32, 64, 128, 128]
    b = ReadBound(3, 100)
    assert b.needed() is None
    b.fill([0, 2], 7)
    b.step()
    b.fill([1], 30)
    assert b.needed() == 31
    b.idle([1])
    assert b.needed() == 9  # rows 0 and 2 write slot 8 next
    b.off()
    assert b.needed() == 9  # the host count is kept whether or not eager steps use it


def test_static_batch_moves_up_the_ladder_with_the_tokens_of_the_eager_step(models,
                                                                            fake_graphs):
    dec = fake_graphs(*models, max_batch_size=4)
    max_new = 70  # steps k = 0..68 write slot 6 + k: rungs 16, 32, 64, 128
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=max_new)
    want = eager(models, PROMPTS, AAD(0.2), max_new, max_batch_size=4)
    assert got.tokens == want.tokens
    assert want.tokens == naive_decode(aad_pick(0.2), models, PROMPTS, max_new, stops=())
    assert got.stats["cuda_graphs"] and not want.stats["cuda_graphs"]
    # step k needs 7 + k slots: 10 steps read 16, 16 read 32, 32 read 64, 11 read 128
    assert got.stats["read_lengths"] == {16: 10, 32: 16, 64: 32, 128: 11}
    assert FakeGraph.made == [16, 32, 64, 128]  # one graph per rung, each on first use
    assert FakeGraph.runs == [16] * 10 + [32] * 16 + [64] * 32 + [128] * 11
    # the eager step reads the written slots rounded up to 64
    assert want.stats["read_lengths"] == {64: 58, 76: 11}
    # bytes of one slot: 2 models x 2 layers x (keys + values) x 4 rows x 2 heads x 12 x fp32
    per_slot = 2 * 2 * 2 * 4 * 2 * 12 * 4
    mean = (16 * 10 + 32 * 16 + 64 * 32 + 128 * 11) / 69
    assert got.stats["kv_read_bytes_per_step"] == int(per_slot * mean)
    # a second call replays the graphs made (none made again) and starts low again
    again = dec.generate(input_ids=PROMPTS[::-1], rule=AAD(0.2), max_new_tokens=20)
    assert again.tokens == [t[:20] for t in want.tokens[::-1]]
    assert FakeGraph.made == [16, 32, 64, 128]
    assert again.stats["read_lengths"] == {16: 10, 32: 9}
    assert again.stats["capture_ms"] < got.stats["capture_ms"]


def test_continuous_batching_rows_come_and_go_across_rungs(models, fake_graphs):
    dec = fake_graphs(*models, max_batch_size=2, check_every=3)
    prompts = PROMPTS + [LONG] + PROMPTS[::-1]
    got = dec.generate(input_ids=prompts, rule=Greedy("a"), max_new_tokens=30)
    assert got.tokens == naive_decode(argmax, models[:1], prompts, 30, stops=())
    runs = FakeGraph.runs
    assert set(got.stats["read_lengths"]) == set(runs) == {16, 32, 64, 128}
    assert sorted(got.stats["read_lengths"].items()) == sorted(
        (n, runs.count(n)) for n in set(runs))
    # LONG (40 + 29 slots) needs 128 near its end only; once it has left, the batch steps down
    last = len(runs) - 1 - runs[::-1].index(128)
    assert runs[last + 1:] and max(runs[last + 1:]) <= 64


def test_entries_keep_their_graphs_per_length_and_are_bounded(models, fake_graphs):
    dec = fake_graphs(*models, max_batch_size=4)
    dec.MAX_ENTRIES = 1
    dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=20)      # 16, 32
    assert FakeGraph.made == [16, 32]
    dec.generate(input_ids=PROMPTS, rule=AAD(0.3), max_new_tokens=30)      # + 64
    assert FakeGraph.made == [16, 32, 64]
    dec.generate(input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=5)    # evicts AAD's
    assert FakeGraph.made == [16, 32, 64, 16] and len(dec._entries) == 1
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=20)  # made again
    assert FakeGraph.made == [16, 32, 64, 16, 16, 32]
    assert got.tokens == eager(models, PROMPTS, AAD(0.1), 20, max_batch_size=4).tokens


def test_a_scheduler_of_its_own_steps_through_the_ladder(models, fake_graphs):
    dec = fake_graphs(*models, max_batch_size=2, check_every=4)
    sched = dec.scheduler(AAD(0.2))
    prompts = [LONG, PROMPTS[1], PROMPTS[0]]
    hs = [sched.submit(dec.request(input_ids=p, rule=AAD(0.2), max_new_tokens=12 + 4 * i))
          for i, p in enumerate(prompts)]
    sched.run_until_idle()
    assert [h.tokens for h in hs] == [naive_decode(aad_pick(0.2), models, [p], 12 + 4 * i,
                                                   stops=())[0]
                                      for i, p in enumerate(prompts)]
    assert set(FakeGraph.made) == {64, 16, 32} and len(FakeGraph.made) == 3
    assert FakeGraph.runs[0] == 64 and FakeGraph.runs[-1] == 32


def test_the_step_attends_over_exactly_the_chosen_length(models, fake_graphs, monkeypatch):
    seen = []
    update = StaticKVCache.update

    def spy(self, k, v, layer_idx, *a, **kw):
        out = update(self, k, v, layer_idx, *a, **kw)
        if layer_idx == 0 and k.shape[2] == 1:  # one-token steps (not prefills)
            seen.append(out[0].shape[2])
        return out
    monkeypatch.setattr(StaticKVCache, "update", spy)
    dec = fake_graphs(models[0], max_batch_size=4)
    dec.generate(input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=30)
    want = []
    for n in FakeGraph.runs:  # each graph made: 3 warm-up steps of its length, then replays
        want += [n] * 3 * (n not in want) + [n]
    assert seen == want and FakeGraph.runs == [16] * 10 + [32] * 16 + [64] * 3


def test_a_failed_capture_runs_the_bounded_eager_step(models, monkeypatch):
    monkeypatch.setitem(cache.MIN_READ, "cpu", LADDER[0])
    tries = []
    monkeypatch.setattr(engine, "try_capture", lambda *a, **k: tries.append(1))
    dec = Decoder(*models, max_batch_size=4, max_seq_len=MAX_LEN, compile=False)
    dec.use_graphs = True
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=40)
    dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=40)
    assert len(tries) == 1 and not got.stats["cuda_graphs"]  # tried once, then eager for good
    assert got.stats["read_lengths"] == {64: 39}
    assert got.tokens == eager(models, PROMPTS, AAD(0.2), 40, max_batch_size=4).tokens
