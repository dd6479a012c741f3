"""Naive reference evaluation of a toy pair: the AAD paper's Table 1 in miniature, with no engine.

    python -m aad_fast.toy.quick_eval [--dir DIR] [--limit N] [--json FILE]

Every method decodes the held-out prompts with a plain loop that recomputes the whole sequence
at every step (no KV cache, float32), so its choices are the definition the fast engine must
match. Methods (docs/rules.md): greedy SFT, greedy DPO, AAD (alpha 0.1 by default, ``aad_select``),
EFT (beta 4, ``mix_select(a, r, 4, -3)``), best-of-2 (two nucleus samples of the DPO model,
p = 0.9, ``mix_select`` with counter-based noise, picked by the picker). A completion ends at
``<eos>`` or ``<user>`` (not included) or after ``--max-new-tokens``. Scores come from the
exact oracle (``task.oracle_reward``); the win rate of AAD counts ties as half.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..ops import aad_select, mix_select
from . import task
from .tokenizer import render_prompt, stop_ids


def _groups(tok, questions):
    """Indices of ``questions`` grouped by prompt length (no padding needed in a group)."""
    by_len: dict[int, list[int]] = {}
    ids = [tok(render_prompt(tok, q))["input_ids"] for q in questions]
    for i, seq in enumerate(ids):
        by_len.setdefault(len(seq), []).append(i)
    return ids, list(by_len.values())


@torch.no_grad()
def naive_decode(pick, questions, tok, *, max_new_tokens: int = 32):
    """Decode every question with ``pick(ids [B, T], step, rows) -> int64 [B]`` called once per
    step on the full sequences (prompt plus the tokens chosen so far); ``rows`` are the indices
    of the batch's questions. Returns the completions' token ids."""
    ids, groups = _groups(tok, questions)
    stops = torch.tensor(stop_ids(tok))
    out: list[list[int]] = [[] for _ in questions]
    for rows in groups:
        seq = torch.tensor([ids[i] for i in rows])
        done = torch.zeros(len(rows), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = pick(seq, step, rows)
            if bool((nxt < 0).any()):
                raise RuntimeError("selection returned -1 (no finite aligned logit)")
            for j, i in enumerate(rows):
                if not done[j]:
                    out[i].append(int(nxt[j]))
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return [[t for t in row if t not in stops.tolist()] for row in out]


def methods(sft, dpo, vocab: int, *, alpha: float = 0.1, eft_beta: float = 4.0):
    """``name -> pick`` for the deterministic methods; logits are float32 ``[B, V]``."""
    def last(model, seq):
        return model(input_ids=seq).logits[:, -1].float()

    return {
        "greedy_sft": lambda s, *_: last(sft, s)[:, :vocab].argmax(1),
        "greedy_dpo": lambda s, *_: last(dpo, s)[:, :vocab].argmax(1),
        f"aad_{alpha:g}": lambda s, *_: aad_select(last(dpo, s), last(sft, s), alpha,
                                                 vocab_size=vocab),
        f"eft_{eft_beta:g}": lambda s, *_: mix_select(last(dpo, s), last(sft, s), eft_beta,
                                                    1.0 - eft_beta, vocab_size=vocab),
    }


def nucleus_pick(model, vocab: int, seed: int, top_p: float = 0.9):
    """Sampling from ``model`` at temperature 1 with top-p; the noise is counter-based (seed
    ``seed * 1_000_003 + question index``, step), so results do not depend on batching."""
    def pick(seq, step, rows):
        a = model(input_ids=seq).logits[:, -1].float()
        seeds = torch.tensor(rows, dtype=torch.int64) + seed * 1_000_003
        return mix_select(a, a, 1.0, 0.0, temperature=1.0, top_p=top_p, seed=seeds,
                          step=torch.tensor(step), vocab_size=vocab)
    return pick


@torch.no_grad()
def picker_scores(picker, tok, questions, completions):
    """Picker score of each (question, completion), rendered as a full chat turn."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q},
                                      {"role": "assistant", "content": c}], tokenize=False)
             for q, c in zip(questions, completions)]
    enc = tok(texts, padding=True, return_tensors="pt")
    return picker(**enc).logits[:, 0].float()


def evaluate(sft, dpo, tok, picker, questions, *, alpha=0.1, max_new_tokens=32, seed=0):
    """Completions and oracle rewards of each method on ``questions``."""
    vocab = len(tok)
    dec = lambda ids: [tok.decode(r, skip_special_tokens=True) for r in ids]  # noqa: E731
    res = {}
    for name, pick in methods(sft, dpo, vocab, alpha=alpha).items():
        res[name] = dec(naive_decode(pick, questions, tok, max_new_tokens=max_new_tokens))
    samples = [dec(naive_decode(nucleus_pick(dpo, vocab, seed + k), questions, tok,
                                max_new_tokens=max_new_tokens)) for k in range(2)]
    s0, s1 = (picker_scores(picker, tok, questions, s) for s in samples)
    res["bo2_picker"] = [b if y > x else a for a, b, x, y in zip(*samples, s0, s1)]
    res["sample_dpo"] = samples[0]
    rewards = {k: [task.oracle_reward(q, c) for q, c in zip(questions, v)] for k, v in res.items()}
    return res, rewards


def aad_pairs(sft, dpo, tok, questions, *, alpha=0.1, seed=0, max_new_tokens=32):
    """Preference rows for one round of iterative DPO as the AAD paper builds them: chosen = the
    AAD completion, rejected = a nucleus sample (p = 0.9) of the aligned model; TRL
    conversational format. Rows whose two completions are equal are left out."""
    vocab = len(tok)
    dec = lambda ids: [tok.decode(r, skip_special_tokens=True) for r in ids]  # noqa: E731
    aad = methods(sft, dpo, vocab, alpha=alpha)[f"aad_{alpha:g}"]
    chosen = dec(naive_decode(aad, questions, tok, max_new_tokens=max_new_tokens))
    rejected = dec(naive_decode(nucleus_pick(dpo, vocab, seed), questions, tok,
                                max_new_tokens=max_new_tokens))
    return [{"prompt": [{"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in zip(questions, chosen, rejected) if c != r]


def summarise(rewards, ref: str):
    """Average reward per method and the win rate of ``ref`` (an AAD row) against it (ties
    count half)."""
    out = {}
    for name, r in rewards.items():
        wins = sum((a > b) + 0.5 * (a == b) for a, b in zip(rewards[ref], r))
        out[name] = {"reward": sum(r) / len(r), "aad_win_rate": wins / len(r)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m aad_fast.toy.quick_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="trained pair (default: the shipped pair)")
    p.add_argument("--adapter", default="dpo", help="adapter directory name inside --dir")
    p.add_argument("--limit", type=int, help="evaluate the first N held-out prompts")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write completions and rewards here")
    p.add_argument("--pairs-out", type=Path,
                   help="instead of evaluating, write AAD-vs-nucleus pairs for the prompts of "
                        "DIR/dpo_pairs.jsonl (input of `train --pairs`)")
    args = p.parse_args(argv)
    from ..jobs.outfile import check_writable, write_atomic
    from .assets import load_default_pair
    try:  # refuse an unwritable output before the run, not after it
        for opt, path in (("--json", args.json), ("--pairs-out", args.pairs_out)):
            if path is not None:
                check_writable(path, opt)
    except ValueError as exc:
        p.error(str(exc))

    torch.set_num_threads(args.threads)
    sft, dpo, tok, picker, _ = load_default_pair(root=args.dir, adapter=args.adapter)
    if args.pairs_out:
        from .assets import default_pair_dir

        with open((args.dir or default_pair_dir()) / "dpo_pairs.jsonl") as f:
            prompts = [json.loads(line)["prompt"][0]["content"] for line in f]
        prompts = list(dict.fromkeys(prompts))[:args.limit]  # distinct, in file order
        rows = aad_pairs(sft, dpo, tok, prompts, alpha=args.alpha,
                         max_new_tokens=args.max_new_tokens)
        write_atomic(args.pairs_out, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} pairs from {len(prompts)} prompts -> {args.pairs_out}")
        return
    held = task.split_problems()[1][:args.limit]
    questions = [q.prompt for q in held]
    res, rewards = evaluate(sft, dpo, tok, picker, questions, alpha=args.alpha,
                            max_new_tokens=args.max_new_tokens)
    table = summarise(rewards, f"aad_{args.alpha:g}")
    print(f"{len(questions)} held-out prompts")
    print("| method | avg oracle reward | AAD win rate |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['reward']:.3f} | {row['aad_win_rate']:.3f} |")
    if args.json:
        write_atomic(args.json, json.dumps({"n": len(questions), "table": table,
                                            "questions": questions, "completions": res,
                                            "rewards": rewards}, indent=1))


if __name__ == "__main__":
    main()
