"""The command line's shared flags: the rule flags (``--rule`` and the values each rule reads,
the rest refused), the stop flags, and the rule they build."""
from __future__ import annotations

import argparse

from ..rules import (RULE_NAMES, RULE_TABLE, SAMPLING, UnreadFields, check_fields,
                     make_rule)


RULES = RULE_NAMES


class _Given(argparse.Action):
    """Store the value and note the flag as given (``a._given``): ``rule_from_args`` refuses
    a rule flag the chosen rule does not use instead of ignoring it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace._given = getattr(namespace, "_given", set()) | {self.dest}


SAMPLING_FLAGS = SAMPLING
#: the rule flags each --rule reads (the rest would be ignored: refused); rules.RULE_TABLE's
RULE_FLAGS = {name: tuple(entry.fields) for name, entry in RULE_TABLE.items()}


def _flags(fields) -> str:
    return ", ".join("--" + f.replace("_", "-") for f in fields)


def check_rule_flags(a) -> None:
    """``ValueError`` naming a given rule flag that ``a.rule`` does not read (``--top-k`` with
    ``--rule aad``; a sampling filter or seed on eft/dera/cfg without ``--temperature > 0``,
    which decode greedily)."""
    try:
        check_fields(a.rule, getattr(a, "_given", set()), (a.temperature or 0) > 0)
    except UnreadFields as exc:
        why = (" (greedy without --temperature > 0)" if RULE_TABLE[a.rule].samples ==
               "temperature" and set(exc.fields) & set(SAMPLING) else "")
        raise ValueError(f"{_flags(exc.fields)} not used by --rule {a.rule}{why}; it takes "
                         f"{_flags(RULE_FLAGS[a.rule]) or 'none'}") from None


def add_rule_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding rule (see docs/rules.md)")
    g.add_argument("--rule", choices=RULES, default="aad", help="decoding rule (default: aad)")
    given = dict(action=_Given)
    g.add_argument("--alpha", **given, type=float, default=0.1,
                   help="candidate threshold p_a >= alpha * max p_a (aad, contrastive, beam-aad)")
    g.add_argument("--beta", **given, type=float, default=None,
                   help="contrastive: weight of the amateur (default 1.0); eft: beta (default 4.0)")
    g.add_argument("--lam", **given, type=float, default=1.0, help="dera: lambda (z = lam*a + (1-lam)*r)")
    g.add_argument("--g", **given, type=float, default=1.5, help="cfg: guidance weight")
    g.add_argument("--k", **given, type=float, default=1.0, help="opad: k")
    g.add_argument("--principle", **given, default=None, help="opad: the principle text")
    g.add_argument("--num-beams", **given, type=int, default=4, help="beam-aad: beams")
    g.add_argument("--tau", **given, type=float, default=None, help="beam-aad: entropy threshold")
    g.add_argument("--length-penalty", **given, type=float, default=0.0, help="beam-aad: length penalty")
    g.add_argument("--n", **given, type=int, default=2, help="best-of-n: samples per prompt")
    g.add_argument("--picker", **given, default=None, help="best-of-n: path of the picker reward model")
    g.add_argument("--stream", **given, choices=("a", "r"), default="a", help="greedy: which model")
    g.add_argument("--temperature", **given, type=float, default=None,
                   help="sampling temperature (eft/dera/cfg: default 0 = greedy; best-of-n: 1.0)")
    g.add_argument("--top-p", **given, type=float, default=None, help="nucleus p (best-of-n default 0.9)")
    g.add_argument("--top-k", **given, type=int, default=0, help="top-k filter (0 = off)")
    g.add_argument("--min-p", **given, type=float, default=0.0, help="min-p filter (0 = off)")
    g.add_argument("--seed", **given, type=int, default=0, help="seed of sampled rules")


def add_stop_arguments(p, scope: str = "") -> None:
    """``--stop STR ...`` and ``--stop-id N`` (repeatable), both into one list ``a.stop`` of
    strings and ints (``Decoder.stop_ids`` takes either)."""
    p.add_argument("--stop", nargs="*", action="extend", default=None, metavar="STR",
                   help=f"extra stop strings{scope} (repeatable), of any length: matched on "
                        "the decoded text, which is cut where the string starts (one that is "
                        "a single token also stops on its id)")
    p.add_argument("--stop-id", dest="stop", action="append", type=int, metavar="N",
                   help=f"an extra stop token id{scope} (repeatable: --stop-id 13 --stop-id 42); "
                        "joins the --stop list")


def check_stop_ids(a) -> None:
    """``--stop-id N`` below 0 is refused before a model loads (the upper bound, the
    vocabulary, is checked once the model is there)."""
    bad = [s for s in (a.stop or []) if isinstance(s, int) and s < 0]
    if bad:
        raise ValueError(f"--stop-id must be a token id >= 0, got {bad[0]}")


def rule_from_args(a):
    """The rule of the command line ``a``. A value the user gave reaches the rule as given (a
    default only stands in for an absent flag), so the rule's own checks refuse a bad one."""
    check_rule_flags(a)
    fields = RULE_TABLE[a.rule].fields
    return make_rule(a.rule, {f: getattr(a, f) for f in fields if getattr(a, f) is not None})


def add_speculate_arguments(p) -> None:
    """``--draft`` and ``--speculate`` (``generate`` and ``serve``): exact speculative decoding,
    handed to the ``Decoder`` (which refuses a bad pair of them, naming the argument)."""
    p.add_argument("--draft", default=None,
                   help="speculative decoding's draft: 'ngram' (prompt lookup), 'default' (the "
                        "embedded pair's draft) or a draft model's local path (same tokenizer); "
                        "the tokens are the rule's own (docs/speculative.md). Needs --speculate")
    p.add_argument("--speculate", type=int, default=0,
                   help="drafted tokens per verify step, 1..8 (default 0: off); needs --draft")
