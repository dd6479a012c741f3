"""Model shapes of the bench: the configs in ``aad_fast/bench/configs/*.json`` (package data, so
an installed package has them), random-weight models and the
LoRA pair built from them (seeded; nothing is downloaded), and the parameter, weight and KV-cache
byte counts the bandwidth floor is computed from."""
from __future__ import annotations

import json
from pathlib import Path

import torch

REAL_SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-0.6b", "qwen3-4b",
               "olmo-2-7b")
CPU_SHAPES = ("smollm2-135m", "qwen2.5-0.5b", "cpu-60m")  # real shapes a CPU decodes in seconds


def default_config_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def load_shape(name: str, config_dir: Path) -> dict:
    path = Path(name) if name.endswith(".json") else Path(config_dir) / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in Path(config_dir).glob("*.json"))
        raise ValueError(f"--models: no config {str(path)!r} (have: {', '.join(have)})")
    return json.loads(path.read_text())


def make_config(shape: dict):
    from transformers import AutoConfig
    fields = {k: v for k, v in shape.items()
              if not k.startswith("_") and k not in ("model_type", "architectures", "torch_dtype")}
    fields.update(eos_token_id=None, pad_token_id=None)  # fixed number of new tokens
    return AutoConfig.for_model(shape["model_type"], **fields)


# The spread of a bench model's next-token logits. A plain random init (std 0.02) gives logits of
# std ~0.5, i.e. a near-uniform next-token distribution in which alpha = 0.1 keeps ~70% of the
# vocabulary; a trained LM keeps a handful (the shipped trained toy pair: ~3 per row). Scaling
# the output projection to logit std 4 gives ~10 of 49152 ids: the choice of every rule, and
# the work of AAD's reference stream (engine.reference_logits), then look like a trained
# model's. Nothing else about the timing depends on the weights' values.
LOGIT_STD = 4.0


def random_model(config, dtype, device, seed: int, logit_std: float | None = LOGIT_STD):
    """A causal LM with seeded random weights built directly on ``device``, without an EOS;
    its output projection scaled so the logits have std ~``logit_std`` (``None``: as
    initialised). A tied embedding is scaled with it (its rows then start the residual stream
    larger; every layer reads that stream through a norm)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if logit_std is not None:
        std = getattr(config, "initializer_range", 0.02) * config.hidden_size ** 0.5
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_std / std)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                               bos_token_id=None)
    return model.eval().requires_grad_(False)


def add_lora(model, seed: int):
    """Wrap ``model`` (in place, as PEFT does) with a rank-64 LoRA on q/k/v; ``lora_B`` is made
    random so the adapter is not a no-op."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj"])
    pm = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return pm.eval().requires_grad_(False)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_weight_bytes(model) -> int:
    """Weights read by one decode step: all parameters but an untied input embedding (only a
    few of its rows are read)."""
    total = param_bytes(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def kv_bytes_per_token(config, elem: int) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv * head_dim * elem


def meta_param_count(config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())
