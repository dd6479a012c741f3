"""Speculative rows of ``aad-fast bench --speculative`` (issue 26): what exact speculation
costs and gives, as ratios to the engine's non-speculative decoding measured in the same run.

- **The embedded toy pair** (trained, so drafts are accepted for real): the caller
  (``toy.spec_bench``, which knows the toy task's held-out prompts) gives the models, the
  shipped draft and the prompt ids; ``time_methods`` runs every method on every prompt at
  batch 1, in interleaved rounds.
- **The oracle sweep on a real shape** (``oracle_sweep``, random weights: no draft would be
  accepted): ``OracleDraft`` proposes the true continuation of a non-speculative run with each
  token corrupted with probability ``1 - p``; ms/token of AAD on the LoRA pair against ``p``
  for ``k`` in 2, 4, 8 beside the engine's greedy and non-speculative AAD.

ms/token here (``CLOCK_NOTE``) is decode time after each prompt's first token over the
tokens emitted after it, summed over the prompts; the mean accepted length (drafted tokens the
rule kept per verify step) is the engine's ``stats``.
"""
from __future__ import annotations

import copy
import datetime
import os
import json
import statistics
import time

import torch

from ..decode.drafts import OracleDraft
from ..rules import AAD, Greedy
from .machine import log, sync
from .shapes import add_lora, default_config_dir, load_shape, make_config, random_model

ORACLE_PS = (0.0, 0.3, 0.5, 0.7, 0.85, 1.0)
ORACLE_KS = (2, 4, 8)
CLOCK_NOTE = ("ms/token: decode time after each prompt's first token over the tokens emitted "
              "after it (a stop id included), summed over the prompts, batch 1, median of the "
              "rounds; the engine's from its stats (speculative: verify steps and the draft's "
              "proposals; not speculative: time per step), Hugging Face generate()'s (with "
              "assistant_model= or not) as t(n) - t(1) of wall-timed calls. The prefill (and "
              "the draft's own) is excluded, as in the main bench. mean accepted: drafted "
              "tokens the rule kept per verify step (engine stats).")


def engine_method(dec, rule, max_new: int, stop):
    """``run(ids) -> (tokens, emitted, decode ms, stats)`` of ``dec.generate`` on one prompt:
    ``emitted`` counts a stop id; the decode ms cover the ``emitted - 1`` tokens after the
    first, at the engine's ``stats["ms_per_token"]`` (speculative: decode time over those
    tokens; otherwise decode time per step, so a burst's steps past a row's stop are not
    charged to its tokens)."""
    def run(ids):
        g = dec.generate(input_ids=torch.tensor([ids]), rule=rule, max_new_tokens=max_new,
                         stop=stop)
        n = len(g.tokens[0]) + (g.finish_reason[0] == "stop")
        return g.tokens[0], n, g.stats["ms_per_token"] * (n - 1), g.stats
    return run


def hf_method(model, max_new: int, stop, assistant=None, k: int | None = None):
    """Hugging Face ``generate()`` greedy on one prompt, with ``assistant`` (its assisted
    generation: HF's own speculative greedy, ``k`` drafted tokens per step) or without; the
    decode ms are ``t(n) - t(1)`` of two wall-timed calls (``n`` tokens, then one)."""
    from transformers import GenerationConfig
    kw = {}
    if assistant is not None:
        assistant = copy.copy(assistant)
        assistant.generation_config = GenerationConfig(
            num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
            eos_token_id=list(stop), pad_token_id=0)
        kw["assistant_model"] = assistant

    def call(x, n):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=list(stop),
                               pad_token_id=0)
        sync(x.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                 **kw)
        sync(x.device)
        return out[0, x.shape[1]:].tolist(), (time.perf_counter() - t0) * 1e3

    def run(ids):
        x = torch.tensor([ids], device=model.device)
        toks, t_n = call(x, max_new)
        _, t_1 = call(x, 1)
        cut = next((j for j, t in enumerate(toks) if t in stop), None)
        n = len(toks) if cut is None else cut + 1
        return (toks if cut is None else toks[:cut]), n, t_n - t_1, {}
    return run


def time_methods(methods: dict, prompts: list, rounds: int) -> dict:
    """Every method (``name: run``) on every prompt, one warm-up pass, then ``rounds`` rounds
    in an order rotated each round; a round's ms/token is its decode ms over its tokens after
    each prompt's first, summed over the prompts. Returns ``name: {"ms_per_token", "ms_per_token_runs",
    "tokens" (per prompt, from the warm-up), "mean_accepted", "emitted"}``."""
    out = {}
    for name, run in methods.items():
        res = [run(p) for p in prompts]
        log(f"speculative: warm-up {name} done")
        acc = [r[3]["mean_accepted"] for r in res if "mean_accepted" in r[3]]
        out[name] = {"tokens": [r[0] for r in res], "emitted": sum(r[1] for r in res),
                     "mean_accepted": statistics.mean(acc) if acc else None,
                     "ms_per_token_runs": []}
    names = list(methods)
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            res = [methods[name](p) for p in prompts]
            out[name]["ms_per_token_runs"].append(sum(r[2] for r in res) /
                                                  max(sum(r[1] - 1 for r in res), 1))
        log(f"speculative: round {rnd + 1}/{rounds} done")
    for name, rec in out.items():
        rec["ms_per_token"] = statistics.median(rec["ms_per_token_runs"])
    return out


def oracle_sweep(args, device, dtype, shape: str = "smollm2-135m", ps=ORACLE_PS,
                 ks=ORACLE_KS) -> list:
    """The oracle sweep on ``shape`` (random weights, no EOS: exactly ``args.new_tokens``
    tokens per prompt, batch 1): engine greedy, AAD LoRA pair and two models without
    speculation, and AAD LoRA pair with ``OracleDraft(p)`` for every ``p`` x ``k``.
    Returns result rows (``x_greedy``, ``x_aad``: ratios to the same run's baselines)."""
    from ..decoder import Decoder
    config = make_config(load_shape(shape, args.configs))
    a = random_model(config, dtype, device, args.seed)
    r = random_model(config, dtype, device, args.seed + 1)
    lora = add_lora(copy.deepcopy(r), args.seed + 2)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, config.vocab_size, (args.decode_prompt_len,), generator=g)
               .tolist() for _ in range(args.spec_prompts)]
    n, L = args.new_tokens, args.decode_prompt_len + args.new_tokens
    # every Decoder with the process's threads (no per-Decoder choice: one count for all rows)
    dec = lambda *m, **kw: Decoder(*m, max_batch_size=1, max_seq_len=L, threads="keep",  # noqa: E731
                                   **kw)
    base = {"greedy": (dec(a), Greedy("a")), "aad_lora": (dec(lora), AAD(0.1)),
            "aad_two": (dec(a, r), AAD(0.1))}
    truth_run = engine_method(base["aad_lora"][0], AAD(0.1), n, [])
    truth = {tuple(p): truth_run(p)[0] for p in prompts}
    methods = {name: engine_method(d, rule, n, []) for name, (d, rule) in base.items()}
    for k in ks:
        for p in ps:
            d = dec(lora, draft=OracleDraft(truth, p, seed=args.seed, vocab_size=config.vocab_size),
                    speculate=k)
            methods[f"aad_lora_oracle_p{p}_k{k}"] = engine_method(d, AAD(0.1), n, [])
    log(f"oracle sweep on {shape}: {len(methods)} methods x {len(prompts)} prompts, "
        f"{n} new tokens")
    res = time_methods(methods, prompts, args.repeats)
    rows = []
    for name, rec in res.items():
        k = p = None
        if "_oracle_" in name:
            p, k = float(name.split("_p")[1].split("_k")[0]), int(name.rsplit("_k", 1)[1])
        rows.append({"model": shape, "method": name, "k": k, "p": p, "batch": 1,
                     "prompts": len(prompts), "new_tokens": n,
                     "ms_per_token": rec["ms_per_token"],
                     "ms_per_token_runs": rec["ms_per_token_runs"],
                     "mean_accepted": rec["mean_accepted"],
                     "same_tokens_as_aad_lora": (rec["tokens"] == res["aad_lora"]["tokens"]
                                                 if name.startswith("aad_lora") else None)})
    add_spec_ratios(rows, "greedy", "aad_lora")
    return rows


def add_spec_ratios(rows: list, greedy: str, aad: str | None = None) -> None:
    """``x_greedy`` (and with ``aad``, ``x_aad``): each row's ms/token over the same run's
    ``greedy`` (``aad``) method's."""
    by = {r["method"]: r["ms_per_token"] for r in rows}
    for r in rows:
        r["x_greedy"] = r["ms_per_token"] / by[greedy] if greedy in by else None
        if aad is not None:
            r["x_aad"] = r["ms_per_token"] / by[aad] if aad in by else None


def plot_oracle(rows: list, path, title: str) -> bool:
    """ms/token against ``p`` per ``k`` (and the baselines as lines) to ``path``; ``False``
    when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in sorted({r["k"] for r in rows if r["k"] is not None}):
        pts = sorted((r["p"], r["ms_per_token"]) for r in rows if r["k"] == k)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"AAD LoRA, k={k}")
    styles = {"greedy": ("engine greedy, 1 model", "k"), "aad_lora": ("AAD LoRA, no draft", "C3"),
              "aad_two": ("AAD two models, no draft", "C7")}
    for r in rows:
        if r["method"] in styles:
            label, color = styles[r["method"]]
            ax.axhline(r["ms_per_token"], ls="--", color=color, label=label)
    ax.set_xlabel("p (chance a drafted token is the rule's)")
    ax.set_ylabel("ms / token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _meta(args, device) -> dict:
    from .. import tuning
    from .machine import device_name, git_info, load_average, portable_argv, versions
    import sys
    commit, dirty = git_info()
    return {"schema": 1, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": {"type": device.type, "name": device_name(device),
                       "threads": torch.get_num_threads(), "machine": tuning.machine(),
                       "load_average_at_start": load_average()},
            "versions": versions(), "commit": commit, "git_dirty": dirty,
            "argv": portable_argv(sys.argv),
            "env": {k: v for k, v in os.environ.items() if k.startswith("AAD_FAST_")}}


def run_speculative(args, toy_rows) -> int:
    """``aad-fast bench --speculative``: ``toy_rows(args, device)`` (the toy pair's rows, from
    the toy layer) and the oracle sweep, written to ``OUT/spec-<device>-<date>.{json,md,png}``."""
    from .machine import load_average
    from .report import out_stem
    device = torch.device(args.device or "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.new_tokens = args.new_tokens or 32
    args.decode_prompt_len = args.decode_prompt_len or 128
    args.repeats = args.repeats or 3
    args.configs = args.configs or default_config_dir()
    result = _meta(args, device)
    result["dtype"] = str(dtype).replace("torch.", "")
    result["notes"] = [CLOCK_NOTE]
    if not args.no_toy:  # (models are built outside inference mode: the engine packs weights)
        result["toy"] = toy_rows(args, device)
    if not args.no_oracle:
        result["oracle"] = oracle_sweep(args, device, dtype, args.spec_shape)
    result["device"]["load_average_at_end"] = load_average()
    result["targets"] = spec_targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = out_stem(device, args.out)
    stem = stem.with_name("spec-" + stem.name)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = spec_markdown(result)
    stem.with_suffix(".md").write_text(table)
    if result.get("oracle") and not plot_oracle(
            result["oracle"], stem.with_suffix(".png"),
            f"{args.spec_shape}, batch 1, {result['device']['name']}"):
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    print(table)
    log(f"wrote {stem}.json, .md and .png")
    return 0


def spec_targets(result: dict) -> list:
    """Issue 26's CPU bounds where this run measured them: the toy LoRA pair with its best
    draft <= 0.7x and two-model AAD <= 1.0x the engine's greedy on the SFT model; AAD LoRA at
    p = 0.7, k = 4 of the oracle sweep <= 0.8x the engine's greedy."""
    out = []
    toy = result.get("toy") or []
    for pair, bound in (("aad_lora", 0.7), ("aad_two", 1.0)):
        rows = [r for r in toy if r["method"].startswith(pair + "_") and r["k"]]
        if rows:
            best = min(rows, key=lambda r: r["x_greedy"])
            out.append({"target": f"toy {pair}, best draft / engine greedy (SFT)",
                        "method": best["method"], "value": best["x_greedy"], "bound": bound,
                        "met": best["x_greedy"] <= bound})
    for r in result.get("oracle") or []:
        if r["k"] == 4 and r["p"] == 0.7:
            out.append({"target": f"{r['model']} AAD LoRA, oracle p 0.7, k 4 / engine greedy",
                        "method": r["method"], "value": r["x_greedy"], "bound": 0.8,
                        "met": r["x_greedy"] <= 0.8})
    return out


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def spec_markdown(result: dict) -> str:
    """The toy rows and the oracle sweep as markdown tables, device named."""
    dev = result["device"]
    lines = [f"# Speculative decoding: {dev['name']}, {result['dtype']}, {result['date']}", "",
             f"torch threads: {dev['threads']} (the toy pair's rows: "
             f"{(result.get('toy') or [{}])[0].get('threads', '-')})", "",
             f"load average at start {dev['load_average_at_start']}, at end "
             f"{dev.get('load_average_at_end')}; commit {result['commit']}", "",
             result["notes"][0], ""]
    if result.get("toy"):
        lines += ["## The embedded toy pair, batch 1", "",
                  "| method | k | ms/token | x engine greedy (SFT) | x same pair, no draft | "
                  "mean accepted | same tokens |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in result["toy"]:
            lines.append(f"| {r['label']} | {r['k'] or '-'} | {r['ms_per_token']:.2f} | "
                         f"{_fmt(r['x_greedy'])} | {_fmt(r.get('x_aad'))} | "
                         f"{_fmt(r['mean_accepted'])} | {_fmt(r.get('same_tokens'), '{}')} |")
        lines.append("")
    if result.get("oracle"):
        o = result["oracle"]
        lines += [f"## Oracle draft on the {o[0]['model']} shape (random weights), batch 1, "
                  f"{o[0]['new_tokens']} new tokens, {o[0]['prompts']} prompts", "",
                  "| method | k | p | ms/token | x engine greedy | x AAD LoRA, no draft | "
                  "mean accepted | same tokens |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in o:
            lines.append(f"| {r['method']} | {r['k'] or '-'} | {_fmt(r['p'])} | "
                         f"{r['ms_per_token']:.2f} | {_fmt(r['x_greedy'])} | {_fmt(r['x_aad'])} | "
                         f"{_fmt(r['mean_accepted'])} | {_fmt(r['same_tokens_as_aad_lora'], '{}')} |")
    if result.get("targets"):
        lines += ["", "## Issue 26's bounds on this run", "", "| bound | method | value | met |",
                  "| --- | --- | ---: | --- |"]
        lines += [f"| {t['target']} <= {t['bound']} | {t['method']} | {t['value']:.2f} | "
                  f"{'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"
