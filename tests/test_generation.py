"""``Decoder``'s cache of captured steps: one entry (one graph) per batch bucket and rule kind,
serving every value of the kind, bounded (LRU).

On CPU there is no graph, so these tests run the graph-mode bookkeeping (buckets, runners
kept at ``max_seq_len``, one capture per entry) with ``engine.try_capture`` counted and the
step run eagerly; ``tests/test_gpu.py`` checks the same on a real captured graph."""
import pytest
from conftest import PROMPTS, tiny_model

from aad_fast import AAD, EFT, Contrastive, Decoder, Greedy, Mix
from aad_fast.decode import steps as engine


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture
def graph_mode(monkeypatch):
    """A Decoder factory in graph-mode bookkeeping; ``captures`` counts capture attempts."""
    captures = []

    def fake_capture(pair, selector, st, name, step=None):
        captures.append(selector)
        return None  # what try_capture returns when capture fails: the step runs eagerly
    monkeypatch.setattr(engine, "try_capture", fake_capture)

    def make(*models, **kw):
        dec = Decoder(*models, max_batch_size=4, max_seq_len=48, **kw)
        dec.use_graphs = True
        return dec
    return make, captures


def fresh(models, rule):
    return Decoder(*models, max_batch_size=4, max_seq_len=48).generate(
        input_ids=PROMPTS, rule=rule, max_new_tokens=8)


@pytest.mark.parametrize("rules", [
    [AAD(0.1), AAD(0.4), Contrastive(0.02, 1.0), AAD(0.1)],
    [Contrastive(0.1, 0.5), Contrastive(0.3, 2.0), Contrastive(0.1, 0.0)],
    [EFT(2.0, temperature=0.7, top_p=0.8, seed=1), EFT(2.0, temperature=0.7, top_p=0.8, seed=2),
     EFT(3.0, temperature=1.2, top_p=0.5, top_k=7, min_p=0.05, seed=1)],
    [Mix(1.0, 0.0, temperature=1.0, seed=4), Mix(2.0, 0.0, temperature=0.5, min_p=0.2, seed=9)],
    [EFT(4.0), EFT(0.5), Mix(0.3, 0.7)],
], ids=["aad", "contrastive", "sampled-filtered", "sampled", "mix-greedy"])
def test_every_value_of_a_rule_kind_shares_one_entry(models, graph_mode, rules):
    make, captures = graph_mode
    dec = make(*models)
    seen = []
    for rule in rules:
        got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=8)
        assert got.tokens == fresh(models, rule).tokens, rule
        seen.append(got.tokens)
    assert len(captures) == 1 and len(dec._entries) == 1
    assert len({str(t) for t in seen}) > 1  # the values really changed the tokens


def test_entries_are_bounded_least_recently_used_first(models, graph_mode):
    make, captures = graph_mode
    dec = make(*models)
    dec.MAX_ENTRIES = 2
    kinds = [AAD(0.1), Contrastive(0.1, 0.5), Greedy("a")]
    for rule in kinds:
        dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4)
    assert len(dec._entries) == 2 and len(captures) == 3
    dec.generate(input_ids=PROMPTS, rule=Greedy("a"), max_new_tokens=4)  # still kept
    assert len(captures) == 3
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.3), max_new_tokens=4)  # evicted: again
    assert len(captures) == 4 and len(dec._entries) == 2
    assert got.tokens == Decoder(*models, max_batch_size=4, max_seq_len=48).generate(
        input_ids=PROMPTS, rule=AAD(0.3), max_new_tokens=4).tokens


def test_buckets_are_separate_entries(models, graph_mode):
    make, captures = graph_mode
    dec = make(*models)
    dec.generate(input_ids=PROMPTS[:1], rule=AAD(0.1), max_new_tokens=4)
    dec.generate(input_ids=PROMPTS, rule=AAD(0.2), max_new_tokens=4)   # bucket 4
    dec.generate(input_ids=PROMPTS[:1], rule=AAD(0.3), max_new_tokens=4)
    assert len(captures) == 2 and len(dec._entries) == 2
