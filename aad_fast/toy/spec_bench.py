"""The toy pair's rows of ``aad-fast bench --speculative`` (``bench.speculative``): the shipped
pair decodes held-out toy prompts at batch 1 with and without speculation.

Methods (every one on the same prompts, interleaved rounds, ``bench.speculative.time_methods``):

- ``greedy_sft``: the engine's plain greedy on the SFT model (the baseline of every ratio), and
  ``greedy_sft_draft_k*``: the same with the shipped draft (``default_pair/draft``);
- ``aad_lora``: AAD(0.1) of the DPO LoRA adapter over its SFT base (one batch of both
  streams), ``aad_lora_{ngram,draft}_k*`` with speculation;
- ``aad_two``: AAD(0.1) of the DPO model merged into a full model and the SFT model (two
  models), ``aad_two_{ngram,draft}_k*``;
- ``hf_greedy_sft`` and ``hf_assisted_sft_k*``: Hugging Face ``generate()`` greedy on the SFT
  model, alone and with ``assistant_model=`` the shipped draft (HF's own speculative greedy,
  ``k`` drafted tokens per step), the peer of ``greedy_sft_draft_k*``.
"""
from __future__ import annotations

import copy

from ..bench.speculative import add_spec_ratios, engine_method, hf_method, time_methods
from ..bench.machine import log
from ..decode.drafts import DEFAULT_DRAFT_DIR
from ..rules import AAD, Greedy
from . import task
from .assets import load_default_pair
from .tokenizer import render_prompt, stop_ids

TOY_KS = (2, 4, 6)


LABELS = {"greedy_sft": "engine greedy, SFT model", "aad_lora": "engine AAD, LoRA pair",
          "aad_two": "engine AAD, two models", "hf_greedy_sft": "HF generate() greedy, SFT"}


def split_name(name: str):
    """``(baseline method, draft or None, k or None)`` of a method name."""
    if name.startswith("hf_assisted_sft_k"):
        return "hf_greedy_sft", "HF assistant_model=draft", int(name.rsplit("_k", 1)[1])
    for draft in ("ngram", "draft"):
        if f"_{draft}_k" in name:
            base, k = name.split(f"_{draft}_k")
            return base, draft, int(k)
    return name, None, None


def _label(name: str) -> str:
    base, draft, _ = split_name(name)
    return LABELS[base] + (f", {draft}" if draft else "")


def _decoders(sft, dpo, tok, ks):
    """``name: (Decoder, rule)`` of every engine method."""
    from ..decoder import Decoder
    merged = copy.deepcopy(dpo).merge_and_unload().eval()
    kw = dict(tokenizer=tok, max_batch_size=1, max_seq_len=128, threads="keep")
    pairs = {"greedy_sft": ((sft,), Greedy("a")), "aad_lora": ((dpo,), AAD(0.1)),
             "aad_two": ((merged, sft), AAD(0.1))}
    out = {}
    for name, (models, rule) in pairs.items():
        out[name] = (Decoder(*models, **kw), rule)
        for draft in (("draft",) if name == "greedy_sft" else ("ngram", "draft")):
            spec = "default" if draft == "draft" else draft
            for k in ks:
                out[f"{name}_{draft}_k{k}"] = (Decoder(*models, draft=spec, speculate=k, **kw),
                                               rule)
    return out


#: intra-op threads of every toy method: the toy model is too small for a second thread to pay
#: (the engine's own measurement, ``model.threads``, picks one for it), and every method,
#: Hugging Face's included, runs with the same count
TOY_THREADS = 1


def toy_rows(args, device) -> list:
    """Result rows of the toy pair (``bench.speculative.run_speculative``'s ``toy_rows``),
    measured with ``TOY_THREADS`` intra-op threads (the process's count put back after)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(TOY_THREADS)
    try:
        return _toy_rows(args, device)
    finally:
        torch.set_num_threads(before)


def _toy_rows(args, device) -> list:
    from transformers import AutoModelForCausalLM
    sft, dpo, tok, _, _ = load_default_pair(device)
    held = task.split_problems()[1][:args.spec_prompts]
    prompts = [tok(render_prompt(tok, p.prompt))["input_ids"] for p in held]
    stop = stop_ids(tok)
    ks = TOY_KS
    decs = _decoders(sft, dpo, tok, ks)
    methods = {name: engine_method(d, rule, 32, stop) for name, (d, rule) in decs.items()}
    draft = AutoModelForCausalLM.from_pretrained(DEFAULT_DRAFT_DIR, dtype="float32",
                                                 local_files_only=True).to(device).eval()
    methods["hf_greedy_sft"] = hf_method(sft, 32, stop)
    for k in ks:
        methods[f"hf_assisted_sft_k{k}"] = hf_method(sft, 32, stop, draft, k)
    log(f"toy pair: {len(methods)} methods x {len(prompts)} held-out prompts, batch 1")
    res = time_methods(methods, prompts, args.repeats)
    rows = []
    for name, rec in res.items():
        base, _, k = split_name(name)
        rows.append({"model": "toy", "method": name, "label": _label(name), "k": k,
                     "batch": 1, "threads": TOY_THREADS, "prompts": len(prompts), "emitted": rec["emitted"],
                     "ms_per_token": rec["ms_per_token"],
                     "ms_per_token_runs": rec["ms_per_token_runs"],
                     "mean_accepted": rec["mean_accepted"],
                     "x_aad": rec["ms_per_token"] / res[base]["ms_per_token"],
                     "same_tokens": rec["tokens"] == res[base]["tokens"] if k else None})
    add_spec_ratios(rows, "greedy_sft", None)
    for d, _ in decs.values():
        d.close()
    return rows


def run(args) -> int:
    """``aad-fast bench --speculative``."""
    from ..bench.speculative import run_speculative
    return run_speculative(args, toy_rows)
