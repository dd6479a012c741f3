"""Drafts of speculative decoding (``decode/drafts.py``): n-gram proposals against a brute-force
search, the model draft against the draft model's own greedy ``generate()`` at every step
(after partial acceptance, rewinds, rows left out, refills), the refusal of a draft with
another vocabulary, the oracle's corruption rate, and ``make_draft``."""
import random
from types import SimpleNamespace

import pytest
import torch

from aad_fast.decode.drafts import (MAX_SPECULATE, Draft, ModelDraft, NgramDraft, OracleDraft,
                                    check_draft_vocab, make_draft)
from conftest import VOCAB, tiny_model


def brute_ngram(seq, k, max_n, min_n):
    """The definition: the longest suffix (max_n .. min_n) that ends earlier too; the tokens
    after its latest earlier end."""
    L = len(seq)
    for n in range(min(max_n, L), min_n - 1, -1):
        ends = [e for e in range(n, L) if seq[e - n:e] == seq[L - n:]]
        if ends:
            e = max(ends)
            return seq[e:e + k]
    return []


@pytest.mark.parametrize("max_n,min_n", [(4, 2), (3, 1), (1, 1), (6, 3)])
def test_ngram_proposals_equal_the_brute_force_search_as_rows_grow(max_n, min_n):
    rng = random.Random(max_n * 10 + min_n)
    draft = NgramDraft(max_n=max_n, min_n=min_n)
    seqs = {}
    for row in range(4):
        alphabet = rng.choice([3, 5, 12])  # small alphabets repeat, large ones rarely
        seqs[row] = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 30))]
        draft.start(row, list(seqs[row]))
    checked = hits = 0
    for _ in range(40):
        rows = rng.sample(range(4), rng.randrange(1, 5))
        k = rng.randrange(0, MAX_SPECULATE + 1)
        got = draft.propose(rows, k)
        for row, prop in zip(rows, got):
            assert prop == brute_ngram(seqs[row], k, max_n, min_n), (row, seqs[row], k)
            checked, hits = checked + 1, hits + bool(prop)
        for row in rows:
            tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 5))]
            draft.accept(row, tokens)
            seqs[row] += tokens
    assert checked >= 40 and 0 < hits < checked  # both outcomes were exercised


def test_ngram_refill_free_and_bad_arguments():
    draft = NgramDraft()
    assert isinstance(draft, Draft)
    draft.start(0, [5, 6, 7, 5, 6])
    assert draft.propose([0], 4) == [[7, 5, 6]]  # the match runs into the suffix itself
    draft.start(0, [1, 2, 3])  # refilled: the old prompt is gone
    assert draft.propose([0], 4) == [[]]
    draft.free(0)
    with pytest.raises(ValueError, match="row=0"):
        draft.propose([0], 2)
    with pytest.raises(ValueError, match="min_n"):
        NgramDraft(min_n=0)
    with pytest.raises(ValueError, match="max_n"):
        NgramDraft(max_n=1, min_n=2)
    with pytest.raises(ValueError, match="k must be"):
        NgramDraft().propose([], MAX_SPECULATE + 1)


def test_ngram_proposal_cost_does_not_grow_with_the_length():
    """A step looks up at most max_n - min_n + 1 n-grams: a 20000-token row answers from its
    index (the brute force would scan it)."""
    draft = NgramDraft(max_n=4, min_n=2)
    seq = [i % 997 for i in range(20000)]
    draft.start(0, seq)
    assert draft.propose([0], 3) == [brute_ngram(seq, 3, 4, 2)] == [seq[19003:19006]]
    assert len(draft._index[0]) <= 3 * 997  # one entry per distinct n-gram, latest end kept


@pytest.fixture(scope="module")
def draft_model():
    model = tiny_model("llama", seed=3)
    model.generation_config.eos_token_id = None  # generate() makes exactly k tokens
    return model


def hf_greedy(model, ctx, k):
    from transformers import GenerationConfig
    cfg = GenerationConfig(do_sample=False, max_new_tokens=k, eos_token_id=None, pad_token_id=0,
                           bos_token_id=None)
    ids = torch.tensor([ctx])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(ctx):].tolist()


def test_model_draft_equals_its_greedy_generate_at_every_step(draft_model):
    """Rows of different lengths; each step some rows are proposed for (the others step on
    junk that the next rewind drops), the rule 'accepts' a random prefix of the proposal and
    emits its own token after it (or more tokens without a proposal), rows are freed and
    refilled; at every step each proposal equals HF generate()'s greedy continuation."""
    rng = random.Random(0)
    draft = ModelDraft(draft_model, max_batch_size=4, max_seq_len=96)
    ctx = {}
    for row, n in enumerate((5, 11, 2)):
        ctx[row] = [rng.randrange(4, VOCAB) for _ in range(n)]
        draft.start(row, ctx[row])
    partial = full = 0
    for step in range(12):
        rows = sorted(rng.sample(sorted(ctx), rng.randrange(1, len(ctx) + 1)))
        k = rng.choice([1, 2, 4, 6, 8])
        props = draft.propose(rows, k)
        for row, prop in zip(rows, props):
            assert prop == hf_greedy(draft_model, ctx[row], k), (step, row)
            j = rng.randrange(0, k + 1)
            partial, full = partial + (0 < j < k), full + (j == k)
            emitted = prop[:j] + [rng.randrange(4, VOCAB)]
            draft.accept(row, emitted)
            ctx[row] += emitted
        for row in set(ctx) - set(rows):
            if rng.random() < 0.5:  # emitted without a proposal (a row not speculating)
                emitted = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 3))]
                draft.accept(row, emitted)
                ctx[row] += emitted
        if step == 5:  # row 1 retires, row 3 and row 1 are filled with new prompts
            draft.free(1)
            for row in (3, 1):
                ctx[row] = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 9))]
                draft.start(row, ctx[row])
    assert partial and full


def test_model_draft_of_one_token_prompt_and_repeated_proposals(draft_model):
    draft = ModelDraft(draft_model, max_batch_size=2, max_seq_len=32)
    draft.start(1, [7])
    steps = lambda: sum(draft.runner.reads.values())  # noqa: E731
    first = draft.propose([1], 3)
    assert steps() == 3  # feed 7, feed d1, feed d2 (d3 is never fed)
    assert first == draft.propose([1], 3) == [hf_greedy(draft_model, [7], 3)]
    draft.accept(1, first[0])  # every proposed token accepted (none emitted after them)
    assert draft.propose([1], 2) == [hf_greedy(draft_model, [7] + first[0], 2)]
    assert steps() == 3 + 3 + 2  # d1, d2 kept in the cache: feed d3, then one of its own


def _tok(words):
    from aad_fast.toy.tokenizer import build_tokenizer
    return build_tokenizer(words)


def test_a_draft_with_another_token_map_or_size_is_refused(draft_model):
    words = [f"w{i}" for i in range(VOCAB - 6)]
    tok = _tok(words)
    check_draft_vocab(draft_model, tok, _tok(words), VOCAB)  # the same map: accepted
    with pytest.raises(ValueError, match=r"the tokenizers of draft and the decoder differ \(tok"):
        check_draft_vocab(draft_model, _tok(words[::-1]), tok, VOCAB)
    with pytest.raises(ValueError, match=r"the tokenizers of draft and the decoder differ"):
        check_draft_vocab(draft_model, _tok(words[:-1]), tok, VOCAB)
    other = _tok(words)
    other.eos_token = "<pad>"
    with pytest.raises(ValueError, match=r"draft: its tokenizer's special ids"):
        check_draft_vocab(draft_model, other, tok, VOCAB)
    with pytest.raises(ValueError, match=r"draft: its vocabulary size 61 differs .* 64"):
        check_draft_vocab(draft_model, None, None, 64)
    with pytest.raises(ValueError, match=r"draft: its vocabulary has 61 ids, fewer than the 64"):
        check_draft_vocab(draft_model, tok, tok, 64)
    with pytest.raises(ValueError, match="draft: its vocabulary size"):
        ModelDraft(draft_model, target_vocab=VOCAB + 3)


def _decoder(model, tok=None):
    return SimpleNamespace(tokenizer=tok, vocab=VOCAB, device=torch.device("cpu"),
                           max_batch_size=2, max_seq_len=64, base=model, cpu_linear=None,
                           forward=None)


def test_make_draft_of_each_spec(draft_model, tmp_path):
    dec = _decoder(draft_model)
    assert isinstance(make_draft("ngram", dec), NgramDraft)
    mine = NgramDraft(max_n=2)
    assert make_draft(mine, dec) is mine
    assert isinstance(make_draft(draft_model, dec), ModelDraft)
    draft_model.save_pretrained(tmp_path / "d")
    words = [f"w{i}" for i in range(VOCAB - 6)]
    _tok(words[::-1]).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="the tokenizers of draft and the decoder differ"):
        make_draft(str(tmp_path / "d"), _decoder(draft_model, _tok(words)))
    loaded = make_draft(tmp_path / "d", _decoder(draft_model, _tok(words[::-1])))
    loaded.start(0, [5, 9, 4])
    assert loaded.propose([0], 3) == [hf_greedy(draft_model, [5, 9, 4], 3)]
    with pytest.raises(ValueError, match="draft='nope'"):
        make_draft("nope", dec)
    with pytest.raises(ValueError, match="draft must be"):
        make_draft(3, dec)


def test_oracle_proposes_the_truth_corrupted_at_rate_one_minus_p():
    rng = random.Random(1)
    truth = {tuple(rng.randrange(100) for _ in range(6)): [rng.randrange(100) for _ in range(400)]
             for _ in range(25)}
    exact = OracleDraft(truth, 1.0, seed=0)
    prompt, out = next(iter(truth.items()))
    exact.start(0, list(prompt))
    assert exact.propose([0], 4) == [out[:4]]
    exact.accept(0, out[:3])
    assert exact.propose([0], 8) == [out[3:11]]
    exact.accept(0, out[3:398])
    assert exact.propose([0], 4) == [out[398:]]  # fewer near the end, none past it
    exact.accept(0, out[398:])
    assert exact.propose([0], 4) == [[]]

    for p, vocab in ((0.7, 100), (0.3, None), (0.0, 100)):
        a, b = OracleDraft(truth, p, seed=5, vocab_size=vocab), OracleDraft(truth, p, seed=5,
                                                                           vocab_size=vocab)
        wrong = total = 0
        for row, (prompt, out) in enumerate(truth.items()):
            a.start(row, list(prompt))
            b.start(row, list(prompt))
            got = []
            while len(got) < len(out):
                prop = a.propose([row], 8)[0]
                assert prop == b.propose([row], 8)[0]  # deterministic per seed
                got += prop
                a.accept(row, out[len(got) - len(prop):len(got)])
                b.accept(row, out[len(got) - len(prop):len(got)])
            assert all(0 <= t < (vocab or 128) for t in got)
            wrong += sum(g != t for g, t in zip(got, out))
            total += len(out)
        # 10000 Bernoulli(1 - p) draws: within 4.5 standard deviations (p = 0: all wrong)
        assert abs(wrong - total * (1 - p)) <= 4.5 * (total * p * (1 - p)) ** 0.5, (p, wrong)
    key = next(iter(truth))
    seeded = [OracleDraft(truth, 0.7, seed=s)._corrupted(key) for s in (5, 6)]
    assert seeded[0] != seeded[1]  # another seed corrupts other positions
    a = OracleDraft(truth, 0.7, seed=5)
    with pytest.raises(ValueError, match="continuations"):
        a.start(1, [1, 2, 3])
    with pytest.raises(ValueError, match="p must be"):
        OracleDraft(truth, 1.5)


def test_the_shipped_toy_draft_is_found_by_default_and_fits_the_toy_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from aad_fast.decode.drafts import DEFAULT_DRAFT_DIR
    pair = DEFAULT_DRAFT_DIR.parent
    tok = AutoTokenizer.from_pretrained(pair / "sft", local_files_only=True)
    sft = AutoModelForCausalLM.from_pretrained(pair / "sft", dtype=torch.float32,
                                               local_files_only=True)
    dec = SimpleNamespace(tokenizer=tok, vocab=len(tok), device=torch.device("cpu"),
                          max_batch_size=1, max_seq_len=64, base=sft, cpu_linear=None,
                          forward=None)
    draft = make_draft("default", dec)
    assert isinstance(draft, ModelDraft) and draft.limit == len(tok)
    assert sum(p.numel() for p in draft.model.parameters()) < 0.1 * sum(
        p.numel() for p in sft.parameters())  # a tenth of the SFT model's size at most
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3 ?"}],
                                         tokenize=False, add_generation_prompt=True))["input_ids"]
    draft.start(0, prompt)
    (got,) = draft.propose([0], 4)
    assert got == hf_greedy(draft.model, prompt, 4)
    assert len(got) == 4 and all(0 <= t < len(tok) for t in got)
