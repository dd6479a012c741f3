"""Timing, memory and environment of the machine the bench runs on: the progress log, wall-clock
timing, peak memory, free memory, out-of-memory handling, and the device, versions and commit
recorded with every result."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..version import __version__

GIB = 1024 ** 3


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device):
    """``(result, ms)`` of one call, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


class PeakMemory:
    """Peak memory above what was held at entry: ``torch.cuda.max_memory_allocated`` on CUDA,
    the process RSS sampled every 5 ms by a thread on CPU (use it on an untimed run)."""

    def __init__(self, device):
        self.device, self.extra = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = self.peak = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.peak, rss_bytes())
        self.extra = max(peak - self.before, 0)


def load_average():
    """1/5/15-minute load averages (other work on a shared machine skews every timing)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(what: str, skipped: list, device, fn):
    """Run ``fn()``; an out-of-memory (or other) failure is reported, recorded and skipped."""
    try:
        return fn()
    except Exception as exc:  # one shape or method failing must not end the run
        oom = is_oom(exc)
        reason = "out of memory" if oom else f"error: {type(exc).__name__}: {exc}"
        log(f"{what}: {'does not fit in memory' if oom else 'failed'} ({reason[:300]}); "
            "skipped, going on")
        skipped.append({"what": what, "reason": reason[:2000]})
        release(device)
        return None


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def checkout_root() -> Path:
    """The folder holding the ``aad_fast`` package: the checkout (or site-packages)."""
    return Path(__file__).resolve().parents[2]


_OUT_FLAGS = {"--out": "OUT_DIR", "--configs": "CONFIG_DIR"}


def portable_path(path, placeholder: str = "PATH") -> str:
    """``path`` as a result may record it, never naming the recording machine's folders: a path
    typed relative stays as typed; an absolute one inside the checkout becomes relative to it
    (``aad_fast/bench/configs``); any other absolute path (home, temp folders) becomes
    ``placeholder`` (``OUT_DIR``, ``CONFIG_DIR``, ...)."""
    text = str(path)
    if not text.startswith(("/", "~")) and not Path(text).is_absolute():
        return text
    p = Path(os.path.expanduser(text))
    root = checkout_root()
    for cand, base in ((p, root), (p.resolve(), root)):
        try:
            return cand.relative_to(base).as_posix() or "."
        except ValueError:
            continue
    return placeholder


def portable_argv(argv, positional: str = "PATH") -> list:
    """A command line as it may be recorded: the program by its name (``aad-fast``,
    ``bench_server.py``, or relative to the checkout), and every absolute path argument through
    ``portable_path`` (``--out`` -> ``OUT_DIR``, ``--configs`` -> ``CONFIG_DIR``, another flag's
    value -> ``PATH``, a positional one -> ``positional``; ``--x=/p`` too)."""
    argv = [str(a) for a in argv]
    if not argv:
        return []
    prog = portable_path(argv[0], Path(argv[0]).name)
    out, prev = [prog], None
    for arg in argv[1:]:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={portable_path(value, _OUT_FLAGS.get(flag, 'PATH'))}")
        else:
            hint = _OUT_FLAGS.get(prev, "PATH") if prev and prev.startswith("-") else positional
            out.append(portable_path(arg, hint))
        prev = arg
    return out


def portable_settings(settings: dict) -> dict:
    """``settings`` with every path (a ``Path``, an absolute path string, or such an entry of a
    list) made portable by ``portable_path``; other values unchanged."""
    def fix(key, v):
        hint = _OUT_FLAGS.get("--" + str(key), "PATH")
        if isinstance(v, Path) or (isinstance(v, str) and v.startswith(("/", "~"))):
            return portable_path(v, hint)
        if isinstance(v, (list, tuple)):
            return [fix(key, x) for x in v]
        return v
    return {k: fix(k, v) for k, v in settings.items()}


def git_info():
    root = checkout_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown", None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "aad_fast": __version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: record, never fail the bench
            out[mod] = "not installed"
    return out
