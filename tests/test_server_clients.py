"""What evaluation and benchmark clients need of ``aad-fast serve`` (docs/clients.md): vLLM's
``/tokenize``, ``/detokenize``, ``/tokenizer_info``; ``GET /v1/models/{id}``; the rule chosen by
the ``model`` name (``NAME:RULE``), an unknown name a 404, a suffix that disagrees with the
body's ``rule`` a 400; ``response_format`` text; request bodies as lm-evaluation-harness,
guidellm and inspect-ai send them. Every answer is compared token for token with the Python
API (``Decoder.generate``) on the embedded pair."""
import importlib.util

import pytest

import aad_fast as af
from aad_fast import rules as R

HAVE = all(importlib.util.find_spec(m) for m in ("fastapi", "httpx"))
pytestmark = pytest.mark.skipif(not HAVE, reason="needs aad_fast[serve] and httpx")
NAME = "aad-default"
MAX_NEW = 6


@pytest.fixture(scope="module")
def pair():
    from aad_fast.toy import task
    from aad_fast.toy.assets import default_pair_dir
    from aad_fast.toy.default import default_pair
    from aad_fast.toy.tokenizer import stop_ids
    aligned, reference, tok, trained = default_pair()
    picker = str(default_pair_dir() / "picker") if trained else None
    dec = af.Decoder(aligned, reference, tokenizer=tok, max_batch_size=4, max_seq_len=128,
                     compile=False)
    prompts = [p.prompt for p in task.split_problems()[1][:4]]
    return dec, tok, picker, stop_ids(tok), prompts


def _client(pair, **kw):
    from fastapi.testclient import TestClient

    from aad_fast.serve.http import create_app
    dec, _, picker, stop, _ = pair
    return TestClient(create_app(dec, model_name=NAME, default_stop=stop, picker=picker, **kw))


@pytest.fixture(scope="module")
def client(pair):
    with _client(pair) as c:
        yield c


def alone(pair, prompt, rule, max_new=MAX_NEW, chat=False):
    dec, _, _, stop, _ = pair
    g = dec.generate(prompt, rule=rule, max_new_tokens=max_new, stop=list(stop), chat=chat)
    return g.tokens[0]


def complete(client, model, prompt, **body):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                "max_tokens": MAX_NEW, **body})


# ------------------------------------------------------------------------- model names
def _served_rules(pair):
    # the embedded pair is two models (a LoRA pair): OPAD (one model) is not served on it
    return [r for r in R.RULE_NAMES if r != "opad" and (r != "best-of-n" or pair[2])]


def test_models_lists_one_name_per_rule_and_each_has_a_card(client, pair):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids == [NAME] + [f"{NAME}:{r}" for r in _served_rules(pair)]
    assert data[0]["aad_rule"] == {"rule": "aad", "defaults": {"alpha": 0.1}}
    eft = next(m for m in data if m["id"] == f"{NAME}:eft")
    assert eft["aad_rule"]["rule"] == "eft" and eft["aad_rule"]["defaults"]["beta"] == 4.0
    assert eft["root"] == NAME and eft["parent"] == NAME and eft["max_model_len"] == 128
    for m in data:  # GET /v1/models/{id}: the same card
        r = client.get(f"/v1/models/{m['id']}")
        assert r.status_code == 200 and r.json() == m
    for bad in ("nope", f"{NAME}:nope", f"{NAME}:opad", f"x{NAME}"):
        r = client.get(f"/v1/models/{bad}")
        assert r.status_code == 404, bad
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert f"{NAME}:greedy" in err["message"] and repr(bad) in err["message"]


def _default_rule(name, picker):
    return R.make_rule(name, {"picker": picker} if name == "best-of-n" else {})


def test_each_rule_name_decodes_as_the_python_api(client, pair):
    prompt = pair[4][0]
    for name in _served_rules(pair):
        r = complete(client, f"{NAME}:{name}", prompt)
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert body["model"] == f"{NAME}:{name}"
        assert body["choices"][0]["token_ids"] == alone(pair, prompt, _default_rule(
            name, pair[2])), name


def test_greedy_name_equals_the_decoders_greedy_exactly(client, pair):
    """What a client that can set only ``model`` and ``temperature`` gets: the exact ids."""
    dec, tok, _, stop, prompts = pair
    for p in prompts:
        got = complete(client, f"{NAME}:greedy", p, temperature=0, seed=1234,
                       max_tokens=12).json()["choices"][0]["token_ids"]
        want = dec.generate(p, rule=af.Greedy(), max_new_tokens=12, stop=list(stop))
        assert got == want.tokens[0]
    r = client.post("/v1/chat/completions", json={
        "model": f"{NAME}:greedy", "max_tokens": 8,
        "messages": [{"role": "user", "content": prompts[1]}]})
    assert r.json()["choices"][0]["token_ids"] == alone(pair, prompts[1], af.Greedy(), 8,
                                                         chat=True)


def test_a_sampling_rule_by_name_takes_temperature_and_seed(client, pair):
    p = pair[4][2]
    r = complete(client, f"{NAME}:eft", p, temperature=0.8, seed=3, n=2)
    assert r.status_code == 200, r.text
    got = [c["token_ids"] for c in r.json()["choices"]]
    assert got == [alone(pair, p, af.EFT(4.0, temperature=0.8, seed=s)) for s in (3, 4)]
    # the bare name is the default rule (aad) exactly as before: temperature is still refused
    r = complete(client, NAME, p, temperature=0.8)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_bare_name_and_no_model_behave_as_before(client, pair):
    p = pair[4][3]
    want = alone(pair, p, af.AAD(0.2))
    for body in ({"model": NAME}, {}, {"model": None}):
        r = client.post("/v1/completions", json={**body, "prompt": p, "max_tokens": MAX_NEW,
                                                 "alpha": 0.2})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
        assert r.json()["model"] == NAME
    r = complete(client, NAME, p, rule="contrastive", alpha=0.2, beta=0.5)
    assert r.json()["choices"][0]["token_ids"] == alone(pair, p, af.Contrastive(0.2, 0.5))


def test_suffix_and_body_rule(client, pair):
    p = pair[4][0]
    r = complete(client, f"{NAME}:greedy", p, rule="eft")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "rule" and "greedy" in err["message"] and "'eft'" in err["message"]
    assert f"{NAME}:greedy" in err["message"]
    r = complete(client, f"{NAME}:contrastive", p, rule="contrastive", beta=0.5)
    assert r.status_code == 200
    assert r.json()["choices"][0]["token_ids"] == alone(pair, p, af.Contrastive(0.1, 0.5))
    # a suffixed name's fields are that rule's: alpha on eft names alpha
    r = complete(client, f"{NAME}:eft", p, alpha=0.3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "alpha"


def test_an_unknown_model_is_404_listing_the_served_names(client, pair):
    p = pair[4][0]
    for path, body in (("/v1/completions", {"prompt": p}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": p}]}),
                       ("/tokenize", {"prompt": p}), ("/detokenize", {"tokens": [1]})):
        for model in ("gpt-4o", f"{NAME}:beam", f"{NAME}:", 7):
            r = client.post(path, json={"model": model, **body})
            assert r.status_code == 404, (path, model, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            assert all(m in err["message"] for m in (NAME, f"{NAME}:aad", f"{NAME}:greedy"))


def test_server_default_rule_and_alpha(pair):
    """``create_app(rule=, rule_defaults=)`` (``aad-fast serve --rule --alpha``): the bare
    name's rule and values; a body's value overrides; other rules keep the table's."""
    p = pair[4][1]
    with _client(pair, rule="beam-aad", rule_defaults={"alpha": 0.3}) as c:
        data = c.get("/v1/models").json()["data"]
        assert data[0]["aad_rule"]["rule"] == "beam-aad"
        assert data[0]["aad_rule"]["defaults"]["alpha"] == 0.3
        want = alone(pair, p, af.BeamAAD(4, 0.3))
        for model in (NAME, f"{NAME}:beam-aad"):
            r = complete(c, model, p)
            assert r.json()["choices"][0]["token_ids"] == want, model
        r = complete(c, NAME, p, alpha=0.2, num_beams=2)
        assert r.json()["choices"][0]["token_ids"] == alone(pair, p, af.BeamAAD(2, 0.2))
        r = complete(c, f"{NAME}:aad", p)
        assert r.json()["choices"][0]["token_ids"] == alone(pair, p, af.AAD(0.1))
    from aad_fast.serve.http import create_app
    with pytest.raises(ValueError, match="beta"):
        create_app(pair[0], rule="aad", rule_defaults={"beta": 1.0})
    with pytest.raises(ValueError, match="alpha"):
        create_app(pair[0], rule="aad", rule_defaults={"alpha": 2.0})
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        create_app(pair[0], rule="nope")


def test_cli_rule_and_alpha_flags():
    from aad_fast.cli import build_parser
    from aad_fast.cli import serve as serve_cli
    a = build_parser().parse_args(["serve"])
    assert a.rule == "aad" and serve_cli.rule_defaults(a) == {}
    a = build_parser().parse_args(["serve", "--rule", "contrastive", "--alpha", "0.25"])
    assert serve_cli.rule_defaults(a) == {"alpha": 0.25}
    with pytest.raises(ValueError, match=r"--alpha not used by --rule eft \(the rules that "
                                         r"take it: aad, contrastive, beam-aad\)"):
        serve_cli.rule_defaults(build_parser().parse_args(["serve", "--rule", "eft",
                                                           "--alpha", "0.2"]))
    with pytest.raises(ValueError, match="alpha"):
        serve_cli.rule_defaults(build_parser().parse_args(["serve", "--alpha", "1.5"]))


def test_response_format_text_is_neutral(client, pair):
    p = pair[4][0]
    r = complete(client, NAME, p, response_format={"type": "text"})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == alone(
        pair, p, af.AAD(0.1))
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {}}):
        r = complete(client, NAME, p, response_format=fmt)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "response_format"
        assert repr(fmt["type"]) in err["message"]


# ------------------------------------------------------------------------ tokenizer endpoints
def test_tokenize_matches_what_a_completion_decodes_from(client, pair):
    dec, tok, _, _, prompts = pair
    p = prompts[0]
    r = client.post("/tokenize", json={"model": NAME, "prompt": p})
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"count", "max_model_len", "tokens", "token_strs"}
    assert got["tokens"] == list(tok(p)["input_ids"]) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 128 and got["token_strs"] is None
    usage = complete(client, NAME, p).json()["usage"]
    assert usage["prompt_tokens"] == got["count"]
    r = client.post("/tokenize", json={"prompt": p, "return_token_strs": True,
                                       "add_special_tokens": False})
    assert r.json()["tokens"] == list(tok(p, add_special_tokens=False)["input_ids"])
    assert r.json()["token_strs"] == tok.convert_ids_to_tokens(r.json()["tokens"])
    # messages: the chat template's ids, as /v1/chat/completions decodes from
    msgs = [{"role": "user", "content": p}]
    r = client.post("/tokenize", json={"model": f"{NAME}:greedy", "messages": msgs})
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert r.json()["tokens"] == want
    chat = client.post("/v1/chat/completions", json={"model": NAME, "messages": msgs,
                                                     "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == len(want)
    for body, param in (({"prompt": 5}, "prompt"), ({}, "prompt"),
                        ({"prompt": p, "messages": msgs}, "prompt"),
                        ({"prompt": p, "add_special_tokens": "yes"}, "add_special_tokens"),
                        ({"prompt": p, "truncate": 3}, "truncate")):
        r = client.post("/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_detokenize_and_tokenizer_info(client, pair):
    dec, tok, _, _, prompts = pair
    ids = list(tok(prompts[1])["input_ids"])
    r = client.post("/detokenize", json={"model": NAME, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(ids)}
    for bad in ([dec.vocab], [-1], "1 2", [1.0], [True]):
        r = client.post("/detokenize", json={"model": NAME, "tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", bad
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["eos_token"] == tok.eos_token and info["eos_token_id"] == tok.eos_token_id
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 128
    assert info["vocab_size"] == dec.vocab


def test_tokenizer_endpoints_want_the_key(pair):
    with _client(pair, api_key="k") as c:
        assert c.get("/tokenizer_info").status_code == 401
        assert c.get(f"/v1/models/{NAME}").status_code == 401
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        auth = {"Authorization": "Bearer k"}
        assert c.post("/detokenize", json={"tokens": [1]}, headers=auth).status_code == 200
        assert c.get("/tokenizer_info", headers=auth).status_code == 200


# ------------------------------------------------- request bodies as the clients send them
def test_lm_eval_remote_tokenizer_and_generate_until(client, pair):
    """lm-evaluation-harness 0.4.13 ``local-completions`` (read from its source, not run here):
    ``tokenizer_backend="auto"`` probes ``GET /tokenizer_info`` (wants ``eos_token``) and
    ``POST /tokenize {"prompt": "test", "add_special_tokens": false}`` (wants ``tokens``), then
    encodes with those and takes ``eos_token_id`` as ``encode(eos)[0]``; generate_until sends
    the prompt as token ids (``tokenized_requests=True``, one-element batch), ``temperature``
    0, ``seed`` 1234 and ``stop`` = the task's ``until`` plus the eos text."""
    dec, tok, _, stop, prompts = pair
    info = client.get("/tokenizer_info").json()
    assert "eos_token" in info and isinstance(info["chat_template"], str)
    probe = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False})
    assert isinstance(probe.json()["tokens"], list)
    enc = client.post("/tokenize", json={"prompt": info["eos_token"],
                                         "add_special_tokens": False}).json()["tokens"]
    assert enc[0] == tok.eos_token_id
    ids = client.post("/tokenize", json={"prompt": prompts[2],
                                         "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == \
        tok.decode(ids)
    body = {"prompt": [ids], "model": f"{NAME}:greedy", "max_tokens": 10, "temperature": 0,
            "stop": [info["eos_token"]], "seed": 1234}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    want = dec.generate(input_ids=[ids], rule=af.Greedy(), max_new_tokens=10,
                        stop=list(stop) + [tok.eos_token_id])
    assert r.json()["choices"][0]["token_ids"] == want.tokens[0]
    # the text form (tokenized_requests=False) of the same request
    r = client.post("/v1/completions", json={**body, "prompt": [prompts[2]]})
    assert r.json()["choices"][0]["token_ids"] == alone(pair, prompts[2], af.Greedy(), 10)
    # generate_until with --batch_size 4: the prompts in one request, a multi-token ``until``
    free = dec.generate(prompts, rule=af.Greedy(), max_new_tokens=12, stop=list(stop))
    until = [" ".join(free.text[1].split()[1:3]), "\n\n"]  # a phrase of two words
    assert len(tok.encode(until[0], add_special_tokens=False)) > 1
    batch = [client.post("/tokenize", json={"prompt": p, "add_special_tokens": False})
             .json()["tokens"] for p in prompts]
    r = client.post("/v1/completions", json={**body, "prompt": batch, "max_tokens": 12,
                                             "stop": until + [info["eos_token"]]})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c, ids_p in zip(choices, batch):
        want = dec.generate(input_ids=[ids_p], rule=af.Greedy(), max_new_tokens=12,
                            stop=list(stop) + until + [tok.eos_token_id])
        assert (c["token_ids"], c["text"]) == (want.tokens[0], want.text[0])
    assert choices[1]["finish_reason"] == "stop" and choices[1]["stop_reason"] == until[0]
    assert until[0] not in choices[1]["text"] and until[0] in free.text[1]
    use = r.json()["usage"]
    assert use["prompt_tokens"] == sum(map(len, batch))
    assert use["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


def _hf_logprobs(model, ids):
    """log p(ids[j] | ids[:j]) for j >= 1 by a plain forward of the whole sequence."""
    import torch
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))], lp


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_echo_logprobs(client, pair, max_tokens):
    """lm-eval's loglikelihood request (multiple choice, perplexity): context + continuation
    ids in one batch, ``max_tokens`` 1 (0 as vLLM also takes), ``logprobs`` 1, ``echo``;
    lm-eval sums ``token_logprobs[ctxlen:-1]`` and checks greediness on ``top_logprobs``.
    Every prompt log-probability equals a plain forward of the aligned model (the LoRA
    adapter on), and ``logprobs_stream: r`` the reference's."""
    dec, tok, _, stop, prompts = pair
    seqs = [tok.encode(p) for p in prompts[:3]]
    body = {"model": NAME, "prompt": seqs, "max_tokens": max_tokens, "logprobs": 1,
            "echo": True, "temperature": 0, "seed": 1234}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for c, ids in zip(r.json()["choices"], seqs):
        lp = c["logprobs"]
        comp = c["token_ids"]
        assert len(comp) == max_tokens and len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want, full = _hf_logprobs(dec.model_a, ids + comp)
        assert lp["token_logprobs"][1:] == pytest.approx(want, rel=0, abs=1e-5)
        for j, top in enumerate(lp["top_logprobs"][1:], 1):
            best = int(full[j - 1].argmax())
            assert len(top) in (1, 2) and top[tok.decode([best])] == pytest.approx(
                float(full[j - 1, best]), rel=0, abs=1e-5)
        assert lp["tokens"] == [tok.decode([i]) for i in ids + comp]
        assert lp["text_offset"][0] == 0
        assert c["text"].startswith(prompts[seqs.index(ids)].split()[0])
        offline = dec.logprobs(ids + comp, start=0).logprobs
        assert lp["token_logprobs"] == offline
    with dec._locked():
        from aad_fast.decode.logprobs import stream_model
        with stream_model(dec.kind, dec.model_a, dec.model_r, "r") as ref:
            want_r, _ = _hf_logprobs(ref, seqs[0] + [])
    r = client.post("/v1/completions", json={**body, "prompt": seqs[0], "max_tokens": 0,
                                             "logprobs_stream": "r"})
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        want_r, rel=0, abs=1e-5)
    assert want_r != pytest.approx(_hf_logprobs(dec.model_a, seqs[0])[0], rel=0, abs=1e-5)


def test_refused_where_not_honoured(client, pair):
    p = pair[4][0]
    for extra, param in (({"echo": True, "stream": True}, "echo"),
                         ({"logprobs": 1, "stream": True}, "logprobs"),
                         ({"logprobs": 21}, "logprobs"), ({"logprobs_stream": "r"},
                                                          "logprobs_stream"),
                         ({"logprobs": 1, "logprobs_stream": "b"}, "logprobs_stream"),
                         ({"min_tokens": 9}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
                         ({"max_tokens": 0}, "max_tokens"), ({"prompt": [p, 3]}, "prompt"),
                         ({"prompt": [p] * 33}, "prompt"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"rule": "beam-aad", "num_beams": 2, "min_tokens": 2}, "min_tokens"),
                         ({"rule": "cfg", "g": 1.5, "echo": True}, "echo")):
        r = client.post("/v1/completions", json={"model": NAME, "prompt": p, "max_tokens": 4,
                                                 **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = client.post("/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": p}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def _sse(client, body):
    import json
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_guidellm_streamed_completion_body(client, pair):
    """guidellm 0.8.1's text-completions request (read from its source): ``stream`` with
    ``stream_options {"include_usage": true, "continuous_usage_stats": true}``, and for a fixed
    output length ``max_tokens``, ``stop: null``, ``ignore_eos: true``. Exactly ``max_tokens``
    tokens come back, each chunk carries the usage so far, and the tokens equal the Python API
    with ``ignore_eos``."""
    dec = pair[0]
    p = pair[4][3]
    body = {"model": NAME, "prompt": p, "max_tokens": 20, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "stop": None, "ignore_eos": True}
    chunks = _sse(client, body)
    assert all(c["model"] == NAME for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    toks = next(c["choices"][0]["token_ids"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"])
    want = dec.generate(p, rule=af.AAD(0.1), max_new_tokens=20, ignore_eos=True)
    assert toks == want.tokens[0] and len(toks) == 20 and text == want.text[0]
    stopped = alone(pair, p, af.AAD(0.1), 20)
    assert len(stopped) < 20  # without ignore_eos this prompt ends early
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[-1] == 20 and len(set(counts)) > 2
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]
               for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    whole = client.post("/v1/completions", json={**body, "stream": False,
                                                 "stream_options": None}).json()
    assert whole["choices"][0]["text"] == text and whole["choices"][0]["token_ids"] == toks
    low = client.post("/v1/completions", json={**body, "stream": False, "stream_options": None,
                                               "ignore_eos": False, "min_tokens": 12}).json()
    assert low["choices"][0]["token_ids"] == dec.generate(
        p, rule=af.AAD(0.1), max_new_tokens=20, stop=list(pair[3]), min_tokens=12).tokens[0]
    assert len(low["choices"][0]["token_ids"]) >= 12


def test_batched_prompts_stream_with_choice_indices(client, pair):
    """Several prompts (and n) in one streamed request: each chunk names its choice; the
    pieces of each choice join to the non-streamed text of the same request."""
    prompts = pair[4][:3]
    body = {"model": f"{NAME}:eft", "prompt": prompts, "max_tokens": 10, "stream": True,
            "temperature": 0.7, "seed": 5, "n": 2}
    chunks = _sse(client, body)
    texts = {}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"]
    assert sorted(texts) == list(range(6)) == [c["index"] for c in whole]
    assert [texts[i] for i in range(6)] == [c["text"] for c in whole]
    for i, c in enumerate(whole):
        assert c["token_ids"] == alone(pair, prompts[i // 2], af.EFT(
            4.0, temperature=0.7, seed=5 + i % 2), 10)


def test_inspect_ai_chat_body(client, pair):
    """inspect-ai's openai-api provider: a chat with a system message, max_tokens, temperature
    and the model chosen by name."""
    dec, tok, _, stop, prompts = pair
    msgs = [{"role": "system", "content": "answer briefly ."},
            {"role": "user", "content": prompts[0]}]
    r = client.post("/v1/chat/completions", json={
        "model": f"{NAME}:eft", "messages": msgs, "max_tokens": 8, "temperature": 0.5,
        "seed": 7})
    assert r.status_code == 200, r.text
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = dec.generate(input_ids=[ids], rule=af.EFT(4.0, temperature=0.5, seed=7),
                        max_new_tokens=8, stop=list(stop))
    assert r.json()["choices"][0]["token_ids"] == want.tokens[0]
    assert r.json()["model"] == f"{NAME}:eft"


def test_inspect_ai_stop_seqs_and_logprobs(client, pair):
    """inspect-ai with ``--stop-seqs`` (several tokens) and ``--logprobs --top-logprobs 3``:
    chat ``logprobs: true``, ``top_logprobs`` 3; the text is cut at the phrase, every content
    entry is a completion token with its log-probability under the aligned model."""
    dec, tok, _, stop, prompts = pair
    msgs = [{"role": "user", "content": prompts[2]}]
    free = dec.generate(prompts[2], rule=af.AAD(0.1), max_new_tokens=12, stop=list(stop),
                        chat=True)
    phrase = " ".join(free.text[0].split()[1:3])
    r = client.post("/v1/chat/completions", json={
        "model": NAME, "messages": msgs, "max_tokens": 12, "stop": [phrase],
        "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    want = dec.generate(prompts[2], rule=af.AAD(0.1), max_new_tokens=12,
                        stop=list(stop) + [phrase], chat=True)
    assert (ch["token_ids"], ch["message"]["content"]) == (want.tokens[0], want.text[0])
    assert ch["stop_reason"] == phrase and phrase not in ch["message"]["content"]
    content = ch["logprobs"]["content"]
    prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    hf, full = _hf_logprobs(dec.model_a, prompt_ids + ch["token_ids"])
    assert [c["logprob"] for c in content] == pytest.approx(hf[len(prompt_ids) - 1:], rel=0,
                                                             abs=1e-5)
    assert [c["token"] for c in content] == [tok.decode([i]) for i in ch["token_ids"]]
    for j, c in enumerate(content):
        assert len(c["top_logprobs"]) == 3 and c["bytes"] == list(c["token"].encode())
        row = full[len(prompt_ids) - 1 + j]
        assert c["top_logprobs"][0]["token"] == tok.decode([int(row[:dec.vocab].argmax())])


def test_streamed_stop_phrase_never_shows_what_it_cuts(client, pair):
    """A stream with a stop phrase of several tokens: every piece is a prefix of the final
    text (the phrase's start is held back until the match), the pieces join to the
    non-streamed text, and the phrase is the choice's stop_reason."""
    dec, tok, _, stop, prompts = pair
    free = dec.generate(prompts, rule=af.AAD(0.1), max_new_tokens=16, stop=list(stop))
    text, prompt = max(zip(free.text, prompts), key=lambda x: len(x[0].split()))
    phrase = " ".join(text.split()[-3:-1])  # late: text is shown before the match
    assert len(tok.encode(phrase, add_special_tokens=False)) > 1
    body = {"model": NAME, "prompt": prompt, "max_tokens": 16, "stop": [phrase],
            "stream": True}
    chunks = _sse(client, body)
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 1  # text was shown before the match
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert "".join(pieces) == whole["text"] and phrase not in whole["text"]
    assert whole["stop_reason"] == phrase and chunks[-1]["choices"][0]["stop_reason"] == phrase
    shown = ""
    for p in pieces:
        shown += p
        assert whole["text"].startswith(shown)
    assert whole["token_ids"] == dec.generate(prompt, rule=af.AAD(0.1), max_new_tokens=16,
                                              stop=list(stop) + [phrase]).tokens[0]
