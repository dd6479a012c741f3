"""Train the toy pair's draft model for speculative decoding (issue 26), with the toy's own
training code, and measure how often the rule accepts what it proposes.

    python -m aad_fast.toy.draft --out aad_fast/default_pair/draft

1. **Teacher outputs**: the shipped pair decodes every training prompt (``task.split_problems``,
   the same 90% the SFT model saw) with ``--teacher`` (default ``aad``: AAD(0.1) of the DPO
   LoRA adapter against its SFT base, the rule speculation must reproduce; ``dpo``/``sft``:
   greedy on one model); each completion is kept up to and including its first stop id
   (``<eos>`` or ``<user>``: the rule's last choice, which a draft proposes too).
2. **Distillation**: a smaller ``LlamaForCausalLM`` (``train.model_config``: same tokenizer and
   padded vocabulary, ``--hidden``/``--layers``/``--heads``) trained by ``train.train_sft`` on
   the chat-rendered prompt + teacher completion, loss on the completion only; stored in
   bfloat16 (the acceptance below is measured on exactly the stored weights).
3. **Acceptance** on the held-out prompts against the teacher's outputs there: per token (the
   draft's greedy choice after the rule's own prefix equals the rule's next token) and, for
   each ``k``, the speculative loop itself (``decode.drafts.ModelDraft`` proposes ``k``, the
   longest prefix equal to the rule's tokens is accepted plus the rule's own next token):
   mean accepted length and emitted tokens per verify step.

``DIR`` then holds the model (``config.json``, ``model.safetensors``, ``generation_config.json``)
and ``draft_meta.json`` (arguments, sizes, losses, acceptance, versions, wall time); no
tokenizer: shipped as ``default_pair/draft`` it shares ``sft/``'s one copy, which
``make_draft("default")`` checks against the decoder's.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from . import task
from .tokenizer import render_prompt, stop_ids

TEACHERS = ("aad", "dpo", "sft")


def teacher_rule(name: str, alpha: float = 0.1):
    from ..rules import AAD, Greedy
    return {"aad": AAD(alpha), "dpo": Greedy("a"), "sft": Greedy("r")}[name]


def teacher_outputs(dec, rule, questions, *, max_new_tokens: int = 32, batch_size: int = 64):
    """Per question, the rule's completion ids up to and including its first stop id (decoded
    with no stop, then cut: choices before a stop do not depend on it)."""
    stops = set(stop_ids(dec.tokenizer))
    out = []
    for i in range(0, len(questions), batch_size):
        gen = dec.generate(questions[i:i + batch_size], rule=rule, chat=True,
                           max_new_tokens=max_new_tokens, stop=[])
        for row in gen.tokens:
            cut = next((j for j, t in enumerate(row) if t in stops), len(row) - 1)
            out.append(list(row[:cut + 1]))
    return out


def prompt_ids(tok, question: str) -> list[int]:
    return tok(render_prompt(tok, question))["input_ids"]


def draft_examples(tok, questions, completions):
    """``(ids, n_prompt)`` per question, as ``train.train_sft`` takes them."""
    out = []
    for q, c in zip(questions, completions):
        p = prompt_ids(tok, q)
        out.append((p + list(c), len(p)))
    return out


@torch.no_grad()
def per_token_acceptance(model, tok, questions, completions) -> float:
    """The share of completion tokens the draft's greedy choice after the true prefix gets
    right (teacher forcing)."""
    right = total = 0
    for q, c in zip(questions, completions):
        p = prompt_ids(tok, q)
        ids = torch.tensor([p + list(c)])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
        right += int((logits.argmax(-1) == torch.tensor(c)).sum())
        total += len(c)
    return right / max(1, total)


def speculative_acceptance(model, tok, questions, completions, k: int,
                           batch_size: int = 16) -> dict:
    """The speculative loop over the held-out prompts with ``ModelDraft`` proposing ``k``:
    accepted = the longest prefix of the proposal equal to the rule's tokens; the step emits
    those plus the rule's own next token. Returns the mean accepted length, the share of
    drafted tokens accepted and the tokens emitted per step."""
    from ..decode.drafts import ModelDraft
    width = max(len(prompt_ids(tok, q)) + len(c) for q, c in zip(questions, completions))
    draft = ModelDraft(model, target_tokenizer=tok, max_batch_size=batch_size,
                       max_seq_len=width + 1)
    steps = accepted = drafted = emitted = 0
    for i in range(0, len(questions), batch_size):
        truth = {row: list(c) for row, c in enumerate(completions[i:i + batch_size])}
        done = {row: 0 for row in truth}
        for row, q in enumerate(questions[i:i + batch_size]):
            draft.start(row, prompt_ids(tok, q))
        while truth:
            rows = sorted(truth)
            for row, prop in zip(rows, draft.propose(rows, k)):
                want = truth[row][done[row]:]
                j = next((n for n, (a, b) in enumerate(zip(prop, want)) if a != b),
                         min(len(prop), len(want)))
                got = want[:j + 1]
                draft.accept(row, got)
                done[row] += len(got)
                steps, accepted, drafted, emitted = (steps + 1, accepted + min(j, len(want)),
                                                     drafted + len(prop), emitted + len(got))
                if done[row] >= len(truth[row]):
                    draft.free(row)
                    del truth[row]
    return {"k": k, "steps": steps, "mean_accepted": accepted / steps,
            "accept_rate": accepted / max(1, drafted), "tokens_per_step": emitted / steps}


def train_draft(a, tok, examples, meta: dict):
    """The draft model, trained by ``train.train_sft`` and rounded to bfloat16 as stored."""
    from .train import train_lm
    model, meta["training"] = train_lm(tok, examples, (a.hidden, a.layers, a.heads, a.heads),
                                       epochs=a.epochs, batch_size=a.batch, lr=a.lr,
                                       seed=a.seed)
    return model.to(torch.bfloat16).to(torch.float32).eval()


def run(a) -> dict:
    from ..decoder import Decoder
    from .assets import load_default_pair
    meta: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    t0 = time.time()
    sft, dpo, tok, _, _ = load_default_pair("cpu")
    train, held = task.split_problems(seed=a.split_seed)
    q_train, q_held = [p.prompt for p in train], [p.prompt for p in held]
    rule = teacher_rule(a.teacher, a.alpha)
    with Decoder(dpo, tokenizer=tok, max_batch_size=64, max_seq_len=128) as dec:
        c_train = teacher_outputs(dec, rule, q_train)
        c_held = teacher_outputs(dec, teacher_rule("aad", a.alpha), q_held)
    meta["teacher"] = {"rule": a.teacher, "train_prompts": len(q_train),
                       "train_tokens": sum(map(len, c_train)),
                       "held_out_prompts": len(q_held), "held_out_tokens": sum(map(len, c_held)),
                       "seconds": round(time.time() - t0, 1)}
    model = train_draft(a, tok, draft_examples(tok, q_train, c_train), meta)
    meta["acceptance_vs_aad_held_out"] = {
        "per_token": per_token_acceptance(model, tok, q_held, c_held),
        "speculative": [speculative_acceptance(model, tok, q_held, c_held, k) for k in a.ks]}
    meta["sft_per_token_acceptance_vs_aad_held_out"] = per_token_acceptance(sft, tok, q_held,
                                                                           c_held)
    a.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(a.out, safe_serialization=True)
    import transformers
    meta["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    meta["wall_seconds"] = round(time.time() - t0, 1)
    (a.out / "draft_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m aad_fast.toy.draft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--teacher", choices=TEACHERS, default="aad",
                   help="whose outputs the draft learns (default aad: AAD(--alpha) of the pair)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6],
                   help="k of the speculative acceptance (comma list)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    meta = run(a)
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}, indent=1))


if __name__ == "__main__":
    main()
