"""The embedded default pair and ``aad-fast demo``.

The default pair is the tiny SFT model + DPO LoRA adapter trained on the toy preference task
(``aad_fast.toy``) and shipped in ``aad_fast/default_pair/``. If that directory is missing (a
source tree without the trained files), a deterministic random-weight pair over the same
tokenizer is built in seconds instead, and the demo says so.
"""
from __future__ import annotations

import sys

import torch


def default_pair():
    """``(aligned, reference, tokenizer, trained)``: the shipped pair, or a built stand-in."""
    from .toy.assets import load_default_pair
    try:
        sft, dpo, tok, _, _ = load_default_pair("cpu")
        return dpo, None, tok, True
    except FileNotFoundError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    from .toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval(), tok, False


def demo(a) -> int:
    from . import AAD, Decoder, Greedy
    reward = None
    if a.aligned:
        dec = Decoder(a.aligned, a.reference)
        prompt, chat, stop = a.prompt or "Hello! Please introduce yourself.", False, None
    else:
        from .toy import task
        from .toy.tokenizer import stop_ids
        aligned, reference, tok, trained = default_pair()
        if not trained:
            print("note: the trained default pair is not in this install; using a random-weight "
                  "stand-in (text will be gibberish)", file=sys.stderr)
        dec = Decoder(aligned, reference, tokenizer=tok, max_batch_size=1, max_seq_len=128)
        held_out = task.split_problems()[1]
        prompt = a.prompt or held_out[0].prompt
        chat, stop = True, stop_ids(tok)
        reward = task.oracle_reward
    print(f"prompt: {prompt}")
    with dec:
        kw = dict(max_new_tokens=a.max_new_tokens, chat=chat, stop=stop)
        dec.generate(prompt, rule=AAD(a.alpha), **kw)  # warm-up
        aad = dec.generate(prompt, rule=AAD(a.alpha), **kw)
        greedy = dec.generate(prompt, rule=Greedy("a"), **kw)
    for name, g in ((f"AAD(alpha={a.alpha})", aad), ("greedy DPO", greedy)):
        line = f"{name:>16}: {g.text[0]!r}"
        if reward is not None:
            try:
                line += f"   oracle reward {reward(prompt, g.text[0]):+.2f}"
            except (KeyError, ValueError):
                pass
        print(line)
    ratio = aad.stats["ms_per_token"] / greedy.stats["ms_per_token"]
    print(f"speed on {aad.stats['device']} ({aad.stats['pair']} pair, backend "
          f"{aad.stats['backend']}): AAD {aad.stats['ms_per_token']:.2f} ms/token, "
          f"single-model greedy {greedy.stats['ms_per_token']:.2f} ms/token ({ratio:.2f}x)")
    return 0
