"""The built verify steps of speculative decoding (aad_fast/decode/verify_steps.py,
docs/speculative.md): ``torch.compile``-d (CPU) and CUDA-graph-captured (graph mode's
bookkeeping on CPU with a stand-in for the capture; the real capture on a GPU only) verify
steps give the tokens of the eager speculative decode and of the plain decode, one step per
(width, read length) that the decode reaches, each replayed at its own length; a failed build
falls back to the eager step for good.

Compiling on CPU costs seconds per (rule kind, width), so the compiled cases are three (AAD
on two models, sampled EFT on the LoRA pair, OPAD on the prompt pair) with few tokens."""
import copy
import functools

import pytest
import torch
from conftest import PROMPTS, random_lora, tiny_model
from test_speculate import Oracle, _wrong

from aad_fast import AAD, EFT, OPAD, Decoder, tuning
from aad_fast.decode import speculate as spec
from aad_fast.decode import steps as engine
from aad_fast.decode import verify_steps
from aad_fast.model import cache

PRINCIPLE = [30, 31, 32]
LADDER = (16, 32, 64)
CASES = [("two", AAD(0.1)), ("lora", EFT(2.0, top_p=0.8, temperature=0.8, seed=5)),
         ("prompt", OPAD(1.0, principle_ids=PRINCIPLE))]
IDS = ["two-aad", "lora-eft-sampled", "prompt-opad"]


@pytest.fixture(scope="module")
def models():
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    return {"two": (ma, mr), "lora": (random_lora(copy.deepcopy(ma)),), "prompt": (ma,)}


def _verify_steps(dec) -> list:
    """The ``VerifySteps`` a Decoder keeps (in its entries)."""
    return [v for ent in dec._entries.values() for key, v in ent.items()
            if isinstance(key, tuple) and key[0] == "verify"]


@pytest.mark.parametrize("kind,rule", CASES, ids=IDS)
def test_compiled_verify_step_gives_the_eager_and_plain_tokens(models, kind, rule):
    kw = dict(max_batch_size=4, max_seq_len=48)
    plain = Decoder(*models[kind], compile=False, **kw).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    eager = Decoder(*models[kind], compile=False, draft=Oracle(PROMPTS, plain, p=0.6, seed=1),
                    speculate=3, **kw).generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    dec = Decoder(*models[kind], compile=True, draft=Oracle(PROMPTS, plain, p=0.6, seed=1),
                  speculate=3, **kw)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10)
    assert got.stats["compiled"] and not eager.stats["compiled"]
    assert not got.stats["cuda_graphs"]
    assert got.tokens == eager.tokens == plain.tokens
    assert got.finish_reason == plain.finish_reason
    assert 0 < sum(got.stats["accepted"]) < sum(got.stats["drafted"])  # right at random
    [vs] = _verify_steps(dec)
    assert vs.compiles == len(vs.modes) >= 1 and not vs.failed
    assert {w for w, _ in vs.modes} <= {1, 4}  # widths 1 and k + 1 only
    assert all(mode == (False, True) for mode in vs.modes.values())
    # the read lengths counted by the host: one per verify step, at the rungs built
    assert sum(got.stats["read_lengths"].values()) == got.stats["steps"] - 1
    assert set(got.stats["read_lengths"]) == {n for _, n in vs.modes}


class FakeGraph:
    """CPU stand-in of ``engine.StepGraph`` for verify steps: made like a capture (warm-up runs
    undone), then each replay runs the step at the length and width it was made for,
    checking that the length covers every live row's last written slot and is the smallest
    rung that does."""

    made: list = []  # (width, read length) of each graph made, in order
    runs: list = []

    def __init__(self, pair, selector, st, step=None, pool=None):
        assert isinstance(step, functools.partial) and step.func is spec.verify_advance
        self.pair, self.step, self.width = pair, step, step.args[-1]
        self.len = pair.runners[0].fixed_len
        assert self.len is not None and all(r.fixed_len == self.len for r in pair.runners)
        engine.undone(pair, selector, st, lambda: [step() for _ in range(3)])
        FakeGraph.made.append((self.width, self.len))

    def __call__(self):
        for r in self.pair.runners:
            assert r.fixed_len == self.len
            live = [i for i, b in enumerate(r.bound.base) if b is not None]
            if live:  # device truth: the last slot this step writes
                need = int(r.slot[live].max()) + self.width
                assert self.len >= min(need, LADDER[-1]), (self.len, need)
                smaller = [n for n in LADDER if n < self.len]
                assert not smaller or smaller[-1] < need, (self.len, need)
        FakeGraph.runs.append((self.width, self.len))
        self.step()


@pytest.fixture
def fake_graphs(monkeypatch):
    FakeGraph.made, FakeGraph.runs = [], []
    monkeypatch.setattr(engine, "StepGraph", FakeGraph)
    monkeypatch.setitem(cache.MIN_READ, "cpu", LADDER[0])


@pytest.mark.parametrize("kind,rule", CASES, ids=IDS)
def test_graph_mode_verify_steps_per_width_and_read_length(models, fake_graphs, kind, rule):
    """Graph mode on CPU (``use_graphs``, the capture a stand-in): rows grow past two rungs
    and are refilled (5 prompts, 2 rows); one graph per (width, rung) reached, replayed for
    every later step there; the tokens are the plain decode's."""
    prompts = PROMPTS + [[1, 4], [1, 30, 31, 32, 33, 34, 35, 2]]
    kw = dict(max_batch_size=2, max_seq_len=64)
    plain = Decoder(*models[kind], compile=False, **kw).generate(
        input_ids=prompts, rule=rule, max_new_tokens=36)
    dec = Decoder(*models[kind], compile=False, speculate=3,
                  draft=Oracle(prompts, plain, p=0.7, seed=2), **kw)
    dec.use_graphs = True
    got = dec.generate(input_ids=prompts, rule=rule, max_new_tokens=36)
    assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason
    assert got.stats["cuda_graphs"] and not got.stats["compiled"]
    assert len(FakeGraph.made) == len(set(FakeGraph.made))  # each built once
    assert {n for _, n in FakeGraph.made} == {16, 32, 64}
    assert 4 in {w for w, _ in FakeGraph.runs} <= {1, 4}  # widths k + 1 and 1 only
    assert len(FakeGraph.runs) == got.stats["steps"] - 1  # every verify step replayed
    reads = {}
    for _, n in FakeGraph.runs:
        reads[n] = reads.get(n, 0) + 1
    assert got.stats["read_lengths"] == reads
    runs = len(FakeGraph.runs)  # a second call replays the kept graphs (builds only new ones)
    again = dec.generate(input_ids=prompts[::-1], rule=rule, max_new_tokens=36)
    assert again.tokens == plain.tokens[::-1] and again.stats["cuda_graphs"]
    assert len(FakeGraph.made) == len(set(FakeGraph.made))
    assert len(FakeGraph.runs) - runs == again.stats["steps"] - 1


def test_a_speculative_scheduler_in_graph_mode(models, fake_graphs):
    ref = Decoder(*models["two"], max_batch_size=4, max_seq_len=64)
    want = [ref.generate(input_ids=[p], rule=AAD(0.1), max_new_tokens=20).tokens[0]
            for p in PROMPTS]
    dec = Decoder(*models["two"], max_batch_size=4, max_seq_len=64,
                  draft=spec.FixedDraft(_wrong), speculate=2)
    dec.use_graphs = True
    sched = dec.scheduler(AAD(0.1), rows=2)
    handles = [sched.submit(dec.request(input_ids=p, max_new_tokens=20)) for p in PROMPTS]
    sched.run_until_idle()
    assert [h.tokens for h in handles] == want
    assert FakeGraph.runs and {w for w, _ in FakeGraph.runs} <= {1, 3}


def test_a_failed_capture_or_compile_runs_the_eager_verify_step(models, monkeypatch):
    tries = []
    monkeypatch.setattr(engine, "try_capture", lambda *a, **k: tries.append(1))
    kw = dict(max_batch_size=4, max_seq_len=64, draft=spec.FixedDraft(_wrong), speculate=3)
    plain = Decoder(*models["two"], max_batch_size=4, max_seq_len=64).generate(
        input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=12)
    dec = Decoder(*models["two"], **kw)
    dec.use_graphs = True
    for _ in range(2):
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=12)
        assert got.tokens == plain.tokens and not got.stats["cuda_graphs"]
    assert len(tries) == 1  # tried once, then eager for good

    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(verify_steps.torch, "compile", broken)
    engine._warned.discard(("torch.compile of the verify step", "LlamaForCausalLM"))
    with pytest.warns(UserWarning, match="torch.compile of the verify step failed"):
        got = Decoder(*models["two"], compile=True, **kw).generate(
            input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=12)
    assert got.tokens == plain.tokens and not got.stats["compiled"]


def test_auto_compile_of_verify_steps_has_its_own_record(models, tmp_path, monkeypatch):
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", str(tmp_path / "t.json"))
    tuning.forget()
    plain = Decoder(*models["two"], max_batch_size=2, max_seq_len=48, threads="keep")
    dec = Decoder(*models["two"], max_batch_size=2, max_seq_len=48, threads="keep",
                  draft=spec.FixedDraft(_wrong), speculate=4)
    key = dec._compile_key("ar", 2)
    assert key == plain._compile_key("ar", 2) + "/verify4"
    out = dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=12)
    assert not out.stats["compiled"]  # nothing measured: eager
    assert tuning.cached(key)["eager_ms"] == out.stats["ms_per_token"]
    assert tuning.cached(plain._compile_key("ar", 2)) is None
    # two verify steps (widths 1 and k + 1) per rung: 2000 tokens save 4 s, two compiles cost
    tuning.store(key, {"eager_ms": 10.0, "compiled_ms": 8.0, "compile_s": 1.9})
    assert dec._wants_compile(key, 2000)
    tuning.store(key, {"eager_ms": 10.0, "compiled_ms": 8.0, "compile_s": 2.1})
    assert not dec._wants_compile(key, 2000)
    tuning.forget()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,rule", CASES, ids=IDS)
def test_captured_verify_steps_on_cuda_give_the_plain_tokens(kind, rule):
    """Real CUDA graphs: the captured verify steps give the eager speculative tokens (same
    kernels) and the plain decode's, on a first call (capture) and a second (replay)."""
    ma, mr = tiny_model("llama", 0).cuda(), tiny_model("llama", 1).cuda()
    args = {"two": (ma, mr), "lora": (random_lora(copy.deepcopy(ma)).cuda(),),
            "prompt": (ma,)}[kind]
    kw = dict(max_batch_size=4, max_seq_len=64)
    plain = Decoder(*args, cuda_graphs=False, **kw).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=24)
    eager = Decoder(*args, cuda_graphs=False, speculate=3,
                    draft=Oracle(PROMPTS, plain, p=0.6, seed=1), **kw).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=24)
    dec = Decoder(*args, cuda_graphs=True, speculate=3,
                  draft=Oracle(PROMPTS, plain, p=0.6, seed=1), **kw)
    for i in range(2):
        got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=24)
        assert got.stats["cuda_graphs"] is True, i
        if i == 0:
            assert got.tokens == eager.tokens  # the same drafts: the same steps
        assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason, i
