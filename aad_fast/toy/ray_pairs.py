"""``make-pairs --ray``: the toy's preference pairs decoded on Ray Data workers
(``aad_fast.jobs.ray_data`` runs them; ``aad_fast.cli.ray`` drives them)."""
from __future__ import annotations

from types import SimpleNamespace

from ..jobs.ray_data import _Worker, row_rule
from ..rules import AAD, Mix
from .evaluate import open_pair
from .tokenizer import stop_ids


def pairs_decoder(aligned=None, reference=None):
    """The Decoder of ``make-pairs``: the given pair, or the embedded one."""
    return open_pair(SimpleNamespace(aligned=aligned, reference=reference))[0]


class MakePairs(_Worker):
    """``make-pairs`` on Ray: ``chosen`` = AAD(``alpha``) completion, ``rejected`` = nucleus
    sample (p = 0.9, temperature 1) of the aligned model with the row's ``seed`` (rows of one
    ``_batch`` share it). Output rows: the input plus ``chosen``, ``rejected``,
    ``chosen_tokens``, ``rejected_tokens``, ``batch_ms``, ``batch_rows``, ``worker``."""

    def __init__(self, decoder, alpha: float = 0.1, seed: int = 0, **kw):
        kw.setdefault("chat", True)
        kw.setdefault("stop", "toy")
        super().__init__(decoder, **kw)
        self.chosen = AAD(alpha)
        self.rejected = Mix(1.0, 0.0, temperature=1.0, top_p=0.9, seed=seed)

    def _group(self, row):
        chosen, max_new = row_rule(self.chosen, row, self.max_new_tokens)
        rejected, _ = row_rule(self.rejected, row, max_new)
        return (repr(chosen), repr(rejected), max_new), (chosen, rejected, max_new)

    def _rows(self, rows, params):
        chosen, rejected, max_new = params
        prompts = [r["prompt"] for r in rows]
        c, ms_c = self._decode(prompts, chosen, max_new)
        j, ms_j = self._decode(prompts, rejected, max_new)
        for i, r in enumerate(rows):
            yield {**r, "chosen": c.text[i], "rejected": j.text[i],
                   "chosen_tokens": list(c.tokens[i]), "rejected_tokens": list(j.tokens[i]),
                   "batch_ms": ms_c + ms_j, "batch_rows": len(rows), "worker": self.worker}

    def _stop(self, stop):
        if stop == "toy":  # the toy tokenizer's turn ends
            return stop_ids(self.dec.tokenizer)
        return super()._stop(stop)
