"""``aad-fast bench``: selection kernels and end-to-end decode on real model shapes, one run.

Everything is measured in ONE run on ONE machine and reported as ratios to baselines measured in
that same run (DESIGN.md "Measuring"):

- kernels: every available backend of ``aad_select`` (the public op, and the ``select_core`` call
  the engine makes with preallocated buffers) against the eager PyTorch a user would write
  (``eager_aad``), at ``B x V``; median ms, effective bandwidth (bytes of both logits read / time)
  and its fraction of the copy bandwidth measured in the same run (read + write bytes / time).
  On CUDA each call is timed with CUDA events after a 256 MiB L2 flush; on CPU with
  ``time.perf_counter`` (warm caches, as in a decode step right after the LM head).
- decode: per model shape and batch size, ``METHODS``: Hugging Face ``generate()`` greedy on one
  model, the naive Hugging Face two-model AAD loop (``naive_hf_aad``), this engine's greedy, AAD
  with two models, AAD with a LoRA pair (rank 64 on q/k/v) and the other two-stream rules; ms/token
  and tokens/s (medians of ``--repeats`` runs after a warm-up run), time to first token at batch 1
  for each prompt length, peak memory, and the fraction of the bandwidth floor
  (weight + KV bytes read per step / copy bandwidth).

Models are built from ``bench/configs/*.json`` with random weights (seeded; nothing is downloaded)
and with no end-of-sequence id, so every run decodes exactly ``--new-tokens`` tokens.
Writes ``OUT/<device>-<date>.json`` and ``.png`` and prints markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .. import __version__, available_backends
from ..ops import aad_select, select_core
from ..rules import AAD, EFT, OPAD, BeamAAD, Contrastive, Greedy

REAL_SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-0.6b", "qwen3-4b",
               "olmo-2-7b")
# name: (label, phase). "plain" methods run on the two plain models; "lora" ones after the
# reference model is wrapped with the LoRA adapter (PEFT edits that model in place).
METHODS = {
    "hf_generate": ("HF generate() greedy, 1 model", "plain"),
    "hf_naive_aad": ("HF naive two-model AAD loop", "plain"),
    "greedy": ("engine greedy, 1 model", "plain"),
    "aad_two": ("engine AAD, two models", "plain"),
    "contrastive_two": ("engine Contrastive(0.1, 0.5), two models", "plain"),
    "eft_two": ("engine EFT(4), two models", "plain"),
    "opad_one": ("engine OPAD(1), one model, two prompts", "plain"),
    "aad_lora": ("engine AAD, LoRA pair (r=64 q/k/v)", "lora"),
    "beam4_lora": ("engine BeamAAD(4), LoRA pair", "lora"),
}
# A baseline and the engine method that must choose the same tokens in exact arithmetic (with
# random weights near-ties can flip under different kernels, e.g. in bf16).
SAME_TOKENS = {"hf_generate": "greedy", "hf_naive_aad": "aad_two"}
TTFT_METHODS = ("hf_generate", "hf_naive_aad", "greedy", "aad_two", "aad_lora")
PRINCIPLE_IDS = tuple(range(3, 19))  # OPAD's principle: 16 token ids before each prompt
ENGINE_RULES = {  # method: (rule, models: "one" | "two" | "lora")
    "greedy": (Greedy("a"), "one"),
    "aad_two": (AAD(0.1), "two"),
    "contrastive_two": (Contrastive(0.1, 0.5), "two"),
    "eft_two": (EFT(4.0), "two"),
    "opad_one": (OPAD(1.0, principle_ids=PRINCIPLE_IDS), "one"),
    "aad_lora": (AAD(0.1), "lora"),
    "beam4_lora": (BeamAAD(4, 0.1), "lora"),
}
GIB = 1024 ** 3


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Timing, memory, environment


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device):
    """``(result, ms)`` of one call, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def time_op(fn, device, quick: bool = False) -> list:
    """ms of each timed call of ``fn()`` after warm-up. CUDA: events around each call, L2
    flushed before each; CPU: ``perf_counter`` per call, repeated for ~0.25 s (>= 5 calls)."""
    if device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
        for _ in range(5):
            fn()
        times = []
        for _ in range(30 if quick else 100):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(3):
        fn()
    times, budget = [], 0.08 if quick else 0.25
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device, quick: bool = False) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting the read and the write (as STREAM's Copy)."""
    n = (64 if quick else 512 if device.type == "cuda" else 256) * 2 ** 20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_op(lambda: dst.copy_(src), device, quick=True))
    return 2 * n / (ms / 1e3)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


class PeakMemory:
    """Peak memory above what was held at entry: ``torch.cuda.max_memory_allocated`` on CUDA,
    the process RSS sampled every 5 ms by a thread on CPU (use it on an untimed run)."""

    def __init__(self, device):
        self.device, self.extra = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = self.peak = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.peak, rss_bytes())
        self.extra = max(peak - self.before, 0)


def load_average():
    """1/5/15-minute load averages (other work on a shared machine skews every timing)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def git_info():
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown", None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "aad_fast": __version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: record, never fail the bench
            out[mod] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# Kernels


def eager_aad(a: torch.Tensor, r: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """AAD selection as a user writes it in PyTorch: log_softmax of both, max, mask, log-ratio,
    argmax. ``a``, ``r`` ``[B, V]`` any float dtype; int64 ``[B]``."""
    la = torch.log_softmax(a.float(), dim=-1)
    lr = torch.log_softmax(r.float(), dim=-1)
    keep = la >= la.max(dim=-1, keepdim=True).values + math.log(alpha)
    score = (la - lr).masked_fill(~keep, float("-inf"))
    return score.argmax(dim=-1)


def bench_kernels(device, dtype, batches, vocabs, copy_bw, quick, backend_names) -> list:
    rows = []
    for vocab in vocabs:
        for b in batches:
            g = torch.Generator().manual_seed(b * 7919 + vocab)
            a = (3 * torch.randn(b, vocab, generator=g)).to(device, dtype)
            r = (3 * torch.randn(b, vocab, generator=g)).to(device, dtype)
            log_rel = torch.full((b,), math.log(0.1), device=device)
            floor = torch.full((b,), -math.inf, device=device)
            impls = {"eager": lambda: eager_aad(a, r, 0.1)}
            for be in backend_names:
                impls[f"aad_select[{be}]"] = lambda be=be: aad_select(a, r, 0.1, backend=be)
                impls[f"engine_core[{be}]"] = lambda be=be: select_core(
                    a, r, vocab, 1.0, 0.0, 1.0, -1.0, log_rel, floor, None, None, be)
            want = impls["eager"]()
            nbytes = 2 * b * vocab * a.element_size()
            eager_ms = None
            for name, fn in impls.items():
                same = bool(torch.equal(fn(), want))
                times = time_op(fn, device, quick)
                ms = statistics.median(times)
                eager_ms = ms if name == "eager" else eager_ms
                bw = nbytes / (ms / 1e3)
                rows.append({"batch": b, "vocab": vocab, "impl": name, "dtype": str(dtype),
                             "median_ms": ms, "min_ms": min(times), "calls": len(times),
                             "bytes_read": nbytes, "gb_per_s": bw / 1e9,
                             "fraction_of_copy_bw": bw / copy_bw, "speedup_vs_eager": eager_ms / ms,
                             "same_ids_as_eager": same})
                log(f"kernel B={b} V={vocab} {name}: {ms:.4f} ms, {bw / 1e9:.1f} GB/s, "
                    f"{eager_ms / ms:.1f}x eager")
    return rows


# --------------------------------------------------------------------------------------------
# Models


def default_config_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "bench" / "configs"
    return here if here.is_dir() else Path.cwd() / "bench" / "configs"


def load_shape(name: str, config_dir: Path) -> dict:
    path = Path(name) if name.endswith(".json") else Path(config_dir) / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in Path(config_dir).glob("*.json"))
        raise ValueError(f"--models: no config {str(path)!r} (have: {', '.join(have)})")
    return json.loads(path.read_text())


def make_config(shape: dict):
    from transformers import AutoConfig
    fields = {k: v for k, v in shape.items()
              if not k.startswith("_") and k not in ("model_type", "architectures", "torch_dtype")}
    fields.update(eos_token_id=None, pad_token_id=None)  # fixed number of new tokens
    return AutoConfig.for_model(shape["model_type"], **fields)


def random_model(config, dtype, device, seed: int):
    """A causal LM with seeded random weights built directly on ``device``, without an EOS."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                               bos_token_id=None)
    return model.eval().requires_grad_(False)


def add_lora(model, seed: int):
    """Wrap ``model`` (in place, as PEFT does) with a rank-64 LoRA on q/k/v; ``lora_B`` is made
    random so the adapter is not a no-op."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj"])
    pm = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return pm.eval().requires_grad_(False)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_weight_bytes(model) -> int:
    """Weights read by one decode step: all parameters but an untied input embedding (only a
    few of its rows are read)."""
    total = param_bytes(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def kv_bytes_per_token(config, elem: int) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv * head_dim * elem


def meta_param_count(config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------
# Decode methods: each run takes prompt ids [B, P] and a number of new tokens and returns
# (time to first token in ms, decode ms per token after the first or None when n == 1, the
# chosen ids per row).


class _FirstTokenClock:
    """A ``generate(streamer=...)`` that notes when the first new token reaches the host.
    Hugging Face passes the prompt first, then each step's tokens (as ``.cpu()`` copies, so the
    device has finished that step: no extra synchronisation)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_generate(model, ids, n, device, cache: str):
    """Hugging Face ``generate()`` greedy. Time to first token: from the call until the first
    new token reaches the streamer; ms/token: the rest of the call over the ``n - 1`` steps."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    clock = _FirstTokenClock()
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, streamer=clock, **kw)
    sync(device)
    t_end = time.perf_counter()
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"HF generate() made {out.shape[1] - ids.shape[1]} tokens, not {n}")
    ttft = ((clock.first or t_end) - t0) * 1e3
    per_token = (t_end - clock.first) * 1e3 / (n - 1) if n > 1 else None
    return ttft, per_token, out[:, ids.shape[1]:].tolist()


def naive_hf_aad(model_a, model_r, ids, n, device, alpha: float = 0.1):
    """AAD as a user writes it without this package: two models, each with its own Hugging Face
    DynamicCache, ``eager_aad`` each step, and the usual per-step stop check (a host sync)."""
    stop = torch.tensor([-1], device=device)  # the models have no EOS; the check still runs
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out_a = model_a(input_ids=ids, use_cache=True)
        out_r = model_r(input_ids=ids, use_cache=True)
        y = eager_aad(out_a.logits[:, -1], out_r.logits[:, -1], alpha)
        done = torch.isin(y, stop)
        chosen = [y]
        sync(device)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            if bool(done.all()):
                break
            step = y[:, None]
            out_a = model_a(input_ids=step, past_key_values=out_a.past_key_values, use_cache=True)
            out_r = model_r(input_ids=step, past_key_values=out_r.past_key_values, use_cache=True)
            y = eager_aad(out_a.logits[:, -1], out_r.logits[:, -1], alpha)
            done |= torch.isin(y, stop)
            chosen.append(y)
        sync(device)
        t2 = time.perf_counter()
    tokens = torch.stack(chosen, 1).tolist()
    return (t1 - t0) * 1e3, ((t2 - t1) * 1e3 / (n - 1) if n > 1 else None), tokens


def engine_run(dec, rule, ids, n, device, info: dict):
    """This engine: ``Decoder.generate``. Time to first token is the wall time of a one-token
    ``generate`` (as a user sees it, like the baselines); ms/token comes from its stats (decode
    steps only), except for BeamAAD, which has none: (t(n) - t(1)) / (n - 1) of wall times
    (noisy when ``n`` is small)."""
    gen = lambda m: dec.generate(input_ids=ids, rule=rule, max_new_tokens=m, stop=[])
    if n == 1:
        out, ms = wall_ms(lambda: gen(1), device)
        return ms, None, out.tokens
    if isinstance(rule, BeamAAD):
        out, t_n = wall_ms(lambda: gen(n), device)
        _, t_1 = wall_ms(lambda: gen(1), device)
        return t_1, (t_n - t_1) / (n - 1), out.tokens
    out = gen(n)
    if any(len(t) != n for t in out.tokens):
        raise RuntimeError(f"the engine made {[len(t) for t in out.tokens]} tokens, not {n}")
    info.update(backend=out.stats.get("backend"), cuda_graphs=out.stats.get("cuda_graphs"),
                pair=out.stats.get("pair"))
    return out.stats["prefill_ms"], out.stats["ms_per_token"], out.tokens


class Decoders:
    """One ``Decoder`` per pair kind, opened on first use and closed together: rules share it
    ("load once, generate many"), and only one Decoder may hold the LoRA model's row hooks.
    Every Decoder gets the same static sizes, so no method reads a longer cache than another."""

    def __init__(self, models: dict, max_batch: int, max_len: int, args):
        self.models, self.max_batch, self.max_len, self.args = models, max_batch, max_len, args
        self.open: dict = {}

    def get(self, kind: str):
        if kind not in self.open:
            from ..generation import Decoder
            m = self.models
            pair = {"one": (m["a"], None), "two": (m["a"], m["r"]), "lora": (m["lora"], None)}[kind]
            self.open[kind] = Decoder(*pair, max_batch_size=self.max_batch,
                                      max_seq_len=self.max_len, backend=self.args.backend,
                                      cuda_graphs=False if self.args.no_graphs else "auto")
        return self.open[kind]

    def close(self):
        for dec in self.open.values():
            dec.close()
        self.open.clear()


def method_runner(name, models: dict, decoders: Decoders, device, info: dict):
    """``run(ids, n) -> (ttft_ms, ms_per_token, tokens)`` for method ``name``."""
    if name == "hf_generate":
        return lambda ids, n: hf_generate(models["a"], ids, n, device, models["hf_cache"])
    if name == "hf_naive_aad":
        return lambda ids, n: naive_hf_aad(models["a"], models["r"], ids, n, device)
    rule, kind = ENGINE_RULES[name]
    return lambda ids, n: engine_run(decoders.get(kind), rule, ids, n, device, info)


def weights_and_floor(name, models, batch, ctx, elem):
    """(weight bytes the method holds, bytes one decode step must read)."""
    wa, wr = models["w_a"], models["w_r"]
    kv = kv_bytes_per_token(models["a"].config, elem) * ctx
    if name in ("hf_generate", "greedy"):
        return wa[0], wa[1] + batch * kv
    if name == "opad_one":
        return wa[0], wa[1] + 2 * batch * kv
    if name in ("aad_lora", "beam4_lora"):
        k = 4 if name == "beam4_lora" else 1
        ad = models.get("adapter_bytes", 0)
        return wr[0] + ad, wr[1] + ad + 2 * batch * k * kv
    return wa[0] + wr[0], wa[1] + wr[1] + 2 * batch * kv


def interleaved(names, models, ids, n, args, device, skipped, what, index, repeats=None):
    """Warm up each method once (peak memory measured on that run), then ``args.repeats``
    rounds that run every method once, in an order rotated each round, so that a change of
    machine load during the run hits every method alike. Returns {method: (info, peak extra
    bytes, [result[index] per round])}; a method that fails is reported and left out."""
    batch = ids.shape[0]
    beams = 4 if "beam4_lora" in names else 1
    decoders = Decoders(models, batch * beams, ids.shape[1] + n + len(PRINCIPLE_IDS), args)
    live = {}
    try:
        for m in names:
            info: dict = {}
            fn = method_runner(m, models, decoders, device, info)
            with PeakMemory(device) as mem:  # the warm-up run: graph capture, HF compile
                ok = guarded(f"{what} {m}", skipped, device, lambda: fn(ids, n))
            if ok is not None:
                info["tokens"] = ok[2]
                live[m] = (fn, info, mem.extra, [])
        for rnd in range(repeats or args.repeats):
            order = list(live)
            order = order[rnd % len(order):] + order[: rnd % len(order)] if order else order
            for m in order:
                fn, _, _, res = live[m]
                res.append(fn(ids, n)[index])
    finally:
        decoders.close()
    return {m: (info, extra, res) for m, (_, info, extra, res) in live.items()}


def measure_decode(names, models, ids, args, device, copy_bw, skipped) -> list:
    b, p = ids.shape
    n = args.new_tokens
    rows = []
    results = interleaved(names, models, ids, n, args, device, skipped,
                          f"{models['name']} batch {b}", 1)
    tokens = {m: info.pop("tokens") for m, (info, _, _) in results.items()}
    for name, (info, extra, runs) in results.items():
        ms = statistics.median(runs)
        weights, step_bytes = weights_and_floor(name, models, b, p + n // 2,
                                                models["a"].dtype.itemsize)
        floor_ms = step_bytes / copy_bw * 1e3
        row = {"model": models["name"], "params": models["params"], "batch": b, "method": name,
               "label": METHODS[name][0], "prompt_len": p, "new_tokens": n}
        row.update(info, ms_per_token=ms, ms_per_token_min=min(runs), ms_per_token_runs=runs,
                   tokens_per_s=b * 1e3 / ms,
                   peak_mem_bytes=weights + extra, weights_bytes=weights, step_bytes=step_bytes,
                   floor_ms=floor_ms, floor_fraction=floor_ms / ms)
        ref = SAME_TOKENS.get(name)
        if ref in tokens:  # the baseline computes what the engine computes (informational)
            row[f"same_tokens_as_{ref}"] = tokens[name] == tokens[ref]
        if name == "hf_generate":
            row["hf_cache"] = models["hf_cache"]
            row["hf_compiled"] = hasattr(models["a"], "_compiled_call")  # HF's auto-compile
        rows.append(row)
        log(f"{models['name']} batch {b}: {METHODS[name][0]}: {ms:.2f} ms/token "
            f"({', '.join(f'{t:.1f}' for t in runs)}), {b * 1e3 / ms:.1f} tokens/s")
    return rows


def measure_ttft(names, models, length, args, device, skipped) -> list:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, models["vocab"], (1, length), generator=g).to(device)
    results = interleaved(names, models, ids, 1, args, device, skipped,
                          f"{models['name']} time to first token, prompt {length}", 0,
                          args.ttft_repeats)
    rows = []
    for name, (_, _, times) in results.items():
        rows.append({"model": models["name"], "method": name, "label": METHODS[name][0],
                     "batch": 1, "prompt_len": length, "ttft_ms": statistics.median(times),
                     "ttft_ms_runs": times})
        log(f"{models['name']} prompt {length}: {METHODS[name][0]}: time to first token "
            f"{rows[-1]['ttft_ms']:.1f} ms")
    return rows


def guarded(what: str, skipped: list, device, fn):
    """Run ``fn()``; an out-of-memory (or other) failure is reported, recorded and skipped."""
    try:
        return fn()
    except Exception as exc:  # one shape or method failing must not end the run
        oom = is_oom(exc)
        reason = "out of memory" if oom else f"error: {type(exc).__name__}: {exc}"
        log(f"{what}: {'does not fit in memory' if oom else 'failed'} ({reason[:300]}); "
            "skipped, going on")
        skipped.append({"what": what, "reason": reason[:2000]})
        release(device)
        return None


def bench_shape(name, args, device, dtype, copy_bw, out: dict) -> None:
    """All methods on one model shape: two random models (aligned, reference) and, for the LoRA
    methods, a copy of the reference wrapped with the adapter (PEFT edits the model it wraps,
    and every method stays live so the runs can be interleaved)."""
    shape = load_shape(name, args.configs)
    config = make_config(shape)
    n, p = args.new_tokens, args.decode_prompt_len
    elem = torch.empty((), dtype=dtype).element_size()
    n_params = meta_param_count(config)
    methods = list(args.methods)
    use_lora = any(METHODS[m][1] == "lora" for m in methods)
    kv = 2 * max(args.batch) * 4 * kv_bytes_per_token(config, elem) * (p + n)
    have = free_bytes(device)
    need = (3 if use_lora else 2) * n_params * elem + kv
    if use_lora and need > 0.9 * have and 2 * n_params * elem + kv <= 0.9 * have:
        log(f"{name}: a third model for the LoRA pair does not fit ({need / GIB:.1f} GiB needed, "
            f"{have / GIB:.1f} GiB free); LoRA methods skipped for this shape")
        out["skipped"].append({"what": f"{name} LoRA methods",
                               "reason": "a third model does not fit"})
        methods = [m for m in methods if METHODS[m][1] != "lora"]
        use_lora, need = False, 2 * n_params * elem + kv
    if need > 0.9 * have:
        msg = (f"{name}: needs ~{need / GIB:.1f} GiB for the models and caches, "
               f"{have / GIB:.1f} GiB free on {device}; shape skipped")
        log(msg)
        out["skipped"].append({"what": name, "reason": msg})
        return
    log(f"{name}: building {3 if use_lora else 2} random-weight models "
        f"({n_params / 1e6:.0f}M params each, {dtype})")
    models = {"name": name, "vocab": config.vocab_size, "params": n_params,
              "hf_cache": "static" if device.type == "cuda" and not args.hf_dynamic else "dynamic"}
    models["a"] = random_model(config, dtype, device, args.seed)
    models["r"] = random_model(config, dtype, device, args.seed + 1)
    models["w_a"] = (param_bytes(models["a"]), step_weight_bytes(models["a"]))
    models["w_r"] = (param_bytes(models["r"]), step_weight_bytes(models["r"]))
    if use_lora:
        models["lora"] = add_lora(copy.deepcopy(models["r"]), args.seed + 2)
        models["adapter_bytes"] = sum(q.numel() * q.element_size()
                                      for k, q in models["lora"].named_parameters() if "lora_" in k)
    max_pos = getattr(config, "max_position_embeddings", 1 << 30)
    lengths = [L for L in args.prompt_lens if L + 1 <= max_pos]
    if len(lengths) < len(args.prompt_lens):
        log(f"{name}: prompt lengths {sorted(set(args.prompt_lens) - set(lengths))} exceed its "
            f"max_position_embeddings={max_pos}; no time to first token there")
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, config.vocab_size, (b, p), generator=g).to(device)
        names = [m for m in methods if not (m == "beam4_lora" and b * 4 > args.max_beam_rows)]
        log(f"{name} batch {b}: {len(names)} methods, {n} new tokens, prompt {p}, "
            f"warm-up + {args.repeats} interleaved rounds ...")
        rows = guarded(f"{name} batch {b}", out["skipped"], device,
                       lambda: measure_decode(names, models, ids, args, device, copy_bw,
                                              out["skipped"]))
        out["decode"] += rows or []
    # After every decode run: HF's static cache keeps the longest length it has seen.
    ttft_names = [m for m in methods if m in TTFT_METHODS]
    for L in lengths:
        log(f"{name}: time to first token at prompt {L}, batch 1 ...")
        rows = guarded(f"{name} time to first token, prompt {L}", out["skipped"], device,
                       lambda: measure_ttft(ttft_names, models, L, args, device, out["skipped"]))
        out["ttft"] += rows or []
    models.clear()
    release(device)


# --------------------------------------------------------------------------------------------
# Ratios, targets, output


def add_ratios(decode: list) -> None:
    by = {(r["model"], r["batch"], r["method"]): r for r in decode}
    for r in decode:
        base = by.get((r["model"], r["batch"], "greedy"))
        r["x_greedy"] = r["ms_per_token"] / base["ms_per_token"] if base else None


TARGETS = {  # device type: [(name, numerator, denominator, bound, "<=" | ">=", settings)]
    "cpu": [("AAD LoRA pair / engine greedy (latency)", "aad_lora", "greedy", 1.35, "<=",
             [("cpu-60m", 1)]),
            ("naive HF two-model loop / engine AAD two models (speedup)", "hf_naive_aad",
             "aad_two", 1.25, ">=", [("cpu-60m", 1)]),
            ("OPAD one model / engine greedy (latency)", "opad_one", "greedy", 1.35, "<=",
             [("cpu-60m", 1)])],
    "cuda": [("AAD LoRA pair / engine greedy (latency)", "aad_lora", "greedy", 1.10, "<=",
              [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)]),
             ("engine AAD two models / engine greedy (latency)", "aad_two", "greedy", 2.05, "<=",
              [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)]),
             ("naive HF two-model loop / engine AAD two models (speedup)", "hf_naive_aad",
              "aad_two", 3.0, ">=", [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)]),
             ("HF generate greedy / engine AAD two models (speedup)", "hf_generate", "aad_two",
              1.0, ">=", [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)]),
             ("HF generate greedy / engine AAD LoRA pair (speedup)", "hf_generate", "aad_lora",
              1.0, ">=", [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)])],
}


def evaluate_targets(device_type: str, decode: list, kernels: list) -> list:
    """The issues' speed targets, where this run measured their setting."""
    by = {(r["model"], r["batch"], r["method"]): r["ms_per_token"] for r in decode}
    best = {(r["model"], r["batch"], r["method"]): r["ms_per_token_min"] for r in decode}
    out = []
    for title, num, den, bound, op, settings in TARGETS.get(device_type, []):
        for model, b in settings:
            if (model, b, num) in by and (model, b, den) in by:
                v = by[(model, b, num)] / by[(model, b, den)]
                out.append({"target": title, "model": model, "batch": b, "value": v,
                            "value_of_best_rounds": best[(model, b, num)] / best[(model, b, den)],
                            "bound": f"{op} {bound}",
                            "met": v <= bound if op == "<=" else v >= bound})
    if device_type == "cpu":
        default = "cpp" if "cpp" in available_backends("cpu") else "torch"
        k = {(r["batch"], r["vocab"], r["impl"]): r for r in kernels}
        row = k.get((1, 128256, f"aad_select[{default}]"))
        eager = k.get((1, 128256, "eager"))
        if row is not None and eager is not None:
            out.append({"target": f"eager PyTorch / default CPU aad_select ({default}) (speedup)",
                        "model": "kernel", "batch": 1, "vocab": 128256,
                        "value": row["speedup_vs_eager"],
                        "value_of_best_rounds": eager["min_ms"] / row["min_ms"], "bound": ">= 10",
                        "met": row["speedup_vs_eager"] >= 10})
    return out


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    dev, date = result["device"]["name"], result["date"][:10]
    lines = [f"### aad_fast bench: {dev}, {result['dtype']}, {date}", "",
             f"`{result['command']}` (commit {result['commit'][:12]})", ""]
    if result["decode"]:
        lines += [f"Decode: prompt {result['settings']['decode_prompt_len']} tokens, "
                  f"{result['settings']['new_tokens']} new tokens, median of "
                  f"{result['settings']['repeats']} runs.", "",
                  "| model | batch | method | ms/token | (min) | tokens/s | x engine greedy "
                  "| peak mem GiB | bandwidth floor |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["decode"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['label']} | {fmt(r['ms_per_token'])} "
                         f"| {fmt(r['ms_per_token_min'])} | {fmt(r['tokens_per_s'], '.1f')} "
                         f"| {fmt(r.get('x_greedy'))} | {r['peak_mem_bytes'] / GIB:.2f} "
                         f"| {r['floor_fraction']:.0%} |")
        checks = [f"{r['model']} batch {r['batch']}: {r['label']} = {METHODS[ref][0]}: "
                  f"{'yes' if r[f'same_tokens_as_{ref}'] else 'no'}"
                  for r in result["decode"] for ref in [SAME_TOKENS.get(r["method"])]
                  if f"same_tokens_as_{ref}" in r]
        if checks:
            lines += ["", "Same tokens as the engine: " + "; ".join(checks) + "."]
    if result["ttft"]:
        lens = sorted({r["prompt_len"] for r in result["ttft"]})
        lines += ["", "Time to first token, batch 1 (ms):", "",
                  "| model | method | " + " | ".join(f"prompt {L}" for L in lens) + " |",
                  "|---|---|" + "---:|" * len(lens)]
        keys = dict.fromkeys((r["model"], r["label"]) for r in result["ttft"])
        t = {(r["model"], r["label"], r["prompt_len"]): r["ttft_ms"] for r in result["ttft"]}
        for model, label in keys:
            lines.append(f"| {model} | {label} | "
                         + " | ".join(fmt(t.get((model, label, L)), ".1f") for L in lens) + " |")
    if result["targets"]:
        lines += ["", "| target | setting | measured (medians) | (best rounds) | bound | met |",
                  "|---|---|---:|---:|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['model']} batch {t['batch']} | {t['value']:.2f} "
                         f"| {fmt(t.get('value_of_best_rounds'))} | {t['bound']} "
                         f"| {'yes' if t['met'] else 'NO'} |")
    if result["kernels"]:
        lines += ["", f"Selection kernels ({result['kernels'][0]['dtype']} logits; copy bandwidth "
                  f"{result['device']['copy_bandwidth_gb_s']:.0f} GB/s):", "",
                  "| B | V | impl | median ms | min ms | GB/s | of copy bw | x eager | same ids |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in result["kernels"]:
            lines.append(f"| {r['batch']} | {r['vocab']} | {r['impl']} | {r['median_ms']:.4f} "
                         f"| {r['min_ms']:.4f} | {r['gb_per_s']:.1f} "
                         f"| {r['fraction_of_copy_bw']:.0%} | {r['speedup_vs_eager']:.1f} "
                         f"| {r['same_ids_as_eager']} |")
    for s in result["skipped"]:
        lines.append(f"\nSkipped: {s['what']}: {s['reason'][:200]}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """ms/token of each method over the engine's greedy, per model, one panel per batch size,
    with the 1x and 2x lines; plus the kernels' speedup over eager PyTorch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    decode = [r for r in result["decode"] if r.get("x_greedy")]
    batches = sorted({r["batch"] for r in decode})
    panels = len(batches) + (1 if result["kernels"] else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(7 * max(panels, 1), 6.5), squeeze=False)
    methods = [m for m in METHODS if any(r["method"] == m for r in decode)]
    for ax, b in zip(axes[0], batches):
        models = list(dict.fromkeys(r["model"] for r in decode if r["batch"] == b))
        width = 0.8 / max(len(methods), 1)
        by = {(r["model"], r["method"]): r for r in decode if r["batch"] == b}
        for j, m in enumerate(methods):
            xs, ys, labels = [], [], []
            for i, model in enumerate(models):
                if (model, m) in by:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(by[(model, m)]["x_greedy"])
                    labels.append(f"{by[(model, m)]['ms_per_token']:.1f}")
            bars = ax.bar(xs, ys, width, label=METHODS[m][0])
            ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.axhline(2.0, color="r", lw=1, ls=":")
        top = max((r["x_greedy"] for r in decode if r["batch"] == b), default=2.0)
        ax.set_ylim(0, max(2.3, top * 1.2))
        ax.set_xticks(range(len(models)), models, rotation=20)
        ax.set_ylabel("ms/token / engine greedy ms/token (bar labels: ms/token)")
        ax.set_title(f"decode, batch {b}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=2)
    if result["kernels"]:
        ax = axes[0][len(batches)]
        ks = result["kernels"]
        combos = list(dict.fromkeys((r["batch"], r["vocab"]) for r in ks))
        impls = list(dict.fromkeys(r["impl"] for r in ks))
        width = 0.8 / len(impls)
        by = {(r["batch"], r["vocab"], r["impl"]): r["speedup_vs_eager"] for r in ks}
        for j, im in enumerate(impls):
            pts = [(i + (j - (len(impls) - 1) / 2) * width, by[c + (im,)])
                   for i, c in enumerate(combos) if c + (im,) in by]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=im)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(combos)), [f"B={b}\nV={v}" for b, v in combos], fontsize=7)
        ax.set_ylabel("speedup over eager PyTorch AAD selection")
        ax.set_title("selection kernels")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=2)
    fig.suptitle(f"aad_fast bench: {result['device']['name']}, {result['dtype']}, "
                 f"{result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def out_stem(device, out_dir: Path) -> Path:
    date = datetime.date.today().isoformat()
    if device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        slug = f"cpu-{torch.get_num_threads()}threads"
    stem = out_dir / f"{slug}-{date}"
    if stem.with_suffix(".json").exists():
        stem = out_dir / f"{slug}-{date}-{datetime.datetime.now():%H%M%S}"
    return stem


# --------------------------------------------------------------------------------------------
# CLI


def _ints(text: str) -> list:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aad-fast bench``."""
    a = parser.add_argument
    a("--quick", action="store_true",
      help="small shapes, batch 1, few tokens: finishes in a few minutes on a 2-core CPU")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    a("--models", default=None, help="comma list of config names in bench/configs (or .json "
      f"paths); default: {','.join(REAL_SHAPES)} on cuda, cpu-60m on cpu")
    a("--batch", type=_ints, default=None, help="decode batch sizes (default 1,8,32; --quick: 1)")
    a("--new-tokens", type=int, default=None, help="new tokens per decode (default 128 on cuda, "
      "32 on cpu, 16 with --quick); models have no EOS, so exactly this many are made")
    a("--prompt-lens", type=_ints, default=None,
      help="prompt lengths for time to first token, batch 1 (default 128,1024,4096)")
    a("--decode-prompt-len", type=int, default=None, help="prompt length of decode runs (128)")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
      help="model and logits dtype (default bfloat16 on cuda, float32 on cpu)")
    a("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    a("--repeats", type=int, default=None, help="timed runs per measurement after one warm-up "
      "(default 3; --quick: 2); the median is reported")
    a("--ttft-repeats", type=int, default=None,
      help="timed runs per time-to-first-token measurement (default: --repeats)")
    a("--methods", default=None, help="comma list of decode methods (default all: "
      f"{','.join(METHODS)}; --quick: {','.join(TTFT_METHODS)})")
    a("--kernel-batches", type=_ints, default=None, help="B of the kernel bench "
      "(default 1,8,64; cuda also 256)")
    a("--kernel-vocabs", type=_ints, default=None,
      help="V of the kernel bench (default 128256,151936)")
    a("--backend", default=None, help="selection backend the engine uses (default: fastest)")
    a("--no-graphs", action="store_true", help="engine without CUDA graphs")
    a("--hf-dynamic", action="store_true",
      help="HF generate() with its dynamic cache on cuda too (default there: static cache)")
    a("--max-beam-rows", type=int, default=64, help="skip BeamAAD(4) above this many rows")
    a("--configs", type=Path, default=None, help="model shape directory (default bench/configs)")
    a("--seed", type=int, default=0, help="seed of the random weights and prompts")
    a("--out", type=Path, default=Path("bench/results"), help="output directory")
    a("--no-kernels", action="store_true", help="skip the kernel bench")
    a("--no-decode", action="store_true", help="skip the decode bench")


def resolve(args) -> torch.device:
    """Fill in defaults that depend on the device and ``--quick``; validate."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    device = torch.device(args.device)
    cuda, quick = device.type == "cuda", args.quick
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    default_models = (("qwen3-0.6b,llama-3.2-1b" if cuda else "tiny,cpu-60m") if quick
                      else (",".join(REAL_SHAPES) if cuda else "cpu-60m"))
    args.models = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    args.batch = args.batch or ([1] if quick else [1, 8, 32])
    args.new_tokens = args.new_tokens or (16 if quick else 128 if cuda else 32)
    args.decode_prompt_len = args.decode_prompt_len or (32 if quick and not cuda else 128)
    lens = args.prompt_lens or [128, 1024, 4096]
    if quick:
        cap = 1024 if cuda else 128
        if args.prompt_lens is None and any(L > cap for L in lens):
            log(f"--quick: time to first token only at prompt lengths <= {cap}")
        lens = [L for L in lens if L <= cap] or [min(lens)]
    args.prompt_lens = lens
    args.repeats = args.repeats or (2 if quick else 3)
    args.ttft_repeats = args.ttft_repeats or args.repeats
    args.kernel_batches = args.kernel_batches or ([1, 8] if quick and not cuda else
                                                  [1, 8, 64, 256] if cuda else [1, 8, 64])
    args.kernel_vocabs = args.kernel_vocabs or [128256, 151936]
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.configs = args.configs or default_config_dir()
    methods = args.methods or ",".join(TTFT_METHODS if quick else METHODS)
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    for name in ("new_tokens", "decode_prompt_len", "repeats", "ttft_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for m in args.models:
        load_shape(m, args.configs)
    return device


def reproduce_command(args) -> str:
    """``aad-fast bench`` with every resolved setting spelt out (defaults depend on the device)."""
    parts = ["aad-fast", "bench"] + (["--quick"] if args.quick else [])
    parts += ["--device", args.device, "--models", ",".join(args.models),
              "--batch", ",".join(map(str, args.batch)), "--new-tokens", str(args.new_tokens),
              "--prompt-lens", ",".join(map(str, args.prompt_lens)),
              "--decode-prompt-len", str(args.decode_prompt_len), "--dtype", args.dtype,
              "--threads", str(torch.get_num_threads()), "--repeats", str(args.repeats),
              "--ttft-repeats", str(args.ttft_repeats),
              "--methods", ",".join(args.methods),
              "--kernel-batches", ",".join(map(str, args.kernel_batches)),
              "--kernel-vocabs", ",".join(map(str, args.kernel_vocabs)),
              "--seed", str(args.seed), "--out", str(args.out)]
    for flag in ("no_graphs", "hf_dynamic", "no_kernels", "no_decode"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.backend:
        parts += ["--backend", args.backend]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run the benchmark described by ``args`` (see ``add_arguments``); returns an exit code."""
    try:
        device = resolve(args)
    except ValueError as exc:
        print(f"aad-fast bench: {exc}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    commit, dirty = git_info()
    log(f"device {device_name(device)}, dtype {args.dtype}, backends "
        f"{available_backends(device)}")
    copy_bw = copy_bandwidth(device, args.quick)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    result = {
        "schema": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device),
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "load_average_at_start": load_average(),
                   "copy_bandwidth_gb_s": copy_bw / 1e9},
        "dtype": args.dtype,
        "versions": versions(),
        "commit": commit, "git_dirty": dirty,
        "command": reproduce_command(args),
        "argv": sys.argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("func", "cmd")},
        "backends": available_backends(device),
        "kernels": [], "decode": [], "ttft": [], "skipped": [], "targets": [],
        "notes": ["ms/token: decode time after the first token / (new tokens - 1); engine times "
                  "from Generation.stats, HF generate() from a streamer's first-token time, "
                  "BeamAAD as (t(n) - t(1)) / (n - 1) of wall times",
                  "peak_mem_bytes: weights the method uses + its peak above the memory held "
                  "before it started (CUDA max_memory_allocated; CPU RSS sampled every 5 ms "
                  "during the warm-up run)",
                  "floor_fraction: (weight + KV bytes one decode step must read) / copy "
                  "bandwidth / measured ms per token; 1.0 = at the bandwidth floor",
                  "time to first token: batch 1, wall time of a one-token generate (engine, "
                  "HF generate()) or of the prompt pass + first choice (naive loop), median"],
    }
    if device.type == "cpu":
        args.backends = [b for b in available_backends(device) if b != "triton"]
        if "triton" in available_backends(device):
            result["notes"].append("triton under TRITON_INTERPRET is a test path; not timed")
    else:
        args.backends = available_backends(device)
    result["backends"] = list(args.backends)  # the ones timed
    with torch.inference_mode():
        if not args.no_kernels:
            log(f"kernels: {args.backends} vs eager PyTorch at B={args.kernel_batches}, "
                f"V={args.kernel_vocabs}")
            result["kernels"] = bench_kernels(device, dtype, args.kernel_batches,
                                              args.kernel_vocabs, copy_bw, args.quick,
                                              args.backends)
    if not args.no_decode:
        for name in args.models:
            guarded(name, result["skipped"], device,
                    lambda: bench_shape(name, args, device, dtype, copy_bw, result))
        add_ratios(result["decode"])
    result["device"]["load_average_at_end"] = load_average()
    result["targets"] = evaluate_targets(device.type, result["decode"], result["kernels"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = out_stem(device, args.out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    print(table)
    log(f"wrote {stem}.json, {stem}.md and {stem}.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aad_fast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
