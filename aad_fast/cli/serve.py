"""``aad-fast serve``: its flags, the pair it loads (default: the embedded one) and the server's
start; the HTTP app itself is ``aad_fast.serve.http.create_app``."""
from __future__ import annotations

import os
import sys

from ..decoder import Decoder
from ..rules import RULE_NAMES, RULE_TABLE, check_real
from ..serve.http import INSTALL_HINT, _fastapi, create_app
from ..serve.openai_api import Limits
from ..toy.assets import default_pair_dir
from ..toy.default import default_pair
from ..toy.tokenizer import stop_ids
from .flags import add_speculate_arguments, add_stop_arguments, check_stop_ids


def add_arguments(p) -> None:
    p.add_argument("--aligned", default=None,
                   help="aligned model or LoRA adapter directory (default: the embedded pair)")
    p.add_argument("--reference", default=None, help="reference model directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, where the model directories have none")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $AAD_FAST_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="rows of the running batch (of each rule kind in use)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row beyond which requests get 429")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context: prompt + new tokens (default 2048, or the model's learned "
                        "position limit where smaller; 128 for the embedded pair)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask (default: the context)")
    p.add_argument("--max-n", type=int, default=4, help="largest n a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--picker", default=None,
                   help="reward model directory for rule=best-of-n (embedded pair: its picker)")
    add_stop_arguments(p, " added to every request")
    p.add_argument("--served-model-name", default=None,
                   help="the name served (default: the aligned directory's name; aad-default "
                        "for the embedded pair); NAME:RULE selects each rule (docs/clients.md)")
    p.add_argument("--rule", choices=RULE_NAMES, default="aad",
                   help="the rule of the bare model name and of a request naming none "
                        "(default: aad); NAME:RULE names each rule")
    p.add_argument("--alpha", type=float, default=None,
                   help="the default rule's alpha (aad, contrastive, beam-aad; default 0.1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_speculate_arguments(p)


def load(a):
    """``(decoder, default_stop, picker, name)`` for the CLI arguments ``a``."""
    import torch

    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.aligned:
        dec = Decoder(a.aligned, a.reference, dtype=dtype, device=a.device,
                      tokenizer=a.tokenizer, max_batch_size=a.max_batch_size,
                      max_seq_len=a.max_seq_len, draft=a.draft, speculate=a.speculate)
        name = os.path.basename(os.path.normpath(a.aligned))
        return dec, list(a.stop or []), a.picker, a.served_model_name or name
    aligned, reference, tok, trained = default_pair()
    if not trained:
        print("note: the trained default pair is not in this install; serving a random-weight "
              "stand-in (text will be gibberish)", file=sys.stderr)
    dec = Decoder(aligned, reference, tokenizer=tok, max_batch_size=a.max_batch_size,
                  max_seq_len=128 if a.max_seq_len is None else a.max_seq_len,
                  draft=a.draft, speculate=a.speculate)
    picker = a.picker or (str(default_pair_dir() / "picker") if trained else None)
    return dec, stop_ids(tok) + list(a.stop or []), picker, a.served_model_name or "aad-default"


def api_key(a) -> str | None:
    """``--api-key``, else ``$AAD_FAST_API_KEY``, else ``None`` (no key needed). An empty key
    (``--api-key "$KEY"`` with ``KEY`` unset, or ``AAD_FAST_API_KEY=``) is refused: it means
    a key was wanted, never "no authentication"."""
    if a.api_key is not None:
        if not a.api_key.strip():
            raise ValueError("--api-key is empty (was it given as \"$VAR\" with VAR unset?); "
                             "give the key, or leave --api-key out to serve without one")
        return a.api_key
    env = os.environ.get("AAD_FAST_API_KEY")
    if env is not None and not env.strip():
        raise ValueError("AAD_FAST_API_KEY is set but empty; set it to the key, or unset it "
                         "to serve without one")
    return env


def rule_defaults(a) -> dict:
    """The default rule's values from ``--alpha`` (refused for a ``--rule`` that reads none)."""
    if getattr(a, "alpha", None) is None:
        return {}
    if "alpha" not in RULE_TABLE[a.rule].fields:
        takes = [r for r in RULE_NAMES if "alpha" in RULE_TABLE[r].fields]
        raise ValueError(f"--alpha not used by --rule {a.rule} (the rules that take it: "
                         f"{', '.join(takes)})")
    check_real("--alpha", a.alpha, 0.0, 1.0)
    return {"alpha": a.alpha}


def run(a) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})")
    _fastapi()
    for name in ("max_batch_size", "max_queue", "max_n", "max_body_bytes", "max_seq_len",
                 "max_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:  # None: the default
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    check_stop_ids(a)
    defaults = rule_defaults(a)
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    key = api_key(a)
    if a.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {a.host} without an API key: anyone who can reach it may "
              "use it (pass --api-key or set AAD_FAST_API_KEY)", file=sys.stderr)
    dec, stop, picker, name = load(a)
    limits = Limits(max_body_bytes=a.max_body_bytes, max_tokens=a.max_tokens, max_n=a.max_n)
    app = create_app(dec, api_key=key, max_batch_size=a.max_batch_size, max_queue=a.max_queue,
                     limits=limits, default_stop=stop, picker=picker, model_name=name,
                     rule=a.rule, rule_defaults=defaults)
    print(f"aad-fast serve: {name} (rule {a.rule}; {name}:RULE for the others; "
          f"{dec.kind} pair on {dec.device}) at http://{a.host}:{a.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0
