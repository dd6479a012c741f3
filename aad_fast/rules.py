"""Decoding rules as small frozen dataclasses (docs/rules.md): which streams run and how the
token is picked. Pure data, validated on creation; the engine reads ``streams`` and
``coefficients()``."""
from __future__ import annotations

import math
import operator
from numbers import Real
from dataclasses import dataclass, field


#: the largest seed: seeds are int64 on the device (``selectors``, the kernels' ``seed`` tensor)
SEED_MAX = 2**63 - 1


def check_real(name: str, value, lo=-math.inf, hi=math.inf, lo_open=False) -> float:
    try:  # an int beyond float's range (10**400) is not finite either
        finite = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite real number, got {value!r}"[:300])
    if value < lo or value > hi or (lo_open and value == lo):
        lo_s = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {lo_s}{lo}, {hi}], got {value!r}")
    return float(value)


def as_int(value):
    """``value`` as a Python int if it is an integer (an ``int``, a numpy integer, a one-element
    integer tensor: anything with ``__index__``), else ``None``; bools (Python, numpy, torch)
    and floats are never integers here (no rounding, no ``True`` as 1)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int in ``[lo, hi]`` (``hi=None``: no upper bound); ``ValueError``
    naming ``name`` and the value otherwise (see ``as_int`` for what counts as an int)."""
    got = as_int(value)
    if got is None or got < lo or (hi is not None and got > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return got


def check_seed(value, name: str = "seed", room: int = 1) -> int:
    """A seed as a Python int in ``[0, SEED_MAX - room + 1]``: ``room`` seeds ``seed ..
    seed + room - 1`` are used (best-of-n's samples, a server's ``n`` choices) and each must
    fit int64."""
    hi = SEED_MAX - (room - 1)
    got = as_int(value)
    if got is None or not 0 <= got <= hi:
        if room == 1:
            raise ValueError(f"{name} must be an int in [0, 2**63 - 1] (int64), got {value!r}")
        raise ValueError(f"{name} must be an int in [0, 2**63 - {room}], got {value!r}: the "
                         f"seeds {name} .. {name} + {room - 1} are used and each must fit int64")
    return got


def _set_int(obj, name: str, lo: int, hi: int | None = None) -> None:
    """``check_int`` of a frozen rule's field, stored back as a Python int."""
    object.__setattr__(obj, name, check_int(name, getattr(obj, name), lo, hi))


def _check_ids(obj, name: str) -> None:
    """Validate and freeze an optional id-list field of a frozen rule (``None`` stays)."""
    value = getattr(obj, name)
    if value is None:
        return
    try:
        ids = () if isinstance(value, (str, bytes)) else tuple(as_int(i) for i in value)
    except TypeError:  # not a list
        ids = ()
    if not ids or not all(i is not None and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-empty list of token ids, got {value!r}")
    object.__setattr__(obj, name, ids)


@dataclass(frozen=True)
class Rule:
    """Base of every rule. ``streams`` is ``"ar"`` (both), ``"a"`` or ``"r"``."""

    @property
    def streams(self) -> str:
        return "ar"

    @property
    def sampled(self) -> bool:
        return False


@dataclass(frozen=True)
class Contrastive(Rule):
    """docs/rules.md Contrastive: ``argmax_{v in K} (la_v - beta*lr_v)``,
    ``K = {p_a >= alpha max p_a}``. Li et al. 2023 with ``r`` an amateur model; AAD is
    ``beta = 1`` with ``r`` the SFT model."""

    alpha: float = 0.1
    beta: float = 1.0

    def __post_init__(self):
        check_real("alpha", self.alpha, 0.0, 1.0)
        check_real("beta", self.beta, 0.0)

    def coefficients(self):
        """``(ma, mr, sa, sr, log_rel)`` of the selection core (``reference.py``)."""
        log_rel = math.log(self.alpha) if self.alpha > 0 else -math.inf
        return 1.0, 0.0, 1.0, -float(self.beta), log_rel


@dataclass(frozen=True)
class AAD(Contrastive):
    """docs/rules.md AAD (Berdoz et al. 2025, Algorithm 1): ``argmax_{v in K} (la_v - lr_v)``."""

    alpha: float = 0.1
    beta: float = field(default=1.0, init=False)


@dataclass(frozen=True)
class Mix(Rule):
    """docs/rules.md Mix: token from ``z = w_a*la + w_r*lr`` with temperature, top-k, top-p, min-p;
    greedy when ``temperature == 0``. ``seed`` fixes the sampled tokens (eager or graph)."""

    w_a: float = 1.0
    w_r: float = 0.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        check_real("w_a", self.w_a)
        check_real("w_r", self.w_r)
        if self.w_a == 0 and self.w_r == 0:
            raise ValueError("w_a and w_r are both 0: the mixed distribution would be uniform")
        check_real("temperature", self.temperature, 0.0)
        _set_int(self, "top_k", 0)
        if self.top_k > 2 ** 31 - 1:  # would overflow the kernels' int; 0 already means off
            raise ValueError(f"top_k must be an int >= 0 and at most 2**31 - 1 (0 = off), got "
                             f"{self.top_k!r}"[:200])
        check_real("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_real("min_p", self.min_p, 0.0, 1.0)
        object.__setattr__(self, "seed", check_seed(self.seed))

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @property
    def streams(self) -> str:
        """Only the streams with a non-zero weight run."""
        return "a" if self.w_r == 0 else ("r" if self.w_a == 0 else "ar")

    def coefficients(self):
        t = self.temperature if self.temperature > 0 else 1.0
        ca, cr = float(self.w_a) / t, float(self.w_r) / t
        log_rel = math.log(self.min_p) if (self.sampled and self.min_p > 0) else -math.inf
        return ca, cr, ca, cr, log_rel


def EFT(beta: float = 4.0, **sampling) -> Mix:
    """Emulated fine-tuning (Mitchell et al. 2024), base = reference = SFT:
    ``z = lr + beta*(la - lr)``. The AAD paper's baseline: ``beta = 4``, greedy."""
    beta = check_real("beta", beta)
    return Mix(w_a=beta, w_r=1.0 - beta, **sampling)


def DeRa(lam: float, **sampling) -> Mix:
    """Decoding-time realignment (Liu et al. 2024): ``z = lam*a + (1-lam)*r``; any real ``lam``."""
    lam = check_real("lam", lam)
    return Mix(w_a=lam, w_r=1.0 - lam, **sampling)


@dataclass(frozen=True)
class CFGMix(Mix):
    """``Mix`` whose reference stream may be the same model on another (unconditional) prompt:
    ``negative_ids`` (or the tokenised ``negative_prompt``); on one model without either, the
    unconditional prompt is each prompt's last token (as Hugging Face's CFG processor does)."""

    negative_prompt: str | None = None
    negative_ids: tuple | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_ids(self, "negative_ids")


def CFG(g: float, negative_prompt: str | None = None, negative_ids=None, **sampling) -> CFGMix:
    """Classifier-free guidance (Sanchez et al. 2023): ``z = g*la + (1-g)*lr`` with ``a`` the
    conditioned context. On one model, ``r`` is the unconditional prompt (``negative_prompt`` /
    ``negative_ids``, default: each prompt's last token); on two models, ``r`` is the
    reference model on the same prompt unless a negative prompt is given."""
    g = check_real("g", g)
    return CFGMix(w_a=g, w_r=1.0 - g, negative_prompt=negative_prompt,
                  negative_ids=None if negative_ids is None else tuple(negative_ids), **sampling)


@dataclass(frozen=True)
class Greedy(Rule):
    """Plain argmax of one stream; only that model runs (the single-model baseline)."""

    stream: str = "a"

    def __post_init__(self):
        if self.stream not in ("a", "r"):
            raise ValueError(f"stream must be 'a' or 'r', got {self.stream!r}")

    @property
    def streams(self) -> str:
        return self.stream

    def coefficients(self):
        return 1.0, 0.0, 1.0, 0.0, -math.inf


@dataclass(frozen=True)
class OPAD(Rule):
    """Principle-guided decoding (Zhu et al. 2025), one model, two prompts (docs/rules.md OPAD)."""

    k: float = 1.0
    principle: str | None = None
    principle_ids: tuple | None = None

    def __post_init__(self):
        check_real("k", self.k, 0.0)
        if self.principle is None and self.principle_ids is None:
            raise ValueError("OPAD needs a principle: give principle='...' or principle_ids=[...]")
        _check_ids(self, "principle_ids")


@dataclass(frozen=True)
class BeamAAD(Rule):
    """Beam search on the AAD token score with optional entropy threshold (paper A.4)."""

    num_beams: int = 4
    alpha: float = 0.1
    tau: float | None = None
    length_penalty: float = 0.0

    def __post_init__(self):
        _set_int(self, "num_beams", 1)
        check_real("alpha", self.alpha, 0.0, 1.0)
        if self.tau is not None:
            check_real("tau", self.tau, 0.0)
        check_real("length_penalty", self.length_penalty)


@dataclass(frozen=True)
class BestOfN(Rule):
    """``n`` nucleus samples of stream ``a``, the picker reward model's best wins."""

    n: int = 2
    top_p: float = 0.9
    temperature: float = 1.0
    picker: object = None
    seed: int = 0

    def __post_init__(self):
        _set_int(self, "n", 1)
        check_real("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_real("temperature", self.temperature, 0.0, lo_open=True)
        # sample j is seeded seed + j (search.samples): every one must fit int64
        object.__setattr__(self, "seed", check_seed(self.seed, room=self.n))
        if self.picker is None:
            raise ValueError("BestOfN needs picker=: a path to (or an instance of) an "
                             "AutoModelForSequenceClassification with one output")

    @property
    def streams(self) -> str:
        return "a"


# ---------------------------------------------------------------------------- the rule table
#: the sampling fields, in the order a rule lists them; ``seed`` fixes the sampled tokens
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed")
#: the value of each sampling filter that samples nothing ("off")
NEUTRAL = {"temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0}
_MIX_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 0}


@dataclass(frozen=True)
class RuleEntry:
    """One rule of ``RULE_TABLE``: ``make(**fields)`` builds it; ``fields`` are the fields it
    reads with their defaults, in order; ``samples``: ``"never"``, ``"temperature"`` (greedy
    unless ``temperature > 0``: then the other sampling fields do nothing) or ``"always"``."""

    make: object
    fields: dict
    samples: str = "never"

    def reads(self, sampled: bool) -> tuple:
        """The fields the rule reads when it samples (``sampled``) or decodes greedily."""
        if self.samples != "temperature" or sampled:
            return tuple(self.fields)
        return tuple(f for f in self.fields if f not in SAMPLING or f == "temperature")


#: every rule by its name (the command line's ``--rule``, the server's ``rule``)
RULE_TABLE = {
    "aad": RuleEntry(AAD, {"alpha": 0.1}),
    "contrastive": RuleEntry(Contrastive, {"alpha": 0.1, "beta": 1.0}),
    "eft": RuleEntry(EFT, {"beta": 4.0, **_MIX_SAMPLING}, "temperature"),
    "dera": RuleEntry(DeRa, {"lam": 1.0, **_MIX_SAMPLING}, "temperature"),
    "cfg": RuleEntry(CFG, {"g": 1.5, **_MIX_SAMPLING}, "temperature"),
    "opad": RuleEntry(OPAD, {"k": 1.0, "principle": None}),
    "beam-aad": RuleEntry(BeamAAD, {"alpha": 0.1, "num_beams": 4, "tau": None,
                                    "length_penalty": 0.0}),
    "best-of-n": RuleEntry(BestOfN, {"n": 2, "picker": None, "temperature": 1.0, "top_p": 0.9,
                                     "seed": 0}, "always"),
    "greedy": RuleEntry(Greedy, {"stream": "a"}),
}
RULE_NAMES = tuple(RULE_TABLE)


class UnreadFields(ValueError):
    """Fields given to a rule that it does not read (sorted); ``greedy``: the rule decodes
    greedily, so a sampling field among them would do nothing."""

    def __init__(self, rule: str, fields: list, greedy: bool):
        self.rule, self.fields, self.greedy = rule, fields, greedy
        super().__init__(f"{', '.join(fields)} not used by rule {rule}; it takes "
                         f"{', '.join(RULE_TABLE[rule].fields) or 'none'}")


def rule_entry(name: str) -> RuleEntry:
    if name not in RULE_TABLE:
        raise ValueError(f"unknown rule {name!r}; use one of {', '.join(RULE_NAMES)}")
    return RULE_TABLE[name]


def check_fields(name: str, given, sampled: bool) -> None:
    """``UnreadFields`` naming each of ``given`` (field names) that rule ``name`` does not read
    when it samples (``sampled``) or not: a sampling field on a greedy rule included."""
    entry = rule_entry(name)
    unread = sorted(set(given) - set(entry.reads(sampled)))
    if unread:
        raise UnreadFields(name, unread, entry.samples == "never" or
                           (entry.samples == "temperature" and not sampled))


def make_rule(name: str, values: dict):
    """Rule ``name`` from ``values`` (fields it reads; the others take their defaults); the
    rule's own checks refuse a bad value."""
    entry = rule_entry(name)
    extra = sorted(set(values) - set(entry.fields))
    if extra:
        raise UnreadFields(name, extra, entry.samples == "never")
    return entry.make(**{**entry.fields, **values})


def build_rule(name: str, values: dict, sampled: bool | None = None):
    """Rule ``name`` from the fields ``values`` given, refusing one it does not read (a
    sampling field on a greedy rule included). ``sampled`` (default: ``temperature > 0``)."""
    if sampled is None:
        t = values.get("temperature")
        sampled = rule_entry(name).samples == "always" or (
            isinstance(t, Real) and not isinstance(t, bool) and t > 0)
    check_fields(name, values, sampled)
    return make_rule(name, values)
