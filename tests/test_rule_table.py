"""rules.RULE_TABLE: the one table of rule names, fields and defaults that the Python API, the
command line (``--rule``) and the server (``rule``) build rules from."""
import pytest

from aad_fast import rules as R
from aad_fast.cli import flags
from aad_fast.serve import openai_api


def test_every_front_end_reads_the_one_table():
    assert R.RULE_NAMES == tuple(R.RULE_TABLE) == flags.RULES == openai_api.RULES
    assert flags.RULE_FLAGS == {n: tuple(e.fields) for n, e in R.RULE_TABLE.items()}
    assert flags.SAMPLING_FLAGS == R.SAMPLING and openai_api._NEUTRAL is R.NEUTRAL
    # the server's names: best_of for n, greedy_stream for stream; no picker, seed always
    assert openai_api._PARAMS["best-of-n"] == {"best_of", "temperature", "top_p"}
    assert openai_api._PARAMS["greedy"] == {"greedy_stream"}


def test_defaults_build_each_rule():
    assert R.build_rule("aad", {}) == R.AAD(0.1)
    assert R.build_rule("contrastive", {}) == R.Contrastive(0.1, 1.0)
    assert R.build_rule("eft", {}) == R.EFT(4.0)
    assert R.build_rule("dera", {"lam": 0.5}) == R.DeRa(0.5)
    assert R.build_rule("cfg", {}) == R.CFG(1.5)
    assert R.build_rule("opad", {"principle": "be kind"}) == R.OPAD(1.0, principle="be kind")
    assert R.build_rule("beam-aad", {"num_beams": 2}) == R.BeamAAD(2, 0.1)
    assert R.build_rule("best-of-n", {"picker": "p"}) == R.BestOfN(2, picker="p", top_p=0.9)
    assert R.build_rule("greedy", {"stream": "r"}) == R.Greedy("r")
    assert R.build_rule("eft", {"temperature": 0.5, "top_k": 3, "seed": 2}) == \
        R.EFT(4.0, temperature=0.5, top_k=3, seed=2)


def test_a_field_the_rule_does_not_read_is_refused_by_name():
    with pytest.raises(R.UnreadFields, match=r"^beta, top_k not used by rule aad; it takes "
                                             r"alpha$") as e:
        R.build_rule("aad", {"beta": 1.0, "top_k": 3})
    assert e.value.fields == ["beta", "top_k"] and e.value.greedy
    # eft without temperature > 0 is greedy: its sampling filters and seed would do nothing
    with pytest.raises(R.UnreadFields, match="seed, top_k not used by rule eft") as e:
        R.build_rule("eft", {"top_k": 3, "seed": 1, "temperature": 0})
    assert e.value.greedy
    with pytest.raises(R.UnreadFields) as e:
        R.build_rule("best-of-n", {"picker": "p", "top_k": 3})
    assert e.value.fields == ["top_k"] and not e.value.greedy
    with pytest.raises(ValueError, match="unknown rule 'nope'; use one of aad, contrastive"):
        R.build_rule("nope", {})
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\]"):  # the rule's check
        R.build_rule("aad", {"alpha": 2.0})
