"""Rules that search over several continuations: beam AAD and best-of-n with a picker.

Both run on the same runners as the per-token rules: beams (or samples) are rows of one batch.
"""
from __future__ import annotations

import math
import os
import time

import torch

from . import backends
from .ops import aad_beam_topk
from .prompts import _left_pad, _Rows
from .rules import BeamAAD, BestOfN, Mix


def beam_aad(dec, rule: BeamAAD, rows, max_new: int, stop_ids):
    """docs/rules.md BeamAAD. Each prompt gets ``k = num_beams`` rows; per step every live beam
    proposes its best candidates by the AAD token score (``ops.aad_beam_topk``), the ``k`` best
    continuations by summed score survive (a candidate that is a stop id ends its beam when it
    ranks among the ``k`` best), caches are reordered on device. A prompt is finished once it
    has ``k`` ended beams or after ``max_new`` tokens; the result is the ended beam with the best
    ``sum(s) / len**length_penalty`` (``len`` counts the stop token), else the best live beam.
    """
    from .generation import Generation

    k, b = rule.num_beams, len(rows.a)
    n = b * k
    dec._check_lengths(rows, max_new, n)
    longest = max(len(r) for r in rows.a)
    pair = dec._pair(dec._bucket(n) if dec.use_graphs else n, "ar", longest + max_new)
    n_rows = pair.runners[0].n_rows if not pair.shared else pair.n
    # each prompt is encoded once; its k beams (and any bucket padding rows) copy its cache
    ids, real = _left_pad(rows.a, b, dec.device)
    width = ids.shape[1]
    which = torch.arange(n_rows, device=dec.device).div(k, rounding_mode="floor").clamp(max=b - 1)
    stops = set(stop_ids)
    n_cand = min(k + len(stops), dec.vocab)
    dev = dec.device
    seqs = [[[] for _ in range(k)] for _ in range(b)]     # live beams' tokens
    score = torch.zeros(b, k, dtype=torch.float64)        # live beams' summed scores
    score[:, 1:] = -math.inf                               # at the start only beam 0 is live
    ended = [[] for _ in range(b)]                         # (normalised, sum, tokens)
    finished = [False] * b
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    steps = 0
    with torch.inference_mode():
        la, lr = pair.prefill(ids, real, ids, real, rows=which)
        sync()
        t1 = time.perf_counter()
        for t in range(max_new):
            steps = t + 1
            s, cand, *_ = aad_beam_topk(la[:n], lr[:n], rule.alpha, n_cand, tau=rule.tau,
                                        vocab_size=dec.vocab)
            s, cand = s.double().cpu().view(b, k, n_cand), cand.cpu().view(b, -1).tolist()
            total, orders = rank_continuations(score, s)
            src = torch.arange(n_rows)   # bucket padding rows keep their own state
            nxt = torch.zeros(n_rows, dtype=torch.int64)
            for p in range(b):
                if finished[p]:   # its rows keep their state (src is the identity there)
                    continue
                live = []
                for rank, i in enumerate(orders[p]):
                    tot, tok = total[p][i], cand[p][i]
                    beam = i // n_cand
                    if tok < 0 or tot == -math.inf:
                        break
                    if tok in stops:
                        if rank < k:
                            length = len(seqs[p][beam]) + 1
                            ended[p].append((tot / length ** rule.length_penalty, tot,
                                             seqs[p][beam]))
                        continue
                    live.append((tot, beam, tok))
                    if len(live) == k:
                        break
                if not live and not ended[p]:
                    raise RuntimeError(f"row {p}: no AAD candidate (all aligned logits -inf/NaN)")
                new_seqs = []
                for j in range(k):
                    if j < len(live):
                        tot, beam, tok = live[j]
                        score[p, j] = tot
                        new_seqs.append(seqs[p][beam] + [tok])
                        src[p * k + j], nxt[p * k + j] = p * k + beam, tok
                    else:
                        score[p, j] = -math.inf
                        new_seqs.append([])
                        src[p * k + j] = p * k
                seqs[p] = new_seqs
                if len(ended[p]) >= k or not live:
                    finished[p] = True
            if all(finished) or t == max_new - 1:
                break
            pair.reorder(src.to(dev), width, width + t)   # slots written since the prompt
            la, lr = pair.step(nxt.to(dev))
    sync()
    decode_s = time.perf_counter() - t1
    tokens, reasons, scores = [], [], []
    for p in range(b):
        if ended[p]:
            best = max(ended[p], key=lambda e: e[0])
            tokens.append(best[2])
            reasons.append("stop")
            scores.append(best[1])
        else:
            j = int(torch.argmax(score[p]))
            tokens.append(seqs[p][j])
            reasons.append("length")
            scores.append(score[p, j].item())
    text = dec.tokenizer.batch_decode(tokens, skip_special_tokens=True) if dec.tokenizer else None
    stats = {"prefill_ms": (t1 - t0) * 1e3, "steps": steps,
             # every step after the first is one forward of all b*k beams plus the bookkeeping
             "ms_per_token": decode_s * 1e3 / max(steps - 1, 1),
             "tokens_per_s": (b * (steps - 1) / decode_s if steps > 1 and decode_s > 0
                              else float("nan")),
             "backend": "cpp" if backends.pick_backend(dev, None) == "cpp" else "torch",
             "cuda_graphs": False, "pair": dec.kind, "batch": b, "num_beams": k,
             "device": str(dev)}
    return Generation(tokens=tokens, text=text, finish_reason=reasons, scores=scores,
                      stats=stats)


def rank_continuations(score, s):
    """Beam bookkeeping: ``score`` float64 ``[b, k]`` summed scores of the live beams (``-inf``
    = no beam), ``s`` float64 ``[b, k, c]`` the candidates' token scores. Returns
    ``(total, order)`` as lists: ``total[p][i]`` the summed score of continuation
    ``i = beam * c + rank`` and ``order[p]`` the continuations best first, ties to the lower
    index. A NaN total (``-inf`` + ``inf``) counts as ``-inf``."""
    total = (score[:, :, None] + s).flatten(1)
    total.masked_fill_(total.isnan(), -math.inf)
    order = torch.sort(total, dim=1, descending=True, stable=True).indices
    return total.tolist(), order.tolist()


def load_picker(picker, device):
    """``(model, tokenizer)`` of a picker reward model given as a path, a model, or a pair."""
    if isinstance(picker, tuple):
        model, tok = picker
    elif isinstance(picker, (str, os.PathLike)):
        from transformers import AutoModelForSequenceClassification

        from .hf import _check_dir, load_tokenizer
        p = _check_dir(picker, "picker")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:
            raise ValueError(f"picker={str(picker)!r} could not be loaded as a sequence "
                             f"classification model: {exc}") from exc
        tok = load_tokenizer(p)
    else:
        model, tok = picker, None
    n_out = getattr(model.config, "num_labels", 1)
    if n_out != 1:
        raise ValueError(f"picker must have one output (a reward model), it has {n_out}")
    return model.to(device).eval(), tok


def best_of_n(dec, rule: BestOfN, rows, max_new: int, stop_ids):
    """docs/rules.md BestOfN: ``n`` samples per prompt from stream ``a`` (nucleus ``top_p`` at
    ``temperature``, seeds ``rule.seed + j``) as one batch; the picker scores prompt +
    completion, batched; the highest score wins, ties to the first sample."""
    b, n = len(rows.a), rule.n
    sample = Mix(w_a=1.0, w_r=0.0, temperature=rule.temperature, top_p=rule.top_p, seed=rule.seed)
    rep = [r for r in rows.a for _ in range(n)]
    seeds = torch.tensor([rule.seed + j for _ in range(b) for j in range(n)], dtype=torch.int64)
    n_rows = dec._bucket(b * n)
    seeds = torch.cat([seeds, seeds.new_zeros(n_rows - b * n)]).to(dec.device)
    for gen in dec._decode(sample, _Rows(rep, rep), max_new, stop_ids, seeds=seeds):
        pass
    model, ptok = load_picker(rule.picker, dec.device)
    scores = score_with_picker(model, ptok or dec.tokenizer, dec.tokenizer, rep, gen.tokens)
    tokens, reasons, best_scores, cands = [], [], [], []
    for p in range(b):
        sc = scores[p * n:(p + 1) * n]
        j = max(range(n), key=lambda i: (sc[i], -i))
        tokens.append(gen.tokens[p * n + j])
        reasons.append(gen.finish_reason[p * n + j])
        best_scores.append(sc[j])
        cands.append([{"tokens": gen.tokens[p * n + i], "score": sc[i],
                       "text": gen.text[p * n + i] if gen.text else None,
                       "finish_reason": gen.finish_reason[p * n + i]} for i in range(n)])
    text = dec.tokenizer.batch_decode(tokens, skip_special_tokens=True) if dec.tokenizer else None
    stats = dict(gen.stats, n=n)
    from .generation import Generation
    return Generation(tokens=tokens, text=text, finish_reason=reasons, stats=stats,
                      scores=best_scores, candidates=cands)


def score_with_picker(model, picker_tok, dec_tok, prompts_ids, completions):
    """Reward of each prompt + completion (floats). Text goes through the picker's tokenizer
    (decoded with the decoder's); without tokenizers the ids are used as they are."""
    dev = next(model.parameters()).device
    if picker_tok is not None and dec_tok is not None:
        texts = [dec_tok.decode(p, skip_special_tokens=True) + dec_tok.decode(c, skip_special_tokens=True)
                 for p, c in zip(prompts_ids, completions)]
        if picker_tok.pad_token is None:
            picker_tok.pad_token = picker_tok.eos_token
        enc = picker_tok(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        seqs = [list(p) + list(c) for p, c in zip(prompts_ids, completions)]
        width = max(map(len, seqs))
        pad = getattr(model.config, "pad_token_id", None) or 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    return out[:, 0].float().cpu().tolist()
