"""The embedded default pair: a tiny SFT model, its DPO LoRA adapter, the tokenizer and a picker,
trained by ``python -m aad_fast.toy.train`` on the toy task and shipped in
``aad_fast/default_pair/``. Loading reads local files only (no hub, ``HF_HUB_OFFLINE``-safe).

Layout of the directory::

    sft/              LlamaForCausalLM (safetensors), generation config (stops: <eos>, <user>),
                      and the word-level tokenizer with its chat template: the one copy, which
                      the adapters (found through their base) and the picker share
    dpo/              PEFT LoRA adapter on q_proj/k_proj/v_proj; base recorded as "../sft"
    dpo_iter1/        iterative DPO (``python -m aad_fast.toy.iterate``), same base: iteration 1
                      (from SFT on chosen = AAD of dpo, rejected = nucleus sample of dpo),
    dpo_iter1p/       iteration 1' (the same pairs, dpo's adapter trained on, reference dpo),
    dpo_iter2/        iteration 2 (from SFT; chosen = AAD of dpo_iter1, rejected kept),
    dpo_iter1_oracle/ diagnostics of iteration 1: its pairs relabelled by the oracle, and
    dpo_iter1_weak/   half the DPO steps (``aad-fast evaluate --iterations`` scores them all)
    picker/           LlamaForSequenceClassification (num_labels=1), sft/'s tokenizer
    draft/            the draft model of speculative decoding (``python -m aad_fast.toy.draft``):
                      a one-layer Llama distilled from the pair's AAD(0.1) outputs, sft/'s
                      tokenizer (``Decoder(..., draft="default", speculate=k)``)
    dpo_pairs.jsonl   the 10% of oracle-ranked pairs DPO and the picker were trained on (its
                      prompts are read by ``quick_eval --pairs-out`` and ``toy.iterate``)
    train_meta.json   training arguments, sizes, losses, versions, wall time
"""
from __future__ import annotations

from pathlib import Path

#: ``base_model_name_or_path`` written into the shipped adapters: the SFT model's directory
#: relative to the adapter's own directory. Load the base explicitly; never resolve it on a hub.
ADAPTER_BASE_MARKER = "../sft"


def default_pair_dir() -> Path:
    """Directory of the shipped pair inside the installed package."""
    return Path(__file__).resolve().parent.parent / "default_pair"


def load_default_pair(device="cpu", *, root: str | Path | None = None, adapter: str = "dpo"):
    """Load the shipped pair (or a pair trained into ``root``) in float32, in eval mode.

    Args:
        device: where to put the models.
        root: a directory written by ``aad_fast.toy.train`` (default ``default_pair_dir()``).
        adapter: the adapter's directory name inside ``root`` (``dpo``, or e.g. ``dpo_iter1``).
    Returns:
        ``(sft_model, dpo_model, tokenizer, picker_model, picker_tokenizer)``: ``sft_model`` a
        ``LlamaForCausalLM``; ``dpo_model`` a ``peft.PeftModel`` over its *own* copy of the SFT
        weights (PEFT injects LoRA layers into the model it wraps, so the two never share
        modules); ``picker_model`` a ``LlamaForSequenceClassification`` with one output.
    """
    from ..model.loading import load_adapter
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    root = Path(root) if root is not None else default_pair_dir()
    if not (root / "sft" / "config.json").is_file():
        raise FileNotFoundError(f"no trained pair in {root} (expected {root / 'sft'}/config.json)")
    kw = {"local_files_only": True}
    tok = AutoTokenizer.from_pretrained(root / "sft", **kw)
    sft = AutoModelForCausalLM.from_pretrained(root / "sft", dtype="float32", **kw)
    base = AutoModelForCausalLM.from_pretrained(root / "sft", dtype="float32", **kw)
    dpo = load_adapter(base, root / adapter, is_trainable=False)
    picker = AutoModelForSequenceClassification.from_pretrained(root / "picker", dtype="float32",
                                                                **kw)
    # a picker directory without a tokenizer of its own shares sft/'s (the shipped layout)
    has_tok = (root / "picker" / "tokenizer_config.json").is_file()
    picker_tok = AutoTokenizer.from_pretrained(root / "picker", **kw) if has_tok else tok
    return (sft.to(device).eval(), dpo.to(device).eval(), tok, picker.to(device).eval(),
            picker_tok)
