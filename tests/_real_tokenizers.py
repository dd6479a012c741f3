"""A real BPE tokenizer for tests, built from a tokenizer file a PyPI package ships (nothing from
a hub): Mistral's first SentencePiece model, ``mistral_common/data/tokenizer.model.v1`` (32000
pieces, BPE with byte fallback), read with a small protobuf reader (no ``sentencepiece`` or
``protobuf`` needed) and turned into a Hugging Face fast tokenizer the way transformers'
``LlamaConverter`` does (merges ordered by the pieces' scores, ``▁`` for spaces, byte fallback)."""
from __future__ import annotations

import functools
import importlib.util
import struct
from pathlib import Path


def mistral_model_file() -> Path | None:
    """The file, or ``None`` when ``mistral-common`` is not installed (found without importing
    it)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def _varint(buf: bytes, i: int) -> tuple:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return out, i


def _fields(buf: bytes):
    """``(field number, wire type, value)`` of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not expected")
        yield num, wire, val


def sentencepiece_pieces(path) -> list:
    """``[(piece, score, type)]`` of a SentencePiece ``ModelProto`` (field 1: its pieces; a
    piece's field 1 its text, 2 its score, 3 its type: 1 normal, 2 unknown, 3 control, 6 byte)."""
    pieces = []
    for num, _, val in _fields(Path(path).read_bytes()):
        if num != 1:
            continue
        piece, score, kind = "", 0.0, 1
        for n, _, v in _fields(val):
            if n == 1:
                piece = v.decode("utf-8")
            elif n == 2:
                score = struct.unpack("<f", v)[0]
            elif n == 3:
                kind = v
        pieces.append((piece, score, kind))
    return pieces


@functools.lru_cache(maxsize=1)
def mistral_tokenizer():
    """The Hugging Face fast tokenizer of ``tokenizer.model.v1`` (``None`` without the file)."""
    path = mistral_model_file()
    if path is None:
        return None
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    pieces = sentencepiece_pieces(path)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    scored = {p: s for p, s, k in pieces if k == 1}
    merges = []
    for merged, score in scored.items():
        local = [(merged[:j], merged[j:], score) for j in range(1, len(merged))
                 if merged[:j] in vocab and merged[j:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = next(p for p, _, k in pieces if k == 2)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    control = [p for p, _, k in pieces if k == 3]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=control[0],
                                   eos_token=control[1], clean_up_tokenization_spaces=False)
    return fast
