"""The AAD paper's iterative DPO (its Section 6, Fig. 6, Table 9) in miniature on the toy task.

    python -m aad_fast.toy.iterate --out DIR [--root PAIR_DIR]

Starting from a trained pair (default: the shipped one, ``aad_fast/default_pair``):

* **iteration 0**: ``PAIR_DIR/dpo``, the DPO adapter trained on 10% of the oracle-ranked pairs.
* **round-1 pairs**: on the distinct prompts of ``PAIR_DIR/dpo_pairs.jsonl`` (the 10% subset),
  chosen = AAD(``--alpha``) with iteration 0 against SFT, rejected = a nucleus sample
  (p = 0.9, temperature 1) of iteration 0; rows whose two completions are equal are dropped
  (their DPO gradient is zero).
* **iteration 1** (``dpo_iter1``): a fresh LoRA adapter, DPO from SFT (reference SFT) on them.
* **iteration 1'** (``dpo_iter1p``): the same data, DPO *continued from iteration 0*: the
  iteration-0 adapter is trained further, and TRL's reference is a frozen copy of it, i.e. the
  iteration-0 model (the paper starts 1' from the aligned model; with LoRA, continuing the one
  adapter keeps the result a rank-``r`` adapter over SFT, shippable and decodable as a LoRA pair).
* **round-2 pairs**: chosen = AAD with iteration 1 against SFT, rejected kept from round 1.
* **iteration 2** (``dpo_iter2``): a fresh adapter, DPO from SFT on them.

DPO settings (beta, learning rate, epochs, batch, LoRA rank) are those of ``toy.train``
(overridable here). ``DIR`` receives the three adapters (base recorded as ``../sft``), both
pair files, ``iterate_meta.json`` (pair statistics against the oracle, training logs, wall
time) and links to ``PAIR_DIR``'s ``sft``, ``picker`` and ``dpo``, so that ``aad-fast evaluate
--iterations --dir DIR`` scores them; copying the adapter directories into
``aad_fast/default_pair/`` ships them. ``--ablations`` (or ``--only-ablations`` after a run)
adds two diagnostic variants of iteration 1. About 5 minutes on 2 idle cores (14 on a loaded
one), the ablations 1-4 more.

Needs the ``[train]`` extra (``trl``, ``datasets``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import task
from .tokenizer import stop_ids


def _decode(dec, rule, prompts, max_new_tokens, batch_size):
    """Completions (text) of ``prompts`` under ``rule``, in batches of ``batch_size``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += dec.generate(prompts[i:i + batch_size], rule=rule, chat=True,
                            max_new_tokens=max_new_tokens, stop=stop_ids(dec.tokenizer)).text
    return out


def nucleus_rule(seed: int):
    """Nucleus sampling (p = 0.9, temperature 1) of the aligned stream, as ``make-pairs``."""
    from ..rules import Mix
    return Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=seed)


def aad_chosen(aligned, tok, prompts, *, alpha, max_new_tokens=32, batch_size=32):
    """AAD(``alpha``) completions of ``aligned`` (a LoRA ``PeftModel``) against its base."""
    from ..rules import AAD
    from ..decoder import Decoder
    with Decoder(aligned, tokenizer=tok, max_batch_size=batch_size, max_seq_len=128) as dec:
        return _decode(dec, AAD(alpha), prompts, max_new_tokens, batch_size)


def nucleus_rejected(aligned, tok, prompts, *, seed, max_new_tokens=32, batch_size=32):
    """One nucleus sample of ``aligned`` per prompt; batch ``i`` uses seed ``seed + i``."""
    from ..decoder import Decoder
    out = []
    with Decoder(aligned, tokenizer=tok, max_batch_size=batch_size, max_seq_len=128) as dec:
        for k, i in enumerate(range(0, len(prompts), batch_size)):
            out += _decode(dec, nucleus_rule(seed + k), prompts[i:i + batch_size],
                           max_new_tokens, batch_size)
    return out


def pair_rows(prompts, chosen, rejected):
    """TRL conversational preference rows (with the oracle's rewards); equal pairs dropped."""
    rows = []
    for q, c, r in zip(prompts, chosen, rejected):
        if c == r:
            continue
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}],
                     "chosen_reward": task.oracle_reward(q, c),
                     "rejected_reward": task.oracle_reward(q, r)})
    return rows


def _ok(question, completion) -> bool:
    """The oracle's correctness term is +2: only the right answer word is stated."""
    return task.reward_breakdown(question, completion)["correct"] == 2.0


def pair_stats(prompts, chosen, rejected, rows) -> dict:
    """How good the synthetic pairs are by the oracle: mean rewards, and the share of prompts
    where chosen is better / equal / worse than rejected (the last: mislabeled pairs)."""
    rc = [task.oracle_reward(q, c) for q, c in zip(prompts, chosen)]
    rr = [task.oracle_reward(q, r) for q, r in zip(prompts, rejected)]
    n = len(prompts)
    return {"prompts": n, "pairs": len(rows), "identical_dropped": n - len(rows),
            "chosen_reward": sum(rc) / n, "rejected_reward": sum(rr) / n,
            "chosen_better": sum(a > b for a, b in zip(rc, rr)) / n,
            "tie": sum(a == b for a, b in zip(rc, rr)) / n,
            "chosen_worse": sum(a < b for a, b in zip(rc, rr)) / n,
            # the pairs that can teach the answer word's credit: correctness differs
            "correctness_contrast_right": sum(_ok(q, c) and not _ok(q, r) for q, c, r in
                                              zip(prompts, chosen, rejected)) / n,
            "correctness_contrast_inverted": sum(_ok(q, r) and not _ok(q, c) for q, c, r in
                                                 zip(prompts, chosen, rejected)) / n,
            "chosen_wrong_answer": sum(task.reward_breakdown(q, c)["correct"] < 2
                                       for q, c in zip(prompts, chosen)) / n,
            "rejected_wrong_answer": sum(task.reward_breakdown(q, r)["correct"] < 2
                                         for q, r in zip(prompts, rejected)) / n}


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_adapter_model(root: Path, adapter_dir: Path):
    """A fresh float32 copy of ``root/sft`` with the LoRA adapter at ``adapter_dir``."""
    from transformers import AutoModelForCausalLM

    from ..model.loading import load_adapter
    base = AutoModelForCausalLM.from_pretrained(root / "sft", dtype=torch.float32,
                                                local_files_only=True)
    return load_adapter(base, adapter_dir, is_trainable=False).eval()


def run(a) -> dict:
    """The whole protocol into ``a.out``; returns the metadata written to iterate_meta.json."""
    from transformers import AutoTokenizer

    from .assets import default_pair_dir
    from .train import train_dpo

    root = Path(a.root) if a.root else default_pair_dir()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    targs = _train_args(a, out)
    tok = AutoTokenizer.from_pretrained(root / "sft", local_files_only=True)
    for name in ("sft", "picker", "dpo"):  # OUT then is a whole pair for evaluate --dir
        if not (out / name).exists():
            (out / name).symlink_to((root / name).resolve(), target_is_directory=True)
    with open(root / "dpo_pairs.jsonl") as f:
        prompts = list(dict.fromkeys(json.loads(line)["prompt"][0]["content"] for line in f))
    if a.limit:
        prompts = prompts[:a.limit]
    kw = dict(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    meta = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "root": str(root), "versions": {"torch": torch.__version__}}
    t_all = time.time()

    def aad_pairs(name, adapter, rejected=None):
        """Pairs of ``adapter``'s AAD completions (chosen) against ``rejected`` (default: its
        own nucleus samples), written to ``iter_<name>.jsonl``; (rows, rejected)."""
        t0 = time.time()
        model = load_adapter_model(root, adapter)
        chosen = aad_chosen(model, tok, prompts, alpha=a.alpha, **kw)
        if rejected is None:
            rejected = nucleus_rejected(model, tok, prompts, seed=a.seed, **kw)
        del model
        rows = pair_rows(prompts, chosen, rejected)
        _write_jsonl(out / f"iter_{name}.jsonl", rows)
        meta[name] = dict(pair_stats(prompts, chosen, rejected, rows),
                          seconds=round(time.time() - t0, 1))
        return rows, rejected

    rows1, rejected = aad_pairs("pairs1", root / "dpo")

    def train(name, rows, init):
        t = time.time()
        log = train_dpo(targs, tok, rows, root / "sft", out / name, init)
        import shutil
        shutil.rmtree(out / name / "_trainer", ignore_errors=True)
        meta[name] = {"init": "dpo (iteration 0), reference = iteration 0" if init else
                      "sft, reference = sft", "pairs": len(rows), "final": log[-1],
                      "seconds": round(time.time() - t, 1)}

    train("dpo_iter1", rows1, None)
    train("dpo_iter1p", rows1, root / "dpo")

    rows2, _ = aad_pairs("pairs2", out / "dpo_iter1", rejected)
    train("dpo_iter2", rows2, None)
    if a.ablations:
        ablations(a, targs, tok, root, out, rows1, meta)
    meta["wall_seconds"] = round(time.time() - t_all, 1)
    (out / "iterate_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def oracle_relabelled(rows):
    """``rows`` with chosen/rejected set by the oracle (the better one chosen), ties dropped:
    the same completions with the label noise of "AAD beats a sample" removed."""
    out = []
    for r in rows:
        if r["chosen_reward"] == r["rejected_reward"]:
            continue
        if r["chosen_reward"] < r["rejected_reward"]:
            r = dict(r, chosen=r["rejected"], rejected=r["chosen"],
                     chosen_reward=r["rejected_reward"], rejected_reward=r["chosen_reward"])
        out.append(r)
    return out


def ablations(a, targs, tok, root, out, rows1, meta):
    """Two diagnostic variants of iteration 1 (DPO from SFT): on the round-1 pairs relabelled
    by the oracle (``dpo_iter1_oracle``), and with half the DPO steps (``dpo_iter1_weak``)."""
    import copy
    import shutil

    from .train import train_dpo
    relabelled = oracle_relabelled(rows1)
    weak = copy.copy(targs)
    weak.dpo_epochs = targs.dpo_epochs / 2
    for name, rows, args in (("dpo_iter1_oracle", relabelled, targs),
                             ("dpo_iter1_weak", rows1, weak)):
        t = time.time()
        log = train_dpo(args, tok, rows, root / "sft", out / name, None)
        shutil.rmtree(out / name / "_trainer", ignore_errors=True)
        meta[name] = {"init": "sft, reference = sft", "pairs": len(rows),
                      "dpo_epochs": args.dpo_epochs, "final": log[-1],
                      "seconds": round(time.time() - t, 1)}


def run_only_ablations(a) -> dict:
    """``ablations`` on ``OUT/iter_pairs1.jsonl``; merges into ``OUT/iterate_meta.json``."""
    from transformers import AutoTokenizer

    from .assets import default_pair_dir
    root = Path(a.root) if a.root else default_pair_dir()
    out = Path(a.out)
    meta_path = out / "iterate_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    targs = _train_args(a, out)
    tok = AutoTokenizer.from_pretrained(root / "sft", local_files_only=True)
    with open(out / "iter_pairs1.jsonl") as f:
        rows1 = [json.loads(line) for line in f if line.strip()]
    ablations(a, targs, tok, root, out, rows1, meta)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _train_args(a, out: Path):
    """``toy.train``'s settings for this run's DPO rounds (its defaults, our DPO values)."""
    from .train import DPO_ARGS, parse_args as train_args
    argv = ["--out", str(out), "--seed", str(a.seed)]
    for name in DPO_ARGS:
        argv += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    return train_args(argv)


def parse_args(argv=None):
    from .train import add_dpo_arguments
    p = argparse.ArgumentParser(prog="python -m aad_fast.toy.iterate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--root", type=Path, default=None,
                   help="trained pair with sft/, dpo/, dpo_pairs.jsonl (default: the shipped one)")
    p.add_argument("--alpha", type=float, default=0.1, help="AAD's alpha for the chosen side")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all; smoke)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true",
                   help="also train two diagnostic variants of iteration 1: oracle-relabelled "
                        "pairs (dpo_iter1_oracle) and half the DPO steps (dpo_iter1_weak)")
    p.add_argument("--only-ablations", action="store_true",
                   help="train only the ablations, from OUT/iter_pairs1.jsonl of an earlier run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_dpo_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.only_ablations:
        meta = run_only_ablations(a)
    else:
        meta = run(a)
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}, indent=1))


if __name__ == "__main__":
    main()
