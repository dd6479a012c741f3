"""``decode.logprobs`` / ``Decoder.logprobs``: the log-probabilities of given tokens under one
stream, from one forward of the whole sequence, equal each position's log-softmax recomputed from
scratch by a plain Hugging Face forward of that prefix (``conftest.full_logits``): two models
(``a``, ``r``), a LoRA pair (``a`` the adapter on, ``r`` a separate copy of the base without it),
one model; the top alternatives in order, ties to the lower id; ``start`` and position 0."""
import copy

import pytest
import torch
from conftest import VOCAB, full_logits, random_lora, tiny_model

from aad_fast import Decoder
from aad_fast.decode.logprobs import sequence_logprobs

IDS = [1, 5, 6, 7, 8, 9, 20, 21, 3, 40]
TOL = dict(rel=0, abs=2e-5)  # one forward of the whole sequence vs a forward per prefix


def _expect(model, ids, start, top):
    """Per position ``j >= max(start, 1)``: (log p(ids[j] | ids[:j]), the ``top`` best)."""
    out = []
    for j in range(max(start, 1), len(ids)):
        lp = full_logits(model, ids[:j]).log_softmax(-1)
        out.append((float(lp[ids[j]]), lp))
    return out


def _check(got, model, ids, start, top):
    assert got.ids == ids[start:]
    pad = max(1 - start, 0)
    assert got.logprobs[:pad] == [None] * pad and got.top[:pad] == [None] * pad
    want = _expect(model, ids, start, top)
    assert len(got.logprobs) - pad == len(want)
    for v, alts, (w, lp) in zip(got.logprobs[pad:], got.top[pad:], want):
        assert v == pytest.approx(w, **TOL)
        assert len(alts) == top
        for i, x in alts:
            assert x == pytest.approx(float(lp[i]), **TOL)
        vals = [x for _, x in alts]
        assert vals == sorted(vals, reverse=True)
        if top:  # the best one is the argmax (no ties in random float32 logits)
            assert alts[0][0] == int(lp.argmax())


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


def test_two_models_each_stream(models):
    dec = Decoder(*models, max_batch_size=1, max_seq_len=32, compile=False)
    for stream, model in zip("ar", models):
        for start, top in ((0, 3), (4, 0), (1, 5), (len(IDS), 2)):
            _check(dec.logprobs(IDS, stream=stream, top=top, start=start), model, IDS, start, top)


def test_lora_pair_adapter_on_and_off():
    base = tiny_model("llama", 2)
    plain = copy.deepcopy(base)  # the base without any adapter: the reference stream
    peft = random_lora(base, seed=1)
    dec = Decoder(peft, max_batch_size=1, max_seq_len=32, compile=False)
    _check(dec.logprobs(IDS, stream="a", top=4, start=2), peft, IDS, 2, 4)
    _check(dec.logprobs(IDS, stream="r", top=4, start=2), plain, IDS, 2, 4)
    a = dec.logprobs(IDS, stream="a", start=2).logprobs
    r = dec.logprobs(IDS, stream="r", start=2).logprobs
    assert a != r  # the adapter is really on for a and off for r
    assert peft.active_adapters == ["default"]  # the adapter is back on afterwards


def test_one_model_and_ties_to_the_lower_id():
    model = tiny_model("llama", 0)
    dec = Decoder(model, max_batch_size=1, max_seq_len=32, compile=False)
    _check(dec.logprobs(IDS, top=2), model, IDS, 1, 2)
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.lm_head.weight.zero_()  # every logit 0: all ids tie
    got = sequence_logprobs(flat, IDS, VOCAB, top=4, start=3)
    assert all([i for i, _ in alts] == [0, 1, 2, 3] for alts in got.top)


def test_bad_arguments_are_refused(models):
    dec = Decoder(*models, max_batch_size=1, max_seq_len=32, compile=False)
    with pytest.raises(ValueError, match="logprobs stream must be 'a' or 'r'"):
        dec.logprobs(IDS, stream="b")
    with pytest.raises(ValueError, match=r"ids must be a non-empty list of token ids in \[0, 61\)"):
        dec.logprobs([1, 99])
    with pytest.raises(ValueError, match="top"):
        dec.logprobs(IDS, top=-1)
