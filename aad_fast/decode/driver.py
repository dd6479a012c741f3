"""The decode driver: what every caller of a ``scheduler.Scheduler`` shares (``Decoder``'s
calls and the server's loop, ``serve/loop.py``): how many rows a batch takes (``bucket``) and
what a stream is sent after each burst (``text_delta``)."""
from __future__ import annotations


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
