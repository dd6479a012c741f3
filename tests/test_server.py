"""``aad-fast serve`` over loopback: the official ``openai`` client against a server started here
on 127.0.0.1 (a free port, uvicorn in a thread), every answer compared token for token with
``Decoder.generate`` on that prompt alone; concurrency (requests of mixed values sharing one
scheduler batch, concurrent streams), limits, keys, queue overflow, disconnects, a failing
request and a closed decode_loop."""
import importlib.util
import socket
import sys
import threading
import time

import pytest

import aad_fast as af
from aad_fast.cli import serve as serve_cli
from aad_fast.serve import http as server
from aad_fast.serve.openai_api import Limits
from aad_fast.serve.loop import DecodeLoop

HAVE_SERVE = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai", "httpx"))
if HAVE_SERVE:
    import httpx
    import openai
    import uvicorn
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="needs aad_fast[serve] and openai, httpx")


def test_cli_serve_subcommand_and_key_from_env(monkeypatch):
    from aad_fast.cli import build_parser
    a = build_parser().parse_args(["serve"])
    assert a.func is serve_cli.run and a.host == "127.0.0.1" and a.aligned is None
    monkeypatch.delenv("AAD_FAST_API_KEY", raising=False)
    assert serve_cli.api_key(a) is None
    monkeypatch.setenv("AAD_FAST_API_KEY", "k1")
    assert serve_cli.api_key(a) == "k1"
    assert serve_cli.api_key(build_parser().parse_args(["serve", "--api-key", "k2"])) == "k2"


def test_backend_close_answers_what_waits():
    from types import SimpleNamespace

    from aad_fast.serve.loop import DecodeRequest, QueueFull
    decode_loop = DecodeLoop(SimpleNamespace(max_batch_size=2), max_batch_size=2, max_queue=1)
    decode_loop.pause()
    got = []
    decode_loop.submit(DecodeRequest(rule=af.AAD(0.1), max_new_tokens=2, text="hi"), got.append)
    with pytest.raises(QueueFull):
        decode_loop.submit(DecodeRequest(rule=af.AAD(0.1), max_new_tokens=2, text="hi"), got.append)
    decode_loop.close()
    assert len(got) == 1 and got[0][0] == "error" and "shutting down" in str(got[0][1])


def test_missing_fastapi_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'aad_fast\[serve\]'"):
        server.create_app(object())

class Served:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(trust_env=False, timeout=60))

    def post(self, path, body=None, headers=None, content=None):
        with httpx.Client(trust_env=False, timeout=60) as c:
            return c.post(self.url + path, json=body, content=content, headers=headers)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def models():
    from aad_fast.toy.default import default_pair
    from aad_fast.toy import task
    from aad_fast.toy.assets import default_pair_dir
    aligned, reference, tok, trained = default_pair()
    picker = str(default_pair_dir() / "picker") if trained else None
    prompts = [p.prompt for p in task.split_problems()[1][:12]]
    return aligned, reference, tok, picker, prompts


@pytest.fixture(scope="module")
def served(models):
    """The embedded pair (LoRA) behind the server, batching up to 8 rows."""
    from aad_fast.toy.tokenizer import stop_ids
    aligned, reference, tok, picker, _ = models
    dec = af.Decoder(aligned, reference, tokenizer=tok, max_batch_size=8, max_seq_len=128,
                     compile=False)
    app = server.create_app(dec, max_queue=64, default_stop=stop_ids(tok), picker=picker,
                     model_name="toy")
    srv = Served(app)
    srv.dec, srv.stop_ids = dec, app.state.default_stop
    yield srv
    srv.stop()


def alone(srv, prompt=None, *, ids=None, rule, max_new, chat=False):
    """What ``Decoder.generate`` gives this one prompt (the server's own stop ids)."""
    kw = dict(rule=rule, max_new_tokens=max_new, stop=list(srv.stop_ids), chat=chat)
    g = srv.dec.generate(prompt, **kw) if ids is None else srv.dec.generate(input_ids=[ids], **kw)
    return g.tokens[0], g.text[0], g.finish_reason[0]


@needs_serve
def test_models_and_health(served):
    models = served.client().models.list()  # the pair under its name, then once per rule
    rules = [r for r in af.rules.RULE_NAMES if r != "opad" and
             (r != "best-of-n" or served.app.state.picker is not None)]
    assert [m.id for m in models.data] == ["toy"] + [f"toy:{r}" for r in rules]
    with httpx.Client(trust_env=False) as c:
        assert c.get(served.url + "/health").json()["status"] == "ok"


def _rule_cases(picker):
    cases = [
        ({}, af.AAD(0.1)),
        ({"rule": "aad", "alpha": 0.3}, af.AAD(0.3)),
        ({"rule": "contrastive", "alpha": 0.2, "beta": 0.5}, af.Contrastive(0.2, 0.5)),
        ({"rule": "eft", "beta": 2.0}, af.EFT(2.0)),
        ({"rule": "dera", "lam": 0.5, "temperature": 0.8, "seed": 3},
         af.DeRa(0.5, temperature=0.8, seed=3)),
        ({"rule": "cfg", "g": 1.5, "top_p": 0.9, "temperature": 1.0, "seed": 1},
         af.CFG(1.5, temperature=1.0, top_p=0.9, seed=1)),
        ({"rule": "beam-aad", "num_beams": 2, "alpha": 0.1}, af.BeamAAD(2, 0.1)),
        ({"rule": "greedy", "greedy_stream": "r"}, af.Greedy("r")),
    ]
    if picker is not None:
        cases.append(({"rule": "best-of-n", "best_of": 2, "seed": 5},
                      af.BestOfN(2, picker=picker, seed=5)))
    return cases


@needs_serve
def test_completions_every_rule(served, models):
    client = served.client()
    prompt = models[4][0]
    for extra, rule in _rule_cases(models[3]):
        r = client.completions.create(model="toy", prompt=prompt, max_tokens=12,
                                      extra_body=extra)
        toks, text, reason = alone(served, prompt, rule=rule, max_new=12)
        ch = r.choices[0]
        assert (ch.token_ids, ch.text, ch.finish_reason) == (toks, text, reason), extra
        n_prompt = len(models[2](prompt)["input_ids"])
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(toks))
        assert r.usage.total_tokens == n_prompt + len(toks)


@needs_serve
def test_chat_and_token_prompt(served, models):
    client = served.client()
    prompt = models[4][1]
    r = client.chat.completions.create(model="toy", messages=[{"role": "user",
                                                               "content": prompt}],
                                       extra_body={"alpha": 0.2})
    toks, text, reason = alone(served, prompt, rule=af.AAD(0.2),
                               max_new=128 - len(_chat_ids(models[2], prompt)), chat=True)
    assert (r.choices[0].message.content, r.choices[0].token_ids) == (text, toks)
    assert r.choices[0].finish_reason == reason == "stop"
    # several turns: the chat template's ids, decoded as input_ids
    msgs = [{"role": "user", "content": models[4][2]}, {"role": "assistant", "content": "ok ."},
            {"role": "user", "content": prompt}]
    ids = list(_chat_ids(models[2], msgs))
    r = client.chat.completions.create(model="toy", messages=msgs, max_tokens=10)
    assert r.choices[0].token_ids == alone(served, ids=ids, rule=af.AAD(0.1), max_new=10)[0]
    # a prompt of token ids on /v1/completions
    r = client.completions.create(model="toy", prompt=ids, max_tokens=6)
    assert r.choices[0].token_ids == alone(served, ids=ids, rule=af.AAD(0.1), max_new=6)[0]


def _chat_ids(tok, msgs):
    if isinstance(msgs, str):
        msgs = [{"role": "user", "content": msgs}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return out["input_ids"] if hasattr(out, "keys") else out


@needs_serve
def test_each_prompt_is_tokenised_once(served, models, monkeypatch):
    """The server tokenises a prompt once (to count and check it) and decodes those ids: the
    scheduler's request and best-of-n's generate do not tokenise it again."""
    from aad_fast.decode import prompt_rows
    real, texts = prompt_rows.encode, []

    def counting(tok, vocab, prompts, *a, **k):
        if prompts is not None:
            texts.append(prompts)
        return real(tok, vocab, prompts, *a, **k)
    prompt = models[4][5]
    cases = [({}, af.AAD(0.1)), ({"rule": "beam-aad", "num_beams": 2}, af.BeamAAD(2))]
    if models[3] is not None:
        cases.append(({"rule": "best-of-n", "best_of": 2, "seed": 1},
                      af.BestOfN(2, picker=models[3], seed=1)))
    for extra, rule in cases:
        want = alone(served, prompt, rule=rule, max_new=6)[0]
        monkeypatch.setattr(prompt_rows, "encode", counting)
        texts.clear()
        r = served.client().completions.create(model="toy", prompt=prompt, max_tokens=6,
                                               extra_body=extra)
        monkeypatch.setattr(prompt_rows, "encode", real)
        assert texts == [[prompt]] and r.choices[0].token_ids == want, extra
    monkeypatch.setattr(prompt_rows, "encode", counting)
    texts.clear()
    served.client().chat.completions.create(model="toy", max_tokens=2,
                                            messages=[{"role": "user", "content": prompt}])
    assert texts == [[prompt]]


@needs_serve
def test_streaming_equals_generate(served, models):
    client = served.client()
    prompt = models[4][3]
    stream = client.completions.create(model="toy", prompt=prompt, max_tokens=20, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    toks, text, reason = alone(served, prompt, rule=af.AAD(0.1), max_new=20)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    last = [c for c in chunks if c.choices][-1]
    assert (last.choices[0].finish_reason, last.choices[0].token_ids) == (reason, toks)
    assert chunks[-1].usage.completion_tokens == len(toks)
    stream = client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": prompt}], max_tokens=20,
        stream=True, extra_body={"rule": "eft", "beta": 3.0})
    chunks = list(stream)
    toks, text, reason = alone(served, prompt, rule=af.EFT(3.0), max_new=20, chat=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


@needs_serve
def test_n_samples_use_consecutive_seeds(served, models):
    prompt = models[4][4]
    r = served.client().completions.create(
        model="toy", prompt=prompt, max_tokens=10, n=3,
        extra_body={"rule": "dera", "lam": 1.0, "temperature": 1.5, "seed": 7})
    for i, ch in enumerate(r.choices):
        assert ch.index == i
        rule = af.DeRa(1.0, temperature=1.5, seed=7 + i)
        assert ch.token_ids == alone(served, prompt, rule=rule, max_new=10)[0]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)


@needs_serve
def test_32_concurrent_clients_exact(served, models):
    """Mixed prompts, rules and max_tokens, held in the queue and released together so that
    compatible requests share decode calls; every answer equals decoding it alone."""
    prompts = models[4]
    rules = [({"alpha": 0.1}, af.AAD(0.1)), ({"alpha": 0.5}, af.AAD(0.5)),
             ({"rule": "eft", "beta": 2.0}, af.EFT(2.0)),
             ({"rule": "dera", "lam": 0.7, "temperature": 1.0, "seed": 2},
              af.DeRa(0.7, temperature=1.0, seed=2))]
    jobs = [(prompts[i % len(prompts)] + " ?" * (i % 3), rules[i % 4], 3 + (i * 7) % 11,
             i % 8 == 7) for i in range(32)]
    decode_loop = served.app.state.decode_loop
    before = dict(decode_loop.counts)
    results = [None] * 32
    client = served.client()

    def call(i):
        prompt, (extra, _), mt, stream = jobs[i]
        if stream:
            chunks = list(client.completions.create(model="toy", prompt=prompt, max_tokens=mt,
                                                    stream=True, extra_body=extra))
            last = [c for c in chunks if c.choices][-1].choices[0]
            results[i] = ("".join(c.choices[0].text for c in chunks if c.choices),
                          last.token_ids, last.finish_reason, chunks[0].id)
        else:
            r = client.completions.create(model="toy", prompt=prompt, max_tokens=mt,
                                          extra_body=extra)
            ch = r.choices[0]
            results[i] = (ch.text, ch.token_ids, ch.finish_reason, r.id)

    t0 = time.time()
    decode_loop.pause()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    try:
        for t in threads:
            t.start()
        while decode_loop.waiting() < 32 and time.time() - t0 < 30:
            time.sleep(0.02)
        assert decode_loop.waiting() == 32
    finally:
        decode_loop.resume()
    for t in threads:
        t.join(60)
    assert time.time() - t0 < 60
    assert all(r is not None for r in results)
    assert len({r[3] for r in results}) == 32  # 32 distinct answers
    done = decode_loop.counts["done"] - before["done"]
    batches = decode_loop.counts["batches"] - before["batches"]
    assert done == 32 and batches < 28  # 28 non-streamed requests shared decode calls
    for i, (prompt, (_, rule), mt, _) in enumerate(jobs):
        toks, text, reason = alone(served, prompt, rule=rule, max_new=mt)
        assert results[i][:3] == (text, toks, reason), (i, jobs[i])


@needs_serve
def test_mixed_alphas_and_max_tokens_share_one_batch_exact(served, models):
    """Six AAD requests with their own alpha and max_tokens (one streamed) are admitted together
    into one scheduler batch (one admission, six rows in use) and each equals decoding it alone."""
    prompts = models[4]
    jobs = [(prompts[i], alpha, mt) for i, (alpha, mt) in
            enumerate(((0.05, 3), (0.1, 12), (0.3, 5), (0.5, 20), (0.8, 8), (1.0, 16)))]
    decode_loop = served.app.state.decode_loop
    client = served.client()
    results = [None] * len(jobs)

    def call(i):
        prompt, alpha, mt = jobs[i]
        if i == 3:
            chunks = list(client.completions.create(model="toy", prompt=prompt, max_tokens=mt,
                                                    stream=True, extra_body={"alpha": alpha}))
            last = [c for c in chunks if c.choices][-1].choices[0]
            results[i] = (last.token_ids, "".join(c.choices[0].text for c in chunks
                                                  if c.choices), last.finish_reason)
        else:
            ch = client.completions.create(model="toy", prompt=prompt, max_tokens=mt,
                                           extra_body={"alpha": alpha}).choices[0]
            results[i] = (ch.token_ids, ch.text, ch.finish_reason)

    before = dict(decode_loop.counts)
    decode_loop.pause()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while decode_loop.waiting() < len(jobs) and time.time() < deadline:
            time.sleep(0.02)
        assert decode_loop.waiting() == len(jobs)
    finally:
        decode_loop.resume()
    for t in threads:
        t.join(60)
    counts = decode_loop.counts
    assert counts["done"] - before["done"] == len(jobs)
    assert counts["batches"] - before["batches"] == 1  # one admission: one batch of six rows
    assert counts["rows_peak"] >= len(jobs)
    for i, (prompt, alpha, mt) in enumerate(jobs):
        assert results[i] == alone(served, prompt, rule=af.AAD(alpha), max_new=mt), jobs[i]
    with httpx.Client(trust_env=False) as c:
        health = c.get(served.url + "/health").json()
    assert health["waiting"] == 0 and health["rows_in_use"]["aad"] == 0
    assert health["max_batch_size"] == 8


@needs_serve
def test_bad_requests_name_the_field(served, models):
    p = models[4][0]
    cases = [
        ({"prompt": p, "rule": "nope"}, "rule"),
        ({"prompt": p, "alpha": 1.5}, "alpha"),
        ({"prompt": p, "alpha": "big"}, "alpha"),
        ({"prompt": p, "max_tokens": 125}, "max_tokens"),  # prompt + 125 > 128 slots
        ({"prompt": p, "max_tokens": 0}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": [1, 2], "max_tokens": 2, "rule": "opad", "principle": "be kind"}, "rule"),
        ({"prompt": p, "temperature": 0.7}, "temperature"),
        ({"prompt": p, "n": 2}, "n"),
        ({"prompt": p, "beta": 2.0}, "beta"),  # aad takes no beta
        ({"prompt": p, "rule": "beam-aad", "num_beams": 9}, "num_beams"),
        ({"prompt": p, "stop": ""}, "stop"),
        ({"prompt": p, "logprobs": 21}, "logprobs"),
        ({"prompt": [10 ** 6]}, "prompt"),
    ]
    for body, param in cases:
        r = served.post("/v1/completions", {"model": "toy", **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        assert err["type"] == "invalid_request_error" and err["message"]
    r = served.post("/v1/chat/completions", {"model": "toy", "messages": [
        {"role": "user", "content": ""}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = served.post("/v1/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400


# ------------------------------------------------------------------ a second, small server
@pytest.fixture(scope="module")
def guarded(models):
    """The SFT model alone (OPAD and CFG's one-model form), a key, small limits, one queue
    slot, a burst per token, and a test hook after each streamed burst."""
    aligned, _, tok, _, _ = models
    from aad_fast.toy.tokenizer import stop_ids
    base = aligned.get_base_model()
    dec = af.Decoder(base, tokenizer=tok, max_batch_size=4, max_seq_len=128, check_every=1,
                     compile=False)
    hooks = []
    decode_loop = DecodeLoop(dec, max_batch_size=4, max_queue=2,
                      on_piece=lambda t: [h(t) for h in list(hooks)])
    app = server.create_app(dec, api_key="sekret", decode_loop=decode_loop,
                            default_stop=stop_ids(tok),
                     limits=Limits(max_body_bytes=4096, max_tokens=64, max_n=2), model_name="m")
    srv = Served(app)
    srv.dec, srv.stop_ids, srv.hooks = dec, app.state.default_stop, hooks
    srv.decode_loop = decode_loop
    srv.auth = {"Authorization": "Bearer sekret"}
    yield srv
    srv.stop()
    decode_loop.close()


@needs_serve
def test_api_key(guarded, models):
    body = {"model": "m", "prompt": models[4][0], "max_tokens": 4, "rule": "greedy"}
    assert guarded.post("/v1/completions", body).status_code == 401
    bad = guarded.post("/v1/completions", body, headers={"Authorization": "Bearer sekreT"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    with httpx.Client(trust_env=False) as c:
        assert c.get(guarded.url + "/v1/models").status_code == 401
        assert c.get(guarded.url + "/health").status_code == 200  # open
    assert guarded.client("sekret").models.list().data[0].id == "m"
    assert guarded.post("/v1/completions", body, headers=guarded.auth).status_code == 200


@needs_serve
def test_one_model_rules_and_limits(guarded, models):
    client = guarded.client("sekret")
    p = models[4][5]
    for extra, rule in (({"rule": "opad", "k": 0.5, "principle": "answer kindly"},
                         af.OPAD(0.5, principle="answer kindly")),
                        ({"rule": "cfg", "g": 2.0}, af.CFG(2.0))):
        r = client.completions.create(model="m", prompt=p, max_tokens=8, extra_body=extra)
        g = guarded.dec.generate(p, rule=rule, max_new_tokens=8, stop=list(guarded.stop_ids))
        assert r.choices[0].token_ids == g.tokens[0], extra
    for body, param in (({"rule": "aad"}, "rule"),
                        ({"max_tokens": 65, "rule": "greedy"}, "max_tokens"),
                        ({"n": 3, "rule": "dera", "lam": 1.0, "temperature": 1.0}, "n")):
        r = guarded.post("/v1/completions", {"model": "m", "prompt": p, **body},
                         headers=guarded.auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    big = {"model": "m", "prompt": "x " * 4000, "rule": "greedy"}
    r = guarded.post("/v1/completions", big, headers=guarded.auth)
    assert r.status_code == 413


@needs_serve
def test_full_queue_gets_429(guarded, models):
    body = {"model": "m", "prompt": models[4][0], "max_tokens": 4, "rule": "greedy"}
    out = {}
    guarded.decode_loop.pause()
    try:
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(
            i, guarded.post("/v1/completions", body, headers=guarded.auth))) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while guarded.decode_loop.waiting() < 2 and time.time() < deadline:
            time.sleep(0.02)
        r = guarded.post("/v1/completions", body, headers=guarded.auth)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        guarded.decode_loop.resume()
    for t in threads:
        t.join(30)
    assert [out[i].status_code for i in range(2)] == [200, 200]


@needs_serve
def test_disconnect_mid_stream_frees_the_decoder(guarded, models):
    p = models[4][6]
    body = {"model": "m", "prompt": p, "max_tokens": 40, "rule": "greedy", "stream": True}
    full = guarded.dec.generate(p, rule=af.Greedy(), max_new_tokens=40,
                                stop=list(guarded.stop_ids))
    assert len(full.tokens[0]) >= 3  # so that the uncut stream has several bursts
    pieces = []

    def hold(ticket):  # after the first burst, wait for the client to go away
        pieces.append(ticket)
        if len(pieces) == 1:
            assert ticket.cancelled.wait(20)

    guarded.hooks.append(hold)
    before = dict(guarded.decode_loop.counts)
    try:
        with httpx.Client(trust_env=False, timeout=30) as c:
            with c.stream("POST", guarded.url + "/v1/completions", json=body,
                          headers=guarded.auth) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert first.startswith("data: ")
        deadline = time.time() + 20
        while guarded.decode_loop.counts["cancelled"] == before["cancelled"] and \
                time.time() < deadline:
            time.sleep(0.02)
    finally:
        guarded.hooks.remove(hold)
    assert guarded.decode_loop.counts["cancelled"] == before["cancelled"] + 1
    assert len(pieces) == 1  # stopped at the first burst, not decoded to the end
    r = guarded.post("/v1/completions", {**body, "stream": False}, headers=guarded.auth)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == full.tokens[0]


@needs_serve
def test_two_streams_run_in_one_batch(guarded, models):
    """Two streams admitted together decode concurrently: the second one's first text reaches
    its client while the first is still decoding (the first stream's decode waits after its
    first burst until that text has arrived; streams decoded one at a time would never get
    there). Both equal decoding alone."""
    p_long, p_short = models[4][3], models[4][1]
    want_long = guarded.dec.generate(p_long, rule=af.Greedy(), max_new_tokens=40,
                                     stop=list(guarded.stop_ids))
    assert len(want_long.tokens[0]) >= 4  # several bursts at check_every=1
    short_first = threading.Event()
    seen = {}

    def hold(ticket):
        if ticket.request.text == p_long:
            seen["long"] = seen.get("long", 0) + 1
            if seen["long"] == 1:
                seen["waited"] = short_first.wait(10)

    client = guarded.client("sekret")
    got = {}

    def call(name, prompt, mt):
        text, times = "", []
        for c in client.completions.create(model="m", prompt=prompt, max_tokens=mt,
                                           stream=True, extra_body={"rule": "greedy"}):
            if c.choices and c.choices[0].text:
                text += c.choices[0].text
                times.append(time.perf_counter())
                if name == "short":
                    short_first.set()
            if c.choices and c.choices[0].finish_reason is not None:
                last = c.choices[0]
        got[name] = (text, last.token_ids, last.finish_reason, times)

    decode_loop = guarded.decode_loop
    before = dict(decode_loop.counts)
    guarded.hooks.append(hold)
    decode_loop.pause()
    threads = [threading.Thread(target=call, args=a) for a in (("long", p_long, 40),
                                                                ("short", p_short, 3))]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while decode_loop.waiting() < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert decode_loop.waiting() == 2
        decode_loop.resume()
        for t in threads:
            t.join(60)
    finally:
        decode_loop.resume()
        guarded.hooks.remove(hold)
    assert seen["waited"] is True  # the short stream's text came while the long one decoded
    assert got["short"][3][0] < got["long"][3][-1]
    assert decode_loop.counts["batches"] - before["batches"] == 1  # admitted together
    assert got["long"][:3] == (want_long.text[0], want_long.tokens[0], want_long.finish_reason[0])
    short = guarded.dec.generate(p_short, rule=af.Greedy(), max_new_tokens=3,
                                 stop=list(guarded.stop_ids))
    assert got["short"][:3] == (short.text[0], short.tokens[0], short.finish_reason[0])


@needs_serve
def test_lone_request_runs_in_one_row_and_a_full_batch_takes_over(guarded, models):
    """A stream that comes alone decodes in a one-row scheduler; a request that comes while it
    runs gets a scheduler of max_batch_size rows and finishes first (3 tokens against the
    stream's longer completion), while the stream goes on in its row. Both exact."""
    p_long, p_short = models[4][3], models[4][2]
    want_long = guarded.dec.generate(p_long, rule=af.Greedy(), max_new_tokens=40,
                                     stop=list(guarded.stop_ids))
    assert len(want_long.tokens[0]) >= 6
    decode_loop, client = guarded.decode_loop, guarded.client("sekret")
    seen = {"schedulers": []}

    def hold(ticket):  # the long stream: after its first burst, wait for the second request
        if ticket.request.text == p_long:
            if not seen.get("second"):
                seen["second"] = True
                deadline = time.time() + 10
                while decode_loop.waiting() < 1 and time.time() < deadline:
                    time.sleep(0.005)
            seen["schedulers"].append(decode_loop.stats()["schedulers"])
            time.sleep(0.02)  # so the short request's answer clearly comes first

    order, got = [], {}

    def long_stream():
        text = ""
        for c in client.completions.create(model="m", prompt=p_long, max_tokens=40,
                                           stream=True, extra_body={"rule": "greedy"}):
            if c.choices:
                text += c.choices[0].text
                if text and "first" not in got:
                    got["first"] = True
                    short.start()
                if c.choices[0].finish_reason is not None:
                    got["long"] = (c.choices[0].token_ids, text, c.choices[0].finish_reason)
        order.append("long")

    def short_call():
        ch = client.completions.create(model="m", prompt=p_short, max_tokens=3,
                                       extra_body={"rule": "greedy"}).choices[0]
        got["short"] = (ch.token_ids, ch.text, ch.finish_reason)
        order.append("short")

    short = threading.Thread(target=short_call)
    guarded.hooks.append(hold)
    try:
        long_t = threading.Thread(target=long_stream)
        long_t.start()
        long_t.join(60)
        short.join(60)
    finally:
        guarded.hooks.remove(hold)
    assert order == ["short", "long"]
    alone_in = [x for x in seen["schedulers"][0] if x["kind"] == "greedy-a" and x["in_use"]]
    assert len(alone_in) == 1 and alone_in[0]["rows"] < 4  # not a full batch for one request
    assert any({"kind": "greedy-a", "rows": 4, "in_use": 1} in s for s in seen["schedulers"])
    assert got["long"] == (want_long.tokens[0], want_long.text[0], want_long.finish_reason[0])
    short_want = guarded.dec.generate(p_short, rule=af.Greedy(), max_new_tokens=3,
                                      stop=list(guarded.stop_ids))
    assert got["short"] == (short_want.tokens[0], short_want.text[0],
                            short_want.finish_reason[0])


@needs_serve
def test_closed_backend_answers_503(guarded, models):
    decode_loop = DecodeLoop(guarded.dec, max_batch_size=2, max_queue=2)
    decode_loop.close()
    srv = Served(server.create_app(guarded.dec, decode_loop=decode_loop))
    try:
        r = srv.post("/v1/completions", {"model": "aad-fast", "prompt": models[4][0], "max_tokens": 2,
                                         "rule": "greedy"})
    finally:
        srv.stop()
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert r.headers["retry-after"] == "1"


@needs_serve
def test_disconnect_frees_its_row_while_the_batch_goes_on(guarded, models):
    """A stream and a non-streamed request share a batch; the stream's client goes away after
    its first burst: its row is freed (one row in use at the next burst), the other request
    decodes on, exact."""
    p_gone, p_kept = models[4][6], models[4][3]
    want = guarded.dec.generate(p_kept, rule=af.Greedy(), max_new_tokens=30,
                                stop=list(guarded.stop_ids))
    assert len(want.tokens[0]) >= 4
    decode_loop = guarded.decode_loop
    rows = []

    def hold(ticket):
        if ticket.request.text == p_gone:
            rows.append(decode_loop.stats()["rows_in_use"]["greedy-a"])
            assert ticket.cancelled.wait(20)

    before = dict(decode_loop.counts)
    out = {}

    def kept():
        out["kept"] = guarded.post("/v1/completions", {"model": "m", "prompt": p_kept,
                                                       "max_tokens": 30, "rule": "greedy"},
                                   headers=guarded.auth)

    guarded.hooks.append(hold)
    decode_loop.pause()
    t = threading.Thread(target=kept)
    try:
        t.start()
        with httpx.Client(trust_env=False, timeout=30) as c:
            with c.stream("POST", guarded.url + "/v1/completions", headers=guarded.auth,
                          json={"model": "m", "prompt": p_gone, "max_tokens": 40,
                                "rule": "greedy", "stream": True}) as r:
                deadline = time.time() + 20
                while decode_loop.waiting() < 2 and time.time() < deadline:
                    time.sleep(0.02)
                decode_loop.resume()
                assert r.status_code == 200 and next(r.iter_lines()).startswith("data: ")
        t.join(30)
    finally:
        decode_loop.resume()
        guarded.hooks.remove(hold)
    assert rows == [2]  # both in the batch when the stream's client left
    assert decode_loop.counts["cancelled"] == before["cancelled"] + 1
    assert decode_loop.counts["batches"] - before["batches"] == 1
    assert out["kept"].status_code == 200
    assert out["kept"].json()["choices"][0]["token_ids"] == want.tokens[0]
    assert decode_loop.stats()["rows_in_use"]["greedy-a"] == 0


@needs_serve
def test_a_failing_request_does_not_fail_the_others(guarded, models, monkeypatch):
    """A burst fails while the "BOOM" request is in the batch (after its admission, mid-decode,
    in the server's scheduler and in any ``Decoder.generate``): only that request fails."""
    from aad_fast.decode.scheduler import Scheduler
    real = guarded.dec.generate
    p = models[4][7]
    boom = guarded.dec.request("BOOM " + p, rule=af.Greedy()).ids_a
    burst = Scheduler.burst

    def flaky(sched, on_admit=None):
        ran = burst(sched, on_admit)
        if any(res.request.ids_a == boom for res in sched.live.values()):
            raise RuntimeError("injected failure")
        return ran

    monkeypatch.setattr(Scheduler, "burst", flaky)
    before = dict(guarded.decode_loop.counts)
    out = {}
    guarded.decode_loop.pause()
    try:
        ts = [threading.Thread(target=lambda i=i, q=q: out.__setitem__(i, guarded.post(
            "/v1/completions", {"model": "m", "prompt": q, "max_tokens": 5, "rule": "greedy"},
            headers=guarded.auth))) for i, q in enumerate((p, "BOOM " + p))]
        for t in ts:
            t.start()
        deadline = time.time() + 20
        while guarded.decode_loop.waiting() < 2 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        guarded.decode_loop.resume()
    for t in ts:
        t.join(30)
    assert out[1].status_code == 500
    assert out[1].json()["error"]["type"] == "server_error"
    assert "injected failure" in out[1].json()["error"]["message"]
    want = real(p, rule=af.Greedy(), max_new_tokens=5, stop=list(guarded.stop_ids)).tokens[0]
    assert out[0].status_code == 200 and out[0].json()["choices"][0]["token_ids"] == want
    assert guarded.decode_loop.counts["retried"] == before["retried"] + 2  # both, each alone


# ------------------------------------------------------------------ issue 23: reliability
def test_an_empty_api_key_is_refused_before_a_model_loads(monkeypatch, capsys):
    """``--api-key "$KEY"`` with KEY unset, or ``AAD_FAST_API_KEY=``, never means "no auth"."""
    from types import SimpleNamespace

    from aad_fast.cli import build_parser, main
    monkeypatch.delenv("AAD_FAST_API_KEY", raising=False)
    for key in ("", "  "):
        with pytest.raises(ValueError, match="--api-key is empty"):
            serve_cli.api_key(build_parser().parse_args(["serve", "--api-key", key]))
    monkeypatch.setenv("AAD_FAST_API_KEY", "")
    with pytest.raises(ValueError, match="AAD_FAST_API_KEY is set but empty"):
        serve_cli.api_key(build_parser().parse_args(["serve"]))
    monkeypatch.delenv("AAD_FAST_API_KEY")
    if HAVE_SERVE:
        loaded = []
        monkeypatch.setattr(serve_cli, "load", lambda a: loaded.append(a))
        for argv, message in ((["--api-key", ""], "--api-key is empty"),
                              (["--port", "70000"], "--port must be in"),
                              (["--stop-id", "-3"], "--stop-id must be a token id >= 0")):
            assert main(["serve", *argv]) == 2
            assert message in capsys.readouterr().err
        assert loaded == []  # refused before a model loads
        with pytest.raises(ValueError, match="api_key='' is empty"):
            server.create_app(SimpleNamespace(tokenizer=object()), api_key="")


@needs_serve
def test_fields_that_would_be_ignored_or_cannot_be_honoured_are_400(served, models):
    p = models[4][0]
    cases = [
        ({"prompt": p, "max_tokenz": 4}, "max_tokenz"),  # a typo is not ignored
        ({"prompt": p, "stream": "yes"}, "stream"),
        ({"prompt": p, "stream": 0}, "stream"),
        ({"prompt": p, "user": 5}, "user"),
        ({"prompt": p, "rule": "eft", "temperature": 1.0, "top_k": 10 ** 30}, "top_k"),
        ({"prompt": p, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": p, "max_completion_tokens": 4}, "max_completion_tokens"),  # chat's field
        ({"prompt": p, "rule": "cfg", "g": 10 ** 400}, "g"),  # beyond float: not a 500
        ({"prompt": p, "temperature": 10 ** 400, "rule": "eft"}, "temperature"),
    ]
    for body, param in cases:
        r = served.post("/v1/completions", {"model": "toy", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = served.post("/v1/chat/completions", {"model": "toy", "messages": [
        {"role": "user", "content": p, "name": "bob"}]})
    assert r.status_code == 400 and "messages[0].name" in r.json()["error"]["message"]
    r = served.post("/v1/completions", content=b"[" * 100000,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]
    # a null field is its default; a huge length penalty ranks beams, it does not hang
    r = served.post("/v1/completions", {"model": "toy", "prompt": p, "alpha": None,
                                        "max_tokens": 3, "rule": "aad"})
    assert r.status_code == 200
    for lp in (10 ** 30, -10 ** 30):
        r = served.post("/v1/completions", {"model": "toy", "prompt": p, "max_tokens": 4,
                                            "rule": "beam-aad", "num_beams": 2,
                                            "length_penalty": lp})
        assert r.status_code == 200, r.text


@needs_serve
def test_slow_request_parsing_does_not_stall_other_clients(served, models, monkeypatch):
    """Parsing and tokenising a body (a prompt may be the whole megabyte) run off the event
    loop: /health answers while a slow one is being parsed."""
    real = server.parse_request

    def slow(body, *a, **k):
        if body.get("prompt") == "slow":
            time.sleep(3)
        return real(body, *a, **k)
    monkeypatch.setattr(server, "parse_request", slow)
    t = threading.Thread(target=lambda: served.post("/v1/completions", {
        "model": "toy", "prompt": "slow", "max_tokens": 2}))
    t.start()
    time.sleep(0.5)
    t0 = time.time()
    with httpx.Client(trust_env=False, timeout=30) as c:
        assert c.get(served.url + "/health").status_code == 200
    waited = time.time() - t0
    t.join(30)
    assert waited < 1.5, f"/health waited {waited:.1f} s behind a request being parsed"


@needs_serve
def test_a_non_streamed_client_that_goes_away_frees_its_request(guarded, models):
    body = {"model": "m", "prompt": models[4][0], "max_tokens": 40, "rule": "greedy"}
    decode_loop = guarded.decode_loop
    before = dict(decode_loop.counts)
    decode_loop.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            with httpx.Client(trust_env=False, timeout=1.0) as c:
                c.post(guarded.url + "/v1/completions", json=body, headers=guarded.auth)
        time.sleep(1.0)  # the server notices the closed connection
    finally:
        decode_loop.resume()
    deadline = time.time() + 20
    while decode_loop.counts["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.05)
    assert decode_loop.counts["cancelled"] == before["cancelled"] + 1
    assert decode_loop.counts["done"] == before["done"]  # it was not decoded for nobody
    assert decode_loop.waiting() == 0
