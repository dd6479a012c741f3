"""Decode and time-to-first-token bench: the methods compared (Hugging Face ``generate()``, the
naive two-model AAD loop, this engine with each rule), their interleaved timing, and the run over
one model shape.

Each method's run takes prompt ids ``[B, P]`` and a number of new tokens and returns (time to
first token in ms, decode ms per token after the first or None when n == 1, the chosen ids per
row)."""
from __future__ import annotations

import copy
import statistics
import time

import torch

from ..rules import AAD, CFG, EFT, OPAD, BeamAAD, Contrastive, DeRa, Greedy
from .kernels import eager_aad
from .machine import GIB, PeakMemory, free_bytes, guarded, log, release, sync, wall_ms
from .shapes import (add_lora, kv_bytes_per_token, load_shape, make_config, meta_param_count,
                     param_bytes, random_model, step_weight_bytes)

# name: (label, phase). "plain" methods run on the two plain models; "lora" ones after the
# reference model is wrapped with the LoRA adapter (PEFT edits that model in place).
METHODS = {
    "hf_generate": ("HF generate() greedy, 1 model", "plain"),
    "hf_naive_aad": ("HF naive two-model AAD loop", "plain"),
    "greedy": ("engine greedy, 1 model", "plain"),
    "aad_two": ("engine AAD, two models", "plain"),
    "contrastive_two": ("engine Contrastive(0.1, 0.5), two models", "plain"),
    "eft_two": ("engine EFT(4), two models", "plain"),
    "eft_sampled_two": ("engine EFT(4) sampled (T 0.7, top-p 0.9), two models", "plain"),
    "dera_two": ("engine DeRa(0.5), two models", "plain"),
    "cfg_one": ("engine CFG(1.5), one model, two prompts", "plain"),
    "opad_one": ("engine OPAD(1), one model, two prompts", "plain"),
    "aad_lora": ("engine AAD, LoRA pair (r=64 q/k/v)", "lora"),
    "beam4_lora": ("engine BeamAAD(4), LoRA pair", "lora"),
    # the same engine with every machine-dependent choice forced: plain F.linear, or compiled
    "greedy_plain": ("engine greedy, 1 model, plain F.linear + HF forward", "plain"),
    "aad_lora_plain": ("engine AAD, LoRA pair, plain F.linear + HF forward", "lora"),
    "greedy_compiled": ("engine greedy, 1 model, torch.compile", "plain"),
    "greedy_bf16": ("engine greedy, 1 model, bf16 weights", "plain"),
    "aad_lora_compiled": ("engine AAD, LoRA pair, torch.compile", "lora"),
    "aad_two_compiled": ("engine AAD, two models, torch.compile", "plain"),
}
# A baseline and the engine method that must choose the same tokens in exact arithmetic (with
# random weights near-ties can flip under different kernels, e.g. in bf16).
SAME_TOKENS = {"hf_generate": "greedy", "hf_naive_aad": "aad_two"}
TTFT_METHODS = ("hf_generate", "hf_naive_aad", "greedy", "aad_two", "aad_lora")
QUICK_METHODS = TTFT_METHODS + ("greedy_plain",)
# compiles take minutes; bf16 is a CPU question (on CUDA the bench runs bf16 throughout)
DEFAULT_METHODS = tuple(m for m in METHODS if not m.endswith("_compiled") and m != "greedy_bf16")
PRINCIPLE_IDS = tuple(range(3, 19))  # OPAD's principle: 16 token ids before each prompt
ENGINE_RULES = {  # method: (rule, models: "one" | "two" | "lora")
    "greedy": (Greedy("a"), "one"),
    "aad_two": (AAD(0.1), "two"),
    "contrastive_two": (Contrastive(0.1, 0.5), "two"),
    "eft_two": (EFT(4.0), "two"),
    "eft_sampled_two": (EFT(4.0, temperature=0.7, top_p=0.9, seed=0), "two"),
    "dera_two": (DeRa(0.5), "two"),
    "cfg_one": (CFG(1.5), "one"),
    "opad_one": (OPAD(1.0, principle_ids=PRINCIPLE_IDS), "one"),
    "aad_lora": (AAD(0.1), "lora"),
    "beam4_lora": (BeamAAD(4, 0.1), "lora"),
    "greedy_plain": (Greedy("a"), "one+plain"),
    "aad_lora_plain": (AAD(0.1), "lora+plain"),
    "greedy_compiled": (Greedy("a"), "one+compiled"),
    "greedy_bf16": (Greedy("a"), "bf16"),
    "aad_lora_compiled": (AAD(0.1), "lora+compiled"),
    "aad_two_compiled": (AAD(0.1), "two+compiled"),
}


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


def _cache_of(out):
    """A model output's cache: ``out.cache`` (transformers >= 5.24) or ``out.past_key_values``."""
    return out["cache"] if "cache" in out else out.past_key_values


def naive_hf_aad(model_a, model_r, ids, n, device, alpha: float = 0.1):
    """AAD as a user writes it without this package: two models, each with its own Hugging Face
    DynamicCache, ``eager_aad`` each step, and the usual per-step stop check (a host sync)."""
    from ..model.runner import cache_kwarg
    stop = torch.tensor([-1], device=device)  # the models have no EOS; the check still runs
    kw_a, kw_r = cache_kwarg(type(model_a)), cache_kwarg(type(model_r))
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
            out_a = model_a(input_ids=step, use_cache=True, **{kw_a: _cache_of(out_a)})
            out_r = model_r(input_ids=step, use_cache=True, **{kw_r: _cache_of(out_r)})
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
                pair=out.stats.get("pair"), compiled=out.stats.get("compiled"),
                linear=out.stats.get("linear"), forward=out.stats.get("forward"),
                reference_head=out.stats.get("reference_head"))
    return out.stats["prefill_ms"], out.stats["ms_per_token"], out.tokens


class Decoders:
    """One ``Decoder`` per pair kind, opened on first use and closed together: rules share it
    ("load once, generate many"), and only one Decoder may hold the LoRA model's row hooks.
    Every Decoder gets the same static sizes, so no method reads a longer cache than another."""

    def __init__(self, models: dict, max_batch: int, max_len: int, args):
        self.models, self.max_batch, self.max_len, self.args = models, max_batch, max_len, args
        self.open: dict = {}

    def get(self, kind: str):
        """``kind``: ``one`` | ``two`` | ``lora``, optionally ``+plain`` (plain ``F.linear`` and
        the model's own forward forced) or ``+compiled`` (``compile=True``); otherwise every choice is the default's."""
        if kind not in self.open:
            from ..decoder import Decoder
            m = self.models
            base, _, variant = kind.partition("+")
            pair = {"one": (m["a"], None), "two": (m["a"], m["r"]),
                    "bf16": (m.get("a_bf16"), None)}.get(base) or (m["lora"], None)
            self.open[kind] = Decoder(*pair, max_batch_size=self.max_batch,
                                      max_seq_len=self.max_len, backend=self.args.backend,
                                      cuda_graphs=False if self.args.no_graphs else "auto",
                                      cpu_linear="plain" if variant == "plain" else None,
                                      forward="hf" if variant == "plain" else None,
                                      compile=True if variant == "compiled" else "auto")
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
    if name in ("hf_generate", "greedy", "greedy_plain", "greedy_compiled"):
        return wa[0], wa[1] + batch * kv
    if name == "greedy_bf16":
        return wa[0] // 2, wa[1] // 2 + batch * kv // 2
    if name in ("opad_one", "cfg_one"):
        return wa[0], wa[1] + 2 * batch * kv
    if name in ("aad_lora", "beam4_lora", "aad_lora_plain", "aad_lora_compiled"):
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
    if "greedy_bf16" in methods:  # the same weights rounded to bf16 (CPU: where it is native)
        models["a_bf16"] = copy.deepcopy(models["a"]).to(torch.bfloat16)
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
