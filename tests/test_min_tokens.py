"""``min_tokens`` and ``ignore_eos`` (``steps.early_stops``, ``selectors.ban_``): the stop ids
(EOS included) cannot be chosen before ``min_tokens`` tokens, for every per-token rule, on the
static batch and on the scheduler with per-row values admitted mid-decode; with ``ignore_eos``
the model's EOS does not end a row. Tokens are compared exactly with the naive loop of
docs/rules.md with the same mask: -inf at the stop ids in what the rule chooses from (the aligned
logits for AAD / Contrastive / Greedy, the mixed ``z`` for Mix before its filters, OPAD's
combined score), the streams themselves unmasked."""
import copy
import math

import pytest
import torch
from conftest import EOS, naive_decode, tiny_model

from aad_fast import AAD, CFG, EFT, OPAD, Contrastive, Decoder, DeRa, Greedy
from aad_fast.ops.reference import gumbel_noise

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22], [1, 4], [1, 11, 12]]
PRINCIPLE = [30, 31, 32]
NINF = torch.tensor(-math.inf)


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


def _masked(x, banned):
    x = x.clone()
    if banned:
        x[list(banned)] = -math.inf
    return x


def aad_choose(alpha, beta=1.0):
    def choose(a, r, t, hist, banned):
        la, lr = _masked(a, banned).log_softmax(-1), r.log_softmax(-1)
        cand = la >= la.max() + (math.log(alpha) if alpha > 0 else -math.inf)
        return int(torch.where(cand, la - beta * lr, NINF).argmax())
    return choose


def greedy_choose(a, r, t, hist, banned):
    return int(_masked(a, banned).argmax())


def mix_choose(w_a, w_r, temperature=0.0, seed=0):
    def choose(a, r, t, hist, banned):
        z = w_a * a.log_softmax(-1) + (w_r * r.log_softmax(-1) if w_r else 0.0)
        z = _masked(z, banned)
        if temperature == 0:
            return int(z.argmax())
        z = z / temperature
        return int((z + gumbel_noise(torch.tensor([seed]), torch.tensor(t), z.shape[0])[0])
                   .argmax())
    return choose


def opad_choose(k):
    def choose(a, r, t, hist, banned):
        la, lr = a.log_softmax(-1), r.log_softmax(-1)
        if t == 0:
            return int(_masked(la, banned).argmax())
        pa, pr = hist[-1]
        z = (1 + k) * la - k * lr + k * (pa.log_softmax(-1) - pr.log_softmax(-1))
        return int(_masked(z, banned).argmax())
    return choose


def naive_min(choose, models, prompts, max_new, stops, min_tokens, prompts_r=None):
    """conftest's ``naive_decode`` with ``min_tokens``: ``choose`` is told the ids it may not
    choose (the stop ids while ``t < min_tokens``)."""
    return naive_decode(choose, models, prompts, max_new, stops, prompts_r, min_tokens)


def _early_stops(dec, rule, prompts, **kw):
    """Stop ids that end the rows early without min_tokens: each row's first two free tokens."""
    free = dec.generate(input_ids=prompts, rule=rule, max_new_tokens=4, stop=[], **kw)
    return sorted({t for toks in free.tokens for t in toks[:2]} - {EOS})[:15]


CASES = [("aad", AAD(0.1), aad_choose(0.1)),
         ("contrastive", Contrastive(0.2, beta=0.5), aad_choose(0.2, 0.5)),
         ("greedy", Greedy(), greedy_choose),
         ("eft", EFT(4.0), mix_choose(4.0, -3.0)),
         ("dera-sampled", DeRa(0.5, temperature=0.7, seed=3), mix_choose(0.5, 0.5, 0.7, 3))]


@pytest.mark.parametrize("name,rule,choose", CASES, ids=[c[0] for c in CASES])
def test_min_tokens_masks_stop_ids_until_then(models, name, rule, choose):
    dec = Decoder(*models, max_batch_size=8, max_seq_len=48, compile=False)
    stops = _early_stops(dec, rule, PROMPTS)
    free = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10, stop=stops)
    assert any(len(t) < 4 for t in free.tokens)  # without min_tokens some rows end early
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=10, stop=stops,
                       min_tokens=4)
    want = naive_min(choose, models, PROMPTS, 10, (EOS, *stops), 4)
    assert got.tokens == want
    assert all(len(t) >= 4 for t in got.tokens)
    # the same without the mask: the naive loop with min_tokens 0 is the plain decode
    assert free.tokens == naive_min(choose, models, PROMPTS, 10, (EOS, *stops), 0)


def test_min_tokens_opad_and_cfg_one_model(models):
    model = models[0]
    dec = Decoder(model, max_batch_size=8, max_seq_len=48, compile=False)
    for rule, choose, ids_r in (
            (OPAD(1.0, principle_ids=PRINCIPLE), opad_choose(1.0), PROMPTS),
            (CFG(1.5, negative_ids=[1]), mix_choose(1.5, -0.5), None)):
        stops = _early_stops(dec, rule, PROMPTS)
        got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=9, stop=stops,
                           min_tokens=5)
        if ids_r is None:  # CFG's unconditional prompt: the negative ids
            prompts_a, prompts_r = PROMPTS, [[1]] * len(PROMPTS)
        else:
            prompts_a, prompts_r = [PRINCIPLE + p for p in PROMPTS], PROMPTS
        want = naive_min(choose, (model, model), prompts_a, 9, (EOS, *stops), 5, prompts_r)
        assert got.tokens == want, rule
        assert all(len(t) >= 5 for t in got.tokens)


def test_scheduler_per_row_min_tokens_admitted_mid_decode(models):
    """Rows with their own min_tokens (0 among them) in one batch, refilled: each equals the
    naive loop with its own mask."""
    dec = Decoder(*models, max_batch_size=2, max_seq_len=48, compile=False, check_every=2)
    stops = _early_stops(dec, AAD(0.1), PROMPTS)
    sched = dec.scheduler(AAD(0.1), min_tokens=True)
    mins = [3, 0, 6, 1, 4]
    hs = [sched.submit(dec.request(input_ids=p, rule=AAD(0.1), max_new_tokens=8, stop=stops,
                                   min_tokens=m)) for p, m in zip(PROMPTS, mins)]
    sched.run_until_idle()
    for h, p, m in zip(hs, PROMPTS, mins):
        assert h.tokens == naive_min(aad_choose(0.1), models, [p], 8, (EOS, *stops), m)[0]
    plain = dec.scheduler(AAD(0.1))
    with pytest.raises(ValueError, match="min_new_tokens needs a scheduler built for it"):
        plain.submit(dec.request(input_ids=PROMPTS[0], max_new_tokens=4, min_tokens=2))


def test_ignore_eos_runs_to_max_tokens(models):
    """A model whose EOS it chooses early: with ignore_eos the rows run to max_new_tokens
    (the caller's stop ids still end them)."""
    a, r = (copy.deepcopy(m) for m in models)
    free = Decoder(a, r, max_batch_size=8, max_seq_len=48, compile=False).generate(
        input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=6, stop=[])
    eos = free.tokens[0][1]
    for m in (a, r):
        m.config.eos_token_id = m.generation_config.eos_token_id = eos
    dec = Decoder(a, r, max_batch_size=8, max_seq_len=48, compile=False)
    ended = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert len(ended.tokens[0]) == 1 and ended.finish_reason[0] == "stop"
    got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10, ignore_eos=True)
    assert got.tokens == naive_min(aad_choose(0.1), (a, r), PROMPTS, 10, (), 0)
    assert got.finish_reason == ["length"] * len(PROMPTS)
    other = free.tokens[1][0]
    kept = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10, ignore_eos=True,
                        stop=[other])
    assert kept.tokens == naive_min(aad_choose(0.1), (a, r), PROMPTS, 10, (other,), 0)


def test_min_tokens_refused_where_it_cannot_hold(models):
    from aad_fast import BeamAAD
    dec = Decoder(*models, max_batch_size=4, max_seq_len=48, compile=False)
    with pytest.raises(ValueError, match="min_tokens=5 exceeds max_new_tokens=3"):
        dec.generate(input_ids=PROMPTS[:1], max_new_tokens=3, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens must be"):
        dec.generate(input_ids=PROMPTS[:1], max_new_tokens=3, min_tokens=-1)
    with pytest.raises(ValueError, match="min_tokens is not supported with BeamAAD"):
        dec.generate(input_ids=PROMPTS[:1], rule=BeamAAD(2), max_new_tokens=3, min_tokens=2)
