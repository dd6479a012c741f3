"""Prompt files of the resumable jobs (``generate --prompts-file``, ``evaluate --prompts``, Ray
Data sources): reading them, their identity in a results file's sidecar, and the check that a
resumed run's done rows were made from the same prompts."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .outfile import row_key, sha256_of


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
        key = row_key(rid)
        if key in seen:
            raise ValueError(f"{where}: id {rid!r} is also on line {seen[key]}; ids must be "
                             "unique")
        seen[key] = i + 1
        rows.append(obj)
    return rows


def prompts_identity(path) -> dict:
    return {"file": os.path.abspath(path), "sha256": sha256_of(path)}


def check_resume(out, rows, prompt_of, arg: str = "--out") -> None:
    """Refuse a resume whose done rows were made from other prompts (same id, other text)."""
    if not out.prompts_changed:
        return
    current = {row_key(r["id"]): r["prompt"] for r in rows}
    for key, row in out.done.items():
        if key in current and prompt_of(row) != current[key]:
            raise ValueError(f"{arg}={str(out.path)!r}: id {row['id']!r} was made from the "
                             f"prompt {prompt_of(row)!r} but the prompts now give "
                             f"{current[key]!r}; pass another {arg} for the new prompts")
    print(f"{out.path}: the prompts changed since it was started, but every done row's prompt "
          "is unchanged; resuming", file=sys.stderr)
