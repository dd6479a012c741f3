"""``aad-fast``: generate | demo | serve | bench | evaluate | make-pairs.

Run ``aad-fast COMMAND --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

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


def read_prompts_file(path, arg: str = "--prompts-file", text_lines: bool = False) -> list:
    """Rows ``{"id": ..., "prompt": str, ...}`` of a JSONL file (a line may also be a bare JSON
    string; with ``text_lines`` a line that does not start with ``{`` is the prompt itself).
    Ids default to the line index; given ids must be ints or strings (never a float, a bool or
    a list) and unique. Blank lines are skipped. Lines are split on ``\n`` only (a prompt may
    hold U+2028, U+0085, ...; a ``\r`` before the ``\n`` is dropped); a UTF-8 BOM is skipped."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{arg}={str(path)!r}: no such file")
    if not p.is_file():
        raise ValueError(f"{arg}={str(path)!r} is not a file (a directory?); give a JSONL file")
    try:
        lines = p.read_bytes().decode("utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{arg}={str(path)!r} cannot be read as UTF-8 text ({exc})") from None
    rows, seen = [], {}
    for i, line in enumerate(lines):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        where = f"{arg} {path}: line {i + 1}"
        if text_lines and not line.lstrip().startswith("{"):
            line = json.dumps(line)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValueError(f"{where} has no 'prompt' (expected {{\"prompt\": \"...\"}})")
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got "
                             f"{obj['prompt']!r}")
        obj.setdefault("id", i)
        rid = obj["id"]
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise ValueError(f"{where}: 'id' must be an int or a string, got {rid!r} "
                             f"({type(rid).__name__})")
        key = (type(rid).__name__, rid)
        if key in seen:
            raise ValueError(f"{where}: id {rid!r} is also on line {seen[key]}; ids must be "
                             "unique")
        seen[key] = i + 1
        rows.append(obj)
    return rows


def _read_prompts(a) -> list:
    if a.prompt is not None:
        if not a.prompt:
            raise ValueError("--prompt is empty; give some text")
        return [{"id": 0, "prompt": a.prompt}]
    return read_prompts_file(a.prompts_file)


def generate_settings(a, rule) -> dict:
    """What the rows of ``generate --out`` depend on (the sidecar's ``settings``)."""
    def path(x):
        return None if x is None else os.path.abspath(x)
    return {"command": "generate", "aligned": path(a.aligned), "reference": path(a.reference),
            "rule": repr(rule), "max_new_tokens": a.max_new_tokens, "chat": a.chat,
            "stop": a.stop or None, "dtype": a.dtype}


def prompts_identity(path) -> dict:
    from ..jobs.outfile import sha256_of
    return {"file": os.path.abspath(path), "sha256": sha256_of(path)}


def check_resume(out, rows, prompt_of, arg: str = "--out") -> None:
    """Refuse a resume whose done rows were made from other prompts (same id, other text)."""
    if not out.prompts_changed:
        return
    current = {(type(r["id"]).__name__, r["id"]): r["prompt"] for r in rows}
    for key, row in out.done.items():
        if key in current and prompt_of(row) != current[key]:
            raise ValueError(f"{arg}={str(out.path)!r}: id {row['id']!r} was made from the "
                             f"prompt {prompt_of(row)!r} but the prompts now give "
                             f"{current[key]!r}; pass another {arg} for the new prompts")
    print(f"{out.path}: the prompts changed since it was started, but every done row's prompt "
          "is unchanged; resuming", file=sys.stderr)


CONTINUOUS_CHUNK = 16  # batches' worth of prompts per Decoder.generate call


def generate_inputs(a):
    """``(rule, rows)`` of a ``generate`` command line, checked: one prompt source, positive
    sizes, no whitespace-only prompt (it encodes to no tokens)."""
    if (a.prompt is None) == (a.prompts_file is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompts-file FILE.jsonl")
    for name in ("max_new_tokens", "batch_size", "max_seq_len"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    check_stop_ids(a)
    out = getattr(a, "out", None)
    if out and a.prompts_file and os.path.exists(out) and os.path.exists(a.prompts_file) \
            and os.path.samefile(out, a.prompts_file):
        raise ValueError(f"--out={out!r} is the prompts file; give another path for the "
                         "results")
    rule = rule_from_args(a)
    rows = _read_prompts(a)
    if not a.chat:
        for r in rows:
            if not r["prompt"].strip():
                raise ValueError(f"prompt id {r['id']!r} is only whitespace, which encodes to "
                                 "no tokens; give some text (or --chat)")
    return rule, rows


def cmd_generate(a) -> int:
    import torch
    from tqdm import tqdm

    import aad_fast as af

    from ..jobs.outfile import ResultsFile
    rule, rows = generate_inputs(a)
    with contextlib.ExitStack() as stack:
        out = None
        todo = rows
        if a.out:
            ident = prompts_identity(a.prompts_file) if a.prompts_file else {"prompt": a.prompt}
            out = stack.enter_context(ResultsFile(a.out, generate_settings(a, rule), ident))
            check_resume(out, rows, lambda row: row.get("prompt"))
            todo = [r for r in rows if not out.is_done(r["id"])]
            if out.done:
                print(f"{a.out}: {len(out.done)} prompt(s) already done, {len(todo)} to go",
                      file=sys.stderr)
        if not todo:
            return 0
        dtype = getattr(torch, a.dtype) if a.dtype else None
        per_prompt = rule.n if isinstance(rule, af.BestOfN) else getattr(rule, "num_beams", 1)
        dec = stack.enter_context(af.Decoder(a.aligned, a.reference, dtype=dtype,
                                             device=a.device, tokenizer=a.tokenizer,
                                             max_batch_size=a.batch_size * per_prompt,
                                             max_seq_len=a.max_seq_len))
        bar = stack.enter_context(tqdm(total=len(todo), desc="generate", unit="prompt",
                                       disable=out is None))
        # per-token rules and beam search: Decoder.generate batches continuously (a finished
        # row, or a prompt's slot of beams, is refilled with the next prompt), so give it many
        # prompts per call; results are still written every chunk (resumable)
        searched = isinstance(rule, af.BestOfN)
        per_call = a.batch_size if searched else a.batch_size * CONTINUOUS_CHUNK
        for i in range(0, len(todo), per_call):
            chunk = todo[i:i + per_call]
            gen = dec.generate([r["prompt"] for r in chunk], rule=rule, chat=a.chat,
                               max_new_tokens=a.max_new_tokens, stop=a.stop or None)
            for j, r in enumerate(chunk):
                text = gen.text[j] if gen.text is not None else None
                rec = {"id": r["id"], "prompt": r["prompt"], "completion": text,
                       "tokens": gen.tokens[j], "finish_reason": gen.finish_reason[j],
                       "rule": a.rule}
                if out is not None:
                    out.write(rec)
                else:
                    print(text if len(todo) == 1 else json.dumps(rec))
            bar.update(len(chunk))
            if out is None and gen.stats.get("ms_per_token"):
                print(f"[{gen.stats['ms_per_token']:.2f} ms/token on {gen.stats['device']}, "
                      f"backend {gen.stats['backend']}]", file=sys.stderr)
    return 0


def cmd_demo(a) -> int:
    from ..toy.default import demo
    return demo(a)


def _optional(module: str, name: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"aad-fast {name} is not available in this install ({exc})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aad-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="decode prompts with a model pair",
                       description="Decode prompts with AAD (or another rule) from local models.")
    g.add_argument("--aligned", required=True,
                   help="aligned (DPO) model directory, or a LoRA adapter directory")
    g.add_argument("--reference", default=None,
                   help="reference (SFT) model directory; defaults to a LoRA adapter's base")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, where the model directories have none")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt")
    src.add_argument("--prompts-file", default=None,
                     help="JSONL with {'prompt': ..., 'id': optional} per line")
    g.add_argument("--out", default=None,
                   help="append results as JSONL, one durable line per prompt; a rerun skips "
                        "ids already in the file (repairing a row cut by a crash) and is "
                        "refused if the rule/settings differ (recorded in OUT.meta.json)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    add_stop_arguments(g, "")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + new tokens per row (default 2048, or the model's learned "
                        "position limit where smaller)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_rule_arguments(g)
    from .ray import add_ray_arguments, dispatch
    add_ray_arguments(g)
    g.set_defaults(func=dispatch(cmd_generate, "run_generate"))

    d = sub.add_parser("demo", help="run AAD on the embedded default pair (no paths needed)",
                       description="Decode a held-out prompt of the embedded toy task with AAD "
                                   "and greedy DPO, show rewards and speed vs single-model greedy.")
    d.add_argument("--aligned", default=None, help="use this aligned model instead")
    d.add_argument("--reference", default=None, help="use this reference model instead")
    d.add_argument("--prompt", default=None, help="prompt text (default: a held-out prompt)")
    d.add_argument("--alpha", type=float, default=0.1)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs aad_fast[serve])",
                       description="Serve a pair (default: the embedded one) over the OpenAI "
                                   "API: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health. The rule rides in the request body "
                                   "(docs/serving.md).")
    from ..serve import http as server
    server.add_arguments(s)
    s.set_defaults(func=server.run)

    b = sub.add_parser("bench", help="kernel and decode latency benchmarks",
                       description="Kernel and decode benchmarks against single-model greedy.")
    b.set_defaults(func=lambda a: _optional("aad_fast.bench", "bench").run(a))
    try:
        from .. import bench
        bench.add_arguments(b)
    except ImportError:
        pass

    for name, mod in (("evaluate", "aad_fast.toy.evaluate"), ("make-pairs", "aad_fast.toy.evaluate")):
        e = sub.add_parser(name, help=f"toy-task {name} (see docs/toy-pair.md)")
        try:
            import importlib
            m = importlib.import_module(mod)
            getattr(m, "add_arguments_" + name.replace("-", "_"))(e)
            e.set_defaults(func=getattr(m, "run_" + name.replace("-", "_")))
            if name == "make-pairs":
                add_ray_arguments(e)
                e.set_defaults(func=dispatch(e.get_default("func"), "run_make_pairs"))
        except (ImportError, AttributeError):
            e.set_defaults(func=lambda a, n=name: sys.exit(f"aad-fast {n} is not available yet"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as exc:  # bad input: the message names the argument
        print(f"aad-fast: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine: a full disk, a file that cannot be written
        print(f"aad-fast: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
