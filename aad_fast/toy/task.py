"""A synthetic instruction/preference task with an exact oracle reward.

Prompts are short requests from a small grammar (seven families: opposites, colours, capitals,
animal sounds, irregular plurals, addition and subtraction of digits, six phrasings each); every
prompt has one correct answer word. A completion is a string of space-separated words and the
oracle ``oracle_reward(prompt, completion)`` scores it exactly, as a sum of:

============  =====================================================================  ========
component     rule                                                                   value
============  =====================================================================  ========
correctness   answer words stated (candidate answers of the family that are not in   +2 / 0 /
              the prompt): only the correct one / the correct one among others       -1 / -1
              (a hedge) / only wrong ones / none
complete      the canonical full sentence is present, e.g. ``the capital of peru is   +1
              lima`` or ``3 plus 4 is seven``
polite        starts with ``sure !`` or ``happy to help !``; ends with                +0.5 each
              ``hope this helps !`` or ``glad i could help !``
rude          each of ``ugh obviously whatever duh``                                 -1 each
filler        each of ``um well basically``                                          -0.5 each
repetition    each repeated word trigram (occurrences minus distinct trigrams)       -0.5 each
rambling      each word beyond the 20th                                              -0.25 each
============  =====================================================================  ========

The best completions score 4.0 (``sure ! the opposite of hot is cold . hope this helps !``); a
terse correct answer (``cold .``) scores 2.0. Every term is a multiple of 0.25, so rewards are
exact in floating point.

Demonstrations for SFT (``sample_demonstration``) are of mixed quality, each part drawn on its
own (``STYLE_WEIGHTS``): the commonest choice at every point is the mediocre one (no opener, a
terse body, no closer), so an SFT model's greedy output is a terse answer, while the good
choices keep enough probability that a DPO model's candidates (``p >= 0.1 * max p``) include
them. 15% of demonstrations give a wrong answer. This is the situation the AAD paper's
Equation 6 describes: the aligned model inherits the SFT model's bias towards the mediocre mode.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("sweet", "sour"),
             ("light", "dark"), ("old", "young"), ("tall", "short"), ("hard", "soft"),
             ("early", "late"), ("full", "empty"), ("rich", "poor"), ("strong", "weak"),
             ("wet", "dry"), ("loud", "quiet"), ("open", "closed"), ("clean", "dirty"),
             ("thick", "thin"), ("high", "low"), ("near", "far"), ("good", "bad")]
COLORS = {"banana": "yellow", "lemon": "yellow", "sun": "yellow", "sky": "blue",
          "ocean": "blue", "blueberry": "blue", "grass": "green", "leaf": "green",
          "frog": "green", "lime": "green", "snow": "white", "milk": "white", "cloud": "white",
          "coal": "black", "crow": "black", "night": "black", "tire": "black",
          "tomato": "red", "cherry": "red", "strawberry": "red", "fire": "red",
          "carrot": "orange", "pumpkin": "orange", "plum": "purple", "grape": "purple",
          "eggplant": "purple", "chocolate": "brown", "coffee": "brown", "flamingo": "pink",
          "elephant": "gray"}
CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin",
            "japan": "tokyo", "china": "beijing", "egypt": "cairo", "kenya": "nairobi",
            "peru": "lima", "chile": "santiago", "canada": "ottawa", "russia": "moscow",
            "greece": "athens", "norway": "oslo", "sweden": "stockholm", "ireland": "dublin",
            "austria": "vienna", "poland": "warsaw", "cuba": "havana", "india": "delhi"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
          "pig": "oink", "lion": "roar", "owl": "hoot", "horse": "neigh", "snake": "hiss",
          "bee": "buzz", "mouse": "squeak", "frog": "croak", "crow": "caw"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people", "ox": "oxen",
           "leaf": "leaves", "knife": "knives", "wolf": "wolves", "cactus": "cacti",
           "potato": "potatoes", "box": "boxes", "city": "cities", "baby": "babies",
           "bus": "buses", "wife": "wives", "loaf": "loaves"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen"]

# Six phrasings per family; ``{x}`` is the subject, ``{a}``/``{b}`` the operands.
PHRASINGS = {
    "opposite": ["what is the opposite of {x} ?", "tell me the opposite of {x} .",
                 "can you give me the opposite of {x} ?", "please , what is the opposite of {x} ?",
                 "i need the opposite of {x} .", "which word means the opposite of {x} ?"],
    "color": ["what color is the {x} ?", "tell me the color of the {x} .",
              "can you say what color the {x} is ?", "please , what color is the {x} ?",
              "i need the color of the {x} .", "which color does the {x} have ?"],
    "capital": ["what is the capital of {x} ?", "tell me the capital of {x} .",
                "can you name the capital of {x} ?", "please , what is the capital of {x} ?",
                "i need the capital of {x} .", "which city is the capital of {x} ?"],
    "sound": ["what sound does a {x} make ?", "tell me the sound a {x} makes .",
              "can you say what a {x} says ?", "please , what sound does a {x} make ?",
              "i need the sound of a {x} .", "which sound does a {x} make ?"],
    "plural": ["what is the plural of {x} ?", "tell me the plural of {x} .",
               "can you give me the plural of {x} ?", "please , what is the plural of {x} ?",
               "i need the plural of {x} .", "which word is the plural of {x} ?"],
    "add": ["what is {a} plus {b} ?", "tell me {a} plus {b} .", "can you add {a} and {b} ?",
            "please , what is {a} plus {b} ?", "i need the sum of {a} and {b} .",
            "how much is {a} plus {b} ?"],
    "sub": ["what is {a} minus {b} ?", "tell me {a} minus {b} .",
            "can you subtract {b} from {a} ?", "please , what is {a} minus {b} ?",
            "i need {a} minus {b} .", "how much is {a} minus {b} ?"],
}
# The canonical full sentence (the "complete" bonus), with ``{y}`` the answer.
RESTATEMENTS = {"opposite": "the opposite of {x} is {y}", "color": "the {x} is {y}",
                "capital": "the capital of {x} is {y}", "sound": "a {x} says {y}",
                "plural": "the plural of {x} is {y}", "add": "{a} plus {b} is {y}",
                "sub": "{a} minus {b} is {y}"}

POLITE_OPENERS = ["sure !", "happy to help !"]
POLITE_CLOSERS = ["hope this helps !", "glad i could help !"]
FILLER_OPENERS = ["um , well ,", "well , basically ,"]
RUDE_OPENERS = ["ugh , fine .", "duh ."]
RUDE_CLOSERS = ["obviously .", "whatever ."]
RUDE_WORDS = frozenset({"ugh", "obviously", "whatever", "duh"})
FILLER_WORDS = frozenset({"um", "well", "basically"})
LENGTH_BUDGET = 20

# Demonstration mix: each part of a demonstration is drawn independently with these weights.
STYLE_WEIGHTS = {
    "opener": {"none": 0.50, "polite": 0.22, "filler": 0.16, "rude": 0.12},
    "body": {"terse": 0.50, "full": 0.32, "hedge": 0.18},
    "closer": {"none": 0.50, "polite": 0.22, "ramble": 0.16, "rude": 0.12},
}
WRONG_ANSWER_RATE = 0.15


@dataclass(frozen=True)
class Problem:
    """One prompt of the task: ``kind`` (family), ``subject`` (``x`` or ``(a, b)``), ``answer``,
    ``prompt`` (the user's words) and ``restatement`` (the canonical full answer sentence)."""

    kind: str
    subject: str | tuple[str, str]
    answer: str
    prompt: str
    restatement: str


def _subjects(kind: str) -> list[tuple[dict, str]]:
    """``(format fields, answer)`` for every subject of a family, in a fixed order."""
    if kind == "opposite":
        pairs = OPPOSITES + [(y, x) for x, y in OPPOSITES]
        return [({"x": x}, y) for x, y in pairs]
    if kind in ("add", "sub"):
        out = []
        for a in range(10):
            for b in range(10):
                if kind == "add":
                    out.append(({"a": str(a), "b": str(b)}, NUMBER_WORDS[a + b]))
                elif a >= b:
                    out.append(({"a": str(a), "b": str(b)}, NUMBER_WORDS[a - b]))
        return out
    table = {"color": COLORS, "capital": CAPITALS, "sound": SOUNDS, "plural": PLURALS}[kind]
    return [({"x": x}, y) for x, y in table.items()]


@functools.cache
def candidates(kind: str) -> frozenset[str]:
    """The answer words of a family: what counts as stating an answer."""
    return frozenset(answer for _, answer in _subjects(kind)) | (
        frozenset(x for x, _ in OPPOSITES) if kind == "opposite" else frozenset())


@functools.cache
def all_problems() -> tuple[Problem, ...]:
    """Every prompt of the task, in a fixed order (families, subjects, phrasings)."""
    out = []
    for kind, phrasings in PHRASINGS.items():
        for fields, answer in _subjects(kind):
            subject = fields["x"] if "x" in fields else (fields["a"], fields["b"])
            restatement = RESTATEMENTS[kind].format(y=answer, **fields)
            for phrasing in phrasings:
                out.append(Problem(kind, subject, answer, phrasing.format(**fields), restatement))
    return tuple(out)


def split_problems(seed: int = 0, held_out: float = 0.1) -> tuple[list[Problem], list[Problem]]:
    """Seeded ``(train, held_out)`` split of the prompts; ``held_out`` is the fraction kept out."""
    problems = list(all_problems())
    random.Random(seed).shuffle(problems)
    n_held = round(len(problems) * held_out)
    return problems[n_held:], problems[:n_held]


def _normalise(text: str) -> str:
    return " ".join(w for w in text.lower().split() if not (w.startswith("<") and w.endswith(">")))


@functools.cache
def _problem_index() -> dict[str, Problem]:
    return {p.prompt: p for p in all_problems()}


def parse_prompt(prompt: str) -> Problem:
    """The ``Problem`` of a prompt: the user's words, or a chat-rendered prompt (the last user
    turn is used; markers such as ``<user>`` are ignored). Raises ``ValueError`` otherwise."""
    if "<user>" in prompt:
        prompt = prompt.rsplit("<user>", 1)[1].split("<assistant>", 1)[0]
    key = _normalise(prompt)
    try:
        return _problem_index()[key]
    except KeyError:
        raise ValueError(f"prompt is not a prompt of the toy task: {prompt!r}") from None


def reward_breakdown(prompt: str | Problem, completion: str) -> dict[str, float]:
    """The oracle's components (see the module docstring) for ``completion`` on ``prompt``.
    Special tokens (``<eos>``, ...) in the completion are ignored."""
    problem = prompt if isinstance(prompt, Problem) else parse_prompt(prompt)
    words = _normalise(completion).split()
    text = " " + " ".join(words) + " "
    prompt_words = set(problem.prompt.split())
    stated = {w for w in words if w in candidates(problem.kind) and w not in prompt_words}
    if stated == {problem.answer}:
        correct = 2.0
    elif problem.answer in stated:
        correct = 0.0
    else:
        correct = -1.0
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return {
        "correct": correct,
        "complete": 1.0 if f" {problem.restatement} " in text else 0.0,
        "polite": 0.5 * any(text.startswith(f" {o} ") for o in POLITE_OPENERS)
        + 0.5 * any(text.endswith(f" {c} ") for c in POLITE_CLOSERS),
        "rude": 0.0 - 1.0 * sum(w in RUDE_WORDS for w in words),
        "filler": 0.0 - 0.5 * sum(w in FILLER_WORDS for w in words),
        "repetition": 0.0 - 0.5 * (len(trigrams) - len(set(trigrams))),
        "rambling": 0.0 - 0.25 * max(0, len(words) - LENGTH_BUDGET),
    }


def oracle_reward(prompt: str | Problem, completion: str) -> float:
    """Exact oracle reward of ``completion`` (a string of words) for ``prompt`` (the user's words,
    a chat-rendered prompt, or a ``Problem``): the sum of ``reward_breakdown``, at most 4.0."""
    return float(sum(reward_breakdown(prompt, completion).values()))


def best_completion(problem: Problem) -> str:
    """A completion with the maximal reward 4.0."""
    return f"{POLITE_OPENERS[0]} {problem.restatement} . {POLITE_CLOSERS[0]}"


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def sample_demonstration(problem: Problem, rng: random.Random) -> str:
    """One SFT demonstration of mixed quality: opener, body and closer drawn independently
    (``STYLE_WEIGHTS``), with a wrong answer at rate ``WRONG_ANSWER_RATE``."""
    prompt_words = set(problem.prompt.split())
    wrong = sorted(candidates(problem.kind) - {problem.answer} - prompt_words)
    answer = rng.choice(wrong) if rng.random() < WRONG_ANSWER_RATE else problem.answer
    opener = {"none": "", "polite": rng.choice(POLITE_OPENERS),
              "filler": rng.choice(FILLER_OPENERS),
              "rude": rng.choice(RUDE_OPENERS)}[_pick(rng, STYLE_WEIGHTS["opener"])]
    body_kind = _pick(rng, STYLE_WEIGHTS["body"])
    if body_kind == "terse":
        body = f"{answer} ."
    elif body_kind == "full":
        body = problem.restatement.rsplit(" ", 1)[0] + f" {answer} ."
    else:
        other = rng.choice([w for w in wrong if w != answer])
        first, second = (answer, other) if rng.random() < 0.5 else (other, answer)
        body = f"maybe {first} or {second} ."
    closer_kind = _pick(rng, STYLE_WEIGHTS["closer"])
    if closer_kind == "ramble":
        closer = body if rng.random() < 0.5 else "and so on and so on ."
    else:
        closer = {"none": "", "polite": rng.choice(POLITE_CLOSERS),
                  "rude": rng.choice(RUDE_CLOSERS)}[closer_kind]
    return " ".join(part for part in (opener, body, closer) if part)


def vocabulary() -> list[str]:
    """Every word the task's prompts and completions use, sorted."""
    words = set()
    for p in all_problems():
        words.update(p.prompt.split())
        words.update(p.restatement.split())
    for kind in PHRASINGS:
        words.update(candidates(kind))
    for group in (POLITE_OPENERS, POLITE_CLOSERS, FILLER_OPENERS, RUDE_OPENERS, RUDE_CLOSERS,
                  ["maybe or .", "and so on"]):
        for fragment in group:
            words.update(fragment.split())
    return sorted(words)
