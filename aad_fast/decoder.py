"""``Decoder`` (load once, generate many) and the one-shot ``generate()``.

A ``Decoder`` holds the two streams' weights, one KV pool per set of weights
(``cache.KVPool``, ``max_batch_size`` rows, twice that for a shared pair, x ``max_seq_len``
slots, allocated once), per batch-size bucket the runners (whose caches are views of the
pool), and per rule kind (``selectors.rule_kind``) the selector, the decode state and (on
CUDA, or compiled) one step per read length (``engine.LengthSteps``), which serve every value
of the kind (at most ``Decoder.MAX_ENTRIES`` kept). Per-token rules decode through a
``scheduler.Scheduler``: a call whose prompts fit ``max_batch_size`` is one static batch, a
larger one is batched continuously (a finished row is refilled with the next prompt);
``Decoder.scheduler``/``Decoder.request`` give a scheduler of its own to a caller that submits
requests over time (a server).
Beam search and best-of-n run on the scheduler too, with ``search``'s pieces (which never
import this module): a beam request is a slot of ``num_beams`` rows (``search.BeamSearch``
ranks), refilled like any row past ``max_batch_size``; best-of-n's samples are ordinary rows.

The buffers and the decodes themselves are ``decode.driver.Driver``'s, which ``Decoder``
extends with loading, validation, the hold (one call at a time: ``decode.hold.Hold``) and the
public calls (``generate``, ``stream``, ``scheduler``, ``request``).
"""
from __future__ import annotations

import os
import threading

import torch

from .decode.driver import Driver, Generation, text_delta
from .decode.hold import Hold
from .model.loading import check_positions, load_pair, pair_vocab, position_limit
from .model.lora_rows import RowLoRA
from .decode.prompt_rows import Rows, resolve_stop_ids, resolve_stops, rule_rows
from .decode.logprobs import sequence_logprobs, stream_model
from .decode.stop_strings import StopStrings
from .rules import AAD, OPAD, BeamAAD, BestOfN, CFGMix, Rule, check_int
from .decode.scheduler import Request, Scheduler
from .decode.speculate import check_speculate, resolve_draft
from .model import cpu_linear as linear_layouts
from .model import forward as fast_forward
from .model import threads as thread_choice


class Decoder(Driver):
    """Decode with two next-token distributions at close to one model's cost.

    Args:
        aligned: the aligned model (DPO / expert / the one model of OPAD and CFG): a
            ``transformers`` causal LM, a ``peft.PeftModel`` with a LoRA adapter, or a local path
            to either (a model directory or an adapter directory).
        reference: the reference model (SFT / amateur), a model or a local path. With a LoRA
            adapter it defaults to the adapter's base and must be that base; both streams then
            run as one batch through the shared base weights.
        tokenizer: optional; by default the one saved beside ``aligned`` or ``reference``.
        dtype: load dtype for paths (default: the checkpoint's).
        device: where paths are loaded (default: CUDA when available, else CPU); models given
            as objects stay where they are.
        max_batch_size, max_seq_len: static cache sizes (prompt + new tokens per row);
            ``max_seq_len=None``: ``DEFAULT_SEQ_LEN``, or fewer for a model whose learned
            position table is shorter (GPT-2's 1024).
        cuda_graphs: ``"auto"``/``True`` capture the decode step on CUDA, ``False`` never.
        backend: selection-op backend (``None`` = fastest available).
        check_every: steps between host checks for finished rows.
        cpu_linear: layout of the decode step's fp32 linears on CPU: ``"auto"`` (default, or
            ``$AAD_FAST_CPU_LINEAR``) times ``F.linear`` against the few-row layout and
            oneDNN-packed weights per weight shape on this machine and keeps the fastest
            (cached, see ``tuning``; a packed copy only where it fits in memory); ``"plain"`` /
            ``"few_row"`` / ``"packed"`` force one. ``stats["linear"]`` says what each shape took.
        compile: run the one-token step through ``torch.compile`` (full graph, static shapes;
            on CUDA the compiled step is what the graph captures). ``True``/``False`` force it;
            ``"auto"`` (default) compiles only where a run on this machine measured the
            compiled step faster for this model shape, pair and batch, and this call's
            ``max_new_tokens`` saves more than the measured compile time once per read
            length the call reaches (``tuning.compile_pays``, ``cache.read_ladder``). Every
            decode records its ms/token (and a compile its time) for that choice. The compile itself is not part of ``ms_per_token``
            (``stats["capture_ms"]``).
        threads: the intra-op threads its calls run with on CPU: ``"auto"`` (default, or
            ``$AAD_FAST_THREADS``) keeps the process's count unless a half or a quarter of it
            was measured faster for this model (``thread_choice.threads_choice``), ``"keep"`` never
            changes it, an int uses that many; set while a call (``generate``, ``stream``, a
            server burst) holds the Decoder, the process's count put back after (a
            ``scheduler()`` you drive yourself runs with yours). ``stats["threads"]`` says
            what ran.
        forward: the one-token forward of the decode steps on CPU: ``"auto"`` (default, or
            ``$AAD_FAST_DECODER``) times the model's own forward against the engine's
            (``fast_decoder.FastDecoder``, for Llama/Mistral/Qwen2/Qwen3/OLMo-2) per model shape
            and row count and keeps the faster (cached); ``"hf"`` / ``"fast"`` force one.
            ``stats["forward"]`` says which ran.
        draft, speculate: exact speculative decoding (docs/speculative.md): ``draft``
            proposes up to ``speculate`` (1..8) tokens per row and step, both streams score
            them in one forward, and the rule's own choices are kept, so the tokens are those
            of ``speculate=0``. ``draft``: ``"ngram"`` (prompt lookup), a draft model (a causal
            LM or a local path, same tokenizer), or an object with ``start``/``propose``/
            ``accept``/``free`` (``decode.speculate.Draft``). Not for BeamAAD or BestOfN.
            ``stats`` adds ``drafted``, ``accepted``, ``emitted`` per row and
            ``mean_accepted``.
    """

    DEFAULT_SEQ_LEN = 2048

    def __init__(self, aligned, reference=None, *, tokenizer=None, dtype=None, device=None,
                 max_batch_size: int = 8, max_seq_len: int | None = None, cuda_graphs="auto",
                 backend: str | None = None, check_every: int = 8,
                 cpu_linear: str | None = None, compile="auto", forward: str | None = None,
                 threads=None, draft=None, speculate: int = 0):
        max_batch_size = check_int("max_batch_size", max_batch_size, 1)
        self.speculate = check_speculate(speculate, draft)
        check_every = check_int("check_every", check_every, 1)
        if max_seq_len is not None:
            max_seq_len = check_int("max_seq_len", max_seq_len, 1)
        self.cpu_linear = linear_layouts.linear_mode(cpu_linear)
        self.forward = fast_forward.decoder_mode(forward)
        if compile not in ("auto", True, False):
            raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
        self.compile = compile
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        if device is None and isinstance(aligned, (str, os.PathLike)):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kind, self.model_a, self.model_r, self.tokenizer, self.names = load_pair(
            aligned, reference, dtype=dtype, device=device, tokenizer=tokenizer)
        self.device = next(self.model_a.parameters()).device
        if self.model_r is not None and next(self.model_r.parameters()).device != self.device:
            raise ValueError(f"aligned is on {self.device} but reference is on "
                             f"{next(self.model_r.parameters()).device}; put both on one device")
        self.lora = RowLoRA(self.model_a) if self.kind == "lora" else None
        if self.lora is not None:
            self.lora.check_rows(self.model_a)
        self.base = self.model_a.get_base_model() if self.kind == "lora" else self.model_a
        limits = [lim for lim in (position_limit(m) for m in (self.base, self.model_r)
                                  if m is not None) if lim is not None]
        if max_seq_len is None:  # the default, within a learned position table
            max_seq_len = min([self.DEFAULT_SEQ_LEN] + limits)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # the intra-op threads its calls run with (None: the process's; thread_choice.threads_choice)
        self.threads = thread_choice.threads_choice(self.base, max_batch_size, threads)
        self.use_graphs = self.device.type == "cuda" and cuda_graphs in ("auto", True)
        self.backend, self.check_every = backend, check_every
        self.vocab = pair_vocab(self.base, self.model_r, self.tokenizer)
        check_positions((self.base, self.model_r), max_seq_len)
        self._init_buffers()
        self._hold = Hold()
        self._owner = None  # the thread inside _run (re-entry from it is refused)
        self._draft_spec = draft
        self.draft = resolve_draft(draft, self)

    def _locked(self):
        """Hold this Decoder (``hold.Hold``: other threads' calls wait) with its intra-op
        thread count; every call takes it, the server's loop per burst."""
        return self._hold.locked(self.threads)

    def close(self) -> None:
        """Free the caches and captured graphs (the models are never modified)."""
        with self._locked():
            self._runner_sets.clear()
            for pool in self._pools.values():
                pool.free()
            self._entries.clear()
            self._pickers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ inputs
    def stop_ids(self, stop=None) -> list:
        """The model's end-of-sequence id(s) plus the caller's ``stop`` (ids or single-token
        strings)."""
        return resolve_stop_ids(stop, self.base, self.tokenizer, self.vocab)

    def stops(self, stop=None, *, ignore_eos: bool = False) -> tuple:
        """``(ids, strings)``: the stop ids (the model's EOS unless ``ignore_eos``, the caller's
        ids and single-token strings) and the stop strings matched on the text (every caller
        string but the special tokens: ``prompt_rows.resolve_stops``)."""
        return resolve_stops(stop, self.base, self.tokenizer, self.vocab, eos=not ignore_eos)

    def _stop_matcher(self, strings: tuple, include: bool, min_tokens: int):
        """A function making one row's ``StopStrings`` (``None`` without stop strings)."""
        if not strings:
            return None
        if self.tokenizer is None:
            raise ValueError(f"stop strings {list(strings)} need a tokenizer; pass ids instead")
        tok = self.tokenizer

        def decode(ids):
            return tok.decode(ids, skip_special_tokens=True)
        return lambda: StopStrings(strings, decode, include=include, min_tokens=min_tokens)

    def _rows(self, rule, prompts, input_ids, attention_mask, chat) -> Rows:
        """Both streams' prompt ids for ``rule`` (``prompts.rule_rows``)."""
        return rule_rows(rule, self.kind, self.tokenizer, self.vocab, prompts, input_ids,
                         attention_mask, chat)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts=None, *, input_ids=None, attention_mask=None, rule: Rule = AAD(0.1),
                 max_new_tokens: int = 128, stop=None, chat: bool = False, min_tokens: int = 0,
                 ignore_eos: bool = False, include_stop: bool = False) -> Generation:
        """Decode every prompt with ``rule`` (docs/rules.md).

        Args:
            prompts: a string or list of strings (tokenised; with the chat template when
                ``chat=True``; with ``chat=True`` a prompt may also be a conversation, a list
                of ``{"role": system|user|assistant, "content": str}`` messages), or instead
                ``input_ids`` (list of id lists, or a ``[B, L]`` tensor with an optional
                ``attention_mask`` marking real tokens).
            rule: ``AAD``, ``Contrastive``, ``EFT``/``DeRa``/``CFG``/``Mix``, ``OPAD``,
                ``BeamAAD``, ``BestOfN`` or ``Greedy``.
            max_new_tokens: at most this many tokens per row.
            stop: extra stop ids and stop strings besides the model's EOS. A string of any
                length is matched on the decoded text (docs/stopping-and-input.md): the text is
                cut where it starts, the tokens end with the one that completes it; one that is
                a single token also stops on its id.
            min_tokens: no stop id (EOS included) or stop string ends a row before this many
                tokens (vLLM's ``min_tokens``: the stop ids are masked until then).
            ignore_eos: the model's EOS does not end a row (the caller's stops still do).
            include_stop: keep a matched stop string in the text.
        Returns:
            ``Generation`` with per row ``tokens`` (stop id excluded), ``text``,
            ``finish_reason`` and ``stats``.
        """
        with self._locked():
            for out in self._run(prompts, input_ids, attention_mask, rule, max_new_tokens, stop,
                                 chat, ends=(min_tokens, ignore_eos, include_stop)):
                pass
        return out

    def scheduler(self, rule: Rule = AAD(0.1), *, rows: int | None = None,
                  min_tokens: bool = False) -> Scheduler:
        """A continuous-batching ``Scheduler`` for requests of ``rule``'s kind (each
        ``Request`` may carry its own values of that kind; ``rule`` is the default) over
        ``rows`` slots (default ``max_batch_size``), each holding up to ``max_seq_len`` prompt
        + new tokens. Make its requests with ``request``. It owns its runners (a KV cache of
        ``rows x max_seq_len``), selector and state, sharing only the weights, and on CUDA
        captures its step after the first admission; drive it from one thread.

        ``BeamAAD``: each request takes ``num_beams`` of the rows (``rows // num_beams``
        requests at a time; ``num_beams`` and ``tau`` are the scheduler's, alpha,
        length_penalty, stop ids and ``max_new_tokens`` each request's own); its ``Result``
        carries the beam's ``score``. Not best-of-n (its samples are ordinary requests of a
        ``Mix`` scheduler: ``search.samples``). ``min_tokens``: its requests may carry
        ``min_new_tokens`` (its step then masks each row's stop ids until then)."""
        if isinstance(rule, BestOfN):
            raise ValueError("BestOfN is not a per-token rule; the scheduler runs AAD, "
                             "Contrastive, Mix/EFT/DeRa/CFG, OPAD, Greedy and BeamAAD")
        self._validate(rule, 1)
        n = self.max_batch_size if rows is None else rows
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch_size:
            raise ValueError(f"rows must be an int in [1, max_batch_size={self.max_batch_size}]"
                             f", got {rows!r}")
        if self.lora is not None:
            self.lora.check_unmerged()
        if min_tokens and isinstance(rule, BeamAAD):
            raise ValueError("min_tokens is not supported with BeamAAD")
        return self._new_scheduler(rule, n, bool(min_tokens))

    def request(self, prompt=None, *, input_ids=None, rule: Rule = AAD(0.1),
                max_new_tokens: int = 128, stop=None, chat: bool = False, seed=None,
                tag=None, rows: Rows | None = None, min_tokens: int = 0,
                ignore_eos: bool = False, include_stop: bool = False) -> Request:
        """One ``Request`` for a ``scheduler(...)`` of ``rule``'s kind: ``prompt`` (a string,
        or with ``chat`` a conversation: a list of ``{"role", "content"}`` messages) or
        ``input_ids`` (one id list), both streams' ids as ``generate`` makes them (OPAD's
        principle, CFG's negative prompt), stop ids with the model's EOS. ``rows``: those ids
        made already (``prompt_rows.rule_rows`` for ``rule``; the server), used as they are.
        ``min_tokens``, ``ignore_eos``, ``include_stop`` and stop strings: as ``generate``."""
        max_new_tokens = self._validate(rule, max_new_tokens)
        if input_ids is not None:
            input_ids = [input_ids]
        if rows is None:
            rows = self._rows(rule, prompt, input_ids, None, chat)
        if len(rows.a) != 1:
            raise ValueError(f"request() takes one prompt, got {len(rows.a)}")
        a, r = {"ar": (rows.a[0], rows.r[0]), "a": (rows.a[0], rows.a[0]),
                "r": (rows.r[0], rows.r[0])}[rule.streams]
        if isinstance(rule, BeamAAD):  # both streams score the one prompt
            r = a
        ids, strings = self._stops_for(rule, stop, ignore_eos, min_tokens)
        make = self._stop_matcher(strings, include_stop, min_tokens)
        return Request(ids_a=a, ids_r=r, rule=rule, max_new_tokens=max_new_tokens,
                       stop_ids=tuple(ids), seed=seed, tag=tag, min_new_tokens=min_tokens,
                       stops=make() if make is not None else None)

    def _stops_for(self, rule, stop, ignore_eos, min_tokens) -> tuple:
        """``stops(stop, ignore_eos)`` with what ``rule`` cannot take refused: stop strings
        and ``min_tokens`` with BeamAAD, stop strings with BestOfN."""
        min_tokens = check_int("min_tokens", min_tokens, 0)
        ids, strings = self.stops(stop, ignore_eos=bool(ignore_eos))
        if strings and isinstance(rule, (BeamAAD, BestOfN)):
            raise ValueError(f"stop strings that are not single tokens ({strings[0]!r}) are not "
                             f"supported with {type(rule).__name__}; give stop ids")
        if min_tokens and isinstance(rule, BeamAAD):
            raise ValueError("min_tokens is not supported with BeamAAD")
        return ids, strings

    def stream(self, prompt=None, *, input_ids=None, rule: Rule = AAD(0.1),
               max_new_tokens: int = 128, stop=None, chat: bool = False, min_tokens: int = 0,
               ignore_eos: bool = False, include_stop: bool = False):
        """Yield the text of one prompt as it is decoded (every ``check_every`` tokens); the
        end of the text that could begin a stop string is held back until it is known not to.

        The Decoder is held (other threads' calls wait) until the stream is exhausted,
        closed or garbage-collected, whichever thread resumes, closes or drops it; in the
        thread that runs it, call ``generate`` only after it (refused otherwise)."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer")
        shown = ""
        with self._locked():
            for out in self._run(prompt, input_ids, None, rule, max_new_tokens, stop, chat,
                                 partial=True, ends=(min_tokens, ignore_eos, include_stop)):
                final = isinstance(out, Generation)
                piece, now = text_delta(shown, out.text[0] if final else out, final)
                if piece:  # a trailing U+FFFD held back until its bytes come (text_delta)
                    with self._hold.caller_turn(self.threads):
                        yield piece
                    shown = now

    def logprobs(self, ids, *, stream: str = "a", top: int = 0, start: int = 1):
        """Log-probabilities of ``ids[start:]`` (one id list: a prompt and its completion) under
        one stream, ``"a"`` (the aligned model; a LoRA pair's adapter on) or ``"r"`` (the
        reference; the adapter off), each given the ids before it, with the ``top`` most likely
        ids of each position: one forward (``decode.logprobs``), not the decode path. One
        model (OPAD, CFG): the model itself; give the stream's own prompt."""
        ids = list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab)]
        if not ids or bad:
            raise ValueError(f"ids must be a non-empty list of token ids in [0, {self.vocab}), "
                             f"got {bad[:3] if bad else ids!r}")
        top = check_int("top", top, 0)
        with self._locked(), stream_model(self.kind, self.model_a, self.model_r, stream) as m:
            return sequence_logprobs(m, ids, self.vocab, top, start)

    def _validate(self, rule, max_new_tokens):
        if not isinstance(rule, Rule):
            raise ValueError(f"rule must be an aad_fast rule (AAD(0.1), Greedy(), ...), got {rule!r}")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        check_speculate(self.speculate, self.draft, rule)
        if "r" in rule.streams and self.kind == "one" and not isinstance(rule, (OPAD, CFGMix)):
            raise ValueError(f"{type(rule).__name__} needs a reference model: pass reference= "
                             "(or an aligned LoRA adapter); only OPAD and CFG run on one model")
        if isinstance(rule, OPAD) and self.kind != "one":
            raise ValueError("OPAD runs one model with two prompts: build Decoder(model) "
                             "without a reference (and without a LoRA adapter)")
        return max_new_tokens

    def _run(self, prompts, input_ids, attention_mask, rule, max_new_tokens, stop, chat,
             partial=False, ends=(0, False, False)):
        """Yield the text of row 0 after each burst when ``partial``, then the Generation.
        Runs with the models' locks held (``generate``/``stream``)."""
        if self._owner is not None:
            raise RuntimeError("this Decoder is already decoding in this thread (a stream() "
                               "that is still open?); exhaust or close() the stream first")
        self._owner = threading.get_ident()
        try:
            yield from self._run_unguarded(prompts, input_ids, attention_mask, rule,
                                           max_new_tokens, stop, chat, partial, ends)
        finally:
            self._owner = None

    def _run_unguarded(self, prompts, input_ids, attention_mask, rule, max_new_tokens, stop,
                       chat, partial, ends):
        max_new_tokens = self._validate(rule, max_new_tokens)
        min_new, ignore_eos, include = ends
        stop_ids, strings = self._stops_for(rule, stop, ignore_eos, min_new)
        if min_new > max_new_tokens:
            raise ValueError(f"min_tokens={min_new} exceeds max_new_tokens={max_new_tokens}")
        if self.lora is not None:
            self.lora.check_unmerged()
        rows = self._rows(rule, prompts, input_ids, attention_mask, chat)
        if isinstance(rule, BeamAAD):
            yield self._beam(rule, rows, max_new_tokens, stop_ids)
            return
        if isinstance(rule, BestOfN):
            yield self._best_of_n(rule, rows, max_new_tokens, stop_ids, min_new)
            return
        yield from self._decode(rule, rows, max_new_tokens, stop_ids, partial=partial,
                                min_new=min_new,
                                stops=self._stop_matcher(strings, include, min_new))

def generate(aligned, reference=None, prompts=None, **kwargs) -> Generation:
    """One-shot ``Decoder(aligned, reference, ...).generate(prompts, ...)``. Decoder options
    (``tokenizer, dtype, device, max_batch_size, max_seq_len, cuda_graphs, backend``) and
    ``generate`` options are both accepted."""
    dec_keys = ("tokenizer", "dtype", "device", "max_batch_size", "max_seq_len", "cuda_graphs",
                "backend", "check_every", "cpu_linear", "compile", "forward", "threads",
                "draft", "speculate")
    dec_kw = {k: kwargs.pop(k) for k in dec_keys if k in kwargs}
    n = len(prompts) if isinstance(prompts, list) else 1
    if "input_ids" in kwargs and kwargs["input_ids"] is not None:
        n = len(kwargs["input_ids"])
    rule = kwargs.get("rule")  # beams and samples are rows of the batch too
    n *= rule.num_beams if isinstance(rule, BeamAAD) else rule.n if isinstance(rule, BestOfN) else 1
    dec_kw.setdefault("max_batch_size", max(n, 1))
    with Decoder(aligned, reference, **dec_kw) as dec:
        return dec.generate(prompts, **kwargs)
