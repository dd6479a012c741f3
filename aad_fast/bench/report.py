"""Output of the bench: ratios to the engine's greedy, the speed targets and whether this run met
them, the markdown tables, the plot and the output file name."""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import torch

from ..ops.backends import available_backends
from .decode import METHODS, SAME_TOKENS
from .machine import GIB


def add_ratios(decode: list) -> None:
    by = {(r["model"], r["batch"], r["method"]): r for r in decode}
    for r in decode:
        base = by.get((r["model"], r["batch"], "greedy"))
        r["x_greedy"] = r["ms_per_token"] / base["ms_per_token"] if base else None


_CPU_SETTINGS = [("cpu-60m", 1), ("cpu-60m", 8), ("smollm2-135m", 1), ("smollm2-135m", 8)]
_GPU_SETTINGS = [("llama-3.2-1b", 1), ("llama-3.1-8b", 1)]
TARGETS = {  # device type: [(name, numerator, denominator, bound, "<=" | ">=", settings)]
    "cpu": [("HF generate() greedy / engine greedy (speedup)", "hf_generate", "greedy", 1.0,
             ">=", _CPU_SETTINGS),
            ("engine greedy, plain F.linear + HF forward / engine greedy (measured choices "
             "never slower)",
             "greedy_plain", "greedy", 1.0, ">=", _CPU_SETTINGS),
            ("AAD LoRA pair / engine greedy (latency)", "aad_lora", "greedy", 1.20, "<=",
             _CPU_SETTINGS),
            ("engine AAD two models / engine greedy (latency)", "aad_two", "greedy", 2.05, "<=",
             _CPU_SETTINGS),
            ("naive HF two-model loop / engine AAD two models (speedup)", "hf_naive_aad",
             "aad_two", 1.25, ">=", _CPU_SETTINGS),
            ("OPAD one model / engine greedy (latency)", "opad_one", "greedy", 1.35, "<=",
             _CPU_SETTINGS)],
    "cuda": [("AAD LoRA pair / engine greedy (latency)", "aad_lora", "greedy", 1.10, "<=",
              _GPU_SETTINGS),
             ("engine AAD two models / engine greedy (latency)", "aad_two", "greedy", 2.05, "<=",
              _GPU_SETTINGS),
             ("naive HF two-model loop / engine AAD two models (speedup)", "hf_naive_aad",
              "aad_two", 3.0, ">=", _GPU_SETTINGS),
             ("HF generate() greedy / engine greedy (speedup)", "hf_generate", "greedy", 1.0,
              ">=", _GPU_SETTINGS),
             ("HF generate greedy / engine AAD LoRA pair (speedup)", "hf_generate", "aad_lora",
              1.0, ">=", _GPU_SETTINGS)],
}
NOISE = 0.05  # a ratio misses "beyond noise" when medians AND best rounds miss by more than this


def _verdict(value: float, best: float, bound: float, op: str) -> str:
    """``yes`` (bound met), ``noise`` (missed by less than NOISE, or met by the best rounds),
    ``NO`` (missed beyond noise)."""
    def meets(v, slack=0.0):
        return v <= bound * (1 + slack) if op == "<=" else v >= bound * (1 - slack)
    if meets(value):
        return "yes"
    return "noise" if meets(value, NOISE) or meets(best) else "NO"


def evaluate_targets(device_type: str, decode: list, kernels: list) -> list:
    """The issues' speed targets, where this run measured their setting."""
    by = {(r["model"], r["batch"], r["method"]): r["ms_per_token"] for r in decode}
    best = {(r["model"], r["batch"], r["method"]): r["ms_per_token_min"] for r in decode}
    out = []
    for title, num, den, bound, op, settings in TARGETS.get(device_type, []):
        for model, b in settings:
            if (model, b, num) in by and (model, b, den) in by:
                v = by[(model, b, num)] / by[(model, b, den)]
                vb = best[(model, b, num)] / best[(model, b, den)]
                verdict = _verdict(v, vb, bound, op)
                out.append({"target": title, "model": model, "batch": b, "value": v,
                            "value_of_best_rounds": vb, "bound": f"{op} {bound}",
                            "met": verdict == "yes", "verdict": verdict})
    if device_type == "cpu":
        default = "cpp" if "cpp" in available_backends("cpu") else "torch"
        k = {(r["batch"], r["vocab"], r["impl"]): r for r in kernels}
        row = k.get((1, 128256, f"aad_select[{default}]"))
        eager = k.get((1, 128256, "eager"))
        if row is not None and eager is not None:
            v, vb = row["speedup_vs_eager"], eager["min_ms"] / row["min_ms"]
            verdict = _verdict(v, vb, 10, ">=")
            out.append({"target": f"eager PyTorch / default CPU aad_select ({default}) (speedup)",
                        "model": "kernel", "batch": 1, "vocab": 128256, "value": v,
                        "value_of_best_rounds": vb, "bound": ">= 10",
                        "met": verdict == "yes", "verdict": verdict})
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
        lines += ["", f"Verdict ({dev}; met: yes, noise = missed by < {NOISE:.0%} or met by the "
                  "best rounds, NO = missed beyond noise):", "",
                  "| target | setting | measured (medians) | (best rounds) | bound | met |",
                  "|---|---|---:|---:|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['model']} batch {t['batch']} | {t['value']:.2f} "
                         f"| {fmt(t.get('value_of_best_rounds'))} | {t['bound']} "
                         f"| {t['verdict']} |")
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
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
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
            bars = ax.bar(xs, ys, width, label=METHODS[m][0], color=cmap(j))
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
    else:  # named by the CPU model: results of different machines never overwrite each other
        from ..tuning import machine
        cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", machine()["cpu"].lower())
        cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu"
        slug = f"cpu-{cpu}-{torch.get_num_threads()}threads"
    stem = out_dir / f"{slug}-{date}"
    if stem.with_suffix(".json").exists():
        stem = out_dir / f"{slug}-{date}-{datetime.datetime.now():%H%M%S}"
    return stem
