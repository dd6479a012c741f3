"""``aad-fast``: generate | demo | serve | bench | evaluate | make-pairs.

Run ``aad-fast COMMAND --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

from ..jobs.prompt_files import check_resume, prompts_identity, read_prompts_file
from . import serve
from .flags import (RULE_FLAGS, RULES, SAMPLING_FLAGS, add_rule_arguments,  # noqa: F401
                    add_speculate_arguments, add_stop_arguments, check_rule_flags, check_stop_ids,
                    rule_from_args)

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
            "stop": a.stop or None, "dtype": a.dtype, **_ends(a)}


def _ends(a) -> dict:
    """``--min-tokens`` / ``--ignore-eos`` where given (a run without them records neither, as
    before they existed, so its sidecar still matches)."""
    return {k: v for k, v in (("min_tokens", getattr(a, "min_tokens", 0)),
                              ("ignore_eos", getattr(a, "ignore_eos", False))) if v}


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
    if getattr(a, "min_tokens", 0) < 0:
        raise ValueError(f"--min-tokens must be >= 0, got {a.min_tokens}")
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


@dataclass
class GenerateJob:
    """What ``generate`` and ``generate --ray`` share: the checked ``rule`` and ``rows``,
    ``out`` (the ``ResultsFile`` of ``--out``, resume checked, or ``None``), ``todo`` (positions
    in ``rows`` still to do), ``per_prompt`` (Decoder rows a prompt takes: beams or samples)
    and ``per_call`` (prompts per ``Decoder.generate`` call)."""

    rule: object
    rows: list
    out: object
    todo: list
    per_prompt: int
    per_call: int

    def chunks(self) -> list:
        """``todo`` cut into the prompts of each ``Decoder.generate`` call."""
        return [self.todo[j:j + self.per_call] for j in range(0, len(self.todo), self.per_call)]


def open_generate(a, stack: contextlib.ExitStack) -> GenerateJob:
    """The ``GenerateJob`` of a ``generate`` command line (``--out`` entered on ``stack``)."""
    from ..jobs.outfile import ResultsFile
    from ..rules import BestOfN
    rule, rows = generate_inputs(a)
    out, todo = None, list(range(len(rows)))
    if a.out:
        ident = prompts_identity(a.prompts_file) if a.prompts_file else {"prompt": a.prompt}
        out = stack.enter_context(ResultsFile(a.out, generate_settings(a, rule), ident))
        check_resume(out, rows, lambda row: row.get("prompt"))
        todo = [i for i in todo if not out.is_done(rows[i]["id"])]
        if out.done:
            print(f"{a.out}: {len(out.done)} prompt(s) already done, {len(todo)} to go",
                  file=sys.stderr)
    searched = isinstance(rule, BestOfN)
    per_prompt = rule.n if searched else getattr(rule, "num_beams", 1)
    # per-token rules and beam search: Decoder.generate batches continuously (a finished
    # row, or a prompt's slot of beams, is refilled with the next prompt), so give it many
    # prompts per call; results are still written every chunk (resumable)
    per_call = a.batch_size if searched else a.batch_size * CONTINUOUS_CHUNK
    return GenerateJob(rule, rows, out, todo, per_prompt, per_call)


def generate_decoder(a, job: GenerateJob, path=lambda x: x) -> dict:
    """The ``Decoder`` options of a ``generate`` command line (``path``: applied to paths)."""
    return {"aligned": path(a.aligned), "reference": path(a.reference),
            "tokenizer": path(getattr(a, "tokenizer", None)), "dtype": a.dtype,
            "device": a.device, "max_seq_len": a.max_seq_len,
            "max_batch_size": a.batch_size * job.per_prompt,
            "draft": getattr(a, "draft", None), "speculate": getattr(a, "speculate", 0)}


def generate_record(a, row: dict, completion, tokens, finish_reason) -> dict:
    """The result row of one prompt (``--out`` line, or printed)."""
    return {"id": row["id"], "prompt": row["prompt"], "completion": completion,
            "tokens": [int(t) for t in tokens], "finish_reason": finish_reason, "rule": a.rule}


def cmd_generate(a) -> int:
    import torch
    from tqdm import tqdm

    import aad_fast as af
    with contextlib.ExitStack() as stack:
        job = open_generate(a, stack)
        if not job.todo:
            return 0
        opts = generate_decoder(a, job)
        opts["dtype"] = getattr(torch, a.dtype) if a.dtype else None
        dec = stack.enter_context(af.Decoder(opts.pop("aligned"), opts.pop("reference"), **opts))
        bar = stack.enter_context(tqdm(total=len(job.todo), desc="generate", unit="prompt",
                                       disable=job.out is None))
        for chunk in job.chunks():
            gen = dec.generate([job.rows[i]["prompt"] for i in chunk], rule=job.rule,
                               chat=a.chat, max_new_tokens=a.max_new_tokens, stop=a.stop or None,
                               **_ends(a))
            for j, i in enumerate(chunk):
                text = gen.text[j] if gen.text is not None else None
                rec = generate_record(a, job.rows[i], text, gen.tokens[j], gen.finish_reason[j])
                if job.out is not None:
                    job.out.write(rec)
                else:
                    print(text if len(job.todo) == 1 else json.dumps(rec))
            bar.update(len(chunk))
            if job.out is None and gen.stats.get("ms_per_token"):
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


def _bench(a) -> int:
    """``aad-fast bench``; with ``--speculative`` the speculative rows (the toy pair's held-out
    prompts come from the toy layer, ``toy.spec_bench``)."""
    if getattr(a, "speculative", False):
        return _optional("aad_fast.toy.spec_bench", "bench --speculative").run(a)
    return _optional("aad_fast.bench", "bench").run(a)


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
    g.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="no stop id (EOS included) or stop string ends a row before N tokens "
                        "(vLLM's min_tokens; not with --ray)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="the model's EOS does not end a row; --stop still does (not with --ray)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + new tokens per row (default 2048, or the model's learned "
                        "position limit where smaller)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_speculate_arguments(g)
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
    serve.add_arguments(s)
    s.set_defaults(func=serve.run)

    b = sub.add_parser("bench", help="kernel and decode latency benchmarks",
                       description="Kernel and decode benchmarks against single-model greedy.")
    b.set_defaults(func=_bench)
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
