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
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .decode import steps as engine
from .decode import search
from .decode.driver import bucket, text_delta
from .model.cache import KVPool, check_fits, kv_bytes, ladder_length, read_ladder
from .model.loading import load_pair
from . import tuning
from .model.lora_rows import RowLoRA
from .model.pairs import SharedPair, SinglePair, TwoModelPair
from .model.runner import sliding_unsupported
from .decode.prompt_rows import MAX_STOP_IDS, Rows, resolve_stop_ids, rule_rows
from .rules import AAD, OPAD, BeamAAD, BestOfN, CFGMix, Rule, check_int
from .decode.scheduler import Request, Scheduler, new_state
from .decode.selectors import make_selector, rule_kind
from .model import cpu_linear as linear_layouts
from .model import forward as fast_forward
from .model import threads as thread_choice


@dataclass
class Generation:
    """Result of ``Decoder.generate``: per row the completion ids (stop id excluded), the text
    (when a tokenizer is known), ``"stop"`` or ``"length"``, and run statistics."""

    tokens: list
    text: list | None
    finish_reason: list
    stats: dict = field(default_factory=dict)
    scores: list | None = None
    candidates: list | None = None


class Decoder:
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
    """

    MAX_ENTRIES = 16  # entries kept (batch bucket, rule kind; a step per read length), LRU
    DEFAULT_SEQ_LEN = 2048

    def __init__(self, aligned, reference=None, *, tokenizer=None, dtype=None, device=None,
                 max_batch_size: int = 8, max_seq_len: int | None = None, cuda_graphs="auto",
                 backend: str | None = None, check_every: int = 8,
                 cpu_linear: str | None = None, compile="auto", forward: str | None = None,
                 threads=None):
        max_batch_size = check_int("max_batch_size", max_batch_size, 1)
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
        self.vocab = self._vocab()
        self._check_positions(max_seq_len)
        self._slots: dict = {}
        # every runner of this Decoder works on views of these (one decode at a time: below)
        self._pools = self._make_pools(max_batch_size)
        check_fits(self.kv_cache_bytes, self.device, max_batch_size, max_seq_len)
        self._entries: OrderedDict = OrderedDict()
        self._pickers: dict = {}  # best-of-n picker models loaded from paths
        self._init_hold()

    # ------------------------------------------------------------------ setup helpers
    def _check_positions(self, max_seq_len: int) -> None:
        """Refuse ``max_seq_len`` past a learned position table; warn where sliding-window
        attention is mixed with layer types that are not masked."""
        for model in (self.base, self.model_r):
            limit = None if model is None else position_limit(model)
            if limit is not None and max_seq_len > limit:
                raise ValueError(f"max_seq_len={max_seq_len} exceeds {type(model).__name__}'s "
                                 f"{limit} learned positions (its position table has no row "
                                 f"beyond position {limit - 1}); pass "
                                 f"Decoder(max_seq_len<={limit})")
        for model in (self.base, self.model_r):
            window = sliding_unsupported(getattr(model, "config", None), max_seq_len)
            if window is not None:
                warnings.warn(f"{type(model).__name__} mixes sliding-window attention ({window} "
                              f"tokens) with layer types aad_fast does not mask "
                              f"({sorted(set(model.config.layer_types))}); it attends over the "
                              f"full cache, so sequences longer than {window} tokens will differ "
                              f"from the model's own generate(). Pass max_seq_len<={window} to "
                              f"rule this out.", stacklevel=3)

    def _init_hold(self) -> None:
        """A decode reuses this Decoder's static buffers (caches, state, captured graphs), so
        calls must not overlap: each holds the Decoder for a whole generate()/stream().
        Decoders never share buffers or layers (each runs its own view of the models), so
        they don't. The hold is not owned by a thread: a stream suspended at a yield may be
        resumed, closed or garbage-collected in any thread, and that releases it (an RLock
        across the yields could only be released by the thread that took it)."""
        self._free = threading.Condition(threading.Lock())
        self._depth = 0         # nested holds (0: free)
        self._running = None    # the thread running inside the hold; None while a stream waits
        self._home = None       # a waiting stream's thread, while it has run in that one only
        self._owner = None  # the thread inside _run (re-entry from it is refused)

    def _vocab(self) -> int:
        sizes = [self.base.get_output_embeddings().weight.shape[0]]
        if self.model_r is not None:
            sizes.append(self.model_r.get_output_embeddings().weight.shape[0])
        v = min(sizes)
        n_tok = _tokenizer_ids(self.tokenizer) if self.tokenizer is not None else None
        if n_tok is not None and n_tok < v:
            v = n_tok  # ids at or beyond the tokenizer's range are padding rows: never chosen
        return v

    def close(self) -> None:
        """Free the caches and captured graphs (the models are never modified)."""
        with self._locked():
            self._slots.clear()
            for pool in self._pools.values():
                pool.free()
            self._entries.clear()
            self._pickers.clear()

    def _acquire(self) -> None:
        """Hold this Decoder: wait while another call holds it; re-entry from the thread
        running inside the hold nests. A stream left open at a yield in this very thread (and
        only ever run in it) would never be resumed while this thread waits: refused."""
        me = threading.get_ident()
        with self._free:
            while self._depth and self._running != me:
                if self._running is None and self._home == me:
                    raise RuntimeError("this Decoder is already decoding in this thread (a "
                                       "stream() that is still open?); exhaust or close() the "
                                       "stream first")
                self._free.wait()
            self._depth += 1
            self._running = me

    def _release(self) -> None:
        """Let go of one hold; from any thread (a stream may end in another than began it)."""
        with self._free:
            self._depth -= 1
            if not self._depth:
                self._running = self._home = None
                self._free.notify_all()

    @contextlib.contextmanager
    def _locked(self):
        """Hold this Decoder (other threads' calls wait for it), with ``self.threads`` intra-op
        threads while it is held (the process's count put back after)."""
        self._acquire()
        try:
            before = torch.get_num_threads()
            change = self.threads is not None and self.threads != before
            if change:
                torch.set_num_threads(self.threads)
            self._caller_threads = before if change else None
            try:
                yield
            finally:
                self._caller_threads = None
                if change:
                    torch.set_num_threads(before)
        finally:
            self._release()

    @contextlib.contextmanager
    def _caller_turn(self):
        """Around a ``stream`` yield: the hold stays the stream's, but no thread runs inside it
        (the stream may be resumed from any thread, which then runs inside it); the caller's
        code between two pieces runs with its own intra-op thread count, the Decoder's is set
        again when the stream resumes."""
        me = threading.get_ident()
        with self._free:
            self._home = me if self._home in (None, me) and self._running == me else -1
            self._running = None
        before = getattr(self, "_caller_threads", None)
        if before is not None:
            torch.set_num_threads(before)
        try:
            yield
        finally:
            with self._free:
                self._running = threading.get_ident()
                if self._home != self._running:
                    self._home = -1  # resumed elsewhere: driven by several threads (a pool)
            if before is not None:
                torch.set_num_threads(self.threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _bucket(self, b: int) -> int:
        return bucket(b, self.max_batch_size) if self.use_graphs else b

    def _make_pools(self, rows: int, streams: str = "ar") -> dict:
        """KV pools (``cache.KVPool``) for ``rows`` rows of ``streams`` (default: every stream
        set), one per set of weights: ``{"a", "r"}`` (``rows`` each) for two models, else
        ``{"base"}`` with ``2 * rows`` (a shared pair runs both streams as rows of one batch; a
        single stream, beams and samples use the first rows). Nothing is allocated until a
        runner's first forward."""
        L = self.max_seq_len
        if self.kind == "two":
            models = {"a": self.base, "r": self.model_r}
            return {s: KVPool(rows, L, kv_bytes(models[s], rows, L))
                    for s in ("a", "r") if s in streams}
        n = 2 * rows if streams == "ar" else rows
        return {"base": KVPool(n, L, kv_bytes(self.base, n, L))}

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of this Decoder's KV pools: ``2 * layers * rows * kv_heads * max_seq_len *
        head_dim * itemsize`` per set of weights (``cache.kv_bytes``), whatever the buckets and
        rule kinds used. A ``scheduler(...)`` holds a pool of its own besides."""
        return sum(pool.nbytes for pool in self._pools.values())

    def _pair(self, n: int, streams: str, needed: int, static: bool | None = None):
        """Runners for ``n`` rows, their caches views of the Decoder's KV pools (so keeping
        several costs no KV memory: one decode runs at a time, and each prefill/admission
        rewrites what its rows read). Static runners (CUDA graphs, a compiled step) are kept:
        the graphs or the compiled code hold their buffers; they have ``max_seq_len`` slots
        (at most ``MAX_STATIC`` kept), and their steps read only a rung of the read ladder
        (``engine.LengthSteps``). Eager runners are sized to this call's need, so attention
        never reads unused slots."""
        static = self.use_graphs if static is None else static
        L = self.max_seq_len if static else needed
        key = (n, streams, L, static)
        for old in [k for k in self._slots if not k[3] and k != key]:
            self._drop(old)
        if key not in self._slots:
            kept = [k for k in self._slots if k[3]]
            if static and len(kept) >= MAX_STATIC:
                self._drop(kept[0])
            self._slots[key] = self._new_pair(n, streams, L)
        return self._slots[key]

    def _new_pair(self, n: int, streams: str, L: int, pools: dict | None = None):
        """Runners of ``n`` rows and ``L`` cache slots for ``streams`` on this Decoder's pair,
        over ``pools`` (``_make_pools``; default the Decoder's own)."""
        lin, fwd = self.cpu_linear, self.forward
        pools = self._pools if pools is None else pools
        if streams == "ar":
            if self.kind == "two":
                return TwoModelPair(self.model_a, self.model_r, n, L, lin,
                                    (pools["a"], pools["r"]), fwd)
            # LoRA pair or prompt pair
            return SharedPair(self.base, n, L, self.lora, lin, pools["base"], fwd)
        pool = pools[streams] if self.kind == "two" else pools["base"]
        if streams == "a":
            return SinglePair(self.base, n, L, self.lora, n, lin, pool, fwd)
        model = self.model_r if self.kind == "two" else self.base
        return SinglePair(model, n, L, self.lora if self.kind == "lora" else None, 0, lin, pool,
                          fwd)

    def _drop(self, key) -> None:
        pair = self._slots.pop(key)
        for k in [k for k in self._entries if k[0] == id(pair)]:
            del self._entries[k]

    def _compile_key(self, streams: str, n: int) -> str:
        """The tuning entry of the compiled-vs-eager choice: model shape, pair, rows, device."""
        model = self.base if streams != "r" or self.kind != "two" else self.model_r
        cfg = model.config
        sig = (f"{type(model).__name__}-h{getattr(cfg, 'hidden_size', '?')}"
               f"-l{getattr(cfg, 'num_hidden_layers', '?')}-v{self.vocab}-"
               f"{str(next(model.parameters()).dtype).replace('torch.', '')}")
        pair = self.kind if streams == "ar" else f"single-{streams}"
        return f"compile/{self.device.type}/{sig}/{pair}/rows{n}"

    def _wants_compile(self, key: str, max_new: int, longest: int = 1) -> bool:
        """``compile``, or for ``"auto"`` whether this machine's record says compiling pays
        for ``max_new`` tokens after a prompt of ``longest``: one compile per rung of the read
        ladder the call's rows reach (``cache.read_ladder``)."""
        if self.compile is True or self.compile is False:
            return self.compile and max_new > 1
        ladder = read_ladder(self.max_seq_len, self.device)
        lo = ladder_length(ladder, longest + 1)
        hi = ladder_length(ladder, longest + max_new)
        return tuning.compile_pays(key, max_new - 1, sum(lo <= r <= hi for r in ladder))

    def _entry(self, pair, n: int, rule: Rule):
        """Selector, decode state and captured graph for ``n`` rows of ``rule``'s kind
        (``selectors.rule_kind``): one entry, so one graph, serves every value of the kind;
        ``rule``'s values are written into the selector's tensors here. At most
        ``MAX_ENTRIES`` are kept, least recently used dropped first."""
        key = (id(pair), rule.streams, rule_kind(rule))  # the pair fixes the row count
        ent = self._entries.get(key)
        if ent is None or ent["pair"] is not pair:
            sel = make_selector(rule, n, self.vocab, self.device, self.backend)
            st = new_state(n, pair.runners[0].max_len, MAX_STOP_IDS, self.device)
            ent = {"sel": sel, "st": st, "pair": pair}
            self._entries[key] = ent
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        else:
            ent["sel"].set_rule(rule)
        self._entries.move_to_end(key)
        return ent

    # ------------------------------------------------------------------ inputs
    def stop_ids(self, stop=None) -> list:
        """The model's end-of-sequence id(s) plus the caller's ``stop`` (ids or single-token
        strings)."""
        return resolve_stop_ids(stop, self.base, self.tokenizer, self.vocab)

    def _rows(self, rule, prompts, input_ids, attention_mask, chat) -> Rows:
        """Both streams' prompt ids for ``rule`` (``prompts.rule_rows``)."""
        return rule_rows(rule, self.kind, self.tokenizer, self.vocab, prompts, input_ids,
                         attention_mask, chat)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts=None, *, input_ids=None, attention_mask=None, rule: Rule = AAD(0.1),
                 max_new_tokens: int = 128, stop=None, chat: bool = False) -> Generation:
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
            stop: extra stop ids / single-token strings besides the model's EOS.
        Returns:
            ``Generation`` with per row ``tokens`` (stop id excluded), ``text``,
            ``finish_reason`` and ``stats``.
        """
        with self._locked():
            for out in self._run(prompts, input_ids, attention_mask, rule, max_new_tokens, stop,
                                 chat):
                pass
        return out

    def scheduler(self, rule: Rule = AAD(0.1), *, rows: int | None = None) -> Scheduler:
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
        ``Mix`` scheduler: ``search.samples``)."""
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
        streams = rule.streams
        pools = self._make_pools(n, streams)  # its own: its rows stay live between other calls
        check_fits(sum(p.nbytes for p in pools.values()), self.device, n, self.max_seq_len,
                   "a scheduler's KV cache", "rows")
        pair = self._new_pair(n, streams, self.max_seq_len, pools)
        if isinstance(rule, BeamAAD):
            if rule.num_beams > n:
                raise ValueError(f"num_beams={rule.num_beams} exceeds rows={n}: a request's "
                                 "beams are rows of the scheduler; give it more rows")
            bs = search.BeamSearch(rule, n, self.max_seq_len, MAX_STOP_IDS, self.vocab,
                                   self.backend, self.device)
            return Scheduler(pair, bs, None, rule, check_every=self.check_every)
        sel = make_selector(rule, n, self.vocab, self.device, self.backend)
        st = new_state(n, self.max_seq_len, MAX_STOP_IDS, self.device)
        st.names = ("reference", "reference") if streams == "r" else ("aligned", "reference")
        name = type(self.base).__name__

        def prepare():  # a step per read length, captured on first use
            if not self.use_graphs:
                return None
            return engine.LengthSteps(pair, sel, st, name,
                                      read_ladder(self.max_seq_len, self.device),
                                      graphs=True, compiled=False)
        return Scheduler(pair, sel, st, rule, check_every=self.check_every, prepare=prepare)

    def request(self, prompt=None, *, input_ids=None, rule: Rule = AAD(0.1),
                max_new_tokens: int = 128, stop=None, chat: bool = False, seed=None,
                tag=None) -> Request:
        """One ``Request`` for a ``scheduler(...)`` of ``rule``'s kind: ``prompt`` (a string,
        or with ``chat`` a conversation: a list of ``{"role", "content"}`` messages) or
        ``input_ids`` (one id list), both streams' ids as ``generate`` makes them (OPAD's
        principle, CFG's negative prompt), stop ids with the model's EOS."""
        max_new_tokens = self._validate(rule, max_new_tokens)
        if input_ids is not None:
            input_ids = [input_ids]
        rows = self._rows(rule, prompt, input_ids, None, chat)
        if len(rows.a) != 1:
            raise ValueError(f"request() takes one prompt, got {len(rows.a)}")
        a, r = {"ar": (rows.a[0], rows.r[0]), "a": (rows.a[0], rows.a[0]),
                "r": (rows.r[0], rows.r[0])}[rule.streams]
        if isinstance(rule, BeamAAD):  # both streams score the one prompt
            r = a
        return Request(ids_a=a, ids_r=r, rule=rule, max_new_tokens=max_new_tokens,
                       stop_ids=tuple(self.stop_ids(stop)), seed=seed, tag=tag)

    def stream(self, prompt=None, *, input_ids=None, rule: Rule = AAD(0.1),
               max_new_tokens: int = 128, stop=None, chat: bool = False):
        """Yield the text of one prompt as it is decoded (every ``check_every`` tokens).

        The Decoder is held (other threads' calls wait) until the stream is exhausted,
        closed or garbage-collected, whichever thread resumes, closes or drops it; in the
        thread that runs it, call ``generate`` only after it (refused otherwise)."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer")
        shown = ""
        with self._locked():
            for out in self._run(prompt, input_ids, None, rule, max_new_tokens, stop, chat,
                                 partial=True):
                final = isinstance(out, Generation)
                piece, now = text_delta(shown, out.text[0] if final else out, final)
                if piece:  # a trailing U+FFFD held back until its bytes come (text_delta)
                    with self._caller_turn():
                        yield piece
                    shown = now

    def _validate(self, rule, max_new_tokens):
        if not isinstance(rule, Rule):
            raise ValueError(f"rule must be an aad_fast rule (AAD(0.1), Greedy(), ...), got {rule!r}")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        if "r" in rule.streams and self.kind == "one" and not isinstance(rule, (OPAD, CFGMix)):
            raise ValueError(f"{type(rule).__name__} needs a reference model: pass reference= "
                             "(or an aligned LoRA adapter); only OPAD and CFG run on one model")
        if isinstance(rule, OPAD) and self.kind != "one":
            raise ValueError("OPAD runs one model with two prompts: build Decoder(model) "
                             "without a reference (and without a LoRA adapter)")
        return max_new_tokens

    def _check_lengths(self, rows: Rows, max_new: int, n_rows: int, refill: bool = False):
        """``refill``: more rows than ``max_batch_size`` are fine (continuous batching)."""
        if n_rows > self.max_batch_size and not refill:
            raise ValueError(f"{n_rows} rows exceed max_batch_size={self.max_batch_size}; "
                             "pass a larger Decoder(max_batch_size=...)")
        longest = max(len(r) for r in rows.a + rows.r)
        if longest + max_new > self.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new} exceeds "
                             f"max_seq_len={self.max_seq_len}; pass a larger "
                             "Decoder(max_seq_len=...) or fewer new tokens")

    def _run(self, prompts, input_ids, attention_mask, rule, max_new_tokens, stop, chat,
             partial=False):
        """Yield the text of row 0 after each burst when ``partial``, then the Generation.
        Runs with the models' locks held (``generate``/``stream``)."""
        if self._owner is not None:
            raise RuntimeError("this Decoder is already decoding in this thread (a stream() "
                               "that is still open?); exhaust or close() the stream first")
        self._owner = threading.get_ident()
        try:
            yield from self._run_unguarded(prompts, input_ids, attention_mask, rule,
                                           max_new_tokens, stop, chat, partial)
        finally:
            self._owner = None

    def _run_unguarded(self, prompts, input_ids, attention_mask, rule, max_new_tokens, stop,
                       chat, partial):
        max_new_tokens = self._validate(rule, max_new_tokens)
        if self.lora is not None:
            self.lora.check_unmerged()
        rows = self._rows(rule, prompts, input_ids, attention_mask, chat)
        stop_ids = self.stop_ids(stop)
        if isinstance(rule, BeamAAD):
            yield self._beam(rule, rows, max_new_tokens, stop_ids)
            return
        if isinstance(rule, BestOfN):
            yield self._best_of_n(rule, rows, max_new_tokens, stop_ids)
            return
        yield from self._decode(rule, rows, max_new_tokens, stop_ids, partial=partial)

    def _beam(self, rule: BeamAAD, rows: Rows, max_new, stop_ids) -> Generation:
        """BeamAAD through a ``Scheduler`` of beam slots (``search.BeamSearch``): each prompt
        takes ``k = num_beams`` rows of this Decoder's kept runners; all prompts at once when
        their beams fit ``max_batch_size``, else as many as fit, each finished slot refilled
        with the next prompt."""
        k, b = rule.num_beams, len(rows.a)
        self._check_beams(k)
        self._check_lengths(rows, max_new, b * k, refill=True)
        n = self._bucket(min(b, self.max_batch_size // k) * k)
        longest = max(len(r) for r in rows.a)
        pair = self._pair(n, "ar", longest + max_new)
        bs = search.BeamSearch(rule, n, max_new, max(len(set(stop_ids)), 1), self.vocab,
                               self.backend, self.device)
        sched = Scheduler(pair, bs, None, rule, check_every=self.check_every)
        for r in pair.runners:  # this call's read lengths only
            r.reads = {}
        handles = [sched.submit(Request(ids_a=rows.a[i], ids_r=rows.a[i], rule=rule,
                                        max_new_tokens=max_new, stop_ids=tuple(stop_ids), tag=i))
                   for i in range(b)]
        sync = sched.sync
        t0, t1 = _first_admission(sched)
        with torch.inference_mode():
            while sched.step_burst():
                pass
            sync()
        decode_s = time.perf_counter() - t1
        tokens = [h.tokens for h in handles]
        steps = sched.steps + 1  # the first selection, then one forward of every row per step
        stats = {"prefill_ms": (t1 - t0) * 1e3, "steps": steps,
                 "ms_per_token": decode_s * 1e3 / max(steps - 1, 1),
                 "tokens_per_s": (sum(h.steps - 1 for h in handles) / decode_s
                                  if steps > 1 and decode_s > 0 else float("nan")),
                 # aad_beam_topk has a fused C++ step; every other backend runs the reference
                 "backend": "cpp" if bs.backend == "cpp" else "torch",
                 "cuda_graphs": False, "compiled": False, "batch": b, "num_beams": k, "rows": n,
                 "pair": self.kind, "device": str(self.device),
                 "linear": _linear_stats(pair), "forward": _forward_stats(pair),
                 "kv_cache_bytes": self.kv_cache_bytes, "threads": torch.get_num_threads(),
                 **_read_stats(pair, pair.runners[0].reads)}
        return Generation(tokens=tokens, text=self._text(tokens),
                          finish_reason=[h.finish_reason for h in handles], stats=stats,
                          scores=[h.score for h in handles])

    def _check_beams(self, k: int) -> None:
        if k > self.max_batch_size:
            raise ValueError(f"num_beams={k} exceeds max_batch_size={self.max_batch_size}: a "
                             "prompt's beams are rows of one batch; pass a larger "
                             "Decoder(max_batch_size=...) or fewer beams")

    def _best_of_n(self, rule: BestOfN, rows: Rows, max_new, stop_ids) -> Generation:
        """BestOfN: ``rule.n`` samples per prompt (``search.samples``: each an ordinary
        request with its own seed) through the one decode loop (``_decode``, continuous batching
        past ``max_batch_size``), then the picker's choice (``search.pick_best``)."""
        sample, rep, seeds = search.samples(rule, rows.a)
        for got in self._decode(sample, Rows(rep, rep), max_new, stop_ids, seeds=seeds):
            pass
        model, ptok = search.load_picker(rule.picker, self.device, self._pickers)
        best = search.pick_best(rule.n, rep, got, model, ptok or self.tokenizer, self.tokenizer)
        return Generation(text=self._text(best["tokens"]), stats=dict(got.stats, n=rule.n),
                          **best)

    def _decode(self, rule, rows: Rows, max_new, stop_ids, seeds=None, partial=False):
        """Every row of ``rows`` through a ``Scheduler``: all admitted at once when they fit
        ``max_batch_size`` (a static batch), else the rows that fit first and each freed row
        refilled with the next prompt (continuous batching). ``seeds``: one int per row, its
        request's seed (best-of-n's samples); ``None``: the rule's."""
        b = len(rows.a)
        self._check_lengths(rows, max_new, b, refill=True)
        n = self._bucket(min(b, self.max_batch_size))
        streams = rule.streams
        longest = max(len(r) for r in rows.a + rows.r)
        ckey = self._compile_key(streams, n)
        compiled = self._wants_compile(ckey, max_new, longest)
        pair = self._pair(n, streams, longest + max_new, static=self.use_graphs or compiled)
        ent = self._entry(pair, n, rule)
        sel, st = ent["sel"], ent["st"]
        st.names = ("reference", "reference") if streams == "r" else ("aligned", "reference")
        stream_rows = {"ar": (rows.a, rows.r), "a": (rows.a, rows.a), "r": (rows.r, rows.r)}
        ra, rr = stream_rows[streams]
        sched = Scheduler(pair, sel, st, rule, check_every=self.check_every)
        handles = [sched.submit(Request(ids_a=ra[i], ids_r=rr[i], max_new_tokens=max_new,
                                        stop_ids=tuple(stop_ids), tag=i,
                                        seed=None if seeds is None else seeds[i]))
                   for i in range(b)]
        sync = sched.sync
        t0, t1 = _first_admission(sched)
        with torch.inference_mode():
            lsteps = self._length_steps(ent, pair, max_new, compiled)
            compiles = lsteps.compiles if lsteps is not None else 0
            if lsteps is not None:
                lsteps.prepare()  # the first step's length, outside the timed decode
            sched.step = lsteps
            st.ref_head.update(sparse=0, full=0, candidates=0)  # not the compile's warm-up
            for r in pair.runners:
                r.reads = {}
            sync()
            t2 = time.perf_counter()
            built_s = lsteps.build_s if lsteps is not None else 0.0
            while sched.step_burst():
                if partial and sched.busy:
                    yield self._text([sched.partial(handles[0])])[0]
            sync()
            t3 = time.perf_counter()
            # lengths first reached mid-decode were built then: capture time, not decode time
            late_s = lsteps.build_s - built_s if lsteps is not None else 0.0
        tokens = [h.tokens for h in handles]
        out = Generation(tokens=tokens, text=self._text(tokens),
                         finish_reason=[h.finish_reason for h in handles])
        out.stats = self._decode_stats(sched, out, pair, sel, st, lsteps, streams, n,
                                       (t0, t1, t2, t3, late_s))
        compile_s = None
        if lsteps is not None and lsteps.compiles > compiles:
            compile_s = lsteps.compile_s  # compiled in this call (for compile="auto")
        if out.stats["steps"] > 8 and b <= n:  # enough steps to say what the step costs
            tuning.observe_step(ckey, out.stats["compiled"], out.stats["ms_per_token"],
                                compile_s)  # for compile="auto"
        yield out

    def _length_steps(self, ent: dict, pair, max_new: int, compiled: bool):
        """The entry's ``engine.LengthSteps`` for graphs and/or a compiled step (made on first
        use; one entry per (bucket, rule kind) keeps one step per read length, LRU: ``_entry``),
        or ``None`` for the eager step."""
        graphs = self.use_graphs and max_new > 1
        if not (graphs or compiled):
            return None
        skey = ("steps", graphs, compiled)
        if skey not in ent:
            ent[skey] = engine.LengthSteps(
                pair, ent["sel"], ent["st"], type(self.base).__name__,
                read_ladder(pair.runners[0].max_len, self.device), graphs=graphs,
                compiled=compiled)
        return ent[skey]

    def _decode_stats(self, sched, out: Generation, pair, sel, st, lsteps, streams: str,
                      n: int, times: tuple) -> dict:
        """``Generation.stats`` of a ``_decode``: ``times`` are the perf-counter seconds
        before and after the first admission, at the timed decode's start and end, and the
        build time of steps first reached mid-decode."""
        t0, t1, t2, t3, late_s = times
        b = len(out.tokens)
        steps = sched.steps + 1
        n_tok = sum(len(t) + (r == "stop") for t, r in zip(out.tokens, out.finish_reason))
        # admissions after the first are part of the decode time (they are what refill costs)
        decode_s = t3 - t2 - late_s
        reads = pair.runners[0].reads
        ran = [lsteps.kinds[n] for n in reads if n in lsteps.kinds] \
            if lsteps is not None and not lsteps.failed else []
        return {
            "prefill_ms": (t1 - t0) * 1e3,
            "capture_ms": (t2 - t1 + late_s) * 1e3,
            "steps": steps,
            "ms_per_token": decode_s * 1e3 / max(steps - 1, 1),
            "tokens_per_s": (n_tok - b) / decode_s if decode_s > 0 and n_tok > b else float("nan"),
            "backend": getattr(sel, "backend", "torch"),
            "cuda_graphs": any(graph for graph, _ in ran),
            "compiled": any(comp for _, comp in ran),
            "pair": self.kind if streams == "ar" else f"single:{streams}",
            "batch": b,
            "rows": n,
            "device": str(self.device),
            "linear": _linear_stats(pair),
            "forward": _forward_stats(pair),
            "reference_head": _ref_head_stats(st.ref_head),
            "kv_cache_bytes": self.kv_cache_bytes,
            "threads": torch.get_num_threads(),
            **_read_stats(pair, reads),
        }

    def _text(self, tokens):
        if self.tokenizer is None:
            return None
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)


MAX_STATIC = 4  # kept static runner sets (each holds a KV cache and maybe compiled code)


def _read_stats(pair, reads: dict) -> dict:
    """``read_lengths``: steps run per attention read length (slots) in this call;
    ``kv_read_bytes_per_step``: the KV bytes those steps read, on average (keys and values of
    every layer, row and read slot of the pair's runners)."""
    steps = sum(reads.values())
    per_slot = sum(t.numel() // t.shape[2] * t.element_size()
                   for r in pair.runners for t in r.cache.keys + r.cache.values)
    mean = sum(n * c for n, c in reads.items()) / steps if steps else 0
    return {"read_lengths": dict(sorted(reads.items())),
            "kv_read_bytes_per_step": int(per_slot * mean)}


def _linear_stats(pair) -> dict:
    """Which layout each weight shape of the pair's runners took (``linear_layouts.summarize``)."""
    out = {}
    for runner in pair.runners:
        out.update(linear_layouts.summarize(runner.plan))
    return out


def _forward_stats(pair) -> str:
    """``"fast"`` (every runner on ``FastDecoder``), ``"hf"`` (none) or ``"mixed"``."""
    fast = {r.fast is not None for r in pair.runners}
    return "mixed" if len(fast) == 2 else "fast" if fast.pop() else "hf"


def _ref_head_stats(counts: dict) -> dict:
    """How the decode steps computed stream r's logits (``engine.reference_logits``):
    ``sparse_steps`` on the aligned stream's candidates only (``candidates_per_step``: their
    mean count over the batch), ``full_steps`` over the whole vocabulary by that path (steps
    of rules that need the whole reference are in neither)."""
    s = counts["sparse"]
    return {"sparse_steps": s, "full_steps": counts["full"],
            "candidates_per_step": counts["candidates"] / s if s else None}


def _tokenizer_ids(tokenizer) -> int | None:
    """The size of ``tokenizer``'s id range: 1 + its largest id (vocabulary and added tokens),
    at least ``len(tokenizer)``; ids may have gaps, so ``len()`` alone can miss real ones."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    ids = []
    with contextlib.suppress(Exception):  # a tokenizer-like object without these
        ids += list(tokenizer.get_vocab().values())
    with contextlib.suppress(Exception):
        ids += list(tokenizer.added_tokens_decoder)
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    if ids:
        n = max(n or 0, 1 + max(ids))
    return n


def position_limit(model) -> int | None:
    """The number of positions of ``model``'s learned absolute position table (GPT-2's
    ``wpe``, OPT/BioGPT-style ``embed_positions``, ...), or ``None`` for models without one
    (rotary, ALiBi): an ``nn.Embedding`` besides the input embeddings whose name says
    "pos"/``wpe``. Its limit is the config's ``n_positions`` / ``max_position_embeddings``
    when given (a table may hold offset rows), else the table's rows."""
    model = getattr(model, "get_base_model", lambda: model)()
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = None
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(mod, torch.nn.Embedding) and mod is not inp and \
                ("pos" in leaf or leaf == "wpe"):
            table = mod
            break
    if table is None:
        return None
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and not isinstance(val, bool) and 0 < val <= table.num_embeddings:
            return val
    return table.num_embeddings


def _first_admission(sched: Scheduler) -> tuple:
    """Admit what fits of ``sched``'s queue (the call's first prefill), timed from a synced
    device: ``(t0, t1)`` perf-counter seconds around it."""
    sched.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        sched.admit()
    sched.sync()
    return t0, time.perf_counter()


def generate(aligned, reference=None, prompts=None, **kwargs) -> Generation:
    """One-shot ``Decoder(aligned, reference, ...).generate(prompts, ...)``. Decoder options
    (``tokenizer, dtype, device, max_batch_size, max_seq_len, cuda_graphs, backend``) and
    ``generate`` options are both accepted."""
    dec_keys = ("tokenizer", "dtype", "device", "max_batch_size", "max_seq_len", "cuda_graphs",
                "backend", "check_every", "cpu_linear", "compile", "forward", "threads")
    dec_kw = {k: kwargs.pop(k) for k in dec_keys if k in kwargs}
    n = len(prompts) if isinstance(prompts, list) else 1
    if "input_ids" in kwargs and kwargs["input_ids"] is not None:
        n = len(kwargs["input_ids"])
    rule = kwargs.get("rule")  # beams and samples are rows of the batch too
    n *= rule.num_beams if isinstance(rule, BeamAAD) else rule.n if isinstance(rule, BestOfN) else 1
    dec_kw.setdefault("max_batch_size", max(n, 1))
    with Decoder(aligned, reference, **dec_kw) as dec:
        return dec.generate(prompts, **kwargs)
