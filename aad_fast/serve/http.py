"""``aad-fast serve``: an OpenAI-compatible HTTP server for a model pair (FastAPI on uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. The rule
and its parameters ride in the body beside the OpenAI fields (``openai_api``); decoding is done
by a ``serving.Backend``: one decode thread running a continuous-batching scheduler per rule
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
import os
import sys
import time

from .openai_api import APIError, Limits, chunk, completion_body, new_id, parse_request, usage
from .loop import Backend, QueueFull, Unavailable

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
               picker=None, model_name: str = "aad-fast", backend: Backend | None = None):
    """The FastAPI app serving ``decoder`` (an ``aad_fast.Decoder`` with a tokenizer).

    Args:
        api_key: if set, required as ``Authorization: Bearer KEY`` except on ``/health``.
        max_batch_size: rows of each rule kind's scheduler (default: the Decoder's
            ``max_batch_size``).
        max_queue: requests waiting for a row beyond which a request gets 429.
        limits: per-request caps (``openai_api.Limits``).
        default_stop: stop ids/strings added to every request (e.g. a chat turn marker).
        picker: the reward model of ``rule=best-of-n`` (a path or model), or ``None``.
        model_name: the id ``/v1/models`` lists and responses carry.
        backend: a ready ``Backend`` (tests); by default one is built and closed with the app.
    """
    fastapi, responses = _fastapi()
    from contextlib import asynccontextmanager

    if decoder.tokenizer is None:
        raise ValueError("the served Decoder needs a tokenizer (pass tokenizer=)")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError(f"api_key={api_key!r} is empty: it would accept an empty key; give "
                         "a key, or None for no key")
    mbs = decoder.max_batch_size if max_batch_size is None else max_batch_size
    own = backend is None
    backend = backend or Backend(decoder, max_batch_size=mbs, max_queue=max_queue)
    limits = (limits or Limits()).resolve(decoder, backend.max_batch_size)
    default_stop = tuple(decoder.stop_ids(list(default_stop)))

    @asynccontextmanager
    async def lifespan(app):
        yield
        if own:
            backend.close()

    app = fastapi.FastAPI(title="aad-fast", lifespan=lifespan, docs_url=None, redoc_url=None,
                          openapi_url=None)
    app.state.backend, app.state.limits, app.state.decoder = backend, limits, decoder
    app.state.default_stop = default_stop

    def error(exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return responses.JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        return error(exc)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        return error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def check_key(request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type_="invalid_request_error", code="invalid_api_key")

    async def read_json(request) -> dict:
        cap = limits.max_body_bytes
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

    def submit(reqs, loop):
        """Submit every request, each with its own asyncio queue of events."""
        tickets, queues = [], []
        try:
            for r in reqs:
                q: asyncio.Queue = asyncio.Queue()
                tickets.append(backend.submit(
                    r, lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev)))
                queues.append(q)
        except QueueFull as exc:
            for t in tickets:
                t.cancel()
            raise APIError(429, f"the server is busy: {exc}; retry later",
                           type_="rate_limit_error", code="queue_full") from None
        except Unavailable as exc:
            for t in tickets:
                t.cancel()
            raise APIError(503, f"{exc}; retry later", code="unavailable") from None
        return tickets, queues

    def failure(ev) -> APIError:
        exc = ev[1]
        if isinstance(exc, Unavailable):
            return APIError(503, f"{exc}; retry later", code="unavailable")
        if isinstance(exc, ValueError):
            return APIError(400, str(exc))
        return APIError(500, f"decoding failed: {type(exc).__name__}: {exc}")

    async def handle(request, chat: bool):
        check_key(request)
        body = await read_json(request)
        # tokenising (a prompt may be the whole body) and the chat template run off the event
        # loop, so one large request does not stall the other clients' streams
        reqs, n_prompt = await asyncio.to_thread(parse_request, body, chat, decoder, limits,
                                                 default_stop, picker)
        loop = asyncio.get_running_loop()
        tickets, queues = submit(reqs, loop)
        if reqs[0].stream:
            include = isinstance(body.get("stream_options"), dict) and \
                body["stream_options"].get("include_usage") is True
            return responses.StreamingResponse(
                sse(request, chat, tickets[0], queues[0], n_prompt, include),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = []
            for q in queues:
                get = asyncio.ensure_future(q.get())  # one get, never cancelled mid-item
                while not get.done():  # a client that goes away frees its row(s): below
                    await asyncio.wait({get}, timeout=0.2)
                    if not get.done() and await request.is_disconnected():
                        get.cancel()
                        return responses.Response(status_code=499)
                ev = get.result()
                if ev[0] != "done":
                    raise failure(ev) if ev[0] == "error" else APIError(500, "cancelled")
                done.append(ev[1])
        finally:
            for t in tickets:
                t.cancel()  # a no-op for finished ones; frees the rest if this one failed
        return completion_body(chat, model_name, done, n_prompt)

    async def sse(request, chat, ticket, q, n_prompt, include_usage):
        rid, created = new_id(chat), int(time.time())

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield event(chunk(chat, rid, model_name, created, role=True))
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.2)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev[0] == "delta":
                    yield event(chunk(chat, rid, model_name, created, text=ev[1]))
                    continue
                if ev[0] == "done":
                    c = ev[1]
                    yield event(chunk(chat, rid, model_name, created, finish=c.finish_reason,
                                      tokens=c.tokens))
                    if include_usage:
                        yield event({"id": rid, "object": chunk(chat, rid, model_name,
                                                                created)["object"],
                                     "created": created, "model": model_name, "choices": [],
                                     "usage": usage(n_prompt, len(c.tokens))})
                elif ev[0] == "error":
                    yield event(failure(ev).body())
                yield "data: [DONE]\n\n"
                return
        finally:
            ticket.cancel()  # a client gone mid-stream frees its row before the next burst

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "aad_fast",
                                            "max_model_len": decoder.max_seq_len}]}

    @app.get("/health")
    async def health():
        """Open (no key): queue length, rows in use per rule kind and counters."""
        return {"status": "ok", **backend.stats()}

    return app


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--aligned", default=None,
                   help="aligned model or LoRA adapter directory (default: the embedded pair)")
    p.add_argument("--reference", default=None, help="reference model directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, where the model directories have none")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $AAD_FAST_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="rows of the running batch (of each rule kind in use)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row beyond which requests get 429")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context: prompt + new tokens (default 2048, or the model's learned "
                        "position limit where smaller; 128 for the embedded pair)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask (default: the context)")
    p.add_argument("--max-n", type=int, default=4, help="largest n a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--picker", default=None,
                   help="reward model directory for rule=best-of-n (embedded pair: its picker)")
    from ..cli import add_stop_arguments
    add_stop_arguments(p, " added to every request")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def load(a):
    """``(decoder, default_stop, picker, name)`` for the CLI arguments ``a``."""
    import torch

    from ..decoder import Decoder
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.aligned:
        dec = Decoder(a.aligned, a.reference, dtype=dtype, device=a.device,
                      tokenizer=a.tokenizer, max_batch_size=a.max_batch_size,
                      max_seq_len=a.max_seq_len)
        name = os.path.basename(os.path.normpath(a.aligned))
        return dec, list(a.stop or []), a.picker, a.served_model_name or name
    from ..toy.default import default_pair
    from ..toy.assets import default_pair_dir
    from ..toy.tokenizer import stop_ids
    aligned, reference, tok, trained = default_pair()
    if not trained:
        print("note: the trained default pair is not in this install; serving a random-weight "
              "stand-in (text will be gibberish)", file=sys.stderr)
    dec = Decoder(aligned, reference, tokenizer=tok, max_batch_size=a.max_batch_size,
                  max_seq_len=128 if a.max_seq_len is None else a.max_seq_len)
    picker = a.picker or (str(default_pair_dir() / "picker") if trained else None)
    return dec, stop_ids(tok) + list(a.stop or []), picker, a.served_model_name or "aad-default"


def api_key(a) -> str | None:
    """``--api-key``, else ``$AAD_FAST_API_KEY``, else ``None`` (no key needed). An empty key
    (``--api-key "$KEY"`` with ``KEY`` unset, or ``AAD_FAST_API_KEY=``) is refused: it means
    a key was wanted, never "no authentication"."""
    if a.api_key is not None:
        if not a.api_key.strip():
            raise ValueError("--api-key is empty (was it given as \"$VAR\" with VAR unset?); "
                             "give the key, or leave --api-key out to serve without one")
        return a.api_key
    env = os.environ.get("AAD_FAST_API_KEY")
    if env is not None and not env.strip():
        raise ValueError("AAD_FAST_API_KEY is set but empty; set it to the key, or unset it "
                         "to serve without one")
    return env


def run(a) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})")
    _fastapi()
    for name in ("max_batch_size", "max_queue", "max_n", "max_body_bytes", "max_seq_len",
                 "max_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:  # None: the default
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    from .cli import check_stop_ids
    check_stop_ids(a)
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    key = api_key(a)
    if a.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {a.host} without an API key: anyone who can reach it may "
              "use it (pass --api-key or set AAD_FAST_API_KEY)", file=sys.stderr)
    dec, stop, picker, name = load(a)
    limits = Limits(max_body_bytes=a.max_body_bytes, max_tokens=a.max_tokens, max_n=a.max_n)
    app = create_app(dec, api_key=key, max_batch_size=a.max_batch_size, max_queue=a.max_queue,
                     limits=limits, default_stop=stop, picker=picker, model_name=name)
    print(f"aad-fast serve: {name} ({dec.kind} pair on {dec.device}) at "
          f"http://{a.host}:{a.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0
