"""Tiny random models built from configs (never downloaded) and the naive decode loop of
docs/rules.md."""
import math

import pytest
import torch

VOCAB = 61
EOS = 3


def tiny_config(arch: str = "llama", vocab: int = VOCAB, seed_scale: float = 0.35):
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=seed_scale, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
                  tie_word_embeddings=False)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "olmo2": tf.Olmo2Config}[arch]
    if arch in ("qwen3",):
        common["head_dim"] = 12
    return cls(**common)


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    return model.float().eval()


def random_lora(base, seed=0):
    """A rank-4 LoRA (q/k/v) over ``base`` whose ``lora_B`` is random (not a no-op)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                         target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.4)
    return pm.eval()


@pytest.fixture
def pair():
    return tiny_model("llama", 0), tiny_model("llama", 1)


def full_logits(model, seq):
    """Last-position logits of ``seq`` recomputed from scratch (no cache), float32 ``[V]``."""
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1].float()


def naive_decode(pick, models, prompts, max_new, stops=(EOS,), prompts_r=None,
                 min_tokens=None):
    """docs/rules.md's loop, one row at a time: ``pick(a_logits, r_logits, t, history)`` returns
    the id. ``prompts_r`` gives stream r its own prompt (OPAD, CFG); both streams append the
    same id. ``min_tokens``: ``pick`` also gets the ids it may not choose (the stop ids while
    ``t < min_tokens``, else none)."""
    out = []
    for i, p in enumerate(prompts):
        seq_a = list(p)
        seq_r = list(prompts_r[i]) if prompts_r else list(p)
        toks, hist = [], []
        for t in range(max_new):
            a = full_logits(models[0], seq_a)
            r = full_logits(models[1], seq_r) if len(models) > 1 else None
            if min_tokens is None:
                y = pick(a, r, t, hist)
            else:
                y = pick(a, r, t, hist, set(stops) if t < min_tokens else set())
            hist.append((a, r))
            if y in stops:
                break
            toks.append(y)
            seq_a.append(y)
            seq_r.append(y)
        out.append(toks)
    return out


def aad_pick(alpha=0.1, beta=1.0):
    def pick(a, r, t, hist):
        la, lr = a.log_softmax(-1), r.log_softmax(-1)
        cand = la >= la.max() + (math.log(alpha) if alpha > 0 else -math.inf)
        return int(torch.where(cand, la - beta * lr, torch.tensor(-math.inf)).argmax())
    return pick


PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22]]


def mix_pick(w_a, w_r, temperature=0.0, top_p=1.0, min_p=0.0, seed=0):
    from aad_fast.ops.reference import gumbel_noise as _gumbel

    def pick(a, r, t, hist):
        z = w_a * a.log_softmax(-1) + (w_r * r.log_softmax(-1) if w_r else 0.0)
        if temperature == 0:
            return int(z.argmax())
        z = z / temperature
        p = z.softmax(-1)
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_p < 1.0:
            ps, order = p.sort(descending=True)
            before = ps.cumsum(0) - ps
            keep = torch.zeros_like(keep)
            keep[order[before < top_p]] = True
        if min_p > 0:
            keep &= p >= min_p * p.max()
        g = _gumbel(torch.tensor([seed]), torch.tensor(t), z.shape[0])[0]
        return int(torch.where(keep, z + g, torch.tensor(-math.inf)).argmax())
    return pick


def opad_pick(k):
    def pick(a, r, t, hist):
        la, lr = a.log_softmax(-1), r.log_softmax(-1)
        if t == 0:
            return int(la.argmax())
        pa, pr = hist[-1]
        return int(((1 + k) * la - k * lr + k * (pa.log_softmax(-1) - pr.log_softmax(-1))).argmax())
    return pick


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from aad_fast.toy.tokenizer import build_tokenizer
    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    for name, seed in (("dpo", 0), ("sft", 1)):
        m = tiny_model("llama", seed, vocab=len(tok))
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture(autouse=True, scope="session")
def _tuning_cache_per_session(tmp_path_factory):
    """Measured fast-path choices (``aad_fast.tuning``) go to a file of this test session, not
    the user's cache directory."""
    import os
    old = os.environ.get("AAD_FAST_TUNE_CACHE")
    os.environ["AAD_FAST_TUNE_CACHE"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")
    yield
    if old is None:
        os.environ.pop("AAD_FAST_TUNE_CACHE", None)
    else:
        os.environ["AAD_FAST_TUNE_CACHE"] = old


def brute_beam(models, prompt, k, alpha, tau, max_new, lp=0.0, stops=(EOS,)):
    """docs/rules.md BeamAAD written out (every live beam x every candidate, full recompute):
    ``(tokens, finish_reason, score)``."""
    live, ended = [(0.0, [])], []
    for _ in range(max_new):
        options = []
        for j, (tot, seq) in enumerate(live):
            a, r = full_logits(models[0], prompt + seq), full_logits(models[1], prompt + seq)
            la, lr = a.log_softmax(-1), r.log_softmax(-1)
            cand = la >= la.max() + (math.log(alpha) if alpha > 0 else -math.inf)
            s = la - lr
            if tau is not None:
                pr = lr.exp()
                if float(torch.where(cand, -pr * lr, torch.zeros(())).sum()) <= tau:
                    s = la + math.log(int(cand.sum()))
            options += [(tot + float(s[v]), j, v) for v in cand.nonzero().flatten().tolist()]
        options.sort(key=lambda o: (-o[0], o[1], o[2]))
        new = []
        for rank, (tot, j, v) in enumerate(options):
            if v in stops:
                if rank < k:
                    ended.append((tot / (len(live[j][1]) + 1) ** lp, tot, live[j][1]))
                continue
            new.append((tot, live[j][1] + [v]))
            if len(new) == k:
                break
        live = new
        if len(ended) >= k or not live:
            break
    if ended:
        best = max(ended, key=lambda e: e[0])
        return best[2], "stop", best[1]
    best = max(live, key=lambda b: b[0])
    return best[1], "length", best[0]
