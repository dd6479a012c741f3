"""Benchmark of ``aad-fast serve`` (continuous batching) against the offline ``Decoder``.

    python bench/bench_server.py [OUT_DIR] [--shape cpu-60m | --aligned PATH --reference PATH]
                                 [--clients 16] [--requests 2] [--max-tokens 32]

Starts ``aad-fast serve`` in a subprocess on 127.0.0.1 (a free port) and measures, with AAD on
the same prompts: the embedded pair's held-out prompts by default (chat; short answers that end
at the stop token); with ``--shape NAME`` a random-weight pair of that config
(``aad_fast/bench/configs``, e.g. ``cpu-60m``) saved to a temporary folder with a word-level
tokenizer, prompts of ``--prompt-len`` random words and no stop token (every completion is
``--max-tokens`` long); or the ``--aligned``/``--reference`` paths.

- ``batch1``: one request at a time. The offline ``Decoder.generate`` (in this process, same
  ``max_batch_size``/``max_seq_len``, ``compile=False`` as the server's scheduler) against the
  server, streamed and not. Per-token latency: offline, the engine's decode ms/token; streamed,
  (last chunk - first chunk) / (tokens - 1) per request; both also as wall ms per completion
  token (HTTP, queueing and prefill included). ``server_over_offline``: the ratios (medians).
- ``concurrent``: ``--clients`` threads each sending ``--requests`` requests back to back, once
  streamed and once not: throughput (completion tokens/s over the wall time), p50/p99 time to
  first token (first content chunk; the whole request when not streamed) and ms/token after
  the first (streamed) or per token (not streamed).

Writes ``OUT_DIR/server-<device>-<date>.json`` (default ``bench/results``) and a PNG of the same
numbers beside it (skipped with a message if matplotlib is missing). Not a test: nothing is
asserted; run it on an idle machine. About 1-2 minutes on 2 CPU cores with the defaults.
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def random_pair(a, folder: Path) -> None:
    """Save a random pair of config ``a.shape`` (seeds 0 and 1) with a word-level tokenizer
    (``w0`` ... ``w{V-1}``, no special tokens, so no stop token) to ``folder/{a,r}``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aad_fast import bench
    config = bench.make_config(bench.load_shape(a.shape, bench.default_config_dir()))
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)},
                                      unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")
    for name, seed in (("a", 0), ("r", 1)):
        model = bench.random_model(config, torch.float32, "cpu", seed)
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)


def make_prompts(a):
    """``(prompts, chat)``."""
    if a.shape:
        import random
        rng = random.Random(0)
        return [" ".join(f"w{rng.randrange(3, 1000)}" for _ in range(a.prompt_len))
                for _ in range(a.prompts)], False
    if a.aligned:
        return [f"Question {i}: tell me something about the number {i}."
                for i in range(a.prompts)], False
    from aad_fast.toy import task
    held = task.split_problems()[1]
    return [held[i % len(held)].prompt for i in range(a.prompts)], True


SERVED = "bench"


def start_server(a, port):
    cmd = [sys.executable, "-m", "aad_fast.cli", "serve", "--port", str(port),
           "--max-batch-size", str(a.max_batch_size), "--max-queue", "1024",
           "--served-model-name", SERVED]  # the name every request sends (others get 404)
    if a.aligned:
        cmd += ["--aligned", a.aligned] + (["--reference", a.reference] if a.reference else [])
    if a.max_seq_len:
        cmd += ["--max-seq-len", str(a.max_seq_len)]
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
    """The offline Decoder on each prompt alone (the server's settings)."""
    import aad_fast as af
    kw = dict(max_batch_size=a.max_batch_size, compile=False)
    if a.aligned:
        dec = af.Decoder(a.aligned, a.reference, max_seq_len=a.max_seq_len or 2048, **kw)
        stop = None
    else:
        from aad_fast.toy.default import default_pair
        from aad_fast.toy.tokenizer import stop_ids
        aligned, reference, tok, _ = default_pair()
        dec = af.Decoder(aligned, reference, tokenizer=tok, max_seq_len=a.max_seq_len or 128,
                         **kw)
        stop = stop_ids(tok)
    gen = dict(rule=af.AAD(a.alpha), max_new_tokens=a.max_tokens, stop=stop, chat=chat)
    dec.generate(prompts[0], **gen)  # warm-up
    total_s, total_tok, engine_ms = 0.0, 0, []
    for p in prompts:
        t0 = time.perf_counter()
        g = dec.generate(p, **gen)
        total_s += time.perf_counter() - t0
        n = len(g.tokens[0]) + (g.finish_reason[0] == "stop")
        total_tok += n
        if n > 1:
            engine_ms.append(g.stats["ms_per_token"])
    dec.close()
    return {"wall_ms_per_token": 1e3 * total_s / max(total_tok, 1), "tokens": total_tok,
            "decode_ms_per_token_p50": statistics.median(engine_ms) if engine_ms else None}


def one_request(client, prompt, a, chat, stream):
    """``(ttft_s, last_s, total_s, tokens)`` of one request; ``tokens`` counts the stop token
    when the completion ended at one (it was decoded too, as the offline count)."""
    extra = {"rule": "aad", "alpha": a.alpha}
    msgs = [{"role": "user", "content": prompt}]
    make = client.chat.completions.create if chat else client.completions.create
    body = dict(messages=msgs) if chat else dict(prompt=prompt)
    t0 = time.perf_counter()
    if not stream:
        r = make(model=SERVED, max_tokens=a.max_tokens, extra_body=extra, **body)
        dt = time.perf_counter() - t0
        return dt, dt, dt, r.usage.completion_tokens + (r.choices[0].finish_reason == "stop")
    ttft = last = None
    n, stopped = 0, False
    for c in make(model=SERVED, max_tokens=a.max_tokens, stream=True, extra_body=extra,
                  stream_options={"include_usage": True}, **body):
        piece = (c.choices[0].delta.content if chat else c.choices[0].text) if c.choices else ""
        if piece:
            last = time.perf_counter() - t0
            ttft = last if ttft is None else ttft
        if c.usage is not None:
            n = c.usage.completion_tokens
        if c.choices and c.choices[0].finish_reason == "stop":
            stopped = True
    total = time.perf_counter() - t0
    ttft = total if ttft is None else ttft
    return ttft, (total if last is None else last), total, n + stopped


def per_token_ms(rows):
    """ms/token after the first of streamed requests: (last chunk - first chunk) / (n - 1)."""
    return [(r[1] - r[0]) * 1e3 / (r[3] - 1) for r in rows if r[3] > 1 and r[1] > r[0]]


def batch1(make_client, prompts, a, chat):
    client = make_client()
    one_request(client, prompts[0], a, chat, False)  # warm-up: the scheduler's first run
    one_request(client, prompts[0], a, chat, True)
    out = {}
    for stream in (False, True):
        rows = [one_request(client, q, a, chat, stream) for q in prompts]
        tok = sum(r[3] for r in rows)
        res = {"wall_ms_per_token": 1e3 * sum(r[2] for r in rows) / max(tok, 1),
               "tokens": tok, "ttft_ms_p50": _pct([r[0] * 1e3 for r in rows], 50)}
        if stream:
            res["decode_ms_per_token_p50"] = _pct(per_token_ms(rows), 50)
        out["server_stream" if stream else "server"] = res
    return out


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
    toks = sum(r[3] for r in rows)
    ttft = [r[0] * 1e3 for r in rows]
    mspt = per_token_ms(rows) if stream else [r[2] * 1e3 / r[3] for r in rows if r[3] > 0]
    return {"requests": len(rows), "completion_tokens": toks, "wall_s": wall,
            "tokens_per_s": toks / wall, "ttft_ms_p50": _pct(ttft, 50),
            "ttft_ms_p99": _pct(ttft, 99), "ms_per_token_p50": _pct(mspt, 50),
            "ms_per_token_p99": _pct(mspt, 99)}


def plot(result, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    b1, conc = result["batch1"], result["concurrent"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    names = ["offline", "server", "server_stream"]
    ax[0].bar(names, [b1[n]["wall_ms_per_token"] for n in names], label="wall / token")
    dec = [b1["offline"]["decode_ms_per_token_p50"], None,
           b1["server_stream"]["decode_ms_per_token_p50"]]
    ax[0].scatter([n for n, d in zip(names, dec) if d], [d for d in dec if d], color="k",
                  zorder=3, label="decode / token (p50)")
    ax[0].set(title="batch 1: ms per completion token", ylabel="ms")
    ax[0].legend()
    modes = list(conc)
    ax[1].bar(modes, [conc[m]["tokens_per_s"] for m in modes])
    ax[1].set(title=f"{result['settings']['clients']} clients: tokens/s", ylabel="tokens/s")
    width = 0.2
    for k, (key, label) in enumerate((("ttft_ms_p50", "TTFT p50"), ("ttft_ms_p99", "TTFT p99"),
                                      ("ms_per_token_p50", "ms/token p50"),
                                      ("ms_per_token_p99", "ms/token p99"))):
        ax[2].bar([i + (k - 1.5) * width for i in range(len(modes))],
                  [conc[m][key] or 0 for m in modes], width, label=label)
    ax[2].set_xticks(range(len(modes)), modes)
    ax[2].set(title=f"{result['settings']['clients']} clients: latency", ylabel="ms",
              yscale="log")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"aad-fast serve, {result['model']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default=str(RESULTS),
                   help="folder for the JSON and the plot (default bench/results)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--aligned", default=None, help="aligned model (default: the embedded pair)")
    src.add_argument("--shape", default=None, help="a random pair of this config (cpu-60m, ...)")
    p.add_argument("--reference", default=None)
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (batch 1 runs each)")
    p.add_argument("--prompt-len", type=int, default=32, help="words per prompt (--shape)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="server and offline context (default: 128 embedded, prompt + "
                        "max-tokens with --shape, 2048 with --aligned)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--start-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_tokens", "clients", "requests",
                 "max_batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    import httpx
    import openai
    import torch

    from aad_fast.bench.machine import (device_name, git_info, portable_argv, portable_path,
                                        portable_settings)
    t_start = time.perf_counter()
    model = a.shape or (a.aligned and portable_path(a.aligned, "MODEL_DIR")) or "embedded pair"
    settings = portable_settings({k: v for k, v in vars(a).items() if k != "out_dir"})
    tmp = tempfile.TemporaryDirectory(prefix="bench-server-") if a.shape else None
    if a.shape:
        random_pair(a, Path(tmp.name))
        a.aligned, a.reference = str(Path(tmp.name) / "a"), str(Path(tmp.name) / "r")
        a.max_seq_len = a.max_seq_len or a.prompt_len + a.max_tokens + 8
    prompts, chat = make_prompts(a)
    port = _free_port()
    try:
        proc = start_server(a, port)
        try:
            def make_client():
                return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                     max_retries=0,
                                     http_client=httpx.Client(trust_env=False, timeout=600))
            b1 = batch1(make_client, prompts, a, chat)
            conc = {"stream": concurrent(make_client, prompts, a, chat, True),
                    "batched": concurrent(make_client, prompts, a, chat, False)}
            with httpx.Client(trust_env=False) as c:
                health = c.get(f"http://127.0.0.1:{port}/health").json()
        finally:
            proc.terminate()
            proc.wait(30)
        b1["offline"] = offline(a, prompts, chat)
    finally:
        if tmp is not None:
            tmp.cleanup()
    off = b1["offline"]
    b1["server_over_offline"] = {
        "wall": b1["server"]["wall_ms_per_token"] / off["wall_ms_per_token"],
        "decode": (b1["server_stream"]["decode_ms_per_token_p50"] /
                   off["decode_ms_per_token_p50"]
                   if b1["server_stream"]["decode_ms_per_token_p50"] and
                   off["decode_ms_per_token_p50"] else None)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tag = "cuda" if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    result = {"bench": "server", "date": datetime.date.today().isoformat(),
              "device": device_name(device), "model": model,
              "commit": git_info(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "command": " ".join(["python", "bench/bench_server.py"] + portable_argv(
                  ["-"] + (argv if argv is not None else sys.argv[1:]), "OUT_DIR")[1:]),
              "settings": settings,
              "batch1": b1, "concurrent": conc, "server_counts": health,
              "bench_s": time.perf_counter() - t_start}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = a.shape or ("embedded" if model == "embedded pair" else "paths")
    stem = f"server-{tag}-{kind}-{result['date']}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}", file=sys.stderr)
    plot(result, out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
