"""Every decode step is capture-safe (``tests/_capture.py``): recorded op by op on CPU for
every pair kind and every rule, the BeamAAD and BestOfN steps included (the beam step after a
mid-decode admission: tests/test_beam_scheduler.py), once through the
built backend (``aad_fast::select`` opaque) and once with the PyTorch reference inlined (its
own ops inspected). A step with a planted ``.item()``, ``torch.tensor([...])`` and the like
must fail the same check (a test of the test)."""
import copy

import pytest
import torch
from _capture import CaptureChecker
from conftest import PROMPTS, random_lora, tiny_model

from aad_fast import AAD, CFG, EFT, OPAD, BeamAAD, BestOfN, Contrastive, Decoder, Greedy, Mix, ops
from aad_fast.decode import steps as engine
from aad_fast.decode import search
from aad_fast.decode import selectors

PRINCIPLE = [30, 31, 32]


def tiny_picker():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(3)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def decoders():
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    kw = dict(max_batch_size=8, max_seq_len=48)
    return {"two": (ma, mr), "lora": (random_lora(copy.deepcopy(ma)),), "prompt": (ma,), "kw": kw}


SAMPLED = dict(temperature=0.7, seed=3)
PAIR_RULES = [AAD(0.1), Contrastive(0.1, 0.5), Contrastive(0.2, 0.0), EFT(2.0),
              EFT(2.0, top_p=0.8, **SAMPLED), EFT(2.0, top_k=5, min_p=0.1, **SAMPLED),
              Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=5), CFG(1.5), Greedy("a"),
              Greedy("r"), BeamAAD(3, 0.2), BeamAAD(2, 0.1, tau=1.0, length_penalty=1.0)]
PROMPT_RULES = [OPAD(1.0, principle_ids=PRINCIPLE), CFG(1.5, negative_ids=[1]),
                CFG(1.5, top_p=0.8, **SAMPLED), Greedy("a")]
CASES = [(kind, r) for kind in ("two", "lora") for r in PAIR_RULES] + \
        [("prompt", r) for r in PROMPT_RULES] + [("two", "best-of-n"), ("prompt", "best-of-n")]


@pytest.fixture(autouse=True)
def _cuda_step(monkeypatch):
    """Check the step a CUDA graph captures: the CPU-only sparse reference projection
    (``engine.decode_one_split``, which reads a count on the host) is off, as on CUDA."""
    monkeypatch.setenv("AAD_FAST_REF_HEAD", "full")


def _inline_reference(monkeypatch):
    """Run the selection core as plain PyTorch ops the checker can see."""
    monkeypatch.setattr(selectors, "select_core",
                        lambda *a: ops._run_backend(a[-1], *a[:-1]))


def _checked(monkeypatch, name, checks):
    """Replace ``engine.<name>`` by a wrapper that runs the first call under a checker."""
    orig = getattr(engine, name)

    def wrapped(*args):
        if checks:
            return orig(*args)
        with CaptureChecker() as chk:
            orig(*args)
        checks.append(chk)
    monkeypatch.setattr(engine, name, wrapped)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("kind,rule", CASES, ids=lambda x: str(x)[:40].replace(" ", ""))
def test_decode_step_is_capture_safe(decoders, monkeypatch, backend, kind, rule):
    if backend == "torch":
        _inline_reference(monkeypatch)
    if rule == "best-of-n":
        rule = BestOfN(2, top_p=0.9, picker=tiny_picker(), seed=1)
    step = "beam_step" if isinstance(rule, BeamAAD) else "decode_one"
    checks = []
    _checked(monkeypatch, step, checks)
    be = None if backend == "default" else "torch"
    dec = Decoder(*decoders[kind], backend=be, **decoders["kw"])
    # beams: 3 prompts x 3 beams in 8 rows, so the third waits for a slot (refill)
    dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4)
    assert len(checks) == 1, f"the {step} step never ran"
    checks[0].assert_safe(f"{step} of {rule} on the {kind} pair ({backend} backend)")
    if backend == "torch":
        assert not any(op.startswith("aad_fast") for op in checks[0].ops), checks[0].ops


# ------------------------------------------------------------------------- test of the test
def _plant(kind):
    """A copy of ``engine.decode_one`` with one capture-unsafe line."""
    def step(pair, selector, st):
        la, lr = pair.step(st.tok)
        y = selector(la, lr, st.t)
        if kind == "item":
            if y[0].item() < 0:
                pass
        elif kind == "tensor":
            y = y + torch.tensor([0], device=y.device)
        elif kind == "tolist":
            y.tolist()
        elif kind == "bool":
            if (y < 0).any():
                pass
        elif kind == "mask":
            la[la > 0].sum()
        elif kind == "nonzero":
            torch.nonzero(y)
        elif kind == "factory":
            y = y + torch.zeros(y.shape[0], dtype=y.dtype)
        elif kind == "cpu":
            y.cpu()
        engine.record(st, y)
    return step


PLANTS = {"item": "item", "tensor": "torch.tensor", "tolist": "tolist",
          "bool": "__bool__", "mask": "bool mask", "nonzero": "nonzero", "factory": "without device",
          "cpu": "Tensor.cpu"}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_a_planted_unsafe_line_fails_the_check(decoders, monkeypatch, kind):
    monkeypatch.setattr(engine, "decode_one", _plant(kind))
    checks = []
    _checked(monkeypatch, "decode_one", checks)
    Decoder(*decoders["two"], **decoders["kw"]).generate(input_ids=PROMPTS, rule=AAD(0.1),
                                                         max_new_tokens=3)
    with pytest.raises(AssertionError, match=PLANTS[kind]):
        checks[0].assert_safe()


def test_host_data_is_caught_three_ways():
    """``torch.tensor`` inside the step trips the function mode, ``aten.lift_fresh`` and the
    provenance check (an input no op made and that did not exist before)."""
    x = torch.arange(4.0)
    with CaptureChecker() as chk:
        x + torch.tensor([1.0, 2.0, 3.0, 4.0])
    text = "\n".join(chk.violations)
    assert "torch.tensor(...)" in text and "lift_fresh" in text and "no op made" in text
    with CaptureChecker() as clean:
        y = x * 2.0 + torch.full((4,), 1.0, device=x.device)
        torch.where(y > 3, y, 0.0).argmax()
    clean.assert_safe()


MIN_CASES = [("two", AAD(0.1)), ("two", EFT(2.0, top_p=0.8, **SAMPLED)), ("lora", Greedy("a")),
             ("prompt", OPAD(1.0, principle_ids=PRINCIPLE)), ("prompt", CFG(1.5))]


@pytest.mark.parametrize("kind,rule", MIN_CASES, ids=lambda x: str(x)[:40].replace(" ", ""))
def test_min_tokens_step_is_capture_safe(decoders, monkeypatch, kind, rule):
    """The step with ``min_tokens`` (``steps.early_stops`` and the selectors' mask) is
    capture-safe too, and the mask runs inside it."""
    _inline_reference(monkeypatch)
    checks = []
    _checked(monkeypatch, "decode_one", checks)
    dec = Decoder(*decoders[kind], backend="torch", **decoders["kw"])
    dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4, min_tokens=3)
    assert len(checks) == 1, "the decode_one step never ran"
    checks[0].assert_safe(f"decode_one of {rule} with min_tokens on the {kind} pair")
    assert any("scatter" in op for op in checks[0].ops), checks[0].ops
