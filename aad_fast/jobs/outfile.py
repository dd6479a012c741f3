"""Crash-safe, resumable JSONL output (``generate --out``, ``make-pairs --out``) and checked
writes of result files (``evaluate --json``).

``ResultsFile`` makes four promises:

- **Each row is one complete line or nothing.** A row is written with one ``write`` of the whole
  line (newline last) on an ``O_APPEND`` descriptor and ``fsync``'d before the next, so a crash
  at any byte leaves complete lines plus at most one torn tail without its newline.
- **A rerun repairs and resumes, and only a file of ours is repaired.** Bytes after the last
  newline (a row cut mid-way, or a whole row missing only its newline) are cut off, which is
  said on stderr, and that row is redone; the rows before it are kept and their ids skipped.
  Nothing is cut until the whole file has been checked to be ours: every complete line a UTF-8
  JSON object with an ``id`` (ids unique), the tail the start of one (``{``), and the sidecar
  present and readable. Anything else is refused with its line number and the file is left
  byte for byte. Lines are split on ``\n`` only (a row may hold U+2028, U+0085, ``\r``, ...).
- **A resume is refused when its rows were made differently.** ``PATH.meta.json`` (the sidecar)
  records the settings the rows depend on (rule, models, lengths, ...) and the prompts' source
  and sha256. A rerun with other settings is refused, naming each difference. When the prompts
  changed, the caller checks that every done row's prompt is unchanged (``prompts_changed``).
- **One writer at a time.** The output file itself is locked (``fcntl.flock``, exclusive, not
  blocking) for the whole run; a second run on the same path is refused.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path


def check_writable(path, arg: str) -> Path:
    """Refuse, before any work is done, a ``path`` that cannot be written: a directory, a
    missing parent directory, no write permission."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{arg}={str(path)!r} is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{arg}={str(path)!r}: the directory {str(parent)!r} does not exist; "
                         "create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{arg}={str(path)!r} is not writable; choose another path")
    return p


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old
    file or the new one, never half of one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:  # a full disk, a directory in the way: no temporary file left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ResultsFile:
    """``with ResultsFile(path, settings, prompts=...) as out:`` then ``out.done`` (id -> row
    of the complete rows already there) and ``out.write(row)``.

    Args:
        path: the JSONL file (created if missing).
        settings: JSON-able dict of everything the rows depend on; must equal the sidecar's.
        prompts: JSON-able identity of the prompts (e.g. ``{"file": ..., "sha256": ...}``).
        arg: the option name used in messages (``"--out"``).
    """

    def __init__(self, path, settings: dict, prompts: dict, arg: str = "--out"):
        self.path = check_writable(path, arg)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.arg, self.settings, self.prompts = arg, settings, prompts
        self.done: dict = {}
        self.prompts_changed = False
        self.fd = None

    # ------------------------------------------------------------------ open: lock, repair, check
    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ValueError(f"{self.arg}={str(self.path)!r} cannot be opened for writing "
                             f"({exc.strerror}); choose another path") from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"{self.arg}={str(self.path)!r} is being written by another run "
                             "(it holds the file's lock); wait for that run to end, or pass "
                             f"another {self.arg}") from None
        try:  # check everything before anything is changed: a file not ours stays as it is
            tail = self._read()
            self._check_meta(tail)
            self._cut(tail)
        except OSError as exc:  # a full disk while writing the sidecar or cutting the tail
            self.close()
            raise ValueError(f"{self.arg}={str(self.path)!r}: {exc.strerror or exc} while "
                             "preparing the file; free the space or pass another "
                             f"{self.arg}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None

    def _read(self) -> int:
        """Read the complete rows into ``done``, changing nothing; the length of the torn tail
        (bytes after the last newline). Refuses a file that is not a results file of ours."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        cut = data.rfind(b"\n") + 1
        other = ("; it does not look like a results file of aad-fast, so it was left as it is: "
                 f"fix or delete that line, or pass another {self.arg}")
        where: dict = {}
        for n, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):  # \n only: rows hold U+2028
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{self.path}: line {n} is not UTF-8 text" + other) from None
            except ValueError as exc:
                raise ValueError(f"{self.path}: line {n} is not a JSON row ({exc})"
                                 + other) from None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{self.path}: line {n} is not a result row (no 'id')" + other)
            key = row_key(row["id"])
            if key in where:
                raise ValueError(f"{self.path}: id {row['id']!r} is on lines {where[key]} and "
                                 f"{n}; delete one of them")
            where[key] = n
            self.done[key] = row
        tail = data[cut:]
        if tail and not tail.startswith(b"{"):
            raise ValueError(f"{self.path}: its last line (line {len(where) + 1}, {len(tail)} "
                             "bytes without a newline) is not the start of a result row" + other)
        return len(tail)

    def _cut(self, tail: int) -> None:
        """Cut a torn last row of ``tail`` bytes (the file was checked to be ours)."""
        if not tail:
            return
        size = os.fstat(self.fd).st_size
        os.ftruncate(self.fd, size - tail)
        os.fsync(self.fd)
        print(f"{self.path}: dropped a torn last row ({tail} bytes after the last complete "
              "line, left by an interrupted run); it will be redone", file=sys.stderr)

    def _check_meta(self, tail: int = 0) -> None:
        meta = None
        if self.meta_path.exists() or self.meta_path.is_symlink():
            try:
                meta = json.loads(self.meta_path.read_bytes().decode("utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{self.meta_path} cannot be read ({exc}); delete it together "
                                 f"with {self.path} to start over") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("settings", {}), dict):
                raise ValueError(f"{self.meta_path} is not a settings file of aad-fast (a JSON "
                                 "object with 'settings'); it was left as it is: delete it "
                                 f"together with {self.path} to start over, or pass another "
                                 f"{self.arg}")
        if meta is None and (self.done or tail):
            what = f"{len(self.done)} row(s)" if self.done else "a partial row"
            raise ValueError(f"{self.arg}={str(self.path)!r} has {what} but no "
                             f"{self.meta_path.name}, so the settings they were made with are "
                             "unknown (or it is not a results file of aad-fast); it was left "
                             f"as it is: move the file away or pass another {self.arg}")
        if not self.done:  # nothing to protect: (re)start with this run's settings
            self._write_meta()
            return
        old = meta.get("settings", {})
        diff = [f"{k}: {old.get(k)!r} in the file, {v!r} now"
                for k, v in self.settings.items() if old.get(k) != v]
        diff += [f"{k}: {old[k]!r} in the file, not set now" for k in old
                 if k not in self.settings]
        if diff:
            raise ValueError(f"{self.arg}={str(self.path)!r} was started with other settings ("
                             + "; ".join(diff) + f"); rerun with the file's settings, or pass "
                             f"another {self.arg} (or delete it and {self.meta_path.name})")
        if meta.get("prompts") != self.prompts:
            self.prompts_changed = True
            self._write_meta()

    def _write_meta(self) -> None:
        write_atomic(self.meta_path, json.dumps({"settings": self.settings,
                                                 "prompts": self.prompts}, indent=1) + "\n")

    # ------------------------------------------------------------------ rows
    def is_done(self, row_id) -> bool:
        return row_key(row_id) in self.done

    def write(self, row: dict) -> None:
        """Append ``row`` (a dict with an ``id`` not yet in the file) as one durable line."""
        key = row_key(row["id"])
        if key in self.done:
            raise RuntimeError(f"{self.path}: id {row['id']!r} is already in the file")
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        before = os.fstat(self.fd).st_size
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as exc:  # a full disk: take the partial row back (a rerun redoes it)
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, before)
            raise OSError(exc.errno or errno.EIO, f"{self.path}: writing the row of id "
                          f"{row['id']!r} failed ({exc.strerror or exc}); the rows before it "
                          "are kept: free the space and rerun to resume") from None
        self.done[key] = row


def row_key(row_id):
    """Ids compare as written: ``1`` and ``"1"`` are different ids."""
    return (type(row_id).__name__, row_id if isinstance(row_id, (int, str)) else repr(row_id))
