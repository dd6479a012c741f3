"""The embedded default pair and ``aad-fast demo`` leave the caller's state alone: torch's global
random generator, transformers' progress-bar switch and the warning filters; the demo's speed
line compares warmed-up runs of the same length and says what it compares."""
import argparse
import re
import warnings

import pytest
import torch

from aad_fast.toy import default


def demo_args(**kw):
    base = dict(aligned=None, reference=None, prompt=None, alpha=0.1, max_new_tokens=8)
    return argparse.Namespace(**dict(base, **kw))


def test_default_pair_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    default.default_pair()
    assert torch.equal(torch.get_rng_state(), before)


def test_stand_in_pair_leaves_the_global_rng_alone_and_is_deterministic(monkeypatch):
    from aad_fast.toy import assets

    def missing(*a, **k):
        raise FileNotFoundError("no trained pair")
    monkeypatch.setattr(assets, "load_default_pair", missing)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a1, r1, _, trained = default.default_pair()
    assert not trained and torch.equal(torch.get_rng_state(), before)
    a2, _, _, _ = default.default_pair()
    w1, w2 = a1.get_output_embeddings().weight, a2.get_output_embeddings().weight
    assert torch.equal(w1, w2)  # seeded inside: the same stand-in every time
    assert not torch.equal(w1, r1.get_output_embeddings().weight)


def test_demo_leaves_caller_state_and_prints_a_fair_speed_line(capsys):
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        filters = list(warnings.filters)
        assert default.demo(demo_args()) == 0
        assert warnings.filters == filters
    assert torch.equal(torch.get_rng_state(), before)
    assert hf_logging.is_progress_bar_enabled()
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert "Loading weights" not in out and "FutureWarning" not in out
    m = re.search(r"(\d+) decode steps \(tokens\) each, median of (\d+) runs after a warm-up",
                  out)
    assert m and int(m.group(1)) >= 2 and int(m.group(2)) == default.SPEED_REPEATS, out
    assert "AAD on the pair" in out and "greedy on the aligned model alone" in out
    assert re.search(r"AAD costs \d+\.\d\dx single-model greedy", out)


def test_timed_warms_up_and_repeats(monkeypatch):
    """``timed`` runs once untimed, then ``repeats`` times, all with the same token budget, and
    returns the median."""
    calls = []

    class Dec:
        def generate(self, prompt, rule, max_new_tokens, **kw):
            calls.append(max_new_tokens)
            ms = [100.0, 5.0, 1.0, 3.0][len(calls) - 1]  # the cold first call is the slowest
            return argparse.Namespace(stats={"ms_per_token": ms, "steps": max_new_tokens})
    ms, steps = default.timed(Dec(), "p", None, 9, 3)
    assert calls == [9, 9, 9, 9] and ms == 3.0 and steps == 9


@pytest.mark.parametrize("enabled", [True, False])
def test_quiet_restores_the_progress_bar_switch(enabled):
    from transformers.utils import logging as hf_logging
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    with default.quiet():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled() == enabled
    hf_logging.enable_progress_bar()
