"""aad_fast: fast alignment-aware decoding (AAD) and its family of two-distribution rules.

Importing this package compiles and loads nothing: extensions and Triton load on first use.
"""
from .ops.backends import available_backends
from .ops import aad_beam_topk, aad_select, contrastive_select, mix_select
from .decoder import Decoder, Generation, generate
from .processor import AADLogitsProcessor
from .rules import AAD, CFG, EFT, OPAD, BeamAAD, BestOfN, Contrastive, DeRa, Greedy, Mix, Rule
from .decode.scheduler import Request, Result, Scheduler

from .version import __version__  # noqa: E402,F401

__all__ = [
    "AAD", "AADLogitsProcessor", "CFG", "Decoder", "Generation", "generate", "EFT", "OPAD", "BeamAAD", "BestOfN", "Contrastive", "DeRa", "Greedy", "Mix",
    "Request", "Result", "Rule", "Scheduler", "aad_beam_topk", "aad_select", "available_backends", "contrastive_select",
    "mix_select",
]
