"""The decode driver: the one place where decodes are driven through a
``scheduler.Scheduler`` (``Scheduler.burst``: schedule, execute, update), and what every
caller of a scheduler shares (``Decoder``'s calls and the server's loop, ``serve/loop.py``): how many rows a batch
takes (``bucket``) and what a stream is sent after each burst (``text_delta``).

``Driver`` is the part of ``Decoder`` (``decoder.py``, which subclasses it and adds loading,
validation, the hold and the public calls) that holds the decode buffers and runs the decodes:
KV pools (``cache.KVPool``), runners per batch bucket (views of the pools), per rule kind the
selector, state and steps (``engine.LengthSteps``, LRU), the compile choice, and the three
drivers: ``_decode`` (per-token rules, static or continuous batching), ``_beam`` (BeamAAD's
slots) and ``_best_of_n`` (samples through ``_decode``, then the picker).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import search
from . import steps as engine
from .. import tuning
from ..model import cpu_linear as linear_layouts
from ..model.cache import KVPool, check_fits, kv_bytes, ladder_length, read_ladder
from ..model.pairs import SharedPair, SinglePair, TwoModelPair
from ..rules import BeamAAD, BestOfN, Rule
from .prompt_rows import MAX_STOP_IDS, Rows
from .scheduler import Request, Scheduler, new_state
from .selectors import make_selector, rule_kind
from .drafts import resolve_draft
from .speculate import SpecExecutor, Speculator
from .verify_steps import VerifySteps


def bucket(rows: int, cap: int) -> int:
    """The rows of a batch for ``rows`` requests: the next power of two, at most ``cap`` (so a
    few sizes serve every batch, each with its own captured step)."""
    n = 1
    while n < rows:
        n *= 2
    return min(n, cap)


def text_delta(shown: str, text: str, final: bool = False) -> tuple:
    """``(piece, shown)``: the part of ``text`` (a stream's whole text so far) not yet
    ``shown``, and what is shown after sending it (``piece`` is ``""`` when there is nothing
    new). While decoding, a burst may end inside a multi-byte character, which decodes to a
    trailing U+FFFD that the next bytes replace: it is held back until then. The ``final`` text
    is sent whole (a U+FFFD it really ends in included), so the joined pieces equal the
    non-streamed text."""
    stable = text if final else text.rstrip("\ufffd")
    if stable.startswith(shown) and len(stable) > len(shown):
        return stable[len(shown):], stable
    return "", shown


def partial_text(sched: Scheduler, res, tokenizer) -> str:
    """The text a stream of ``res`` may show now: its final text once done (a stop string's
    cut included), else the text of its tokens so far without the end that could begin one
    of its stop strings (``StopStrings.shown``: a later match would cut it)."""
    if res.done and res.text is not None:
        return res.text
    text = tokenizer.decode(sched.partial(res), skip_special_tokens=True)
    stops = res.request.stops
    if stops is None or res.done:
        return text
    return stops.shown(text.rstrip("\ufffd"))


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


class Driver:
    """Decode buffers and the drive loops of a ``Decoder`` (the module docstring). The
    subclass sets ``kind, model_a, model_r, base, lora, tokenizer, device, vocab, backend,
    check_every, use_graphs, compile, cpu_linear, forward, max_batch_size, max_seq_len`` and
    then calls ``_init_buffers``; ``threads`` (the intra-op threads of its
    calls, ``None``: the process's) is read while a call holds it (``_locked``)."""

    MAX_ENTRIES = 16  # entries kept (batch bucket, rule kind; a step per read length), LRU

    def _init_buffers(self) -> None:
        """The KV pools (allocated on first use), the kept runners and entries."""
        self._runner_sets: dict = {}
        # every runner of this Decoder works on views of these (one decode at a time: below)
        self._pools = self._make_pools(self.max_batch_size)
        check_fits(self.kv_cache_bytes, self.device, self.max_batch_size, self.max_seq_len)
        self._entries: OrderedDict = OrderedDict()
        self._pickers: dict = {}  # best-of-n picker models loaded from paths

    def _new_scheduler(self, rule: Rule, n: int, min_tokens: bool = False) -> Scheduler:
        """``Decoder.scheduler``'s ``Scheduler`` of ``n`` rows for ``rule``'s kind, over KV pools,
        runners, selector and state of its own (checked by the caller); ``min_tokens``: its
        state takes per-row ``min_new_tokens`` (``new_state``)."""
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
        st = new_state(n, self.max_seq_len, MAX_STOP_IDS, self.device, min_tokens)
        st.names = ("reference", "reference") if streams == "r" else ("aligned", "reference")
        name = type(self.base).__name__

        k = getattr(self, "speculate", 0)

        def prepare():  # a step per read length, captured on first use
            if not self.use_graphs or k:
                return None
            return engine.LengthSteps(pair, sel, st, name,
                                      read_ladder(self.max_seq_len, self.device),
                                      graphs=True, compiled=False)
        sched = Scheduler(pair, sel, st, rule, check_every=self.check_every, prepare=prepare)
        if k:  # a draft of its own (its rows are this scheduler's), unless given as an object
            vsteps = VerifySteps(pair, sel, st, k, name, read_ladder(
                self.max_seq_len, self.device), graphs=True, compiled=False) \
                if self.use_graphs else None  # (captured per width and length on first use)
            sched.executor = SpecExecutor(sched.executor, Speculator(
                resolve_draft(self._draft_spec, self), k, pair, sel, st, self.vocab, vsteps))
        return sched

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
        the graphs or the compiled code hold their buffers; they have ``max_seq_len`` cache slots
        (at most ``MAX_STATIC`` kept), and their steps read only a rung of the read ladder
        (``engine.LengthSteps``). Eager runners are sized to this call's need, so attention
        never reads unused slots."""
        static = self.use_graphs if static is None else static
        L = self.max_seq_len if static else needed
        key = (n, streams, L, static)
        for old in [k for k in self._runner_sets if not k[3] and k != key]:
            self._drop(old)
        if key not in self._runner_sets:
            kept = [k for k in self._runner_sets if k[3]]
            if static and len(kept) >= MAX_STATIC:
                self._drop(kept[0])
            self._runner_sets[key] = self._new_pair(n, streams, L)
        return self._runner_sets[key]

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
        pair = self._runner_sets.pop(key)
        for k in [k for k in self._entries if k[0] == id(pair)]:
            del self._entries[k]

    def _compile_key(self, streams: str, n: int) -> str:
        """The tuning entry of the compiled-vs-eager choice: model shape, pair, rows, device,
        and ``/verify{k}`` for a Decoder that speculates ``k`` (its step is a verify step)."""
        model = self.base if streams != "r" or self.kind != "two" else self.model_r
        cfg = model.config
        sig = (f"{type(model).__name__}-h{getattr(cfg, 'hidden_size', '?')}"
               f"-l{getattr(cfg, 'num_hidden_layers', '?')}-v{self.vocab}-"
               f"{str(next(model.parameters()).dtype).replace('torch.', '')}")
        pair = self.kind if streams == "ar" else f"single-{streams}"
        k = getattr(self, "speculate", 0)
        return f"compile/{self.device.type}/{sig}/{pair}/rows{n}" + (f"/verify{k}" if k else "")

    def _wants_compile(self, key: str, max_new: int, longest: int = 1) -> bool:
        """``compile``, or for ``"auto"`` whether this machine's record says compiling pays
        for ``max_new`` tokens after a prompt of ``longest``: one compile per rung of the read
        ladder the call's rows reach (``cache.read_ladder``), twice for a Decoder that
        speculates (a verify step of ``k + 1`` positions and one of ``1``: ``VerifySteps``)."""
        if self.compile is True or self.compile is False:
            return self.compile and max_new > 1
        ladder = read_ladder(self.max_seq_len, self.device)
        lo = ladder_length(ladder, longest + 1)
        hi = ladder_length(ladder, longest + max_new)
        widths = 2 if getattr(self, "speculate", 0) else 1
        return tuning.compile_pays(key, max_new - 1,
                                   widths * sum(lo <= r <= hi for r in ladder))

    def _entry(self, pair, n: int, rule: Rule, min_tokens: bool = False):
        """Selector, decode state and captured graph for ``n`` rows of ``rule``'s kind
        (``selectors.rule_kind``): one entry, so one graph, serves every value of the kind;
        ``rule``'s values are written into the selector's tensors here. ``min_tokens``: an
        entry whose step masks stop ids until each row's ``min_new_tokens`` (a decode without
        them runs none of that). At most ``MAX_ENTRIES`` are kept, least recently used
        dropped first."""
        key = (id(pair), rule.streams, rule_kind(rule), min_tokens)  # the pair fixes the rows
        ent = self._entries.get(key)
        if ent is None or ent["pair"] is not pair:
            sel = make_selector(rule, n, self.vocab, self.device, self.backend)
            st = new_state(n, pair.runners[0].max_len, MAX_STOP_IDS, self.device, min_tokens)
            ent = {"sel": sel, "st": st, "pair": pair}
            self._entries[key] = ent
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        else:
            ent["sel"].set_rule(rule)
        self._entries.move_to_end(key)
        return ent

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
            sched.run_until_idle()
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

    def _best_of_n(self, rule: BestOfN, rows: Rows, max_new, stop_ids,
                   min_new: int = 0) -> Generation:
        """BestOfN: ``rule.n`` samples per prompt (``search.samples``: each an ordinary
        request with its own seed) through the one decode loop (``_decode``, continuous batching
        past ``max_batch_size``), then the picker's choice (``search.pick_best``)."""
        sample, rep, seeds = search.samples(rule, rows.a)
        for got in self._decode(sample, Rows(rep, rep), max_new, stop_ids, seeds=seeds,
                                min_new=min_new):
            pass
        model, ptok = search.load_picker(rule.picker, self.device, self._pickers)
        best = search.pick_best(rule.n, rep, got, model, ptok or self.tokenizer, self.tokenizer)
        return Generation(text=self._text(best["tokens"]), stats=dict(got.stats, n=rule.n),
                          **best)

    def _decode(self, rule, rows: Rows, max_new, stop_ids, seeds=None, partial=False,
                min_new: int = 0, stops=None):
        """Every row of ``rows`` through a ``Scheduler``: all admitted at once when they fit
        ``max_batch_size`` (a static batch), else the rows that fit first and each freed row
        refilled with the next prompt (continuous batching). ``seeds``, ``min_new``, ``stops``:
        ``_submit_rows``. ``partial``: yield row 0's text after each burst, then the result."""
        b = len(rows.a)
        self._check_lengths(rows, max_new, b, refill=True)
        n = self._bucket(min(b, self.max_batch_size))
        streams = rule.streams
        longest = max(len(r) for r in rows.a + rows.r)
        ckey = self._compile_key(streams, n)
        compiled = self._wants_compile(ckey, max_new, longest)
        pair = self._pair(n, streams, longest + max_new, static=self.use_graphs or compiled)
        ent = self._entry(pair, n, rule, min_new > 0)
        sel, st = ent["sel"], ent["st"]
        st.names = ("reference", "reference") if streams == "r" else ("aligned", "reference")
        stream_rows = {"ar": (rows.a, rows.r), "a": (rows.a, rows.a), "r": (rows.r, rows.r)}
        ra, rr = stream_rows[streams]
        sched = Scheduler(pair, sel, st, rule, check_every=self.check_every)
        k = self._speculating(sched, ent, max_new, compiled)
        handles = _submit_rows(sched, ra, rr, max_new, stop_ids, seeds, min_new, stops)
        t0, t1 = _first_admission(sched)
        with torch.inference_mode():
            lsteps = None if k else self._length_steps(ent, pair, max_new, compiled)
            built = sched.executor.spec.steps if k else lsteps  # (build times, compiles)
            compiles = built.compiles if built is not None else 0
            if lsteps is not None:
                lsteps.prepare()  # the first step's length, outside the timed decode
            sched.step = lsteps
            st.ref_head.update(sparse=0, full=0, candidates=0)  # not the compile's warm-up
            for r in pair.runners:
                r.reads = {}
            sched.sync()
            t2 = time.perf_counter()
            built_s = built.build_s if built is not None else 0.0
            while sched.burst() is not None:
                if partial and sched.busy:
                    yield partial_text(sched, handles[0], self.tokenizer)
            sched.sync()
            t3 = time.perf_counter()
            # lengths first reached mid-decode were built then: capture time, not decode time
            late_s = built.build_s - built_s if built is not None else 0.0
        tokens = [h.tokens for h in handles]
        out = Generation(tokens=tokens, text=self._text(tokens, handles),
                         finish_reason=[h.finish_reason for h in handles])
        out.stats = self._decode_stats(sched, out, pair, sel, st, lsteps, streams, n,
                                       (t0, t1, t2, t3, late_s))
        if k:
            out.stats.update(_spec_stats(sched.executor.spec, handles, out.stats,
                                         t3 - t2 - late_s, min(b, n)))
        compile_s = None
        if built is not None and built.compiles > compiles:
            compile_s = built.compile_s  # compiled in this call (for compile="auto")
        if out.stats["steps"] > 8 and b <= n:  # enough steps to say what the step costs
            tuning.observe_step(ckey, out.stats["compiled"], out.stats["ms_per_token"],
                                compile_s)  # for compile="auto"
        yield out

    def _speculating(self, sched: Scheduler, ent: dict, max_new: int, compiled: bool) -> int:
        """Give ``sched`` a ``speculate.SpecExecutor`` with this Decoder's draft when it
        speculates (verify steps of drafted tokens in place of the one-token step: the entry's
        ``VerifySteps`` for graphs and/or a compiled step, made on first use, else eager);
        returns ``k`` (0: no speculation)."""
        k = getattr(self, "speculate", 0)
        if k:
            graphs = self.use_graphs and max_new > 1
            skey = ("verify", k, graphs, compiled)
            if (graphs or compiled) and skey not in ent:
                ent[skey] = VerifySteps(
                    sched.pair, ent["sel"], ent["st"], k, type(self.base).__name__,
                    read_ladder(sched.pair.runners[0].max_len, self.device), graphs=graphs,
                    compiled=compiled)
            sched.executor = SpecExecutor(sched.executor, Speculator(
                self.draft, k, sched.pair, sched.sel, sched.st, self.vocab, ent.get(skey)))
        return k

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
        ran = [lsteps.modes[n] for n in reads if n in lsteps.modes] \
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

    def _text(self, tokens, results=None):
        """The decoded ``tokens``; ``results``: their ``Result``s, whose ``text`` (cut at a
        stop string) stands where it is set."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return text if results is None else [t if r.text is None else r.text
                                              for t, r in zip(text, results)]


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


def _spec_stats(spec: Speculator, handles, stats: dict, decode_s: float, rows: int) -> dict:
    """A speculative decode's stats (``Speculator.summary``): ``steps`` count verify steps, so
    ``ms_per_token`` is the decode time over the tokens a row got after its first, averaged
    over the rows that ran at once (``rows``)."""
    out = spec.summary(handles)
    after_first = sum(e - 1 for e in out["emitted"]) / max(rows, 1)
    out["ms_per_token"] = decode_s * 1e3 / max(after_first, 1)
    out["ms_per_verify_step"] = stats["ms_per_token"]
    return out


def _submit_rows(sched: Scheduler, ra, rr, max_new, stop_ids, seeds, min_new, stops) -> list:
    """One ``Request`` per row (prompt ids ``ra[i]``/``rr[i]``, tag ``i``) submitted to
    ``sched``: ``seeds`` one int per row, its request's seed (best-of-n's samples; ``None``:
    the rule's), ``min_new`` their ``min_new_tokens``, ``stops`` a maker of a row's
    ``StopStrings`` (or ``None``). Returns their ``Result``s."""
    return [sched.submit(Request(ids_a=ra[i], ids_r=rr[i], max_new_tokens=max_new,
                                 stop_ids=tuple(stop_ids), tag=i,
                                 seed=None if seeds is None else seeds[i],
                                 min_new_tokens=min_new, stops=stops and stops()))
            for i in range(len(ra))]


def _first_admission(sched: Scheduler) -> tuple:
    """Admit what fits of ``sched``'s queue (the call's first prefill), timed from a synced
    device: ``(t0, t1)`` perf-counter seconds around it."""
    sched.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        sched.admit()
    sched.sync()
    return t0, time.perf_counter()
