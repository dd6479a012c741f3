"""Stop strings of any length, matched on the decoded text of one row as its tokens arrive.

A stop string that is one token of the vocabulary also stops on the device (its id is a stop id,
``prompt_rows.resolve_stop_ids``); every stop string that can appear in the decoded text is
matched here, on the host, at the decode's existing check points (``scheduler.Scheduler`` reads
the tokens of the rows that have stop strings once per burst): a phrase split across tokens is
found, and no host sync is added per token. Pure Python: the caller gives ``decode`` (ids ->
text, as the output is decoded).

What a match means (vLLM's semantics, with the ties made exact). Let ``S_k`` be the decoded text
of a row's first ``k`` tokens, with a trailing run of U+FFFD removed (a multi-byte character whose
last bytes are still to come) unless ``k`` is the row's final length. An occurrence of a stop
string in ``S_k`` is *new at k* when ``S_{k-1}`` does not hold it at the same place. The row
stops at the first ``k >= min_tokens`` with a new occurrence; of those, the one that ends first
(then the one that starts first) is the match. The output is ``S_k`` cut where the match starts
(``include=True``: where it ends) and the tokens are the first ``k``: the token that completes the
match is kept, those after it are dropped (vLLM keeps the completing token's id too).
``reference_match`` is this definition, computed from every prefix; ``StopStrings`` computes the
same with one decode per check (more only when a match is found), for decoders whose text grows by
appending (``S_k`` a prefix of ``S_{k+1}``), as byte-level BPE and SentencePiece decoders do.
"""
from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"


def check_stop_strings(stops, name: str = "stop") -> tuple:
    """``stops`` (a string or a list of strings) as a tuple of distinct non-empty strings, in
    order; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(stops, str):
        stops = [stops]
    try:
        stops = list(stops)
    except TypeError:
        raise ValueError(f"{name} must be a string or a list of strings, got {stops!r}") from None
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"{name} strings must be non-empty strings, got {s!r}")
    return tuple(dict.fromkeys(stops))


@dataclass(frozen=True)
class StopMatch:
    """A row's stop-string match: keep the first ``n_tokens`` tokens, whose output text is
    ``text`` (cut at the match); ``stop`` is the matched string."""

    n_tokens: int
    text: str
    stop: str


def _stable(text: str, final: bool) -> str:
    return text if final else text.rstrip(REPLACEMENT)


def _occurrences(text: str, stops, start: int = 0):
    """Every occurrence ``(end, begin, stop)`` of ``stops`` in ``text`` that ends after
    position ``start``, sorted by end then begin."""
    found = []
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        while i >= 0:
            found.append((i + len(s), i, s))
            i = text.find(s, i + 1)
    return sorted(found)


def _result(text: str, k: int, begin: int, stop: str, include: bool) -> StopMatch:
    return StopMatch(k, text[:begin] + (stop if include else ""), stop)


def reference_match(tokens, stops, decode, *, include: bool = False, min_tokens: int = 0,
                    final: bool = True):
    """The module docstring's definition, decoding every prefix of ``tokens`` (quadratic: the
    tests' reference). ``final``: ``tokens`` is the row's whole output. ``None``: no match."""
    prev = ""
    for k in range(1, len(tokens) + 1):
        text = _stable(decode(list(tokens[:k])), final and k == len(tokens))
        new = [(end, begin, s) for end, begin, s in _occurrences(text, stops)
               if prev[begin:end] != s]
        if new and k >= min_tokens:
            end, begin, s = new[0]
            return _result(text, k, begin, s, include)
        prev = text
    return None


class StopStrings:
    """One row's stop strings and how far its text has been searched.

    Args:
        stops: the stop strings (``check_stop_strings``).
        decode: ``ids -> text``, the decoding of the row's output.
        include: keep the matched string in the output (``include_stop_str_in_output``).
        min_tokens: no match completes before this many tokens (vLLM's ``min_tokens``).
    """

    def __init__(self, stops, decode, *, include: bool = False, min_tokens: int = 0):
        self.stops = check_stop_strings(stops)
        self.decode, self.include, self.min_tokens = decode, include, min_tokens
        self.longest = max((len(s) for s in self.stops), default=0)
        self._tokens = 0  # tokens whose text has been searched
        self._end = 0  # the searched text's length: every occurrence ending there was examined

    def check(self, tokens, final: bool = False):
        """Search the text of ``tokens`` (the row's output so far; ``final``: all of it) for
        occurrences the last check did not see; the ``StopMatch`` of the first that counts, or
        ``None``. One decode, plus a binary search over the new tokens when an occurrence is
        found (to name the token that completes it)."""
        tokens = list(tokens)
        text = _stable(self.decode(tokens), final)
        for end, begin, s in _occurrences(text, self.stops, self._end):
            k = self._completing(tokens, text, end, final)
            if k >= self.min_tokens:
                return _result(text, k, begin, s, self.include)
        self._tokens, self._end = len(tokens), len(text)
        return None

    def _completing(self, tokens: list, text: str, end: int, final: bool) -> int:
        """The fewest tokens whose text already holds ``text[:end]``: the completing token."""
        lo, hi = self._tokens + 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            part = _stable(self.decode(tokens[:mid]), False)
            if len(part) >= end and part[:end] == text[:end]:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def shown(self, text: str) -> str:
        """The part of ``text`` (a live row's text, no match in it yet) that a stream may send:
        without its longest suffix that begins a stop string, which a later token may complete
        into a match that cuts it (``include=False``) or keeps it (``include=True``, when it
        is sent with the match)."""
        return text[:len(text) - held(text, self.stops)]


def held(text: str, stops) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
