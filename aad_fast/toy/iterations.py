"""``aad-fast evaluate --iterations``: the AAD paper's Table 9 (iterative DPO) in miniature, and
the diagnostics of why AAD on an iterated adapter scores what it scores.

Models (adapters in ``DIR``, default the shipped pair; trained by ``python -m
aad_fast.toy.iterate``): iteration 0 = ``dpo``, 1 = ``dpo_iter1``, 1' = ``dpo_iter1p``, 2 =
``dpo_iter2``. Decoders: greedy, best-of-2 (two nucleus samples p = 0.9, the picker chooses) and
AAD(0.1). AAD's reference is the SFT model for every model (the base every adapter was trained
from and the DPO reference of iterations 0, 1, 2); for 1', whose DPO reference was iteration 0,
a second AAD row uses iteration 0 as the reference. Win rate = the model beats iteration 0 under
the same decoder on a held-out prompt (ties count 1/2), as in the paper's Table 9.

Every number is recomputed from decodes, teacher-forced log-probabilities and the exact oracle.
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

from . import task
from .tokenizer import render_prompt, stop_ids

ITERATIONS = (("iteration 0", "dpo"), ("iteration 1", "dpo_iter1"),
              ("iteration 1'", "dpo_iter1p"), ("iteration 2", "dpo_iter2"))
#: diagnostic variants of iteration 1, scored when present (``iterate --ablations``)
ABLATIONS = (("iteration 1, oracle-relabelled pairs", "dpo_iter1_oracle"),
             ("iteration 1, half the DPO steps", "dpo_iter1_weak"))
ALPHA = 0.1
COMPONENTS = ("correct", "complete", "polite", "rude", "filler", "repetition", "rambling")


def _models(root: Path):
    """``(sft, tok, picker, picker_tok, {label: PeftModel})`` in float32, eval mode."""
    from .assets import load_default_pair
    from .iterate import load_adapter_model
    missing = [d for _, d in ITERATIONS if not (root / d / "adapter_config.json").is_file()]
    if missing:
        raise ValueError(f"--dir {root}: no adapter {', '.join(missing)} (train them with "
                         f"`python -m aad_fast.toy.iterate --out {root}`, which also links "
                         "sft/, picker/ and dpo/ there)")
    sft, _, tok, picker, picker_tok = load_default_pair("cpu", root=root)
    present = ITERATIONS + tuple((label, d) for label, d in ABLATIONS
                                 if (root / d / "adapter_config.json").is_file())
    return sft, tok, picker, picker_tok, {label: load_adapter_model(root, root / d)
                                          for label, d in present}


def _merged(peft_model):
    """A plain causal LM with the adapter folded in (a copy; ``peft_model`` is untouched)."""
    import copy
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def decoders(picker, picker_tok):
    """``(name, rule)`` of the three decoders of Table 9."""
    from ..rules import AAD, BestOfN, Greedy
    return [("greedy", Greedy("a")), ("best-of-2", BestOfN(2, picker=(picker, picker_tok))),
            (f"AAD ({ALPHA})", AAD(ALPHA))]


def _decode(dec, rule, prompts, max_new, batch):
    out = []
    for i in range(0, len(prompts), batch):
        out += dec.generate(prompts[i:i + batch], rule=rule, chat=True, max_new_tokens=max_new,
                            stop=stop_ids(dec.tokenizer)).text
    return out


def win_rate(xs, ys) -> float:
    """Share of prompts where ``xs`` beats ``ys`` (ties count one half)."""
    return sum((x > y) + 0.5 * (x == y) for x, y in zip(xs, ys)) / len(xs)


def table(root: Path, problems, *, max_new_tokens=32, batch_size=32):
    """Rewards of every (model, decoder) on ``problems``; returns ``(rows, texts, models)``."""
    from ..rules import AAD
    from ..decoder import Decoder
    sft, tok, picker, picker_tok, models = _models(root)
    prompts = [p.prompt for p in problems]
    texts = {}
    for label, model in models.items():
        with Decoder(model, tokenizer=tok, max_batch_size=2 * batch_size,  # best-of-2: 2 rows each
                     max_seq_len=128) as dec:
            for name, rule in decoders(picker, picker_tok):
                texts[(label, name, "sft")] = _decode(dec, rule, prompts, max_new_tokens,
                                                      batch_size)
        print(f"  {label}: decoded", file=sys.stderr)
    # iteration 1' against its own DPO reference (iteration 0): two plain models
    with Decoder(_merged(models["iteration 1'"]), _merged(models["iteration 0"]), tokenizer=tok,
                 max_batch_size=batch_size, max_seq_len=128) as dec:
        texts[("iteration 1'", f"AAD ({ALPHA})", "iteration 0")] = _decode(
            dec, AAD(ALPHA), prompts, max_new_tokens, batch_size)
    rewards = {k: [task.oracle_reward(p, t) for p, t in zip(problems, v)]
               for k, v in texts.items()}
    rows = []
    for (label, name, ref), rs in rewards.items():
        base = rewards[("iteration 0", name, "sft")]
        comp = {c: sum(task.reward_breakdown(p, t)[c] for p, t in
                       zip(problems, texts[(label, name, ref)])) / len(problems)
                for c in COMPONENTS}
        rows.append({"model": label, "decoder": name,
                     "aad_reference": ref if name.startswith("AAD") else None,
                     "mean_reward": sum(rs) / len(rs),
                     "win_rate_vs_iter0": None if label == "iteration 0" else win_rate(rs, base),
                     "components": comp})
    for label in models:  # the paper's Fig. 10: AAD against best-of-2 within one model
        aad, bo2 = rewards[(label, f"AAD ({ALPHA})", "sft")], rewards[(label, "best-of-2", "sft")]
        rows.append({"model": label, "decoder": "AAD vs best-of-2", "aad_reference": "sft",
                     "mean_reward": None, "win_rate_vs_iter0": None,
                     "aad_over_bo2_win_rate": win_rate(aad, bo2)})
    return rows, texts, (sft, tok, models)


# ----------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def completion_logprob(model, tok, question: str, completions: list[str]) -> torch.Tensor:
    """Teacher-forced log-probability of each completion (its words and ``<eos>``) after the
    chat-rendered ``question``: float64 ``[len(completions)]``."""
    n_prompt = len(tok(render_prompt(tok, question))["input_ids"])
    seqs = [tok.apply_chat_template([{"role": "user", "content": question},
                                     {"role": "assistant", "content": c}],
                                    tokenize=True)["input_ids"] for c in completions]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    tok_lp = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    keep = torch.zeros_like(tok_lp)
    for i, s in enumerate(seqs):
        keep[i, n_prompt - 1:len(s) - 1] = 1
    return (tok_lp * keep).sum(1)


def _pair_accuracy(score, reward, parts):
    """Pairwise agreement of ``score`` with the oracle on pairs of one prompt's candidates with
    different rewards: all such pairs, pairs differing in the correctness term, and pairs with
    the same correctness term (style only). Ties in ``score`` count one half."""
    acc = {"all": [0.0, 0], "correctness": [0.0, 0], "style": [0.0, 0]}
    for i, j in itertools.combinations(range(len(reward)), 2):
        if reward[i] == reward[j]:
            continue
        hi, lo = (i, j) if reward[i] > reward[j] else (j, i)
        hit = 1.0 if score[hi] > score[lo] else 0.5 if score[hi] == score[lo] else 0.0
        kind = "correctness" if parts[i]["correct"] != parts[j]["correct"] else "style"
        for k in ("all", kind):
            acc[k][0] += hit
            acc[k][1] += 1
    return acc


def log_ratio_ranking(sft, tok, models, problems, *, samples=8, seed=0):
    """Does each model's log-ratio against SFT (its implicit DPO reward) still rank the oracle's
    preferences? Candidates per prompt: ``samples`` SFT samples at temperature 1 plus the
    oracle's best completion, de-duplicated. Returns pairwise accuracies per model (and for
    iteration 1' also against iteration 0) and the plain likelihood's for comparison."""
    from .train import sample_completions
    questions = [p.prompt for p in problems]
    draws = [sample_completions(sft, tok, questions, seed=seed + k) for k in range(samples)]
    scores = {f"{m} vs sft": {"all": [0.0, 0], "correctness": [0.0, 0], "style": [0.0, 0]}
              for m in models}
    scores["iteration 1' vs iteration 0"] = {k: [0.0, 0] for k in ("all", "correctness", "style")}
    scores.update({f"{m} likelihood": {k: [0.0, 0] for k in ("all", "correctness", "style")}
                   for m in models})
    n_cands = 0
    for i, p in enumerate(problems):
        cands = list(dict.fromkeys([d[i] for d in draws] + [task.best_completion(p)]))
        n_cands += len(cands)
        reward = [task.oracle_reward(p, c) for c in cands]
        parts = [task.reward_breakdown(p, c) for c in cands]
        lp_sft = completion_logprob(sft, tok, p.prompt, cands)
        lp = {m: completion_logprob(mod, tok, p.prompt, cands) for m, mod in models.items()}
        todo = {f"{m} vs sft": lp[m] - lp_sft for m in models}
        todo["iteration 1' vs iteration 0"] = lp["iteration 1'"] - lp["iteration 0"]
        todo.update({f"{m} likelihood": lp[m] for m in models})
        for key, s in todo.items():
            for kind, (hit, n) in _pair_accuracy(s.tolist(), reward, parts).items():
                scores[key][kind][0] += hit
                scores[key][kind][1] += n
    out = {k: {kind: (hit / n if n else None) for kind, (hit, n) in v.items()}
           for k, v in scores.items()}
    pairs = {kind: n for kind, (_, n) in scores["iteration 0 vs sft"].items()}
    return {"prompts": len(problems), "candidates": n_cands, "pairs": pairs, "accuracy": out}


@torch.no_grad()
def answer_filter(sft, tok, models, problems, *, alpha=ALPHA):
    """At the answer word of the oracle's best completion (context ``sure ! the capital of peru
    is``) and of a terse answer (the first completion token): how often the alpha filter of
    each model admits a wrong answer word, whether AAD (against SFT) and greedy pick the
    correct answer, the model's probability of the correct word, and the log-ratio against SFT
    of the correct word and (mean) of the wrong ones. Returns means per context and model."""
    from ..ops import aad_select
    vocab = len(tok)
    res = {}
    for ctx in ("full", "terse"):
        stats = {m: {"wrong_admitted": 0, "aad_correct": 0, "aad_wrong": 0, "greedy_correct": 0,
                     "p_correct": 0.0, "log_ratio_correct": 0.0, "log_ratio_wrong_mean": 0.0}
                 for m in models}
        for p in problems:
            prefix = "" if ctx == "terse" else \
                f"{task.POLITE_OPENERS[0]} {p.restatement.rsplit(' ', 1)[0]}"
            text = render_prompt(tok, p.prompt) + (" " + prefix if prefix else "")
            ids = torch.tensor([tok(text)["input_ids"]])
            wrong = sorted(task.candidates(p.kind) - {p.answer} - set(p.prompt.split()))
            wrong_ids = [tok.convert_tokens_to_ids(w) for w in wrong]
            answer_id = tok.convert_tokens_to_ids(p.answer)
            r = sft(input_ids=ids).logits[:, -1].float()
            lp_r = torch.log_softmax(r[0, :vocab].double(), -1)
            for m, mod in models.items():
                a = mod(input_ids=ids).logits[:, -1].float()
                lp = torch.log_softmax(a[0, :vocab], -1)
                ratio = torch.log_softmax(a[0, :vocab].double(), -1) - lp_r
                admitted = lp >= lp.max() + torch.log(torch.tensor(alpha))
                pick = int(aad_select(a, r, alpha, vocab_size=vocab)[0])
                st = stats[m]
                st["wrong_admitted"] += bool(admitted[wrong_ids].any())
                st["aad_correct"] += pick == answer_id
                st["aad_wrong"] += pick in wrong_ids
                st["greedy_correct"] += int(lp.argmax()) == answer_id
                st["p_correct"] += float(lp[answer_id].exp())
                st["log_ratio_correct"] += float(ratio[answer_id])
                st["log_ratio_wrong_mean"] += float(ratio[wrong_ids].mean())
        res[ctx] = {m: {k: v / len(problems) for k, v in st.items()} for m, st in stats.items()}
    return res


def evaluate_iterations(a) -> dict:
    """The table and (unless ``--no-diagnose``) the diagnostics on the held-out prompts."""
    from ..bench.machine import portable_path
    from .assets import default_pair_dir
    root = Path(a.dir) if getattr(a, "dir", None) else default_pair_dir()
    problems = task.split_problems()[1]
    if a.limit:
        problems = problems[:a.limit]
    t0 = time.perf_counter()
    rows, texts, (sft, tok, models) = table(root, problems, max_new_tokens=a.max_new_tokens,
                                            batch_size=a.batch_size)
    out = {"prompts": len(problems), "split": "held-out (10%)",
           "dir": portable_path(root, "PAIR_DIR"), "rows": rows, "max_new_tokens": a.max_new_tokens}
    if not getattr(a, "no_diagnose", False):
        out["log_ratio_ranking"] = log_ratio_ranking(sft, tok, models, problems)
        out["answer_filter"] = answer_filter(sft, tok, models, problems)
    out["seconds"] = time.perf_counter() - t0
    return out


def markdown(result: dict) -> str:
    """Table 9 in miniature: mean reward (win rate against iteration 0) per model and decoder."""
    cells = {(r["model"], r["decoder"], r["aad_reference"]): r for r in result["rows"]}
    lines = [f"Held-out prompts: {result['prompts']}; cell = mean oracle reward (win rate "
             "against iteration 0 under the same decoder, ties 1/2). AAD's reference: SFT.", "",
             f"| model | greedy | best-of-2 | AAD ({ALPHA}) | AAD beats best-of-2 |",
             "|---|---:|---:|---:|---:|"]

    def cell(r):
        w = r["win_rate_vs_iter0"]
        return f"{r['mean_reward']:+.3f}" + ("" if w is None else f" ({100 * w:.1f}%)")

    for label in dict.fromkeys(r["model"] for r in result["rows"]):
        lines.append(f"| {label} | {cell(cells[(label, 'greedy', None)])} | "
                     f"{cell(cells[(label, 'best-of-2', None)])} | "
                     f"{cell(cells[(label, f'AAD ({ALPHA})', 'sft')])} | "
                     f"{100 * cells[(label, 'AAD vs best-of-2', 'sft')]['aad_over_bo2_win_rate']:.1f}% |")
    r = cells[("iteration 1'", f"AAD ({ALPHA})", "iteration 0")]
    lines.append(f"| iteration 1', AAD against iteration 0 | | | {cell(r)} | |")
    return "\n".join(lines)
