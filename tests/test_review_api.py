"""Fixes from the user-side review (/tmp/review/REPORT.md #7, #9, #10, #11, #13): seeds bounded
to int64 and never rounded, numpy integers taken where rules take ints, BeamAAD naming the model
whose logits were NaN, the server's streamed text equal to the non-streamed text, its
``stop_token_ids`` and sampling-field checks, and the CLI's defaults and ``--stop-id``."""
import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import EOS, PROMPTS, tiny_model

import aad_fast as af
from aad_fast.cli import build_parser, main, rule_from_args
from aad_fast.decode.scheduler import Request
from aad_fast.decode.selectors import make_selector

HAVE_SERVE = all(importlib.util.find_spec(m) for m in ("fastapi", "httpx"))
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="needs aad_fast[serve] and httpx")
SEED_MAX = 2**63 - 1  # seeds are int64


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture(scope="module")
def dec(models):
    return af.Decoder(*models, max_batch_size=4, max_seq_len=48)


# ------------------------------------------------------------------ #7 seeds
@pytest.mark.parametrize("bad", [2**63, 2**64, -1, -5, 1.7, 3.0, True, "1", np.float64(2.0)])
def test_rule_seeds_outside_int64_or_not_ints_are_refused(bad):
    for make in (lambda s: af.EFT(2.0, temperature=1.0, seed=s),
                 lambda s: af.Mix(1.0, 0.0, temperature=1.0, seed=s),
                 lambda s: af.BestOfN(2, picker="p", seed=s)):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*63 - "):
            make(bad)


def test_largest_seed_decodes_and_best_of_n_leaves_room_for_its_samples(dec):
    rule = af.EFT(2.0, temperature=1.0, seed=SEED_MAX)
    got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=5)
    again = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=5)
    assert got.tokens == again.tokens and all(got.tokens)
    # best-of-n samples with seed + j: every one must fit int64
    assert af.BestOfN(3, picker="p", seed=SEED_MAX - 2).seed == SEED_MAX - 2
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 3\]"):
        af.BestOfN(3, picker="p", seed=SEED_MAX - 1)


@pytest.mark.parametrize("bad", [1.7, 1.0, -5, 2**63, True, np.float32(1.0)])
def test_request_seed_is_validated_never_rounded(dec, bad):
    rule = af.EFT(2.0, temperature=1.0)
    with pytest.raises(ValueError, match="seed must be an int"):
        dec.request(input_ids=PROMPTS[0], rule=rule, max_new_tokens=4, seed=bad)
    with pytest.raises(ValueError, match="seed must be an int"):
        Request(ids_a=PROMPTS[0], seed=bad)
    # a request changed after it was made is checked again when submitted
    sch = dec.scheduler(rule, rows=1)
    r = dec.request(input_ids=PROMPTS[0], rule=rule, max_new_tokens=4, seed=1)
    r.seed = bad
    with pytest.raises(ValueError, match="seed must be an int"):
        sch.submit(r)
    # the selector's own per-request override
    sel = make_selector(rule, 2, 61, "cpu")
    with pytest.raises(ValueError, match="seed must be an int"):
        sel.set_rows(torch.tensor([0]), rule, bad)


def test_request_numbers_are_ints_in_range(dec):
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 4.0"):
        Request(ids_a=[1, 2], max_new_tokens=4.0)
    with pytest.raises(ValueError, match=r"stop_ids must be token ids .* got 3.0"):
        Request(ids_a=[1, 2], stop_ids=(3.0,))
    with pytest.raises(ValueError, match=r"ids_a must be token ids .* got 2.5"):
        Request(ids_a=[1, 2.5])
    with pytest.raises(ValueError, match=r"request 'x': ids_r must be token ids .* got -1"):
        Request(ids_a=[1, 2], ids_r=[1, -1], tag="x")
    sch = dec.scheduler(af.AAD(0.1), rows=1)
    with pytest.raises(ValueError, match=r"ids_a must be token ids \(ints in \[0, 61\)\), got 61"):
        sch.submit(Request(ids_a=[1, 61]))


def test_numpy_seed_and_limits_decode_like_ints(dec):
    rule = af.EFT(2.0, temperature=1.0, top_k=5)
    sch = dec.scheduler(rule, rows=2)
    a = sch.submit(Request(ids_a=PROMPTS[0], max_new_tokens=np.int64(6), seed=np.int64(9),
                           stop_ids=(np.int64(EOS),)))
    b = sch.submit(Request(ids_a=PROMPTS[0], max_new_tokens=6, seed=9, stop_ids=(EOS,)))
    sch.run_until_idle()
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    assert type(a.request.seed) is int and type(a.request.max_new_tokens) is int


# ------------------------------------------------------------------ #11 numpy ints in rules
def test_rules_take_numpy_integers_and_store_python_ints(dec):
    three = np.int64(3)
    m = af.Mix(1.0, 0.0, temperature=1.0, top_k=three, seed=np.int32(4))
    assert (m.top_k, m.seed) == (3, 4) and type(m.top_k) is int and type(m.seed) is int
    assert m == af.Mix(1.0, 0.0, temperature=1.0, top_k=3, seed=4)
    assert af.BeamAAD(np.int64(2)).num_beams == 2
    b = af.BestOfN(np.uint8(2), picker="p", seed=np.int64(7))
    assert (b.n, b.seed) == (2, 7)
    assert af.OPAD(1.0, principle_ids=np.array([4, 5])).principle_ids == (4, 5)
    assert af.CFG(1.5, negative_ids=[np.int64(2)]).negative_ids == (2,)
    # the same tokens as with Python ints
    got = dec.generate(input_ids=PROMPTS, rule=af.EFT(2.0, temperature=1.0, top_k=three,
                                                      seed=np.int64(3)), max_new_tokens=6)
    want = dec.generate(input_ids=PROMPTS, rule=af.EFT(2.0, temperature=1.0, top_k=3, seed=3),
                        max_new_tokens=6)
    assert got.tokens == want.tokens


@pytest.mark.parametrize("bad", [3.0, np.float64(3.0), True, np.bool_(True), "3"])
def test_rules_still_refuse_floats_and_bools_as_ints(bad):
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        af.Mix(1.0, 0.0, temperature=1.0, top_k=bad)
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        af.BeamAAD(bad)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        af.BestOfN(bad, picker="p")
    with pytest.raises(ValueError, match="principle_ids must be a non-empty list"):
        af.OPAD(1.0, principle_ids=[bad])


# ------------------------------------------------------------------ #9 BeamAAD, NaN logits
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_beam_with_a_nan_reference_names_the_reference(models, backend):
    ma, mr = models
    bad = copy.deepcopy(mr)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    d = af.Decoder(ma, bad, max_batch_size=4, max_seq_len=40, backend=backend)
    with pytest.raises(RuntimeError) as err:
        d.generate(input_ids=PROMPTS[:2], rule=af.BeamAAD(2, 0.1), max_new_tokens=4)
    msg = str(err.value)
    assert msg.startswith("row 0: the reference model's logits (stream r) were all -inf/NaN")
    assert "aligned" not in msg
    # the per-token rules say the same of this reference
    with pytest.raises(RuntimeError, match=r"the reference model's logits \(stream r\) were all "
                                           "-inf/NaN"):
        d.generate(input_ids=PROMPTS[:2], rule=af.AAD(0.1), max_new_tokens=4)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_beam_with_a_nan_aligned_model_names_the_aligned_model(models, backend):
    ma, mr = models
    bad = copy.deepcopy(ma)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    d = af.Decoder(bad, mr, max_batch_size=4, max_seq_len=40, backend=backend)
    with pytest.raises(RuntimeError, match="row 0: no AAD candidate: the aligned model's logits "
                                           "were all -inf/NaN"):
        d.generate(input_ids=PROMPTS[:2], rule=af.BeamAAD(2, 0.1), max_new_tokens=4)


# ------------------------------------------------------------------ #10 the server
def _byte_chars():
    """The byte-level BPE alphabet: byte ``b`` -> its printable stand-in character."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


SERVE_PROMPT = [1, 5, 6, 7]


@pytest.fixture(scope="module")
def byte_server():
    """A random 256-token pair with a byte-level tokenizer whose id -> byte map makes the
    greedy completion of ``SERVE_PROMPT`` end in a lone UTF-8 lead byte (0xE4), so the final
    text ends with U+FFFD; a burst per token, so a stream gets text after every token."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aad_fast.serve import http as server
    a, r = tiny_model("llama", 0, vocab=256), tiny_model("llama", 1, vocab=256)
    plain = af.Decoder(a, r, max_batch_size=2, max_seq_len=64)
    toks = plain.generate(input_ids=[SERVE_PROMPT], rule=af.Greedy(), max_new_tokens=8).tokens[0]
    byte_of = list(range(256))
    j = byte_of.index(0xE4)
    byte_of[toks[-1]], byte_of[j] = 0xE4, byte_of[toks[-1]]
    ch = _byte_chars()
    t = Tokenizer(models.BPE(vocab={ch[byte_of[i]]: i for i in range(256)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    d = af.Decoder(a, r, tokenizer=tok, max_batch_size=4, max_seq_len=64, check_every=1)
    app = server.create_app(d, max_queue=8, model_name="m")
    with TestClient(app) as client:
        client.dec = d
        yield client


def _events(resp) -> list:
    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


@needs_serve
def test_streamed_text_keeps_a_trailing_replacement_char(byte_server):
    body = {"model": "m", "prompt": SERVE_PROMPT, "max_tokens": 8, "rule": "greedy"}
    whole = byte_server.post("/v1/completions", json=body).json()["choices"][0]
    want = byte_server.dec.generate(input_ids=[SERVE_PROMPT], rule=af.Greedy(), max_new_tokens=8)
    assert whole["token_ids"] == want.tokens[0] and whole["text"] == want.text[0]
    assert whole["text"].endswith("\ufffd")  # the case under test
    events = _events(byte_server.post("/v1/completions", json={**body, "stream": True}))
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert sum(1 for x in texts if x) > 1  # it did stream in pieces
    assert "".join(texts) == whole["text"]
    assert events[-1]["choices"][0]["token_ids"] == whole["token_ids"]


def _err(client, **body):
    r = client.post("/v1/completions", json={"model": "m", "prompt": SERVE_PROMPT,
                                             "max_tokens": 3, **body})
    return r.status_code, (r.json().get("error") or {}).get("param")


@needs_serve
@pytest.mark.parametrize("ids", [["the"], [True], [3.0], [3, "x"], "3"])
def test_stop_token_ids_must_be_ints(byte_server, ids):
    assert _err(byte_server, stop_token_ids=ids) == (400, "stop_token_ids")


@needs_serve
def test_stop_token_ids_ints_are_taken(byte_server):
    first = byte_server.dec.generate(input_ids=[SERVE_PROMPT], rule=af.AAD(0.1),
                                     max_new_tokens=3).tokens[0][0]
    r = byte_server.post("/v1/completions", json={"model": "m", "prompt": SERVE_PROMPT,
                                                  "max_tokens": 3, "stop_token_ids": [first]})
    ch = r.json()["choices"][0]
    assert r.status_code == 200 and ch["token_ids"] == [] and ch["finish_reason"] == "stop"


@needs_serve
@pytest.mark.parametrize("body,param", [
    ({"rule": "eft", "top_k": 3}, "top_k"),
    ({"rule": "eft", "temperature": 0, "min_p": 0.1}, "min_p"),
    ({"rule": "dera", "top_p": 0.9}, "top_p"),
    ({"rule": "cfg", "top_k": 2, "temperature": 0.0}, "top_k"),
    ({"rule": "aad", "top_k": 3}, "top_k"),
    ({"rule": "aad", "min_p": 0.2}, "min_p"),
    ({"rule": "beam-aad", "num_beams": 2, "top_p": 0.5}, "top_p"),
    ({"rule": "greedy", "temperature": 0.3}, "temperature"),
    ({"rule": "aad", "top_k": False}, "top_k"),
])
def test_sampling_fields_on_a_greedy_request_are_refused(byte_server, body, param):
    code, got = _err(byte_server, **body)
    assert (code, got) == (400, param)


@needs_serve
@pytest.mark.parametrize("body,rule", [
    # neutral values, and a seed (lm-evaluation-harness sends seed=1234 with temperature=0)
    ({"rule": "aad", "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0, "seed": 1234},
     af.AAD(0.1)),
    ({"rule": "eft", "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 5}, af.EFT(4.0)),
    ({"rule": "eft", "temperature": 0.7, "top_k": 3, "min_p": 0.05, "seed": 5},
     af.EFT(4.0, temperature=0.7, top_k=3, min_p=0.05, seed=5)),
])
def test_neutral_sampling_fields_and_seed_are_accepted(byte_server, body, rule):
    r = byte_server.post("/v1/completions", json={"model": "m", "prompt": SERVE_PROMPT,
                                                  "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    want = byte_server.dec.generate(input_ids=[SERVE_PROMPT], rule=rule, max_new_tokens=4)
    assert r.json()["choices"][0]["token_ids"] == want.tokens[0]


@needs_serve
@pytest.mark.parametrize("body", [
    {"rule": "eft", "temperature": 1.0, "seed": 2**63},
    {"rule": "eft", "temperature": 1.0, "seed": 2**64},
    {"rule": "eft", "temperature": 1.0, "seed": -1},
    {"rule": "aad", "seed": 2**63},
    {"rule": "eft", "temperature": 1.0, "seed": 2**63 - 1, "n": 2},  # seed + 1 overflows
])
def test_seed_outside_int64_is_a_400_naming_seed(byte_server, body):
    assert _err(byte_server, **body) == (400, "seed")


@needs_serve
def test_largest_seed_is_served(byte_server):
    body = {"rule": "eft", "temperature": 1.0, "seed": 2**63 - 2, "n": 2}
    r = byte_server.post("/v1/completions", json={"model": "m", "prompt": SERVE_PROMPT,
                                                  "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    for i, ch in enumerate(r.json()["choices"]):
        rule = af.EFT(4.0, temperature=1.0, seed=2**63 - 2 + i)
        want = byte_server.dec.generate(input_ids=[SERVE_PROMPT], rule=rule, max_new_tokens=4)
        assert ch["token_ids"] == want.tokens[0]


# ------------------------------------------------------------------ #13 the CLI
def _args(*extra):
    return build_parser().parse_args(["generate", "--aligned", "x", "--prompt", "p", *extra])


def test_cli_temperature_zero_reaches_the_rule():
    with pytest.raises(ValueError, match=r"temperature must be in \(0.0"):
        rule_from_args(_args("--rule", "best-of-n", "--picker", "p", "--temperature", "0"))
    assert rule_from_args(_args("--rule", "best-of-n", "--picker", "p")).temperature == 1.0
    assert rule_from_args(_args("--rule", "best-of-n", "--picker", "p",
                                "--temperature", "0.5")).temperature == 0.5
    assert rule_from_args(_args("--rule", "eft", "--temperature", "0")).temperature == 0.0
    with pytest.raises(ValueError, match="temperature must be in"):
        rule_from_args(_args("--rule", "dera", "--temperature", "-1"))


def test_cli_stop_ids_join_the_stop_strings():
    assert _args("--stop", "a", "--stop-id", "5", "--stop", "b", "--stop-id", "7").stop == \
        ["a", 5, "b", 7]
    assert _args().stop is None
    with pytest.raises(SystemExit):
        _args("--stop-id", "x")


def test_cli_generate_stops_at_a_stop_id(model_dirs, tmp_path):
    prompt = "what is 2 plus 3 ?"
    d = af.Decoder(str(model_dirs / "dpo"), str(model_dirs / "sft"), max_batch_size=2)
    free = d.generate([prompt], rule=af.AAD(0.1), max_new_tokens=6)
    stop = free.tokens[0][2]  # a token it chooses: the run stops before its first one
    want = d.generate([prompt], rule=af.AAD(0.1), max_new_tokens=6, stop=[stop])
    cut = free.tokens[0].index(stop)
    assert want.finish_reason == ["stop"] and want.tokens[0] == free.tokens[0][:cut]
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--aligned", str(model_dirs / "dpo"), "--reference",
                 str(model_dirs / "sft"), "--prompt", prompt, "--max-new-tokens", "6",
                 "--stop-id", str(stop), "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["tokens"] == want.tokens[0] and row["finish_reason"] == "stop"


@needs_serve
def test_server_limits_given_as_zero_are_refused_not_defaulted(monkeypatch, capsys, dec,
                                                                byte_server):
    import uvicorn

    from aad_fast.serve import http as server
    from aad_fast.serve.openai_api import Limits
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    for flag in ("--max-seq-len", "--max-tokens"):
        assert main(["serve", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Limits.max_tokens must be an int >= 1, got 0"):
        Limits(max_tokens=0).resolve(dec, 4)
    assert Limits(max_tokens=None).resolve(dec, 4).max_tokens == dec.max_seq_len - 1
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1, got 0"):
        server.create_app(byte_server.dec, max_batch_size=0)
