"""Benchmark of ``aad-fast serve`` against the offline ``Decoder``: writes JSON to OUT_DIR.

    python bench/bench_server.py OUT_DIR [--aligned PATH --reference PATH] [--clients 16]

Starts ``aad-fast serve`` in a subprocess on 127.0.0.1 (a free port) and measures, on the same
prompts and rule (the embedded pair's held-out prompts by default):

- ``batch1``: ms per completion token, one request at a time, of the offline
  ``Decoder.generate`` (in this process) and of the server (non-streamed and streamed, wall time
  of the HTTP request, so HTTP and queueing are included); ``server_over_offline`` is their ratio.
- ``concurrent``: ``--clients`` threads each sending ``--requests`` requests back to back, once
  streamed (time to first token = first content chunk) and once non-streamed (the backend
  batches those; time to first token is then the whole request): throughput (completion
  tokens/s over the wall time), p50/p99 time to first token and ms/token after the first.

Tokens are compared, never timed, in the tests; run this on an idle machine for numbers.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def start_server(a, port):
    cmd = [sys.executable, "-m", "aad_fast.cli", "serve", "--port", str(port),
           "--max-batch-size", str(a.max_batch_size), "--max-queue", "1024"]
    if a.aligned:
        cmd += ["--aligned", a.aligned] + (["--reference", a.reference] if a.reference else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    deadline = time.time() + a.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"aad-fast serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1,
                         trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("aad-fast serve did not start in time")


def offline(a, prompts, chat):
    """ms/token of the offline Decoder, one prompt at a time (the server's settings)."""
    import aad_fast as af
    if a.aligned:
        dec, stop = af.Decoder(a.aligned, a.reference, max_batch_size=a.max_batch_size), None
    else:
        from aad_fast.default import default_pair
        from aad_fast.toy.tokenizer import stop_ids
        aligned, reference, tok, _ = default_pair()
        dec = af.Decoder(aligned, reference, tokenizer=tok, max_batch_size=a.max_batch_size,
                         max_seq_len=128)
        stop = stop_ids(tok)
    kw = dict(rule=af.AAD(a.alpha), max_new_tokens=a.max_tokens, stop=stop, chat=chat)
    dec.generate(prompts[0], **kw)  # warm-up
    total_s, total_tok, engine_ms = 0.0, 0, []
    for p in prompts:
        t0 = time.perf_counter()
        g = dec.generate(p, **kw)
        total_s += time.perf_counter() - t0
        total_tok += len(g.tokens[0]) + (g.finish_reason[0] == "stop")
        engine_ms.append(g.stats["ms_per_token"])
    dec.close()
    return {"ms_per_token": 1e3 * total_s / max(total_tok, 1), "tokens": total_tok,
            "engine_ms_per_token_p50": statistics.median(engine_ms)}


def one_request(client, prompt, a, chat, stream):
    """``(ttft_s, total_s, completion_tokens)`` of one request."""
    extra = {"rule": "aad", "alpha": a.alpha}
    msgs = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    ttft = None
    if not stream:
        r = (client.chat.completions.create(model="m", messages=msgs, max_tokens=a.max_tokens,
                                            extra_body=extra) if chat else
             client.completions.create(model="m", prompt=prompt, max_tokens=a.max_tokens,
                                       extra_body=extra))
        dt = time.perf_counter() - t0
        return dt, dt, r.usage.completion_tokens + (r.choices[0].finish_reason == "stop")
    make = client.chat.completions.create if chat else client.completions.create
    body = dict(messages=msgs) if chat else dict(prompt=prompt)
    n, stopped = 0, False
    for c in make(model="m", max_tokens=a.max_tokens, stream=True, extra_body=extra,
                  stream_options={"include_usage": True}, **body):
        piece = (c.choices[0].delta.content if chat else c.choices[0].text) if c.choices else ""
        if piece and ttft is None:
            ttft = time.perf_counter() - t0
        if c.usage is not None:
            n = c.usage.completion_tokens
        if c.choices and c.choices[0].finish_reason == "stop":
            stopped = True  # the stop token was decoded too (as the offline count)
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, n + stopped


def concurrent(make_client, prompts, a, chat, stream):
    rows, lock = [], threading.Lock()

    def client_loop(i):
        client = make_client()
        for j in range(a.requests):
            res = one_request(client, prompts[(i * a.requests + j) % len(prompts)], a, chat,
                              stream)
            with lock:
                rows.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(r[2] for r in rows)
    ttft = [r[0] * 1e3 for r in rows]
    mspt = [(r[1] - r[0]) * 1e3 / (r[2] - 1) for r in rows if r[2] > 1 and stream] or \
        [r[1] * 1e3 / r[2] for r in rows if r[2] > 0]
    return {"requests": len(rows), "completion_tokens": toks, "wall_s": wall,
            "tokens_per_s": toks / wall, "ttft_ms_p50": _pct(ttft, 50),
            "ttft_ms_p99": _pct(ttft, 99), "ms_per_token_p50": _pct(mspt, 50),
            "ms_per_token_p99": _pct(mspt, 99)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for the JSON result")
    p.add_argument("--aligned", default=None, help="aligned model (default: the embedded pair)")
    p.add_argument("--reference", default=None)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--start-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    import httpx
    import openai

    if a.aligned:
        prompts = [f"Question {i}: tell me something about the number {i}."
                   for i in range(a.prompts)]
        chat = False
    else:
        from aad_fast.toy import task
        held = task.split_problems()[1]
        prompts = [held[i % len(held)].prompt for i in range(a.prompts)]
        chat = True
    port = _free_port()
    proc = start_server(a, port)
    try:
        def make_client():
            return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                 max_retries=0, http_client=httpx.Client(trust_env=False,
                                                                         timeout=600))
        client = make_client()
        one_request(client, prompts[0], a, chat, False)  # warm-up
        batch1 = {}
        for stream in (False, True):
            tot_s = tot_tok = 0
            ttfts = []
            for q in prompts:
                ttft, total, n = one_request(client, q, a, chat, stream)
                tot_s, tot_tok = tot_s + total, tot_tok + n
                ttfts.append(ttft * 1e3)
            batch1["server_stream" if stream else "server"] = {
                "ms_per_token": 1e3 * tot_s / max(tot_tok, 1), "tokens": tot_tok,
                "ttft_ms_p50": _pct(ttfts, 50)}
        conc = {"stream": concurrent(make_client, prompts, a, chat, True),
                "batched": concurrent(make_client, prompts, a, chat, False)}
    finally:
        proc.terminate()
        proc.wait(30)
    batch1["offline"] = offline(a, prompts, chat)
    batch1["server_over_offline"] = batch1["server"]["ms_per_token"] / \
        batch1["offline"]["ms_per_token"]
    import torch
    device = "cuda" if torch.cuda.is_available() else f"cpu-{torch.get_num_threads()}threads"
    result = {"bench": "server", "date": datetime.date.today().isoformat(), "device": device,
              "settings": {k: v for k, v in vars(a).items() if k != "out_dir"},
              "batch1": batch1, "concurrent": conc}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"server-{device}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
