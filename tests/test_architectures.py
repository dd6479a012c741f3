"""Architectures beyond the engine forward's (``fast_decoder.TYPES``): the model's own forward
over aad_fast's static cache, left-padded rows included, gives the naive loop's tokens; a LoRA
layer that does not see the batch's rows (mixture-of-experts blocks, routers) and a model that
derives positions from the cache length are refused with an error that says what to do."""
import copy

import pytest
import torch
from conftest import EOS, PROMPTS, VOCAB, aad_pick, naive_decode

from aad_fast import AAD, Decoder

COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.35, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
              tie_word_embeddings=False)
# model_type -> config fields over COMMON (None: drop the field)
ARCHS = {
    "gpt2": dict(n_embd=48, n_layer=2, n_head=4, n_positions=256, hidden_size=None,
                 intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
                 num_key_value_heads=None, max_position_embeddings=None),
    "gpt_neox": dict(num_key_value_heads=None),
    "phi3": {},
    "gemma2": dict(head_dim=12),
    "granite": {},
    "starcoder2": {},
    "cohere": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=48),
}


def arch_model(arch: str, seed: int, **over):
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = {**COMMON, **ARCHS.get(arch, {}), **over}
    cfg = AutoConfig.for_model(arch, **{k: v for k, v in fields.items() if v is not None})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def lora(base, targets, seed=0):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.4)  # PEFT starts B at 0: make the adapter matter
    return pm.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_models_on_the_models_own_forward_equal_the_naive_loop(arch):
    """PROMPTS have three lengths: the batch is left-padded, each row decoded alone in the
    reference loop."""
    a, r = arch_model(arch, 0), arch_model(arch, 1)
    with Decoder(a, r, max_batch_size=4, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert got.stats["forward"] == "hf"
    assert got.tokens == naive_decode(aad_pick(0.1), (a, r), PROMPTS, 10)


@pytest.mark.parametrize("arch,targets", [("phi3", ["qkv_proj", "o_proj", "gate_up_proj"]),
                                          ("gemma2", "all-linear"),
                                          ("qwen2_moe", ["q_proj", "k_proj", "v_proj"])])
def test_lora_pair_on_the_models_own_forward_equals_the_merged_adapter(arch, targets):
    base = arch_model(arch, 0)
    sft = copy.deepcopy(base)
    pm = lora(base, targets)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    with Decoder(pm, max_batch_size=4, max_seq_len=40) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert got.stats["pair"] == "lora"
    assert got.tokens == naive_decode(aad_pick(0.1), (merged, sft), PROMPTS, 10)


@pytest.mark.parametrize("targets,layer", [
    (["shared_expert.gate_proj"], "shared_expert.gate_proj"),  # sees the tokens flattened
    ("all-linear", "shared_expert"),
])
def test_lora_on_layers_that_do_not_see_the_rows_is_refused(targets, layer):
    """A mixture-of-experts block flattens its tokens to ``[rows * T, H]``: "the first n rows"
    would be the first n tokens, a silently wrong adapter. Refused when the Decoder is built,
    naming the layer and the way out."""
    pm = lora(arch_model("qwen2_moe", 0), targets)
    with pytest.raises(ValueError, match=rf"{layer}.*does not see the batch's rows.*"
                                         r"target_modules.*two models"):
        Decoder(pm, max_batch_size=2, max_seq_len=40)


def test_lora_on_a_router_that_returns_a_tuple_is_refused():
    from torch import nn

    class Router(nn.Linear):  # as some MoE routers: an nn.Linear that returns more
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.softmax(-1)

    base = arch_model("llama", 0)
    mlp = base.model.layers[0].mlp
    inner = mlp.forward
    mlp.router = Router(48, 4)
    mlp.forward = lambda x: (mlp.router(x)[0].sum(-1, keepdim=True) * 0 + inner(x))
    pm = lora(base, ["router"])
    with pytest.raises(ValueError, match=r"router does not see.*output a tuple"):
        Decoder(pm, max_batch_size=2, max_seq_len=40)


@pytest.mark.parametrize("arch,fields", [
    ("bloom", dict(n_layer=2, n_head=4, hidden_size=48)),
    ("opt", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=48, ffn_dim=96,
                 word_embed_proj_dim=48)),
])
def test_models_that_take_positions_from_the_cache_length_are_refused(arch, fields):
    """Bloom (ALiBi) and OPT (learned positions) ask the cache for one length for the whole
    batch; every aad_fast row has its own. A clear error, not a crash deep in the forward."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(arch, vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=0,
                               bos_token_id=1, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with Decoder(model, copy.deepcopy(model), max_batch_size=2, max_seq_len=40) as dec:
        with pytest.raises(ValueError, match=rf"model_type '{arch}'.*not supported.*position_ids"):
            dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=4)


def test_a_model_loaded_with_flex_attention_decodes_on_masked_attention():
    """flex_attention expects a block mask (handed a 4-D float mask it crashed the process on
    CPU): the engine's own copy of the model runs sdpa, the user's keeps flex."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(
            tiny_config("llama"), attn_implementation="flex_attention").float().eval())
    want = naive_decode(aad_pick(0.1), models, PROMPTS, 10)
    for forward in ("hf", "fast"):
        with Decoder(*models, max_batch_size=3, max_seq_len=40, forward=forward) as dec:
            assert dec.generate(input_ids=PROMPTS, rule=AAD(0.1),
                                max_new_tokens=10).tokens == want
    assert models[0].config._attn_implementation == "flex_attention"


def test_attention_without_per_row_masks_is_switched_in_the_view_only():
    from aad_fast.model.runner import masked_attention
    model = arch_model("llama", 0)
    model.config._attn_implementation = "flash_attention_2"  # as loaded with flash-attn
    view = copy.deepcopy(model)
    masked_attention(view)
    assert view.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "flash_attention_2"


def test_a_lora_adapter_on_the_embeddings_is_refused_naming_the_layer():
    """PEFT keeps an embedding's LoRA weights apart (lora_embedding_A/B): the check said
    "exactly one active adapter is supported, got ['default']" of a one-adapter model."""
    pm = lora(arch_model("llama", 0), ["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match=r"embed_tokens wraps Embedding.*nn\.Linear only"):
        Decoder(pm, max_batch_size=1, max_seq_len=40)


def test_a_checkpoint_that_needs_its_own_code_is_refused_without_running_or_asking(tmp_path):
    """An ``auto_map`` config of an unknown model type: transformers would ask on a terminal
    whether to run the checkpoint's code; the path loader never does, and says how to."""
    import json
    model = arch_model("llama", 0)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="my_remote_llama",
               auto_map={"AutoConfig": "conf.MyConfig", "AutoModelForCausalLM": "mod.MyModel"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "conf.py").write_text("raise SystemExit('the checkpoint code ran')\n")
    with pytest.raises(ValueError, match="never runs a checkpoint's own code"):
        Decoder(str(tmp_path), str(tmp_path), max_batch_size=1, max_seq_len=40)
