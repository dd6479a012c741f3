"""The embedded default pair and ``aad-fast demo``.

The default pair is the tiny SFT model + DPO LoRA adapter trained on the toy preference task
(``aad_fast.toy``) and shipped in ``aad_fast/default_pair/``. If that directory is missing (a
source tree without the trained files), a deterministic random-weight pair over the same
tokenizer is built in seconds instead, and the demo says so.

Neither touches the caller's state: torch's global random generator is saved and restored
around the loading (PEFT's LoRA init and the stand-in's weights draw from it), and the demo's
silencing of progress bars and warnings is undone when it returns.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import warnings

import torch

#: timed runs per method in the demo's speed line (after one warm-up run each)
SPEED_REPEATS = 5


def default_pair():
    """``(aligned, reference, tokenizer, trained)``: the shipped pair, or a built stand-in.
    The global RNG state is the same after the call as before."""
    with torch.random.fork_rng(devices=[]):
        return _default_pair()


def _default_pair():
    from .assets import load_default_pair
    try:
        sft, dpo, tok, _, _ = load_default_pair("cpu")
        return dpo, None, tok, True
    except FileNotFoundError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)  # inside fork_rng: the caller's generator is restored afterwards
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval(), tok, False


@contextlib.contextmanager
def quiet():
    """No weight-loading progress bars and no transformers FutureWarnings inside; both restored
    on exit (the caller's settings are left as they were)."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def timed(dec, prompt, rule, n_tokens: int, repeats: int, **kw) -> tuple[float, int]:
    """Median decode ms/token of ``repeats`` runs of ``rule`` on ``prompt`` with
    ``max_new_tokens=n_tokens``, after one untimed warm-up run; and the steps each run took."""
    dec.generate(prompt, rule=rule, max_new_tokens=n_tokens, **kw)  # warm-up
    ms, steps = [], set()
    for _ in range(repeats):
        g = dec.generate(prompt, rule=rule, max_new_tokens=n_tokens, **kw)
        ms.append(g.stats["ms_per_token"])
        steps.add(g.stats["steps"])
    return statistics.median(ms), min(steps)


def demo(a) -> int:
    with quiet():
        return _demo(a)


def _demo(a) -> int:
    from ..rules import AAD, Greedy
    from ..decoder import Decoder
    reward = None
    if a.aligned:
        dec = Decoder(a.aligned, a.reference)
        prompt, chat, stop = a.prompt or "Hello! Please introduce yourself.", False, None
    else:
        from . import task
        from .tokenizer import stop_ids
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
    aad_rule, greedy_rule = AAD(a.alpha), Greedy("a")
    with dec:
        kw = dict(chat=chat, stop=stop)
        aad = dec.generate(prompt, rule=aad_rule, max_new_tokens=a.max_new_tokens, **kw)
        greedy = dec.generate(prompt, rule=greedy_rule, max_new_tokens=a.max_new_tokens, **kw)
        for name, g in ((f"AAD(alpha={a.alpha})", aad), ("greedy DPO", greedy)):
            line = f"{name:>16}: {g.text[0]!r}"
            if reward is not None:
                try:
                    line += f"   oracle reward {reward(prompt, g.text[0]):+.2f}"
                except (KeyError, ValueError):
                    pass
            print(line)
        # Speed: both rules decode the same number of steps (the fewer of the two runs above, so
        # neither stops early: decoding is deterministic), warmed up, median of several runs.
        n = min(aad.stats["steps"], greedy.stats["steps"])
        if n < 2:
            print("speed: not measured (a completion ended after its first token)")
            return 0
        ms_aad, steps_aad = timed(dec, prompt, aad_rule, n, SPEED_REPEATS, **kw)
        ms_greedy, steps_greedy = timed(dec, prompt, greedy_rule, n, SPEED_REPEATS, **kw)
    st = aad.stats
    pair = {"lora": "DPO LoRA adapter + its SFT base as one batch", "two": "two models",
            "one": "one model"}.get(st["pair"], st["pair"])
    count = (f"{steps_aad} decode steps (tokens) each" if steps_aad == steps_greedy
             else f"{steps_aad} and {steps_greedy} decode steps")
    print(f"speed on {st['device']}, batch 1, backend {st['backend']}; prefill excluded, "
          f"{count}, median of {SPEED_REPEATS} runs after a warm-up:")
    print(f"  AAD on the pair ({pair}): {ms_aad:.2f} ms/token")
    print(f"  greedy on the aligned model alone (one stream): {ms_greedy:.2f} ms/token")
    print(f"  AAD costs {ms_aad / ms_greedy:.2f}x single-model greedy")
    return 0
