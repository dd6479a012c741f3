"""OpenAI request bodies -> ``serving.DecodeRequest``s, and the response bodies (no web framework).

The rule and its parameters ride beside the OpenAI fields (as vLLM takes ``extra_body``):
``rule`` (aad | contrastive | eft | dera | cfg | opad | beam-aad | best-of-n | greedy, default
aad), ``alpha``, ``beta``, ``lam``, ``g``, ``k``, ``principle``, ``num_beams``, ``tau``,
``length_penalty``, ``top_k``, ``min_p``, ``greedy_stream`` (``"a"``/``"r"``), ``stop_token_ids``.
OpenAI's fields map as follows:

- ``max_tokens`` (chat also ``max_completion_tokens``) -> ``max_new_tokens``; default 16 for
  completions (as OpenAI), for chat the most the context and the server's limit allow.
- ``stop`` (strings of any length, matched on the text: ``stop_strings``; the text is cut where
  the match starts, or ends with ``include_stop_str_in_output``; the match is the choice's
  ``stop_reason``) and ``stop_token_ids`` (ints) are added to the server's stop ids.
  ``ignore_eos``: neither the model's EOS nor the server's ``--stop`` ends a row (the body's
  stops still do); ``min_tokens``: no stop id or string ends a row before that many tokens.
- ``prompt`` (completions): a string, a token-id list, or a list of several of either (at
  most ``Limits.max_prompts``): one choice per prompt and ``n``, prompt-major, decoded together.
- ``temperature``, ``top_p``, ``seed``: the sampling of eft/dera/cfg (default greedy; with
  ``top_k``, ``min_p``) and best-of-n (default 1.0 / 0.9). A greedy request (aad, contrastive,
  opad, beam-aad, greedy; eft/dera/cfg without ``temperature > 0``) refuses every sampling field
  that is not at its neutral value (``temperature`` 0, ``top_p`` 1, ``top_k`` 0, ``min_p`` 0),
  which would have no effect; ``seed`` (an int in ``[0, 2**63 - 1]``) is accepted and has no
  effect there, since evaluation clients (lm-evaluation-harness) send one with every request.
- ``n``: choices per prompt. Only a sampling rule (temperature > 0) has distinct choices;
  choice ``i`` is sampled with ``seed + i``. ``n > 1`` is refused for the greedy rules (the
  choices would be copies). A stream's chunks carry their choice's ``index``;
  ``stream_options.continuous_usage_stats`` puts the choice's usage so far in every chunk.
- ``best_of``: with ``rule=best-of-n``, the number of samples the picker chooses from (OpenAI's
  legacy meaning); one choice comes back.
- ``logprobs`` (completions: an int, the alternatives per token, 0 = the chosen token's only)
  and ``logprobs: true`` + ``top_logprobs`` (chat), ``echo`` (completions: the prompt and its
  log-probabilities first; with ``max_tokens`` 0 the prompt alone): OpenAI's shapes, computed
  after decoding by one forward of prompt + completion through the stream ``logprobs_stream``
  (``"a"``, the aligned model, default; ``"r"``, the reference); not with ``stream``.
- ``suffix``, ``logit_bias``, presence/frequency penalties, tools and response formats are
  refused when set (``response_format`` ``{"type": "text"}``, the neutral value, is accepted).
- ``model``: the served name ``NAME`` (or none) is the server's default rule (``aad`` unless
  ``aad-fast serve --rule``) and a body ``rule`` still chooses another; ``NAME:RULE`` chooses
  ``RULE`` with the rule table's defaults (``ServedModels``), and a body ``rule`` that
  disagrees with it is a 400 naming both; any other name is a 404 listing the served ones.

``tokenize``, ``detokenize`` and ``tokenizer_info`` answer vLLM's endpoints of those names.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from .. import rules as R
from ..decode.prompt_rows import encode, rule_rows
from .loop import DecodeRequest

RULES = R.RULE_NAMES
_SAMPLING = set(R.NEUTRAL)  # the sampling filters (the seed is accepted by every rule)
_NEUTRAL = R.NEUTRAL  # the value that is "off"
#: the body's names of the rule table's fields that differ (the picker is the server's own)
_BODY_NAME = {"n": "best_of", "stream": "greedy_stream", "picker": None, "seed": None}
_TABLE_NAME = {v: k for k, v in _BODY_NAME.items() if v}
#: the rule-specific body fields each rule takes (temperature/top_p are checked separately)
_PARAMS = {name: {_BODY_NAME.get(f, f) for f in entry.fields} - {None}
           for name, entry in R.RULE_TABLE.items()}
_RULE_FIELDS = set().union(*_PARAMS.values())  # every body field of a rule but seed
_ALL_PARAMS = set().union(*_PARAMS.values()) - {"temperature", "top_p", "best_of"}
_UNSUPPORTED = ("suffix", "logit_bias", "presence_penalty", "frequency_penalty", "tools",
                "tool_choice", "functions", "function_call", "response_format")
_FIELDS = _ALL_PARAMS | {"temperature", "top_p", "best_of", "seed", "n", "max_tokens",
                         "max_completion_tokens", "stop", "stop_token_ids", "rule", "prompt",
                         "messages", "num_beams", "echo", "logprobs", "top_logprobs",
                         "logprobs_stream", "ignore_eos", "min_tokens",
                         "include_stop_str_in_output"}
#: every body field a request may carry; any other is refused (never silently ignored).
#: ``model`` names the served model (one is served: any value), ``user`` is a caller's tag.
_KNOWN = _FIELDS | set(_UNSUPPORTED) | {"model", "user", "stream", "stream_options"}
_NOT_FOR = {False: {"messages", "max_completion_tokens", "top_logprobs"},
            True: {"prompt", "echo"}}


class APIError(Exception):
    """An error answered with ``status`` and an OpenAI-style body naming ``param``."""

    def __init__(self, status: int, message: str, param=None, type_=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param, message, code=None) -> APIError:
    return APIError(400, message, param, code=code)


@dataclasses.dataclass
class Limits:
    """What one request may ask for; a client cannot raise these. ``None`` fields are filled
    from the Decoder by ``resolve``."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_n: int = 4
    max_num_beams: int | None = None
    max_prompts: int = 32
    max_logprobs: int = 20

    def resolve(self, decoder, max_batch_size: int) -> "Limits":
        ctx = decoder.max_seq_len

        def cap(name, top):  # None: the most the Decoder allows; a given value: at most that
            v = getattr(self, name)
            return top if v is None else min(R.check_int(f"Limits.{name}", v, 1), top)
        R.check_int("Limits.max_n", self.max_n, 1)
        R.check_int("Limits.max_prompts", self.max_prompts, 1)
        R.check_int("Limits.max_logprobs", self.max_logprobs, 0)
        R.check_int("Limits.max_body_bytes", self.max_body_bytes, 1)
        return dataclasses.replace(
            self, max_prompt_tokens=cap("max_prompt_tokens", ctx - 1),
            max_tokens=cap("max_tokens", ctx - 1),
            max_num_beams=cap("max_num_beams", max_batch_size))


def _value_error_param(msg: str, default: str) -> str:
    """The body field a rule's / the Decoder's ``ValueError`` names (its first word)."""
    word = msg.split(" ", 1)[0].strip("'\"=:")
    names = {"max_new_tokens": "max_tokens", "stop": "stop", "n": "best_of"}
    if word in names:
        return names[word]
    return word if word in _FIELDS else default


def _real(v) -> bool:
    """A JSON number (never a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body, name, types, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise bad(name, f"{name} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
    return v


def _rule_name(body: dict, model_rule: str | None = None, default: str = "aad") -> str:
    """The body's ``rule``, else the rule the model name's suffix selects (``model_rule``),
    else the server's default; a body ``rule`` that disagrees with the suffix is a 400."""
    name = body.get("rule")
    if name is not None and name not in RULES:
        raise bad("rule", f"unknown rule {name!r}; use one of {', '.join(RULES)}")
    if name is not None and model_rule is not None and name != model_rule:
        raise bad("rule", f"model={body.get('model')!r} selects rule {model_rule} but the body "
                          f"says rule={name!r}: give one of them (or the same rule in both)")
    return name or model_rule or default


@dataclasses.dataclass(frozen=True)
class ServedModels:
    """The served pair under one name per rule: ``name`` is the server's default rule
    (``rule`` with ``defaults``, rule-table field -> value, e.g. ``--alpha``), ``name:RULE``
    each rule of ``rules`` (``name:`` + the default rule is ``name`` itself)."""

    name: str
    rule: str = "aad"
    defaults: dict = dataclasses.field(default_factory=dict)
    rules: tuple = RULES

    def ids(self) -> list:
        return [self.name] + [f"{self.name}:{r}" for r in self.rules]

    def rule_of(self, model) -> str | None:
        """The rule ``model`` selects: ``None`` for the bare name or no ``model`` (the body's
        ``rule``, else the default, decides); 404 listing the served ids for any other name."""
        if model is None or model == self.name:
            return None
        base, _, suffix = model.rpartition(":") if isinstance(model, str) else ("", "", "")
        if base == self.name and suffix in self.rules:
            return suffix
        raise APIError(404, f"the model {model!r} does not exist on this server; it serves "
                            f"{', '.join(self.ids())}", "model", code="model_not_found")

    def card(self, model_id: str, max_model_len: int) -> dict:
        """One ``/v1/models`` entry; ``aad_rule``: the rule and the defaults it uses."""
        rule = self.rule_of(model_id) or self.rule
        fields = dict(R.RULE_TABLE[rule].fields)
        if rule == self.rule:
            fields.update(self.defaults)
        fields.pop("picker", None)
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "aad_fast",
                "root": self.name, "parent": None if model_id == self.name else self.name,
                "max_model_len": max_model_len,
                "aad_rule": {"rule": rule, "defaults": {_BODY_NAME.get(k) or k: v
                                                        for k, v in fields.items()}}}


def _given_fields(body: dict, name: str, greedy: bool) -> set:
    """The rule table's names of the rule fields ``body`` gives: a greedy request's sampling
    filters at their neutral values, and ``best_of`` 1 on another rule than best-of-n, are
    not given (they ask for nothing)."""
    given = set()
    for f in _RULE_FIELDS:
        v = body.get(f)
        if v is None or (greedy and f in _SAMPLING and _real(v) and v == _NEUTRAL[f]) or \
                (f == "best_of" and name != "best-of-n" and v in (None, 1)):
            continue
        given.add(_TABLE_NAME.get(f, f))
    return given


def _unread_error(exc: R.UnreadFields, body: dict, mix_greedy: bool) -> APIError:
    """The 400 for the first field of ``exc`` (a rule's field, ``best_of``, then a sampling
    filter of a greedy request) in the body's names."""
    name, greedy = exc.rule, exc.greedy
    wrong = sorted(_BODY_NAME.get(f, f) for f in exc.fields
                   if f != "n" and not (greedy and f in _SAMPLING))
    if wrong:
        takes = ", ".join(sorted(_PARAMS[name] - _SAMPLING)) or "no parameters"
        return bad(wrong[0], f"{wrong[0]} does not apply to rule={name} (it takes {takes})")
    if "n" in exc.fields:
        return bad("best_of", "best_of > 1 needs rule=best-of-n (best_of samples, the picker "
                              "chooses one)")
    f = next(f for f in _NEUTRAL if f in exc.fields)
    v = body.get(f)
    if mix_greedy:
        return bad(f, f"rule={name} without temperature > 0 is greedy, so {f}={v!r} would "
                      f"have no effect; give temperature > 0 to sample, or omit {f} (or "
                      f"give {_NEUTRAL[f]})")
    return bad(f, f"rule={name} is greedy; {f} must be {_NEUTRAL[f]} or omitted, got {v!r} "
                  "(sampling rules: eft, dera, cfg, best-of-n)")


def _rule_values(body: dict, name: str, picker) -> dict:
    """The rule table's fields of rule ``name`` that ``body`` gives (JSON null: not given), its
    seed and the server's picker, each type-checked where the rule would misname it."""
    seed = _get(body, "seed", (int,), 0)
    try:
        seed = R.check_seed(seed)
    except ValueError as exc:
        raise bad("seed", str(exc)) from None
    _get(body, "top_k", (int,), 0)
    _get(body, "min_p", (int, float), 0.0)
    fields, values = R.RULE_TABLE[name].fields, {}
    for f in fields:
        key = _BODY_NAME.get(f, f)
        if key is not None and body.get(key) is not None:
            values[f] = body[key]
    values.update({k: v for k, v in (("seed", seed), ("picker", picker)) if k in fields})
    if name == "opad" and values.get("principle") is None:
        raise bad("principle", "rule=opad needs principle (the principle text)")
    if name == "best-of-n" and picker is None:
        raise bad("rule", "rule=best-of-n needs a picker reward model and this server has none "
                          "(start it with --picker PATH)")
    return values


def build_rule(body: dict, picker=None, models: ServedModels | None = None):
    """The ``aad_fast`` rule a request body asks for (400 naming the field otherwise). A greedy
    request (a greedy rule, or eft/dera/cfg without temperature > 0) takes the sampling fields
    only at their neutral values: anything else would be silently unused. ``models``: the
    served names (the body's ``model`` may select the rule; the server's default rule and its
    default values)."""
    models = models or ServedModels("")
    name = _rule_name(body, models.rule_of(body.get("model")) if models.name else None,
                      models.rule)
    if name == models.rule and models.defaults:  # the server's values, under the body's
        body = {**{_BODY_NAME.get(k) or k: v for k, v in models.defaults.items()},
                **{k: v for k, v in body.items() if v is not None}}
    temp = body.get("temperature")
    mix_greedy = R.RULE_TABLE[name].samples == "temperature" and (
        temp is None or _real(temp) and temp == 0)
    greedy = R.RULE_TABLE[name].samples == "never" or mix_greedy
    try:
        R.check_fields(name, _given_fields(body, name, greedy), not greedy)
    except R.UnreadFields as exc:
        raise _unread_error(exc, body, mix_greedy) from None
    values = _rule_values(body, name, picker)
    try:
        return R.make_rule(name, values)
    except ValueError as exc:
        msg = str(exc)
        param = {"w_a": "lam" if name == "dera" else "g", "n": "best_of",
                 "stream": "greedy_stream"}.get(msg.split(" ", 1)[0], None)
        raise bad(param or _value_error_param(msg, "rule"), msg) from None


def _text_of(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": ...}``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(where, f"{where} must be a string or a list of text parts, got {content!r}")


def _one_prompt(p, where: str) -> dict:
    """``{"text": str}`` or ``{"ids": [int]}`` of one completions prompt."""
    if isinstance(p, str):
        if not p.strip():
            raise bad("prompt", f"{where}={p!r} is empty; give some text")
        return {"text": p, "chat": False}
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        return {"ids": list(p), "chat": False}
    raise bad("prompt", f"{where} must be a non-empty string or token-id list, got {p!r}"[:300])


def prompt_inputs(body: dict, chat: bool, tokenizer, max_prompts: int = 1 << 30) -> list:
    """The body's prompts, each ``{"text": str, "chat": bool}`` or ``{"ids": [int], "chat":
    False}``. Completions: ``prompt`` is a string, a token-id list, or a list of several of
    either (at most ``max_prompts``); chat: one conversation."""
    if not chat:
        p = body.get("prompt")
        if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            if len(p) > max_prompts:
                raise bad("prompt", f"{len(p)} prompts in one request; this server takes at "
                                    f"most {max_prompts}")
            return [_one_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)]
        return [_one_prompt(p, "prompt")]
    return [prompt_input(body, chat, tokenizer)]


def prompt_input(body: dict, chat: bool, tokenizer) -> dict:
    """``{"text": str, "chat": bool}`` or ``{"ids": [int], "chat": False}`` for the body's one
    prompt (chat: the conversation)."""
    if not chat:
        return _one_prompt(body.get("prompt"), "prompt")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", f"messages must be a non-empty list, got {msgs!r}")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):
            raise bad("messages", f"messages[{i}] must be {{'role': system|user|assistant, "
                                  f"'content': ...}}, got {m!r}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise bad("messages", f"messages[{i}].{extra[0]} is not supported (a message is "
                                  "{'role', 'content'}); it would be ignored")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _text_of(m.get("content"),
                                                        f"messages[{i}].content")})
    if not any(m["content"].strip() for m in clean):
        raise bad("messages", "every message is empty; give some text")
    if len(clean) == 1 and clean[0]["role"] == "user":
        return {"text": clean[0]["content"], "chat": True}  # exactly Decoder(chat=True)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise bad("messages", "the served tokenizer has no chat template")
    # the whole conversation, rendered by the Decoder (so OPAD's principle joins its system
    # message instead of preceding the rendered ids)
    return {"text": clean, "chat": True}


def _check_body(body: dict, chat: bool) -> None:
    """Refuse a field the endpoint does not know or support, and a malformed ``stream``,
    ``user`` or ``stream_options``."""
    unknown = sorted(set(body) - (_KNOWN - _NOT_FOR[chat]))
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r} for /v1/"
                              f"{'chat/completions' if chat else 'completions'}; it would be "
                              "ignored (see the API's fields in the docs)")
    for k in _UNSUPPORTED:
        v = body.get(k)
        if k == "response_format" and v == {"type": "text"}:
            continue  # the neutral value: plain text, as without it
        if v not in (None, False, 0, {}, []):
            what = f" (type {v.get('type')!r}; only {{\"type\": \"text\"}})" if \
                k == "response_format" and isinstance(v, dict) else ""
            raise bad(k, f"{k} is not supported by aad-fast serve{what}")
    for k in ("stream", "user"):
        want = bool if k == "stream" else str
        if body.get(k) is not None and not isinstance(body[k], want):
            raise bad(k, f"{k} must be {'true or false' if k == 'stream' else 'a string'}, "
                         f"got {body[k]!r}")
    opts = body.get("stream_options")
    if opts is not None:
        if body.get("stream") is not True:
            raise bad("stream_options", "stream_options applies only with stream=true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"} \
                or not all(isinstance(opts.get(k, False), bool) for k in opts):
            raise bad("stream_options", "stream_options must be {\"include_usage\": true|false, "
                                        "\"continuous_usage_stats\": true|false}, got "
                                        f"{opts!r}")


def _choices(body: dict, rule, limits: Limits) -> int:
    """``n``, the choices per prompt: distinct only for a sampling rule, not streamed, each
    choice's seed (``seed + i``) within int64."""
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= limits.max_n:
        raise bad("n", f"n must be in [1, {limits.max_n}] on this server, got {n}")
    if n > 1 and not rule.sampled:
        raise bad("n", f"n={n} with a greedy rule would give {n} copies; n > 1 needs a sampling "
                       "rule (eft/dera/cfg with temperature > 0)")
    if n > 1:  # choice i is sampled with seed + i
        try:
            R.check_seed(rule.seed, room=n)
        except ValueError as exc:
            raise bad("seed", f"{exc} (n={n})") from None
    return n


def _check_rule_fits(body: dict, rule, decoder, limits: Limits, name: str = "aad") -> None:
    """The rule's rows within this server's limits, and the Decoder's own rule/pair check."""
    if isinstance(rule, R.BeamAAD) and rule.num_beams > limits.max_num_beams:
        raise bad("num_beams", f"num_beams={rule.num_beams} exceeds this server's limit "
                               f"{limits.max_num_beams}")
    if isinstance(rule, R.BestOfN) and rule.n > limits.max_num_beams:
        raise bad("best_of", f"best_of={rule.n} exceeds this server's limit "
                             f"{limits.max_num_beams}")
    validate = getattr(decoder, "_validate", None)
    if validate is not None:
        try:
            validate(rule, 1)
        except ValueError as exc:
            raise bad("rule", f"rule={name}: {exc}") from None


def _prompt_rows(rule, inp: dict, decoder, limits: Limits, where: str):
    """``(rows, longest)``: both streams' prompt ids (the one tokenisation of the prompt) and
    the longer one's length, within ``limits.max_prompt_tokens``."""
    try:
        rows = rule_rows(rule, decoder.kind, decoder.tokenizer, decoder.vocab,
                         None if "text" not in inp else [inp["text"]],
                         None if "ids" not in inp else [inp["ids"]], None, inp["chat"])
    except ValueError as exc:
        raise bad(_value_error_param(str(exc), where), f"{where}: {exc}") from None
    longest = max(len(rows.a[0]), len(rows.r[0]))
    if longest > limits.max_prompt_tokens:
        raise bad(where, f"the prompt is {longest} tokens; this server takes at most "
                         f"{limits.max_prompt_tokens}", code="context_length_exceeded")
    return rows, longest


def _max_new_tokens(body: dict, chat: bool, decoder, limits: Limits, longest: int) -> int:
    """``max_tokens`` (chat: or ``max_completion_tokens``), or its default, within the limits and
    the context left after a prompt of ``longest`` tokens."""
    room = decoder.max_seq_len - longest
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_new = _get(body, key, (int,), None)
    if max_new is None:
        max_new = min(16 if not chat else limits.max_tokens, room, limits.max_tokens)
    if max_new == 0 and not chat and body.get("echo") is True:
        return 0  # the prompt alone, with its log-probabilities (vLLM)
    if max_new < 1:
        raise bad(key, f"{key} must be >= 1 (0 with echo=true), got {max_new}")
    if max_new > limits.max_tokens:
        raise bad(key, f"{key}={max_new} exceeds this server's limit {limits.max_tokens}")
    if max_new > room:
        raise bad(key, f"a prompt of {longest} tokens plus {key}={max_new} exceeds the "
                       f"context of {decoder.max_seq_len} tokens; ask for at most {room}",
                  code="context_length_exceeded")
    return max_new


def _stops(body: dict, decoder, default_stop, ignore_eos: bool) -> tuple:
    """``(ids, strings)``: the server's stop ids (its EOS and ``--stop``, neither with
    ``ignore_eos``) plus the body's ``stop`` (strings of any length: a single-token one is also
    a stop id) and ``stop_token_ids``."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    extra_ids = body.get("stop_token_ids") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got "
                          f"{body['stop']!r}"[:300])
    if not isinstance(extra_ids, list) or not all(_real(i) and isinstance(i, int)
                                                  for i in extra_ids):
        raise bad("stop_token_ids", f"stop_token_ids must be a list of token ids (ints), got "
                                    f"{extra_ids!r}; stop strings go in stop")
    try:
        return decoder.stops((list(default_stop) if not ignore_eos else []) + stop + extra_ids,
                             ignore_eos=ignore_eos)
    except ValueError as exc:
        raise bad("stop_token_ids" if extra_ids and "id" in str(exc).split(" ")[1] else "stop",
                  str(exc)) from None


def _flags(body: dict, chat: bool, rule, limits: Limits) -> dict:
    """The body's ``echo``, ``logprobs``/``top_logprobs``, ``logprobs_stream``, ``ignore_eos``,
    ``min_tokens``, ``include_stop_str_in_output``, ``stream_options`` checked."""
    out = {k: _get(body, k, (bool,), False) for k in ("echo", "ignore_eos",
                                                        "include_stop_str_in_output")}
    out["min_tokens"] = _get(body, "min_tokens", (int,), 0)
    if out["min_tokens"] < 0:
        raise bad("min_tokens", f"min_tokens must be >= 0, got {out['min_tokens']}")
    cap = limits.max_logprobs
    if chat:
        top = _get(body, "top_logprobs", (int,), None)
        on = _get(body, "logprobs", (bool,), False)
        if top is not None and not on:
            raise bad("top_logprobs", "top_logprobs needs logprobs=true")
        top = (top or 0) if on else None
    else:
        top = _get(body, "logprobs", (int,), None)
    if top is not None and not 0 <= top <= cap:
        name = "top_logprobs" if chat else "logprobs"
        raise bad(name, f"{name} must be in [0, {cap}] on this server, got {top}")
    out["logprobs"] = top
    out["logprobs_stream"] = _get(body, "logprobs_stream", (str,), "a")
    if out["logprobs_stream"] not in ("a", "r"):
        raise bad("logprobs_stream", f"logprobs_stream must be 'a' (the aligned model) or 'r' "
                                     f"(the reference), got {out['logprobs_stream']!r}")
    if body.get("logprobs_stream") is not None and top is None:
        raise bad("logprobs_stream", "logprobs_stream applies with logprobs")
    if out["echo"] and isinstance(rule, (R.OPAD, R.CFGMix)):
        raise bad("echo", f"echo with rule {type(rule).__name__}: its two streams see "
                          "different prompts; echo needs a rule whose streams share the prompt")
    for k in ("echo", "logprobs"):
        if body.get("stream") is True and (out[k] if k == "echo" else top is not None):
            raise bad(k, f"{k} is not supported with stream=true (the log-probabilities are "
                         "computed once the completion is done)")
    if out["min_tokens"] and isinstance(rule, R.BeamAAD):
        raise bad("min_tokens", "min_tokens is not supported with rule=beam-aad")
    opts = body.get("stream_options") or {}
    out["include_usage"] = opts.get("include_usage") is True
    out["continuous_usage"] = opts.get("continuous_usage_stats") is True
    return out


@dataclasses.dataclass
class Parsed:
    """A request body, checked: ``requests`` one ``DecodeRequest`` per choice, prompt-major
    (choice ``i`` is prompt ``i // n``'s sample ``i % n``; ``None``: echo with ``max_tokens``
    0, nothing to decode), per prompt its ``inputs`` (``prompt_inputs``), ``rows`` (both
    streams' ids) and ``prompt_tokens``; ``flags`` (``_flags``)."""

    requests: list
    inputs: list
    rows: list
    prompt_tokens: list
    n: int
    flags: dict


def parse_request(body: dict, chat: bool, decoder, limits: Limits, default_stop=(),
                  picker=None, models: ServedModels | None = None) -> Parsed:
    """The checked request (``Parsed``): every choice validated against ``decoder`` (rule and
    pair, prompt length, context) and ``limits``. The prompts are tokenised here, once: each
    request carries its ``prompt_rows``."""
    _check_body(body, chat)
    rule = build_rule(body, picker, models)
    inputs = prompt_inputs(body, chat, decoder.tokenizer, limits.max_prompts)
    n = _choices(body, rule, limits)
    models = models or ServedModels("")
    _check_rule_fits(body, rule, decoder, limits, _rule_name(
        body, models.rule_of(body.get("model")) if models.name else None, models.rule))
    flags = _flags(body, chat, rule, limits)
    where = "messages" if chat else "prompt"
    made = [_prompt_rows(rule, inp, decoder, limits, where) for inp in inputs]
    rows = [m[0] for m in made]
    max_new = min(_max_new_tokens(body, chat, decoder, limits, longest) for _, longest in made)
    if flags["min_tokens"] > max(max_new, 0):
        raise bad("min_tokens", f"min_tokens={flags['min_tokens']} exceeds max_tokens="
                                f"{max_new}")
    ids, strings = _stops(body, decoder, default_stop, flags["ignore_eos"])
    if strings and isinstance(rule, (R.BeamAAD, R.BestOfN)):
        raise bad("stop", f"stop strings that are not single tokens ({strings[0]!r}) are not "
                          "supported with beam-aad or best-of-n; give token ids "
                          "(stop_token_ids)")
    rules = [rule] if n == 1 else [dataclasses.replace(rule, seed=rule.seed + i)
                                   for i in range(n)]
    reqs = [None if max_new == 0 else
            DecodeRequest(rule=r, max_new_tokens=max_new, text=inp.get("text"),
                          ids=inp.get("ids"), chat=inp["chat"], stop=tuple(ids),
                          stream=body.get("stream") is True, prompt_rows=rw,
                          stop_strings=strings, min_tokens=flags["min_tokens"],
                          ignore_eos=flags["ignore_eos"],
                          include_stop=flags["include_stop_str_in_output"])
            for inp, rw in zip(inputs, rows) for r in rules]
    return Parsed(reqs, inputs, rows, [len(rw.a[0]) for rw in rows], n, flags)


def completion_body(chat: bool, model: str, parsed: Parsed, done: list, texts=None,
                    logprobs=None) -> dict:
    """The non-streamed response: ``done`` per choice its ``Completion`` (``None``: echo with
    ``max_tokens`` 0), ``texts`` per choice the text to return (default the completion's; echo
    puts the prompt first), ``logprobs`` per choice its ``logprobs`` object or ``None``."""
    choices = []
    for i, c in enumerate(done):
        ch = {"index": i, "finish_reason": c.finish_reason if c else "length",
              "token_ids": c.tokens if c else []}
        if getattr(c, "stop_reason", None) is not None:
            ch["stop_reason"] = c.stop_reason
        text = texts[i] if texts is not None else c.text
        if chat:
            ch["message"] = {"role": "assistant", "content": text}
        else:
            ch["text"] = text
        ch["logprobs"] = logprobs[i] if logprobs is not None else None
        choices.append(ch)
    n_out = sum(len(c.tokens) for c in done if c)
    return {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(sum(parsed.prompt_tokens), n_out)}


def logprobs_body(chat: bool, tokenizer, lp, top: int) -> dict:
    """OpenAI's ``logprobs`` object of ``lp`` (``decode.logprobs.TokenLogprobs``): completions
    ``{tokens, token_logprobs, top_logprobs, text_offset}`` (``top_logprobs`` a dict of the
    ``top`` best and the chosen token, as vLLM; offsets into the choice's text), chat
    ``{content: [{token, logprob, bytes, top_logprobs}]}``. A token's text is its id decoded
    alone (vLLM's)."""
    def word(i):
        return tokenizer.decode([i])
    strs = [word(i) for i in lp.ids]
    if chat:
        return {"content": [
            {"token": t, "logprob": v, "bytes": list(t.encode("utf-8")),
             "top_logprobs": [{"token": word(i), "logprob": x,
                               "bytes": list(word(i).encode("utf-8"))} for i, x in alts[:top]]}
            for t, v, alts in zip(strs, lp.logprobs, lp.top) if v is not None]}
    tops, offsets, at = [], [], 0
    for i, t, v, alts in zip(lp.ids, strs, lp.logprobs, lp.top):
        offsets.append(at)
        at += len(t)
        if v is None:
            tops.append(None)
            continue
        d = {}
        for j, x in alts[:top]:
            d.setdefault(word(j), x)
        d.setdefault(t, v)
        tops.append(d)
    return {"tokens": strs, "token_logprobs": lp.logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def chunk(chat: bool, rid: str, model: str, created: int, text=None, finish=None,
          role=False, tokens=None, index: int = 0, use=None, stop_reason=None) -> dict:
    """One server-sent event of a stream (OpenAI's chunk format) for choice ``index``;
    ``use``: a ``usage`` to carry (``continuous_usage_stats``)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else \
            ({"content": text} if text is not None else {})
        ch = {"index": index, "delta": delta, "finish_reason": finish}
    else:
        ch = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if tokens is not None:
        ch["token_ids"] = tokens
    if stop_reason is not None:
        ch["stop_reason"] = stop_reason
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "choices": [ch]}
    if use is not None:
        out["usage"] = use
    return out


# ------------------------------------------------------------------ vLLM's tokenizer endpoints
_TOKENIZE = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
             "continue_final_message", "return_token_strs"}


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {v!r}")
    return v


def tokenize(body: dict, decoder) -> dict:
    """``POST /tokenize`` (vLLM's shape): ``{"prompt": str}`` or ``{"messages": [...]}`` ->
    ``{"count", "max_model_len", "tokens", "token_strs"}``. With the defaults
    (``add_special_tokens`` true for a prompt, ``add_generation_prompt`` true for messages) the
    ids are exactly those a completion of that prompt decodes from (the aligned stream's)."""
    unknown = sorted(set(body) - _TOKENIZE)
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r} for /tokenize; it would be ignored")
    if ("prompt" in body) == ("messages" in body):
        raise bad("prompt", "give exactly one of prompt (a string) or messages (a chat)")
    tok, strs = decoder.tokenizer, _flag(body, "return_token_strs", False)
    if _flag(body, "continue_final_message", False):
        raise bad("continue_final_message", "continue_final_message is not supported")
    if "prompt" in body:
        p = body["prompt"]
        if not isinstance(p, str):
            raise bad("prompt", f"prompt must be a string, got {p!r}")
        if _flag(body, "add_special_tokens", True):
            ids = encode(tok, decoder.vocab, [p], None, None, False)[0] if p.strip() else []
        else:
            ids = list(tok(p, add_special_tokens=False)["input_ids"])
    else:
        msgs = prompt_input({"messages": body["messages"]}, True, tok)["text"]
        msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
        if _flag(body, "add_special_tokens", False):
            raise bad("add_special_tokens", "add_special_tokens applies to prompt; the chat "
                                            "template places the special tokens of messages")
        if getattr(tok, "chat_template", None) is None:
            raise bad("messages", "the served tokenizer has no chat template")
        gen = _flag(body, "add_generation_prompt", True)
        if gen and len(msgs) == 1 and msgs[0]["role"] == "user":
            ids = encode(tok, decoder.vocab, [msgs[0]["content"]], None, None, True)[0]
        else:
            out = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    ids = [int(i) for i in ids]
    return {"count": len(ids), "max_model_len": decoder.max_seq_len, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if strs else None}


def detokenize(body: dict, decoder) -> dict:
    """``POST /detokenize`` (vLLM's shape): ``{"tokens": [int]}`` -> ``{"prompt": str}``."""
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r} for /detokenize")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            and 0 <= i < decoder.vocab for i in ids):
        raise bad("tokens", f"tokens must be a list of token ids in [0, {decoder.vocab}), "
                            f"got {ids!r}"[:300])
    return {"prompt": decoder.tokenizer.decode(ids)}


def tokenizer_info(decoder) -> dict:
    """``GET /tokenizer_info`` (vLLM's shape): the tokenizer's class and configuration, so a
    client (lm-evaluation-harness) need not fetch the tokenizer from a hub."""
    tok = decoder.tokenizer
    info = {"tokenizer_class": type(tok).__name__, "model_max_length": decoder.max_seq_len,
            "max_model_len": decoder.max_seq_len, "vocab_size": decoder.vocab,
            "chat_template": getattr(tok, "chat_template", None)}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id",
              "eos_token_id", "pad_token_id", "unk_token_id", "padding_side",
              "truncation_side", "clean_up_tokenization_spaces"):
        v = getattr(tok, k, None)
        if v is None or isinstance(v, (str, int, bool, float)):
            info[k] = v
        else:
            info[k] = str(v)
    return info
