"""``decode.stop_strings``: the incremental matcher (one decode per check) equals the brute-force
definition (decode every prefix, search it) with real BPE tokenizers: Mistral's SentencePiece
model shipped in ``mistral-common`` (byte fallback, ``▁`` spaces) and a byte-level BPE trained in
``test_review_inputs``; phrases split across tokens, split multi-byte characters, ``min_tokens``,
``include``, checks every 1, 3 or 8 tokens, and the streamed text never showing what a match cuts."""
import random

import pytest
from _real_tokenizers import mistral_tokenizer
from test_review_inputs import byte_tokenizer

from aad_fast.decode.stop_strings import (StopStrings, check_stop_strings, held,
                                          reference_match)

TEXTS = ["The answer is 42.\n\nQuestion: what is 3 plus 4?\nAnswer: 7",
         "héllo wörld, ça va? naïve café — 東京 日本語 😀 emoji </s> done",
         "Let's think step by step. First, 2 + 3 = 5. So the answer is 5.\n\n\nQ:",
         "a\n\n\n\nb <|im_end|> c Question: d Question:"]
STOPS = [["\n\n"], ["Question:"], ["answer is", "\n"], ["日本", "😀"], ["5.\n\n", "5"],
         ["<|im_end|>", "</s>"], ["swer", "answer is 42", "42."], ["é", "ça"],
         ["nothing here"]]


def _tokenizers():
    tok = mistral_tokenizer()
    return [pytest.param("byte-bpe", byte_tokenizer(), id="byte-bpe"),
            pytest.param("mistral-sp", tok, id="mistral-sp", marks=pytest.mark.skipif(
                tok is None, reason="needs mistral-common (the test extra) for its tokenizer "
                                    "file"))]


TOKENIZERS = _tokenizers()


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _sequences(tok, seed=0):
    """Encoded texts, and random id runs (byte tokens among them: split characters)."""
    rng = random.Random(seed)
    seqs = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    ids = sorted({i for s in seqs for i in s})
    for _ in range(12):
        s = seqs[rng.randrange(len(seqs))]
        cut = rng.randrange(len(s))
        seqs.append(s[:cut] + [rng.choice(ids) for _ in range(rng.randrange(1, 12))] + s[cut:])
    return seqs


def incremental(tokens, stops, decode, every, **kw):
    """``StopStrings`` fed at check points every ``every`` tokens, then the final check."""
    m = StopStrings(stops, decode, **kw)
    for n in range(every, len(tokens), every):
        got = m.check(tokens[:n])
        if got is not None:
            return got
    return m.check(tokens, final=True)


@pytest.mark.parametrize("name,tok", TOKENIZERS)
def test_incremental_equals_reference(name, tok):
    dec = _decode(tok)
    found = 0
    for i, seq in enumerate(_sequences(tok)):
        for stops in STOPS:
            for every, include, min_tokens in ((1, False, 0), (3, True, 0), (8, False, 5),
                                               (2, False, 12)):
                want = reference_match(seq, stops, dec, include=include, min_tokens=min_tokens)
                got = incremental(seq, stops, dec, every, include=include,
                                  min_tokens=min_tokens)
                assert got == want, (name, i, stops, every, include, min_tokens)
                found += want is not None
    assert found > 50  # the cases do stop, many of them


def test_split_phrase_and_trim():
    """A phrase made of several tokens is found; the output is cut where it starts, the
    tokens end with the one that completes it."""
    tok = byte_tokenizer()
    dec = _decode(tok)
    ids = tok.encode("what is 2 plus 3 ? it is five .", add_special_tokens=False)
    m = reference_match(ids, ["plus 3"], dec)
    assert m.text == "what is 2 " and m.stop == "plus 3"
    assert dec(ids[:m.n_tokens]).startswith("what is 2 plus 3")
    assert "plus 3" not in dec(ids[:m.n_tokens - 1])
    assert reference_match(ids, ["plus 3"], dec, include=True).text == "what is 2 plus 3"


@pytest.mark.parametrize("name,tok", TOKENIZERS)
def test_streamed_text_is_never_cut(name, tok):
    """What a stream shows at each check (``shown`` of the stable text) is a prefix of the final
    output, match or not."""
    dec = _decode(tok)
    for seq in _sequences(tok, seed=1):
        for stops in STOPS:
            m = StopStrings(stops, dec)
            final = reference_match(seq, stops, dec)
            out = final.text if final is not None else dec(seq)
            for n in range(1, len(seq) + 1):
                got = m.check(seq[:n], final=n == len(seq))
                if got is not None:
                    break
                shown = m.shown(dec(seq[:n]).rstrip("\ufffd"))
                assert out.startswith(shown), (stops, n, shown, out)


def test_held_suffix():
    assert held("the answer is", ["is 4", "\n\n"]) == 2
    assert held("abc\n", ["\n\n"]) == 1
    assert held("abc", ["\n\n"]) == 0
    assert held("xQuest", ["Question:", "Que"]) == 5


def test_check_stop_strings():
    assert check_stop_strings("a") == ("a",)
    assert check_stop_strings(["a", "b", "a"]) == ("a", "b")
    for bad in ([""], [3], 3, [None]):
        with pytest.raises(ValueError, match="stop"):
            check_stop_strings(bad)


# ------------------------------------------------------------------ through the Decoder
def _decoder(tok, seed=0):
    from test_review_inputs import model_for

    from aad_fast import Decoder
    return Decoder(model_for(tok, seed), model_for(tok, seed + 1), tokenizer=tok,
                   max_batch_size=2, max_seq_len=96, check_every=3, compile=False)


@pytest.mark.parametrize("name,tok", TOKENIZERS)
def test_decoder_stop_strings_equal_decode_then_search(name, tok):
    """``generate(stop=[...])`` equals decoding with the strings' stop ids only (a single-token
    string is also an id: the device path, tested against the naive loop elsewhere), then the
    brute-force search of the strings on those tokens (the row's text cut, the tokens up to
    the completing one), for phrases taken from the free text across token boundaries, with
    min_tokens and include; the streamed pieces join to the same text."""
    from aad_fast import AAD, EFT
    dec = _decoder(tok)
    prompts = ["the quick brown fox", "héllo wörld, ça va?", "Question: what is 2 plus 3?"]
    checked = matched = 0
    rules = (AAD(0.1), EFT(2.0, temperature=1.0, seed=5))
    if name == "mistral-sp":  # a 32000-token vocabulary: fewer cases, the same checks
        rules, prompts = rules[:1], prompts[1:]
    for rule in rules:
        free = dec.generate(prompts, rule=rule, max_new_tokens=30)
        for p, text in zip(prompts, free.text):
            stable = text.rstrip("\ufffd")
            phrases = [stable[i:i + 3] for i in (2, 7, 13) if len(stable) > i + 3]
            for stops, kw in ((phrases[:1], {}), (phrases[1:], {"include_stop": True}),
                              (phrases, {"min_tokens": 6}), (["zz\nzz"], {})):
                if not stops or not all(stops):
                    continue
                got = dec.generate(p, rule=rule, max_new_tokens=30, stop=stops, **kw)
                ids, strings = dec.stops(stops)
                base = dec.generate(p, rule=rule, max_new_tokens=30, stop=ids,
                                    min_tokens=kw.get("min_tokens", 0))
                toks = base.tokens[0]
                want = reference_match(toks, strings, _decode(tok),
                                       include=kw.get("include_stop", False),
                                       min_tokens=kw.get("min_tokens", 0))
                if want is None:
                    assert (got.tokens[0], got.text[0]) == (toks, base.text[0])
                else:
                    assert (got.tokens[0], got.text[0]) == (toks[:want.n_tokens], want.text)
                    assert got.finish_reason[0] == "stop"
                    matched += 1
                joined = "".join(dec.stream(p, rule=rule, max_new_tokens=30, stop=stops, **kw))
                assert joined == got.text[0]
                checked += 1
    assert matched > 3 and checked > matched


def test_scheduler_stop_strings_per_request():
    """Requests with and without stop strings in one scheduler, admitted as rows free up:
    each equals its own decode-then-search."""
    from aad_fast import AAD
    tok = byte_tokenizer()
    dec = _decoder(tok, seed=2)
    prompts = ["the quick brown fox", "what is 2 plus 3 ?", "naïve café", "東京", "Hello , world"]
    free = dec.generate(prompts, rule=AAD(0.1), max_new_tokens=20)
    sched = dec.scheduler(AAD(0.1), rows=2)
    stops = [[t.rstrip("\ufffd")[3:6]] if i % 2 == 0 else None
             for i, t in enumerate(free.text)]
    hs = [sched.submit(dec.request(p, rule=AAD(0.1), max_new_tokens=20, stop=s))
          for p, s in zip(prompts, stops)]
    sched.run_until_idle()
    for h, toks, text, s in zip(hs, free.tokens, free.text, stops):
        want = reference_match(toks, s, _decode(tok)) if s else None
        if want is None:
            assert h.tokens == toks and h.text is None
        else:
            assert (h.tokens, h.text, h.stop_reason) == (toks[:want.n_tokens], want.text, s[0])


def test_stop_strings_with_speculative_decoding():
    """A speculating Decoder (prompt-lookup draft, several tokens per verify step) stops on the
    same phrases with the same tokens and text as the plain one: the match is made on the
    host at each check, whatever ran in between."""
    from test_review_inputs import model_for

    from aad_fast import AAD, Decoder
    tok = byte_tokenizer()
    models = (model_for(tok, 4), model_for(tok, 5))
    kw = dict(tokenizer=tok, max_batch_size=2, max_seq_len=96, compile=False)
    from aad_fast.decode.speculate import FixedDraft
    plain = Decoder(*models, **kw)
    prompts = ["the quick brown fox", "what is 2 plus 3 ?", "Hello , world"]
    free = plain.generate(prompts, rule=AAD(0.1), max_new_tokens=24)
    truth = [(tok.encode(p), t) for p, t in zip(prompts, free.tokens)]

    def oracle(row, context, k):  # the true continuation: several tokens per verify step
        ids, rest = next((ids, t) for ids, t in truth if context[:len(ids)] == ids)
        return rest[len(context) - len(ids):][:k]
    fast = Decoder(*models, draft=FixedDraft(oracle), speculate=3, **kw)
    stops = [t.rstrip("\ufffd")[4:7] for t in free.text if len(t) > 8]
    got = fast.generate(prompts, rule=AAD(0.1), max_new_tokens=24, stop=stops)
    want = plain.generate(prompts, rule=AAD(0.1), max_new_tokens=24, stop=stops)
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text,
                                                         want.finish_reason)
    assert want.finish_reason.count("stop") >= 2
    assert sum(got.stats["accepted"]) > 0  # several tokens per verify step did run
    got = fast.generate(prompts, rule=AAD(0.1), max_new_tokens=24, stop=stops, min_tokens=6)
    want = plain.generate(prompts, rule=AAD(0.1), max_new_tokens=24, stop=stops, min_tokens=6)
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text,
                                                         want.finish_reason)
