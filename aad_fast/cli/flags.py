"""The command line's shared flags: the rule flags (``--rule`` and the values each rule reads,
the rest refused), the stop flags, and the rule they build."""
from __future__ import annotations

import argparse


RULES = ("aad", "contrastive", "eft", "dera", "cfg", "opad", "beam-aad", "best-of-n", "greedy")


class _Given(argparse.Action):
    """Store the value and note the flag as given (``a._given``): ``rule_from_args`` refuses
    a rule flag the chosen rule does not use instead of ignoring it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace._given = getattr(namespace, "_given", set()) | {self.dest}


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "seed")
RULE_FLAGS = {  # the rule flags each --rule reads (the rest would be ignored: refused)
    "aad": ("alpha",), "contrastive": ("alpha", "beta"), "eft": ("beta",) + SAMPLING_FLAGS,
    "dera": ("lam",) + SAMPLING_FLAGS, "cfg": ("g",) + SAMPLING_FLAGS,
    "opad": ("k", "principle"), "beam-aad": ("alpha", "num_beams", "tau", "length_penalty"),
    "best-of-n": ("n", "picker", "temperature", "top_p", "seed"), "greedy": ("stream",)}


def check_rule_flags(a) -> None:
    """``ValueError`` naming a given rule flag that ``a.rule`` does not read (``--top-k`` with
    ``--rule aad``; a sampling filter or seed on eft/dera/cfg without ``--temperature > 0``,
    which decode greedily)."""
    given = getattr(a, "_given", set())
    used = set(RULE_FLAGS[a.rule])
    if a.rule in ("eft", "dera", "cfg") and not (a.temperature or 0) > 0:
        used -= set(SAMPLING_FLAGS) - {"temperature"}
    extra = sorted(given - used)
    if extra:
        flags = ", ".join("--" + f.replace("_", "-") for f in extra)
        takes = ", ".join("--" + f.replace("_", "-") for f in RULE_FLAGS[a.rule]) or "none"
        why = (" (greedy without --temperature > 0)" if a.rule in ("eft", "dera", "cfg")
               and set(extra) & set(SAMPLING_FLAGS) else "")
        raise ValueError(f"{flags} not used by --rule {a.rule}{why}; it takes {takes}")


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
                   help=f"extra single-token stop strings{scope} (repeatable); a stop text that "
                        "is several tokens: give its token id(s) with --stop-id")
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
    import aad_fast as af
    check_rule_flags(a)
    samp = dict(temperature=0.0 if a.temperature is None else a.temperature, top_k=a.top_k,
                top_p=1.0 if a.top_p is None else a.top_p, min_p=a.min_p, seed=a.seed)
    if a.rule == "aad":
        return af.AAD(a.alpha)
    if a.rule == "contrastive":
        return af.Contrastive(a.alpha, 1.0 if a.beta is None else a.beta)
    if a.rule == "eft":
        return af.EFT(4.0 if a.beta is None else a.beta, **samp)
    if a.rule == "dera":
        return af.DeRa(a.lam, **samp)
    if a.rule == "cfg":
        return af.CFG(a.g, **samp)
    if a.rule == "opad":
        return af.OPAD(a.k, principle=a.principle)
    if a.rule == "beam-aad":
        return af.BeamAAD(a.num_beams, a.alpha, a.tau, a.length_penalty)
    if a.rule == "best-of-n":
        return af.BestOfN(a.n, top_p=0.9 if a.top_p is None else a.top_p,
                          temperature=1.0 if a.temperature is None else a.temperature,
                          picker=a.picker, seed=a.seed)
    return af.Greedy(a.stream)
