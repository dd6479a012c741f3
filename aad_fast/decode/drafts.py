"""Drafts for speculative decoding (issue 26): what proposes the next ``k`` tokens of a row,
which the verify step then checks against the rule's own choices (the output is the rule's,
token for token, whatever a draft proposes; a better draft only makes it faster).

The protocol is host-side lists; the verify loop calls, per row (a scheduler row, stream a)::

    start(row, prompt)      # the row (re)filled with a request's prompt (stream a's ids)
    propose(rows, k)        # per row of ``rows``: 0..k proposed next ids (none: no speculation)
    accept(row, tokens)     # the tokens emitted for that row this step (prefill's first too)
    free(row)               # the row retired or cancelled

Drafts here:

- ``NgramDraft``: prompt-lookup decoding, no model. The longest suffix of the row's
  prompt + output (``max_n`` down to ``min_n`` tokens) that occurred before proposes the ``k``
  tokens that followed its latest earlier occurrence. An index of every n-gram's latest end
  keeps a step at ``O(max_n)`` dict look-ups per row, whatever the length.
- ``ModelDraft``: a small causal LM with the decoder's tokenizer, greedy, on its own static KV
  cache (a ``model.runner.Runner`` of one row per scheduler row). ``propose`` rewinds each row
  to what the rule accepted, feeds the tokens the rule emitted since, and generates ``k``
  greedily: every row of the batch in the same forwards, one sync per ``propose``.
- ``OracleDraft``: for benchmarks and tests: the true continuation of each prompt (from a
  non-speculative run), each token replaced by a wrong one with probability ``1 - p``.

``make_draft(spec, decoder)`` turns the ``draft=`` argument of a decoder into one of these.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from torch import nn

from ..model.loading import check_same_tokenizer, load_causal_lm, load_tokenizer
from ..model.runner import Runner
from ..rules import check_int
from .speculate import MAX_SPECULATE, Draft

#: the tiny draft shipped for the embedded toy pair (``draft="default"``)
DEFAULT_DRAFT_DIR = Path(__file__).resolve().parents[1] / "default_pair" / "draft"


class NgramDraft:
    """Prompt-lookup decoding (model-free).

    For a row whose prompt + output so far is ``s`` (length ``L``): for ``n`` from ``max_n``
    down to ``min_n``, the first ``n`` whose suffix ``s[L-n:]`` also ends at an earlier
    position proposes ``s[e:e+k]``, where ``e < L`` is the latest such end (the most recent
    occurrence; its continuation may be shorter than ``k`` when it runs into the suffix). No
    earlier occurrence of any of these suffixes: no proposal. ``min_n`` 1 proposes after any
    repeated token; the default 2 asks for a repeated pair, which rarely misleads.

    Cost: each appended token adds ``max_n - min_n + 1`` n-grams to the row's index (a dict
    from n-gram to its latest end); a proposal is at most as many look-ups plus a slice."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.min_n = check_int("min_n", min_n, 1)
        self.max_n = check_int("max_n", max_n, self.min_n)
        self._seq: dict[int, list[int]] = {}
        self._index: dict[int, dict[tuple, int]] = {}

    def start(self, row: int, prompt: list[int]) -> None:
        self._seq[row], self._index[row] = [], {}
        self._extend(row, prompt)

    def _extend(self, row: int, tokens) -> None:
        seq, index = self._seq[row], self._index[row]
        lo, hi = self.min_n, self.max_n
        for t in tokens:
            e = len(seq)  # n-grams ending at e (exclusive) now have a continuation: seq[e] = t
            seq.append(int(t))
            for n in range(lo, min(hi, e) + 1):
                index[tuple(seq[e - n:e])] = e

    def propose(self, rows: list[int], k: int) -> list[list[int]]:
        k = check_int("k", k, 0, MAX_SPECULATE)
        return [self._lookup(_live(self._seq, row), self._index[row], k) for row in rows]

    def _lookup(self, seq: list[int], index: dict, k: int) -> list[int]:
        n_len = len(seq)
        if k == 0:
            return []
        for n in range(min(self.max_n, n_len), self.min_n - 1, -1):
            e = index.get(tuple(seq[n_len - n:]))
            if e is not None:
                return seq[e:e + k]
        return []

    def accept(self, row: int, tokens: list[int]) -> None:
        _live(self._seq, row)
        self._extend(row, tokens)

    def free(self, row: int) -> None:
        self._seq.pop(row, None)
        self._index.pop(row, None)


def _live(rows: dict, row: int):
    """The state of a started row; a ``ValueError`` naming ``row`` for one never started (or
    freed)."""
    try:
        return rows[row]
    except KeyError:
        raise ValueError(f"row={row!r} was not started (or was freed): call start(row, prompt) "
                         "first") from None


def _vocab_of(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _special_ids(tok) -> dict:
    return {name: getattr(tok, f"{name}_token_id", None)
            for name in ("bos", "eos", "pad", "unk")}


def check_draft_vocab(model, tokenizer, target_tokenizer, target_vocab: int | None) -> None:
    """Refuse a draft that would propose ids meaning other tokens than the decoder's.

    With both tokenizers known: their token-to-id maps and special ids must be equal, and the
    draft's vocabulary must cover the decoder's ``target_vocab`` ids. Otherwise the draft's
    vocabulary size must equal ``target_vocab`` (the decoder's models' size). ``ValueError``
    naming ``draft`` otherwise."""
    v_draft = _vocab_of(model)
    if tokenizer is not None and target_tokenizer is not None:
        check_same_tokenizer(tokenizer, target_tokenizer, "draft", "the decoder")
        sa, sd = _special_ids(target_tokenizer), _special_ids(tokenizer)
        if sa != sd:
            raise ValueError(f"draft: its tokenizer's special ids {sd} differ from the "
                             f"decoder's {sa}; a draft must share the decoder's tokenizer")
        if target_vocab is not None and v_draft < target_vocab:
            raise ValueError(f"draft: its vocabulary has {v_draft} ids, fewer than the "
                             f"{target_vocab} the decoder may emit")
        return
    if target_vocab is not None and v_draft != target_vocab:
        raise ValueError(f"draft: its vocabulary size {v_draft} differs from the decoder's "
                         f"{target_vocab} and no tokenizer is known to show the ids agree; pass "
                         "a draft with the same tokenizer (or give both tokenizers)")


class _Row:
    """A ModelDraft row: ``ctx`` = prompt + every accepted token; ``cached`` = the tokens
    whose keys and values sit in the row's slots ``0 .. len(cached) - 1`` (position = slot:
    a row is admitted alone, unpadded), which may run past ``ctx`` with drafted tokens."""

    __slots__ = ("ctx", "cached")

    def __init__(self, prompt: list[int]):
        self.ctx, self.cached = list(prompt), list(prompt)


def _common(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ModelDraft:
    """A small causal LM as the draft: greedy on its own static KV cache.

    Args:
        model: a ``transformers`` causal LM (eval mode, on the decoder's device), with the
            decoder's tokenizer (checked: ``check_draft_vocab``).
        tokenizer: the draft's tokenizer, if known; ``target_tokenizer``/``target_vocab``: the
            decoder's tokenizer and the ids it may emit (``Decoder.vocab``).
        max_batch_size: rows (the decoder's scheduler rows); ``max_seq_len``: the longest
            prompt + output of a row (the runner holds ``MAX_SPECULATE + 1`` slots more for
            the drafted tail).
        cpu_linear, forward: as ``Decoder`` (the runner's measured CPU choices).

    ``propose(rows, k)`` rewinds every live row to the longest prefix of what it cached that
    the rule accepted (at most all but the last accepted token, whose logits give the first
    proposal), feeds the accepted tokens not cached yet, then ``k - 1`` of its own proposals:
    ``max(pending) + k - 1`` one-token steps of the whole batch (rows with less to do step on
    junk that the next rewind drops), and one host sync. Proposals are ids below
    ``min(draft vocabulary, target_vocab)``."""

    def __init__(self, model, *, tokenizer=None, target_tokenizer=None, target_vocab=None,
                 max_batch_size: int = 8, max_seq_len: int = 2048, cpu_linear=None,
                 forward=None):
        if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise ValueError(f"draft must be a causal LM, got {type(model).__name__}")
        check_draft_vocab(model, tokenizer, target_tokenizer, target_vocab)
        self.model = model
        self.n_rows = check_int("max_batch_size", max_batch_size, 1)
        self.max_len = check_int("max_seq_len", max_seq_len, 1) + MAX_SPECULATE + 1
        v = _vocab_of(model)
        self.limit = v if target_vocab is None else min(v, target_vocab)
        self._settings = (cpu_linear, forward)
        self.runner: Runner | None = None
        self._rows: dict[int, _Row] = {}

    def _runner(self) -> Runner:
        if self.runner is None:
            cpu_linear, forward = self._settings
            with torch.inference_mode():
                self.runner = Runner(self.model, self.n_rows, self.max_len,
                                     cpu_linear=cpu_linear, forward=forward)
                self.runner.idle(range(self.n_rows))  # every row idle until started
        return self.runner

    def start(self, row: int, prompt: list[int]) -> None:
        row = check_int("row", row, 0, self.n_rows - 1)
        if len(prompt) == 0 or len(prompt) >= self.max_len - MAX_SPECULATE:
            raise ValueError(f"prompt: {len(prompt)} tokens; the draft takes 1 to "
                             f"{self.max_len - MAX_SPECULATE - 1}")
        runner = self._runner()
        dev = runner.device
        with torch.inference_mode():
            ids = torch.tensor([list(prompt)], dtype=torch.int64, device=dev)
            runner.admit(ids, torch.ones_like(ids, dtype=torch.bool),
                         torch.tensor([row], dtype=torch.int64, device=dev))
        self._rows[row] = _Row(prompt)

    def accept(self, row: int, tokens: list[int]) -> None:
        _live(self._rows, row).ctx.extend(int(t) for t in tokens)

    def free(self, row: int) -> None:
        if self._rows.pop(row, None) is not None:
            self.runner.idle([row])

    def propose(self, rows: list[int], k: int) -> list[list[int]]:
        k = check_int("k", k, 0, MAX_SPECULATE)
        states = [_live(self._rows, row) for row in rows]
        if k == 0 or not rows:
            return [[] for _ in rows]
        runner = self._runner()
        with torch.inference_mode():
            self._rewind()
            pending = [s.ctx[len(s.cached):] for s in states]
            rounds = max(len(p) for p in pending) + k - 1
            forced, use = self._schedule(rows, pending, rounds)
            picks = self._run(runner, forced.to(runner.device), use.to(runner.device), rounds)
        got = picks.tolist()  # the one host sync
        out = []
        for row, state, pend in zip(rows, states, pending):
            m = len(pend)
            mine = [got[t][row] for t in range(m - 1, m - 1 + k)]
            state.cached += pend + mine[:k - 1]  # what the rounds fed this row
            out.append(mine)
        return out

    def _rewind(self) -> None:
        """Every live row back to the longest cached prefix the rule accepted, but at least one
        accepted token uncached (its logits give the first proposal): positions, slots, masks
        and the runner's host read bound."""
        runner = self.runner
        live = list(self._rows)
        if not live:
            return
        for row in live:
            s = self._rows[row]
            s.cached = s.cached[:min(_common(s.cached, s.ctx), len(s.ctx) - 1)]
        dev = runner.device
        idx = torch.tensor(live, dtype=torch.int64, device=dev)
        keep = torch.tensor([len(self._rows[r].cached) for r in live], dtype=torch.int64,
                            device=dev)
        runner.pos.index_copy_(0, idx, keep[:, None])
        runner.slot.index_copy_(0, idx, keep)
        slots = torch.arange(runner.max_len, device=dev)[None, :]
        seen = slots < keep[:, None]
        runner.mask[:, 0, 0].index_copy_(0, idx, _additive(seen, runner))
        if runner.smask is not None:
            near = slots > keep[:, None] - runner.window
            runner.smask[:, 0, 0].index_copy_(0, idx, _additive(seen & near, runner))
        for row in live:
            runner.bound.fill([row], len(self._rows[row].cached))

    def _schedule(self, rows, pending, rounds):
        """Per round and row: the token to feed when known on the host (``forced``), and
        whether it is (``use``; otherwise the row feeds its previous round's pick)."""
        forced = torch.zeros((rounds, self.n_rows), dtype=torch.int64)
        use = torch.ones((rounds, self.n_rows), dtype=torch.bool)
        for row, pend in zip(rows, pending):
            m = len(pend)
            forced[:m, row] = torch.tensor(pend, dtype=torch.int64)
            use[m:, row] = False
        return forced, use

    def _run(self, runner: Runner, forced, use, rounds: int):
        """``rounds`` one-token steps of every row; the greedy pick after each ``[rounds, N]``."""
        picks = torch.empty_like(forced)
        prev = forced[0]
        for t in range(rounds):
            tok = torch.where(use[t], forced[t], prev)
            logits = runner.step(tok)
            prev = logits[:, :self.limit].argmax(-1)
            picks[t] = prev
        return picks


def _additive(visible, runner):
    """A bool ``[R, S]`` as the runner's additive mask rows (0 visible, dtype minimum hidden)."""
    out = torch.full(visible.shape, runner.neg, dtype=runner.dtype, device=visible.device)
    return out.masked_fill_(visible, 0.0)


class OracleDraft:
    """The true continuation, corrupted (benchmarks and tests).

    Args:
        continuations: ``{prompt ids (tuple or list): the output ids}`` (from a
            non-speculative run of the same rule), or a list of ``(prompt, output)`` pairs.
        p: the chance each proposed token is the true one, in ``[0, 1]``; otherwise it is
            replaced by a wrong id (another id below ``vocab_size``, drawn uniformly; with no
            ``vocab_size``, the true id with its lowest bit flipped).
        seed: whether the token at each output position of each prompt is corrupted is drawn
            once per (prompt, position) from ``seed``: the same for every batch, row and step.

    A row proposes the continuation from its current output length on (fewer than ``k`` near
    its end, none past it). ``start`` with a prompt that has no continuation: ``ValueError``
    naming ``continuations``."""

    def __init__(self, continuations, p: float, seed: int = 0, vocab_size: int | None = None):
        pairs = continuations.items() if isinstance(continuations, dict) else continuations
        self.truth = {tuple(int(t) for t in prompt): [int(t) for t in out] for prompt, out in pairs}
        if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a number in [0, 1], got {p!r}")
        self.p, self.seed = float(p), int(seed)
        self.vocab_size = None if vocab_size is None else check_int("vocab_size", vocab_size, 2)
        self._rows: dict[int, list] = {}  # row: [the prompt's proposals by position, output length]
        self._noisy: dict[tuple, list[int]] = {}

    def _corrupted(self, prompt: tuple) -> list[int]:
        """The prompt's continuation as proposed: each id kept with probability ``p``."""
        if prompt not in self._noisy:
            rng = random.Random(f"{self.seed}:{len(prompt)}:{hash(prompt)}")
            out = []
            for t in self.truth[prompt]:
                if rng.random() < self.p:
                    out.append(t)
                elif self.vocab_size is None:
                    out.append(t ^ 1)
                else:
                    out.append((t + 1 + rng.randrange(self.vocab_size - 1)) % self.vocab_size)
            self._noisy[prompt] = out
        return self._noisy[prompt]

    def start(self, row: int, prompt: list[int]) -> None:
        key = tuple(int(t) for t in prompt)
        if key not in self.truth:
            raise ValueError(f"continuations: none for the prompt of row {row} ({len(key)} "
                             f"ids, ending {list(key[-8:])})")
        self._rows[row] = [self._corrupted(key), 0]

    def propose(self, rows: list[int], k: int) -> list[list[int]]:
        k = check_int("k", k, 0, MAX_SPECULATE)
        out = []
        for row in rows:
            noisy, done = _live(self._rows, row)
            out.append(noisy[done:done + k])
        return out

    def accept(self, row: int, tokens: list[int]) -> None:
        _live(self._rows, row)[1] += len(tokens)

    def free(self, row: int) -> None:
        self._rows.pop(row, None)


def _is_draft(obj) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("start", "propose", "accept", "free"))


def make_draft(spec, decoder):
    """The draft ``spec`` names for ``decoder`` (a ``Decoder``: its ``tokenizer``, ``vocab``,
    ``device``, ``max_batch_size``, ``max_seq_len``, ``base``).

    ``spec``: ``"ngram"`` (``NgramDraft()``); ``"default"`` (the shipped toy draft,
    ``DEFAULT_DRAFT_DIR``); a local model directory; a causal LM object; or an object with
    ``start``/``propose``/``accept``/``free`` (used as it is). ``ValueError`` naming ``draft``
    otherwise."""
    if _is_draft(spec):
        return spec
    if isinstance(spec, str) and spec == "ngram":
        return NgramDraft()
    tok = None
    if isinstance(spec, str) and spec == "default":
        if not (DEFAULT_DRAFT_DIR / "config.json").is_file():
            raise ValueError(f"draft='default': the toy draft is not in this install "
                             f"({DEFAULT_DRAFT_DIR} has no config.json)")
        spec = DEFAULT_DRAFT_DIR
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ValueError(f"draft={str(spec)!r}: not 'ngram', 'default' or a local model "
                             "directory (aad_fast loads from local paths only)")
        dtype = next(decoder.base.parameters()).dtype
        model = load_causal_lm(path, "draft", dtype, decoder.device).eval()
        # the shipped draft shares the pair's one tokenizer copy (sft/), as the picker does
        tok = load_tokenizer(path) or (load_tokenizer(path.parent / "sft")
                                       if path.resolve() == DEFAULT_DRAFT_DIR else None)
    elif isinstance(spec, nn.Module):
        model = spec
    else:
        raise ValueError(f"draft must be 'ngram', 'default', a local model directory, a causal "
                         f"LM or a Draft (start/propose/accept/free), got {type(spec).__name__}")
    dev = next(model.parameters()).device
    if dev != decoder.device:
        raise ValueError(f"draft is on {dev} but the decoder's models are on {decoder.device}")
    return ModelDraft(model, tokenizer=tok, target_tokenizer=decoder.tokenizer,
                      target_vocab=decoder.vocab, max_batch_size=decoder.max_batch_size,
                      max_seq_len=decoder.max_seq_len, cpu_linear=decoder.cpu_linear,
                      forward=decoder.forward)


def resolve_draft(draft, decoder):
    """``draft`` as a ``Draft``: ``None`` and objects with the protocol's methods as they
    are; a name or a draft model through ``make_draft(draft, decoder)``."""
    if draft is None or isinstance(draft, Draft):
        return draft
    return make_draft(draft, decoder)
