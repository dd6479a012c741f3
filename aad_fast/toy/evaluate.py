"""``aad-fast evaluate`` (the AAD paper's Table 1 in miniature, on the toy task) and
``aad-fast make-pairs`` (AAD completions as preference data for another round of DPO).

Every number is recomputed from decodes and the exact oracle (``task.oracle_reward``); nothing
is stored. Win rate of AAD against a method = share of prompts where AAD's reward is higher,
ties counting one half.
"""
from __future__ import annotations

import argparse

import json
import sys
import time
from pathlib import Path

from . import task
from .tokenizer import stop_ids

ALPHAS = (0.05, 0.1, 0.2, 0.5)


def open_pair(a):
    """``(decoder, picker, picker_tokenizer, adapters)`` for the embedded pair or given paths."""
    from ..decoder import Decoder
    from .assets import default_pair_dir, load_default_pair
    if getattr(a, "aligned", None):
        dec = Decoder(a.aligned, a.reference, max_batch_size=64, max_seq_len=128)
        return dec, None, None, {}
    sft, dpo, tok, picker, picker_tok = load_default_pair("cpu")
    dec = Decoder(dpo, tokenizer=tok, max_batch_size=64, max_seq_len=128)
    root = default_pair_dir()
    # the main table keeps its one iterative row pair; `--iterations` scores every round
    extra = {p.name: p for p in [root / "dpo_iter1"] if (p / "adapter_config.json").exists()}
    return dec, picker, picker_tok, extra


def _methods(picker, picker_tok, alpha: float):
    from ..rules import AAD, EFT, BestOfN, Contrastive, Greedy
    rows = [("greedy SFT", Greedy("r")), ("greedy DPO", Greedy("a"))]
    if picker is not None:
        rows.append(("best-of-2 (picker)", BestOfN(2, picker=(picker, picker_tok))))
    rows += [("EFT (beta 4)", EFT(4.0)),
             ("contrastive (beta 0.5, SFT amateur)", Contrastive(alpha, 0.5))]
    rows += [(f"AAD (alpha {x})", AAD(x)) for x in ALPHAS]
    return rows


def _decode_all(dec, rule, prompts, max_new, batch):
    out = []
    for i in range(0, len(prompts), batch):
        gen = dec.generate(prompts[i:i + batch], rule=rule, chat=True, max_new_tokens=max_new,
                           stop=stop_ids(dec.tokenizer))
        out += gen.text
    return out


def evaluate(a) -> dict:
    """Decode the held-out prompts with every method; return rewards and win rates."""
    dec, picker, picker_tok, extra = open_pair(a)
    problems = task.split_problems()[1]
    if a.limit:
        problems = problems[: a.limit]
    prompts = [p.prompt for p in problems]
    rewards, t0 = {}, time.perf_counter()
    methods = _methods(picker, picker_tok, 0.1)
    for name, rule in methods:
        texts = _decode_all(dec, rule, prompts, a.max_new_tokens, a.batch_size)
        rewards[name] = [task.oracle_reward(p, t) for p, t in zip(problems, texts)]
        print(f"  {name:<38} mean reward {sum(rewards[name]) / len(problems):+.3f}",
              file=sys.stderr)
    dec.close()
    for name, path in extra.items():  # adapters of iterative DPO rounds
        from ..rules import AAD, Greedy
        from ..decoder import Decoder
        from .assets import load_default_pair
        _, dpo_k, tok, _, _ = load_default_pair("cpu", adapter=name)
        with Decoder(dpo_k, tokenizer=tok, max_batch_size=64, max_seq_len=128) as d2:
            for label, rule in ((f"greedy {name}", Greedy("a")), (f"AAD (alpha 0.1) {name}", AAD(0.1))):
                texts = _decode_all(d2, rule, prompts, a.max_new_tokens, a.batch_size)
                rewards[label] = [task.oracle_reward(p, t) for p, t in zip(problems, texts)]
    ref = rewards["AAD (alpha 0.1)"]
    table = []
    for name, rs in rewards.items():
        wins = sum((x > y) + 0.5 * (x == y) for x, y in zip(ref, rs)) / len(rs)
        table.append({"method": name, "mean_reward": sum(rs) / len(rs),
                      "aad_win_rate": None if name == "AAD (alpha 0.1)" else wins})
    return {"prompts": len(problems), "split": "held-out (10%)", "rows": table,
            "seconds": time.perf_counter() - t0, "max_new_tokens": a.max_new_tokens}


def markdown(result: dict) -> str:
    lines = [f"Held-out prompts: {result['prompts']}; win rate = AAD (alpha 0.1) beats the "
             "method on a prompt (ties count 1/2).", "",
             "| method | mean oracle reward | AAD win rate |", "|---|---:|---:|"]
    for r in result["rows"]:
        win = "-" if r["aad_win_rate"] is None else f"{100 * r['aad_win_rate']:.1f}%"
        lines.append(f"| {r['method']} | {r['mean_reward']:+.3f} | {win} |")
    return "\n".join(lines)


def at_least(low: int):
    """An argparse ``type``: an int >= ``low``, else argparse's own error naming the option
    (before any model loads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    return parse


def add_arguments_evaluate(p):
    p.description = ("Average oracle reward and AAD's win rate against greedy SFT, greedy DPO, "
                     "best-of-2, EFT and contrastive decoding on the toy task's held-out prompts "
                     "(default: the embedded pair).")
    p.add_argument("--limit", type=at_least(0), default=0,
                   help="first N held-out prompts (0 = all)")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32)
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--iterations", action="store_true",
                   help="instead: the paper's Table 9 in miniature (iterative DPO: iterations "
                        "0, 1, 1', 2 under greedy, best-of-2 and AAD) and its diagnostics")
    p.add_argument("--dir", default=None,
                   help="with --iterations: directory with sft/, picker/ and the adapters dpo, "
                        "dpo_iter1, dpo_iter1p, dpo_iter2 (default: the embedded pair)")
    p.add_argument("--no-diagnose", action="store_true",
                   help="with --iterations: the table only (no log-ratio ranking / filter check)")


def run_evaluate(a) -> int:
    from ..jobs.outfile import check_writable, write_atomic
    if a.json:  # checked before the run, which is long, not after it
        check_writable(a.json, "--json")
    if a.dir and not a.iterations:
        raise ValueError(f"--dir {a.dir}: only used with --iterations; add --iterations")
    if a.iterations:
        from . import iterations
        result = iterations.evaluate_iterations(a)
        print(iterations.markdown(result))
    else:
        result = evaluate(a)
        print(markdown(result))
    if a.json:
        write_atomic(a.json, json.dumps(result, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- make-pairs
def pair_prompts(a):
    """``(rows, identity)`` of make-pairs' prompts: ``--prompts`` FILE, else the toy task's
    training split."""
    from ..jobs.prompt_files import prompts_identity, read_prompts_file
    if a.prompts:
        return read_prompts_file(a.prompts, "--prompts", text_lines=True), prompts_identity(
            a.prompts)
    rows = [{"id": i, "prompt": p.prompt} for i, p in enumerate(task.split_problems()[0])]
    return rows, {"toy": "train split"}


def pairs_settings(a) -> dict:
    """What a make-pairs output depends on (its resume sidecar); a batch's rejected samples
    share its seed, so the batch size is part of it."""
    return {"command": "make-pairs", "aligned": a.aligned and str(Path(a.aligned).resolve()),
            "reference": a.reference and str(Path(a.reference).resolve()),
            "alpha": a.alpha, "max_new_tokens": a.max_new_tokens, "seed": a.seed,
            "batch_size": a.batch_size}


def make_pairs(a) -> int:
    """chosen = AAD completion, rejected = nucleus sample (p = 0.9) of the aligned model; TRL
    conversational preference rows, appended as they are made (``outfile.ResultsFile``: one
    durable line per row, a torn last row repaired, a resume with other settings refused, one
    writer at a time); a rerun skips done ids."""
    from ..rules import AAD, Mix
    from ..jobs.prompt_files import check_resume
    from ..jobs.outfile import ResultsFile
    rows, ident = pair_prompts(a)
    with ResultsFile(a.out, pairs_settings(a), ident) as out:
        check_resume(out, rows, lambda row: row["prompt"][0]["content"])
        todo = [r for r in rows if not out.is_done(r["id"])]
        print(f"make-pairs: {len(todo)} prompt(s) to do, {len(out.done)} already in {a.out}",
              file=sys.stderr)
        if not todo:
            return 0
        dec, _, _, _ = open_pair(a)
        made = 0
        with dec:
            # Batches are cut from the whole prompt list, not from what is left to do, and the
            # sampler's noise depends on (seed, step, token) only, so a resumed run draws the
            # same rejected samples as an uninterrupted one.
            for i in range(0, len(rows), a.batch_size):
                chunk = [r for r in rows[i:i + a.batch_size] if not out.is_done(r["id"])]
                if not chunk:
                    continue
                prompts = [r["prompt"] for r in chunk]
                kw = dict(chat=True, max_new_tokens=a.max_new_tokens,
                          stop=stop_ids(dec.tokenizer))
                chosen = dec.generate(prompts, rule=AAD(a.alpha), **kw).text
                rejected = dec.generate(prompts, rule=Mix(1.0, 0.0, temperature=1.0, top_p=0.9,
                                                          seed=a.seed + i), **kw).text
                for r, c, j in zip(chunk, chosen, rejected):
                    out.write({"id": r["id"],
                               "prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": j}]})
                made += len(chunk)
                print(f"  {made}/{len(todo)}", file=sys.stderr)
    return 0


def add_arguments_make_pairs(p):
    p.description = ("Preference pairs for iterative DPO: chosen = AAD completion, rejected = "
                     "nucleus sample (p=0.9) of the aligned model, TRL conversational rows.")
    p.add_argument("--aligned", default=None, help="aligned model/adapter (default: embedded)")
    p.add_argument("--reference", default=None, help="reference model (default: adapter base)")
    p.add_argument("--prompts", default=None,
                   help="JSONL ({'prompt': ...}) or text lines (default: the toy train prompts)")
    p.add_argument("--out", required=True, help="output JSONL (appended; reruns resume)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=at_least(1), default=32)
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--seed", type=int, default=0)


def run_make_pairs(a) -> int:
    return make_pairs(a)
