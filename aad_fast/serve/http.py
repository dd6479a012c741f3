"""``aad-fast serve``: an OpenAI-compatible HTTP server for a model pair (FastAPI on uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``,
vLLM's ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``, and ``GET /health``.
The served pair is listed once per rule (``NAME`` the default rule, ``NAME:RULE`` each rule:
``openai_api.ServedModels``), so the ``model`` field alone can choose the rule; the rule and its
parameters may also ride in the body beside the OpenAI fields (``openai_api``); decoding is done
by a ``loop.DecodeLoop``: one decode thread running a continuous-batching scheduler per rule
kind, so concurrent requests (streamed or not, of any values of a kind) share its rows.

Safety: binds 127.0.0.1 unless told; with an API key every endpoint but ``/health`` wants
``Authorization: Bearer KEY`` (401 otherwise, compared in constant time); bodies, prompt
lengths, ``max_tokens``, ``n``, ``num_beams`` and ``best_of`` are capped by ``Limits``; a full
queue answers 429, a server shutting down 503; an error in one request answers that request only
(400 for bad input, 500 otherwise, OpenAI-style error body). An empty key is refused at start.
The event loop never waits on decoding: the decode thread hands each request's events to it
(``call_soon_threadsafe``); parsing and tokenising a body run in a worker thread. A client that
goes away, streamed or not, frees its row before the next burst.

Needs the ``serve`` extra: ``pip install 'aad_fast[serve]'`` (fastapi, uvicorn).
"""
import asyncio
import hmac
import json
import time

from .. import rules as R
from .openai_api import (APIError, Limits, ServedModels, chunk, completion_body, detokenize,
                         logprobs_body, new_id, parse_request, tokenize, tokenizer_info, usage)
from .loop import DecodeLoop, QueueFull, Unavailable

INSTALL_HINT = "aad-fast serve needs fastapi and uvicorn: pip install 'aad_fast[serve]'"


def _fastapi():
    try:
        import fastapi
        from fastapi import responses
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return fastapi, responses


def create_app(decoder, *, api_key: str | None = None, max_batch_size: int | None = None,
               max_queue: int = 64, limits: Limits | None = None, default_stop=(),
               picker=None, model_name: str = "aad-fast", decode_loop: DecodeLoop | None = None,
               rule: str = "aad", rule_defaults: dict | None = None):
    """The FastAPI app serving ``decoder`` (an ``aad_fast.Decoder`` with a tokenizer).

    Args:
        api_key: if set, required as ``Authorization: Bearer KEY`` except on ``/health``.
        max_batch_size: rows of each rule kind's scheduler (default: the Decoder's
            ``max_batch_size``).
        max_queue: requests waiting for a row beyond which a request gets 429.
        limits: per-request caps (``openai_api.Limits``).
        default_stop: stop ids/strings added to every request (e.g. a chat turn marker; a
            request with ``ignore_eos`` drops them with the model's EOS).
        picker: the reward model of ``rule=best-of-n`` (a path or model), or ``None``.
        model_name: the served name: ``/v1/models`` lists it (the default rule) and
            ``model_name:RULE`` for each rule this pair runs; a request naming another model
            is a 404. Responses carry the name the request gave.
        rule, rule_defaults: the rule of the bare ``model_name`` (and of a request that names
            none) and its values (rule-table fields, e.g. ``{"alpha": 0.2}``) under the body's.
        decode_loop: a ready ``loop.DecodeLoop`` (tests); by default one is built and closed
            with the app.
    """
    fastapi, responses = _fastapi()
    if decoder.tokenizer is None:
        raise ValueError("the served Decoder needs a tokenizer (pass tokenizer=)")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError(f"api_key={api_key!r} is empty: it would accept an empty key; give "
                         "a key, or None for no key")
    served = served_models(decoder, model_name, rule, rule_defaults or {}, picker)
    mbs = decoder.max_batch_size if max_batch_size is None else max_batch_size
    own = decode_loop is None
    decode_loop = decode_loop or DecodeLoop(decoder, max_batch_size=mbs, max_queue=max_queue)
    limits = (limits or Limits()).resolve(decoder, decode_loop.max_batch_size)
    ids, strings = decoder.stops(list(default_stop))  # checked now, before a request comes
    server = _Server(decoder, decode_loop, limits, tuple(ids) + strings,
                     api_key, picker, served, responses)
    app = fastapi.FastAPI(title="aad-fast", lifespan=server.lifespan(own), docs_url=None,
                          redoc_url=None, openapi_url=None)
    app.state.decode_loop, app.state.limits, app.state.decoder = decode_loop, limits, decoder
    app.state.default_stop, app.state.picker = server.default_stop, picker
    app.state.served = served
    server.routes(app, fastapi.Request)
    return app


def served_models(decoder, name: str, rule: str, defaults: dict, picker) -> ServedModels:
    """The names served: a rule is listed when this Decoder runs it (two-model rules need a
    pair, OPAD one model; best-of-n a picker). The default rule and its values are checked
    here, before a request comes."""
    def runs(r):
        sample = R.make_rule(r, {"principle": "-"} if r == "opad" else
                             {"picker": "-"} if r == "best-of-n" else {})
        try:
            decoder._validate(sample, 1)
        except ValueError:
            return False
        return r != "best-of-n" or picker is not None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model_name must be a non-empty name, got {name!r}")
    R.check_fields(rule, set(defaults), R.rule_entry(rule).samples == "always")
    R.make_rule(rule, {**defaults, **({"principle": "-"} if rule == "opad" else {}),
                       **({"picker": picker or "-"} if rule == "best-of-n" else {})})
    return ServedModels(name, rule, dict(defaults), tuple(r for r in R.RULE_NAMES if runs(r)))


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _failure(ev) -> APIError:
    """The error answered for a request whose decoding failed (event ``("error", exc)``)."""
    exc = ev[1]
    if isinstance(exc, Unavailable):
        return APIError(503, f"{exc}; retry later", code="unavailable")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, f"decoding failed: {type(exc).__name__}: {exc}")


class _Server:
    """What the app's routes share: the Decoder and its ``DecodeLoop``, the limits, the server's
    stop ids, key, picker and model name; one method per route."""

    def __init__(self, decoder, decode_loop, limits, default_stop, api_key, picker, served,
                 responses):
        self.decoder, self.decode_loop, self.limits = decoder, decode_loop, limits
        self.default_stop, self.api_key, self.picker = default_stop, api_key, picker
        self.served, self.model_name, self.responses = served, served.name, responses

    def routes(self, app, Request) -> None:
        """Register the error handlers and the endpoints on ``app``."""
        async def api_error(request, exc):
            return self.error(exc)

        async def server_error(request, exc):
            return self.error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

        async def completions(request: Request):
            return await self.handle(request, chat=False)

        async def chat_completions(request: Request):
            return await self.handle(request, chat=True)

        async def models(request: Request):
            return self.models(request)

        async def model(model_id: str, request: Request):
            self.check_key(request)
            self.served.rule_of(model_id)  # 404 for a name not served
            return self.served.card(model_id, self.decoder.max_seq_len)

        async def tokenize_(request: Request):
            return await self.tokenizer_call(request, tokenize)

        async def detokenize_(request: Request):
            return await self.tokenizer_call(request, detokenize)

        async def tokenizer_info_(request: Request):
            self.check_key(request)
            return tokenizer_info(self.decoder)

        async def health():
            """Open (no key): queue length, rows in use per rule kind and counters."""
            return {"status": "ok", **self.decode_loop.stats()}

        app.exception_handler(APIError)(api_error)
        app.exception_handler(Exception)(server_error)
        app.post("/v1/completions")(completions)
        app.post("/v1/chat/completions")(chat_completions)
        app.get("/v1/models")(models)
        app.get("/v1/models/{model_id:path}")(model)
        app.post("/tokenize")(tokenize_)
        app.post("/detokenize")(detokenize_)
        app.get("/tokenizer_info")(tokenizer_info_)
        app.get("/health")(health)

    def lifespan(self, own: bool):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app):
            yield
            if own:
                self.decode_loop.close()
        return lifespan

    def error(self, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return self.responses.JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type_="invalid_request_error", code="invalid_api_key")

    def models(self, request) -> dict:
        self.check_key(request)
        return {"object": "list", "data": [self.served.card(m, self.decoder.max_seq_len)
                                           for m in self.served.ids()]}

    async def tokenizer_call(self, request, fn) -> dict:
        """``/tokenize`` or ``/detokenize``: the key, the body, its ``model`` (404 if not
        served), then ``fn(body, decoder)`` off the event loop."""
        self.check_key(request)
        body = await self.read_json(request)
        self.served.rule_of(body.get("model"))
        return await asyncio.to_thread(fn, body, self.decoder)

    async def read_json(self, request) -> dict:
        cap = self.limits.max_body_bytes
        size = request.headers.get("content-length")
        too_big = APIError(413, f"the request body exceeds this server's limit of {cap} bytes",
                           code="request_too_large")
        if size is not None and size.isdigit() and int(size) > cap:
            raise too_big
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > cap:
                raise too_big
        try:  # off the event loop: a large body must not stall the other clients
            body = await asyncio.to_thread(json.loads, bytes(buf))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not JSON ({exc})") from None
        except RecursionError:
            raise APIError(400, "the request body nests JSON too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def submit(self, reqs, loop):
        """Submit every request (``None``: nothing to decode) with one asyncio queue of
        ``(choice index, event)``."""
        q: asyncio.Queue = asyncio.Queue()
        tickets = []
        try:
            for i, r in enumerate(reqs):
                if r is not None:
                    tickets.append(self.decode_loop.submit(
                        r, lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev))))
        except QueueFull as exc:
            for t in tickets:
                t.cancel()
            raise APIError(429, f"the server is busy: {exc}; retry later",
                           type_="rate_limit_error", code="queue_full") from None
        except Unavailable as exc:
            for t in tickets:
                t.cancel()
            raise APIError(503, f"{exc}; retry later", code="unavailable") from None
        return tickets, q

    async def handle(self, request, chat: bool):
        self.check_key(request)
        body = await self.read_json(request)
        self.served.rule_of(body.get("model"))  # 404 for a model not served, before parsing
        # tokenising (a prompt may be the whole body) and the chat template run off the event
        # loop, so one large request does not stall the other clients' streams
        parsed = await asyncio.to_thread(parse_request, body, chat, self.decoder, self.limits,
                                         self.default_stop, self.picker, self.served)
        model = body["model"] if isinstance(body.get("model"), str) else self.model_name
        tickets, q = self.submit(parsed.requests, asyncio.get_running_loop())
        if body.get("stream") is True:
            return self.responses.StreamingResponse(
                self.sse(request, chat, tickets, q, parsed, model),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = [None] * len(parsed.requests)
            for _ in tickets:
                got = await self.next_event(request, q)
                if got is None:  # the client went away: its row(s) are freed below
                    return self.responses.Response(status_code=499)
                i, ev = got
                if ev[0] != "done":
                    raise _failure(ev) if ev[0] == "error" else APIError(500, "cancelled")
                done[i] = ev[1]
        finally:
            for t in tickets:
                t.cancel()  # a no-op for finished ones; frees the rest if this one failed
        texts, logprobs = await asyncio.to_thread(self.echo_and_logprobs, chat, parsed, done)
        return completion_body(chat, model, parsed, done, texts, logprobs)

    def echo_and_logprobs(self, chat: bool, parsed, done: list) -> tuple:
        """``(texts, logprobs)`` per choice: with ``echo`` the prompt's text before the
        completion's; with ``logprobs`` OpenAI's object, from one forward of prompt +
        completion through the asked stream (``Decoder.logprobs``; with ``echo`` the prompt's
        tokens too, the first one's ``None``). ``(None, None)`` when neither is asked."""
        f = parsed.flags
        if not f["echo"] and f["logprobs"] is None:
            return None, None
        tok, texts, out = self.decoder.tokenizer, [], []
        for i, c in enumerate(done):
            p = i // parsed.n
            rows, inp = parsed.rows[p], parsed.inputs[p]
            prompt = rows.a[0] if f["logprobs_stream"] == "a" else rows.r[0]
            comp = c.tokens if c is not None else []
            text = c.text if c is not None else ""
            if f["echo"]:
                text = (inp["text"] if "text" in inp else tok.decode(inp["ids"])) + text
            texts.append(text)
            if f["logprobs"] is None:
                out.append(None)
                continue
            lp = self.decoder.logprobs(prompt + comp, stream=f["logprobs_stream"],
                                       top=f["logprobs"], start=0 if f["echo"] else len(prompt))
            out.append(logprobs_body(chat, tok, lp, f["logprobs"]))
        return texts, out

    @staticmethod
    async def next_event(request, q):
        """The next event of ``q``, or ``None`` once the client has gone away."""
        get = asyncio.ensure_future(q.get())  # one get, never cancelled mid-item
        while not get.done():
            await asyncio.wait({get}, timeout=0.2)
            if not get.done() and await request.is_disconnected():
                get.cancel()
                return None
        return get.result()

    async def sse(self, request, chat, tickets, q, parsed, model):
        """The events of a stream: each choice's pieces as they come (``index`` says whose),
        its last chunk with ``finish_reason`` and ``token_ids``; ``include_usage``: a usage
        chunk last; ``continuous_usage_stats``: each chunk with its choice's usage so far."""
        rid, created = new_id(chat), int(time.time())
        f, n = parsed.flags, parsed.n
        counts = [0] * len(parsed.requests)

        def use(i):
            return usage(parsed.prompt_tokens[i // n], counts[i]) if f["continuous_usage"] \
                else None
        try:
            if chat:
                for i in range(len(parsed.requests)):
                    yield _event(chunk(chat, rid, model, created, role=True, index=i, use=use(i)))
            for _ in tickets:
                while True:
                    got = await self.next_event(request, q)
                    if got is None:
                        return
                    i, ev = got
                    if ev[0] != "delta":
                        break
                    counts[i] = ev[2]
                    yield _event(chunk(chat, rid, model, created, text=ev[1], index=i,
                                       use=use(i)))
                if ev[0] != "done":
                    if ev[0] == "error":
                        yield _event(_failure(ev).body())
                    yield "data: [DONE]\n\n"
                    return
                c = ev[1]
                counts[i] = len(c.tokens)
                yield _event(chunk(chat, rid, model, created, finish=c.finish_reason,
                                   tokens=c.tokens, index=i, use=use(i),
                                   stop_reason=c.stop_reason))
            if f["include_usage"]:
                yield _event({"id": rid, "object": chunk(chat, rid, model, created)["object"],
                              "created": created, "model": model, "choices": [],
                              "usage": usage(sum(parsed.prompt_tokens), sum(counts))})
            yield "data: [DONE]\n\n"
        finally:
            for t in tickets:
                t.cancel()  # a client gone mid-stream frees its row before the next burst


# ---------------------------------------------------------------------------------- CLI
