"""Train the toy SFT/DPO pair and its picker: the AAD paper's recipe in small, on a 2-core CPU.

    python -m aad_fast.toy.train --out DIR                      # SFT, pairs, DPO, picker
    python -m aad_fast.toy.train --out DIR --pairs pairs.jsonl  # one round of iterative DPO

The full run (seeded; about 10 minutes on 2 cores, most of it SFT):

1. **SFT**: a small ``LlamaForCausalLM`` from a config (random init) trained on demonstrations of
   mixed quality (``task.sample_demonstration``) for the training prompts; loss on the assistant
   tokens only.
2. **Preference pairs**: for every training prompt, completions sampled from the SFT model
   (temperature 1), scored by the exact oracle; in each group the best one is ``chosen`` and the
   worst ``rejected`` (groups whose rewards are all equal give no pair).
3. **DPO** with TRL's ``DPOTrainer``, a LoRA adapter on ``q_proj``/``k_proj``/``v_proj``, on a
   seeded 10% of the pairs (the paper's low-data setting).
4. **Picker**: ``LlamaForSequenceClassification`` (one output) initialised from the SFT backbone
   and trained with TRL's ``RewardTrainer`` on the same 10%.

``DIR`` then holds ``sft/`` (model, generation config, and the tokenizer: the one copy, which
the adapters and the picker share), ``dpo/`` (PEFT adapter, float32), ``picker/`` (model),
``dpo_pairs.jsonl`` (the 10%, TRL conversational format) and ``train_meta.json`` (arguments,
sizes, losses, versions, wall time).
The SFT model and the picker are stored in ``--save-dtype`` (bfloat16 by default, half the
size); the SFT weights are rounded to it right after training, so pairs, DPO and the picker are
built on exactly the stored model.
Adapters record their base as ``../sft`` (relative to the adapter directory), never a hub id.

With ``--pairs FILE`` (TRL ``prompt``/``chosen``/``rejected`` rows, standard or conversational)
the script loads ``DIR/sft`` and trains a new adapter on those pairs into ``DIR/<--name>``:
``--init sft`` starts from the SFT model (the paper's iteration 1), ``--init dpo`` continues the
``DIR/dpo`` adapter with that adapter as the frozen reference (iteration 1').

Needs the ``[train]`` extra (``trl``, ``datasets``).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from . import task
from .assets import ADAPTER_BASE_MARKER
from .tokenizer import build_tokenizer, render_prompt, stop_ids

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_config(tok, hidden: int, layers: int, heads: int, kv_heads: int):
    """The tiny Llama: tied embeddings, vocabulary padded to a multiple of 32 (ids at or beyond
    ``len(tok)`` are padding rows, as in real checkpoints)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-len(tok) // 32) * 32, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def train_lm(tok, examples, shape: tuple, *, epochs: int, batch_size: int, lr: float,
             seed: int):
    """A fresh ``model_config(tok, *shape)`` Llama (seeded) trained by ``train_sft`` on
    ``examples``, with the generation config of the shipped models (stops: ``stop_ids``).
    Returns ``(model, record)``: examples, epoch losses, parameters, seconds."""
    from transformers import GenerationConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tok, *shape))
    losses = train_sft(model, examples, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=stop_ids(tok),
                                               pad_token_id=tok.pad_token_id)
    return model, {"examples": len(examples), "epoch_losses": losses,
                   "params": sum(p.numel() for p in model.parameters()),
                   "seconds": round(time.time() - t0, 1)}


def sft_examples(tok, problems, n_demos: int, rng: random.Random):
    """``(ids, n_prompt)`` per demonstration: the chat-rendered conversation and the length of
    its prompt part (the loss covers the rest, ``<eos>`` included)."""
    out = []
    for p in problems:
        n_prompt = len(tok(render_prompt(tok, p.prompt))["input_ids"])
        for _ in range(n_demos):
            conv = [{"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": task.sample_demonstration(p, rng)}]
            out.append((tok.apply_chat_template(conv, tokenize=True)["input_ids"], n_prompt))
    return out


def train_sft(model, examples, *, epochs: int, batch_size: int, lr: float, seed: int):
    """Plain AdamW loop (linear warm-up, cosine decay); returns the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(examples) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())))
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        total, n = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = [examples[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for row, (seq, n_prompt) in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                labels[row, n_prompt:len(seq)] = ids[row, n_prompt:len(seq)]
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total, n = total + loss.item(), n + 1
        losses.append(total / n)
    model.eval()
    return losses


@torch.no_grad()
def sample_completions(model, tok, questions, *, seed: int, max_new_tokens: int = 32,
                       batch_size: int = 256):
    """One completion per question, sampled at temperature 1 (no top-k/top-p) with the KV cache
    of ``generate``; returns decoded strings without special tokens."""
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(questions), batch_size):
        enc = tok([render_prompt(tok, q) for q in questions[i:i + batch_size]], padding=True,
                  return_tensors="pt")
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tok),
                             pad_token_id=tok.pad_token_id)
        stops = set(stop_ids(tok))
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True))
    return out


def preference_pairs(model, tok, problems, *, group: int, groups: int, seed: int):
    """Oracle-ranked pairs from SFT samples: ``groups`` groups of ``group`` samples per prompt,
    best vs worst in each group. Rows are TRL conversational preference rows plus the rewards."""
    questions = [p.prompt for p in problems]
    samples = [sample_completions(model, tok, questions, seed=seed + k)
               for k in range(group * groups)]
    rows = []
    for i, p in enumerate(problems):
        for g in range(groups):
            cands = [s[i] for s in samples[g * group:(g + 1) * group]]
            rewards = [task.oracle_reward(p, c) for c in cands]
            best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
            if rewards[best] == rewards[worst]:
                continue
            rows.append({"prompt": [{"role": "user", "content": p.prompt}],
                         "chosen": [{"role": "assistant", "content": cands[best]}],
                         "rejected": [{"role": "assistant", "content": cands[worst]}],
                         "chosen_reward": rewards[best], "rejected_reward": rewards[worst]})
    return rows


def _trl_rows(rows, tok):
    """A TRL preference dataset from ``rows``: conversational rows as they are; standard rows
    whose prompt is a bare question get the chat template (a rendered prompt is kept)."""
    from datasets import Dataset

    out = []
    for r in rows:
        row = {k: r[k] for k in ("prompt", "chosen", "rejected")}
        if isinstance(row["prompt"], str) and "<assistant>" not in row["prompt"]:
            row["prompt"] = render_prompt(tok, row["prompt"])
        out.append(row)
    return Dataset.from_list(out)


def _common_args(args, out_dir):
    """TRL arguments shared by DPO and the picker (the paper's schedule: linear decay, 10%
    warm-up, weight decay 0.1, clipping 1.0); CPU, no checkpoints, no reporting."""
    return dict(output_dir=str(out_dir), learning_rate=args.dpo_lr,
                num_train_epochs=args.dpo_epochs,
                per_device_train_batch_size=args.dpo_batch, lr_scheduler_type="linear",
                warmup_steps=0.1, weight_decay=0.1, max_grad_norm=1.0, logging_steps=5,
                report_to="none", save_strategy="no", use_cpu=True, seed=args.seed,
                data_seed=args.seed, disable_tqdm=True, max_length=64, dataloader_num_workers=0,
                gradient_checkpointing=False)


def train_dpo(args, tok, rows, sft_dir: Path, adapter_dir: Path, init_adapter: Path | None):
    """DPO (TRL) of a LoRA adapter on q/k/v over the SFT model; ``init_adapter`` continues an
    existing adapter (the reference is then its frozen copy). Returns the training log."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                             target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        model.peft_config["default"].base_model_name_or_path = str(sft_dir)
        peft_config = None
    cfg = DPOConfig(beta=args.dpo_beta, **_common_args(args, adapter_dir / "_trainer"))
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=_trl_rows(rows, tok),
                         processing_class=tok, peft_config=peft_config)
    if init_adapter is not None and "ref" not in trainer.model.peft_config:
        # TRL copies a pre-trained adapter to "ref" and uses it as the reference; without that
        # copy the reference would silently be the base (SFT), not the model we continue from
        raise RuntimeError(f"DPO from {init_adapter}: TRL made no 'ref' adapter copy")
    trainer.train()
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    _point_adapter_at_package_base(adapter_dir)
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))}
            for h in trainer.state.log_history]


def _point_adapter_at_package_base(adapter_dir: Path):
    """Record the base as ``../sft`` (no hub id, no absolute path); drop PEFT's model card."""
    (adapter_dir / "README.md").unlink(missing_ok=True)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = ADAPTER_BASE_MARKER
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train_picker(args, tok, rows, sft_dir: Path, picker_dir: Path):
    """Bradley-Terry picker (TRL ``RewardTrainer``) initialised from the SFT backbone with a
    fresh one-output head. Returns the training log."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    kw = _common_args(args, picker_dir / "_trainer")
    kw.update(learning_rate=args.picker_lr, num_train_epochs=args.picker_epochs)
    trainer = RewardTrainer(model=model, args=RewardConfig(**kw),
                            train_dataset=_trl_rows(rows, tok), processing_class=tok)
    trainer.train()
    trainer.model.to(SAVE_DTYPES[args.save_dtype]).save_pretrained(picker_dir,
                                                                   safe_serialization=True)
    # no tokenizer here: the picker shares sft/'s, which is shipped once
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))}
            for h in trainer.state.log_history]


def _cleanup(path: Path):
    """Remove a trainer's scratch directory (nothing in it is shipped)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run_full(args, out: Path, meta: dict):
    """SFT, oracle-ranked pairs, DPO adapter and picker into ``out``; fills ``meta``."""
    from transformers import LlamaForCausalLM

    rng = random.Random(args.seed)
    tok = build_tokenizer()
    train, held = task.split_problems(seed=args.split_seed)
    meta.update(n_prompts=len(train) + len(held), n_train_prompts=len(train),
                n_held_out_prompts=len(held))

    sft_dir = out / "sft"
    if args.reuse_sft:
        model = LlamaForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
        meta["sft"] = {"reused": str(sft_dir)}
    else:
        examples = sft_examples(tok, train, args.demos, rng)
        model, meta["sft"] = train_lm(tok, examples, (args.hidden, args.layers, args.heads,
                                                      args.kv_heads), epochs=args.sft_epochs,
                                      batch_size=args.sft_batch, lr=args.sft_lr, seed=args.seed)
        # Stored in --save-dtype; every later stage uses exactly the stored (rounded) weights.
        model.to(SAVE_DTYPES[args.save_dtype]).save_pretrained(sft_dir, safe_serialization=True)
        model.to(torch.float32)
        tok.save_pretrained(sft_dir)

    t0 = time.time()
    rows = preference_pairs(model, tok, train, group=args.pair_group, groups=args.pair_groups,
                            seed=args.seed + 1000)
    subset = random.Random(args.seed + 1).sample(rows, round(len(rows) * args.pair_fraction))
    with open(out / "dpo_pairs.jsonl", "w") as f:
        for r in subset:
            f.write(json.dumps(r) + "\n")
    mean = lambda xs: round(sum(xs) / max(1, len(xs)), 4)  # noqa: E731
    meta["pairs"] = {"all": len(rows), "used": len(subset),
                     "chosen_reward": mean([r["chosen_reward"] for r in subset]),
                     "rejected_reward": mean([r["rejected_reward"] for r in subset]),
                     "seconds": round(time.time() - t0, 1)}

    t0 = time.time()
    meta["dpo"] = {"log": train_dpo(args, tok, subset, sft_dir, out / "dpo", None),
                   "seconds": round(time.time() - t0, 1)}
    t0 = time.time()
    meta["picker"] = {"log": train_picker(args, tok, subset, sft_dir, out / "picker"),
                      "seconds": round(time.time() - t0, 1)}
    _cleanup(out / "dpo" / "_trainer")
    _cleanup(out / "picker" / "_trainer")


def run_iterative(args, out: Path, meta: dict):
    """One round of iterative DPO from ``args.pairs`` into ``out/args.name``; fills ``meta``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "sft")
    with open(args.pairs) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or not all(k in rows[0] for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f"--pairs {args.pairs}: expected JSONL rows with prompt/chosen/rejected")
    init = out / "dpo" if args.init == "dpo" else None
    t0 = time.time()
    meta["iterative_dpo"] = {"pairs": len(rows), "pairs_file": str(args.pairs), "init": args.init,
                             "log": train_dpo(args, tok, rows, out / "sft", out / args.name, init),
                             "seconds": round(time.time() - t0, 1)}
    _cleanup(out / args.name / "_trainer")


DPO_ARGS = ("dpo_beta", "dpo_lr", "dpo_epochs", "dpo_batch", "lora_r")


def add_dpo_arguments(g) -> None:
    """The DPO/LoRA settings (``DPO_ARGS``), shared with ``toy.iterate``."""
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--dpo-lr", type=float, default=5e-4)
    g.add_argument("--dpo-epochs", type=float, default=2)
    g.add_argument("--dpo-batch", type=int, default=16)
    g.add_argument("--lora-r", type=int, default=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m aad_fast.toy.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--pairs", type=Path, help="TRL preference JSONL: run one iterative DPO round")
    p.add_argument("--init", choices=["sft", "dpo"], default="sft",
                   help="with --pairs: start the new adapter from SFT (iteration 1) or from "
                        "DIR/dpo (iteration 1'); default sft")
    p.add_argument("--name", default="dpo_iter1", help="with --pairs: new adapter's directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 90/10 prompt split")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="bfloat16",
                   help="storage dtype of the SFT model and the picker (adapters stay float32)")
    g = p.add_argument_group("model and SFT")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--demos", type=int, default=6, help="demonstrations per training prompt")
    g.add_argument("--sft-epochs", type=int, default=16)
    g.add_argument("--sft-batch", type=int, default=128)
    g.add_argument("--sft-lr", type=float, default=4e-3)
    g.add_argument("--reuse-sft", action="store_true",
                   help="skip SFT and load DIR/sft (to experiment with the later stages)")
    g = p.add_argument_group("preference pairs, DPO and picker")
    g.add_argument("--pair-group", type=int, default=4, help="SFT samples ranked per pair")
    g.add_argument("--pair-groups", type=int, default=8, help="pairs tried per prompt")
    g.add_argument("--pair-fraction", type=float, default=0.1, help="share of pairs used")
    add_dpo_arguments(g)
    g.add_argument("--picker-lr", type=float, default=2e-4)
    g.add_argument("--picker-epochs", type=float, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if args.pairs and meta_path.exists() else {}
    run = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "trl": trl.__version__}}
    t0 = time.time()
    if args.pairs:
        meta.setdefault("iterative_runs", []).append(run)
        run_iterative(args, args.out, run)
    else:
        meta.update(run)
        run_full(args, args.out, meta)
    (run if args.pairs else meta)["wall_seconds"] = round(time.time() - t0, 1)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: v for k, v in (run if args.pairs else meta).items()
                      if k not in ("args", "dpo", "picker", "iterative_dpo")}, indent=1))


if __name__ == "__main__":
    main()
