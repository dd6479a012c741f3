"""The executors of a ``scheduler.Scheduler``'s plans: how its slots run on the device.

A scheduler plans in *slots* (a request's place in the batch) and hands each plan to one of two
executors behind one interface:

- ``RowExecutor``: per-token rules (AAD, Contrastive, Mix/EFT/DeRa/CFG, OPAD, Greedy). A slot is
  one row; a selector (``selectors``) and a ``steps.DecodeState`` hold the rows' values, limits,
  stop ids and outputs; a step is ``steps.decode_one`` (or the captured/compiled step the caller
  gives).
- ``BeamExecutor``: BeamAAD. A slot is ``num_beams`` rows of one search (``search.BeamSearch``);
  a step is ``steps.beam_step`` over the slots every live search wrote.

Interface (all host calls between steps; ``slots`` are host ints):
``admit(slots, requests, rules, prompts, stop, lim)`` prefills new requests into free slots and
makes their first choice; ``run(n, live, step)`` runs ``n`` steps of every row; ``finished(live)``
is the one look at the device after a burst (raising for a slot with no candidate, naming its
request) and returns ``{slot: (tokens, finish_reason, score)}`` of the slots that ended;
``stop(slot)`` idles a cancelled slot; ``partial(result)`` reads a live request's tokens.

Stop strings (``stop_strings``) are matched by ``RowExecutor.finished``, on the tokens of the
requests that have them (one host copy of those rows per burst): a match ends its row (marked done
on the device) and puts the cut text in its result (``Result.text``, ``stop_reason``).
"""
from __future__ import annotations

import torch

from . import steps as engine
from .selectors import rule_kind


def _cut(tokens: list, stop_ids) -> tuple:
    """``(tokens, finish_reason)``: ``tokens`` up to the first stop id (excluded)."""
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stops), None)
    return (tokens, "length") if cut is None else (tokens[:cut], "stop")


def _tag(res, slot):
    return slot if res.request.tag is None else res.request.tag


class RowExecutor:
    """Per-token rules: one row per slot (module docstring). ``state.stop`` must be per row
    ``[N, S]``; ``state.out``'s width is the largest ``max_new_tokens`` it takes."""

    width = 1

    def __init__(self, pair, selector, state: engine.DecodeState, n: int):
        if state.stop.dim() != 2 or state.stop.shape[0] != n:
            raise ValueError(f"state.stop must be per row [{n}, S], got "
                             f"{tuple(state.stop.shape)}")
        self.pair, self.sel, self.st, self.n = pair, selector, state, n
        self.kind, self.kind_of = selector.kind, rule_kind
        self.max_new, self.max_stop = state.out.shape[1], state.stop.shape[1]
        with torch.inference_mode():  # every row starts idle
            state.done.fill_(True)
            for t in (state.bad, state.bad_r, state.t, state.tok):
                t.zero_()
            state.lim.fill_(1)
            state.stop.fill_(-2)

    def admit(self, slots, requests, rules, prompts, stop, lim) -> None:
        dev = self.pair.runners[0].device
        for slot, r, rule in zip(slots, requests, rules):
            one = torch.tensor([slot], dtype=torch.int64, device=dev)
            self.sel.set_rows(one, rule, r.seed)
        dst = torch.tensor(slots, dtype=torch.int64, device=dev)
        low = torch.tensor([r.min_new_tokens for r in requests], dtype=torch.int64)
        engine.admit(self.pair, self.sel, self.st, dst, *prompts, stop, lim, low)

    def run(self, n: int, live: dict, step=None) -> None:
        step = step or engine.default_step(self.pair, self.sel, self.st)
        for _ in range(n):
            step()
        for res in live.values():
            res.steps += n

    def finished(self, live: dict) -> dict:
        st = self.st
        flags = torch.stack([st.done, st.bad, st.bad_r]).tolist()
        if any(flags[1]) or any(flags[2]):
            tags = {slot: _tag(res, slot) for slot, res in live.items()}
            engine.check(st, rows=[tags.get(i, i) for i in range(self.n)])
        matched = self._stop_strings(live, flags[0])
        ended = [slot for slot in live if flags[0][slot] or slot in matched]
        if not ended:
            return {}
        for slot in ended:
            live[slot].steps = min(live[slot].steps, live[slot].request.max_new_tokens)
        outs = st.out[ended, :max(live[s].steps for s in ended)].tolist()
        out = {slot: (*_cut(out[:live[slot].steps], live[slot].request.stop_ids), None)
               for slot, out in zip(ended, outs)}
        for slot, m in matched.items():  # a stop string: its completing token is the last kept
            res = live[slot]
            res.text, res.stop_reason = m.text, m.stop
            out[slot] = (out[slot][0][:m.n_tokens], "stop", None)
        return out

    def _stop_strings(self, live: dict, done: list) -> dict:
        """``{slot: StopMatch}`` of the live requests with stop strings whose text now holds
        one (``StopStrings.check``; ``final`` for a row that ended); a live row that matched
        is marked done on the device."""
        slots = [slot for slot, res in live.items() if res.request.stops is not None]
        if not slots:
            return {}
        width = max(min(live[s].steps, live[s].request.max_new_tokens) for s in slots)
        matched = {}
        for slot, out in zip(slots, self.st.out[slots, :width].tolist()):
            res = live[slot]
            toks = _cut(out[:min(res.steps, res.request.max_new_tokens)],
                        res.request.stop_ids)[0]
            m = res.request.stops.check(toks, final=bool(done[slot]))
            if m is not None:
                matched[slot] = m
        if matched:
            self.st.done[list(matched)] = True
        return matched

    def stop(self, slot: int) -> None:
        self.st.done[slot] = True  # an idle row: never flagged, never read

    def partial(self, res) -> list:
        toks = self.st.out[res.row, :min(res.steps, res.request.max_new_tokens)].tolist()
        return _cut(toks, res.request.stop_ids)[0]


class BeamExecutor:
    """BeamAAD: ``num_beams`` rows per slot, one ``search.BeamSearch`` (module docstring)."""

    def __init__(self, pair, search, n: int):
        if search.n_rows != n:
            raise ValueError(f"the BeamSearch is for {search.n_rows} rows, the pair has {n}")
        self.pair, self.sel, self.n = pair, search, n
        self.width = search.rows_per_request
        self.kind, self.kind_of = search.kind, search.kind_of
        self.max_new, self.max_stop = search.max_new, search.max_stop

    def admit(self, slots, requests, rules, prompts, stop, lim) -> None:
        engine.beam_admit(self.pair, self.sel, slots, *prompts, rules, stop, lim)

    def run(self, n: int, live: dict, step=None) -> None:
        for _ in range(n):
            # the cache slots every live search wrote since its prompt (host counts)
            lo = min(res.width for res in live.values())
            hi = max(res.width + res.steps - 1 for res in live.values())
            engine.beam_step(self.pair, self.sel, lo, min(hi, self.pair.runners[0].max_len))
            for res in live.values():
                res.steps += 1

    def finished(self, live: dict) -> dict:
        fin, bad = self.sel.flags()
        dead = [slot for slot in live if bad[slot]]
        if dead:  # the error path: one more look, at which stream left a slot without a beam
            by_r = self.sel.bad_r.tolist()  # a beam had candidates, their scores were all NaN
            slot = next((g for g in dead if by_r[g]), dead[0])  # the reference first (as check)
            tag = _tag(live[slot], slot)
            if by_r[slot]:
                raise RuntimeError(
                    f"row {tag}: the reference model's logits (stream r) were all -inf/NaN at "
                    "some step (on every AAD candidate of every beam), so its distribution is "
                    "undefined (check the reference model's dtype/weights)")
            raise RuntimeError(
                f"row {tag}: no AAD candidate: the aligned model's logits were all -inf/NaN at "
                "some step, so no token could be chosen (check the model's dtype/weights)")
        out = {}
        for slot in [s for s in live if fin[s]]:
            tokens, reason, score, steps = self.sel.result(slot)
            live[slot].steps = steps
            out[slot] = (tokens, reason, score)
        return out

    def stop(self, slot: int) -> None:
        self.sel.stop_group(slot)

    def partial(self, res) -> list:
        return []  # its best beam may still change until the search ends
