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
    out = [("byte-bpe", byte_tokenizer())]
    tok = mistral_tokenizer()
    if tok is not None:
        out.append(("mistral-sp", tok))
    return out


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


@pytest.mark.parametrize("name,tok", TOKENIZERS, ids=[n for n, _ in TOKENIZERS])
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


@pytest.mark.parametrize("name,tok", TOKENIZERS, ids=[n for n, _ in TOKENIZERS])
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
