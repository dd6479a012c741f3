"""The one place that says which implementation of the selection core runs.

Backends, all computing ``reference.select_ref`` exactly:

- ``torch``:  the PyTorch reference itself (any device).
- ``cpp``:    C++ loop over rows and vocabulary chunks, the ``aad_fast._C`` extension (CPU tensors).
- ``cuda``:   CUDA C++ twin, the ``aad_fast._cuda`` extension (CUDA tensors).

``cpp`` and ``cuda`` are the two kernels of one op, ``aad_fast::select_native`` (schema in
``ops.py``), registered for the CPU and the CUDA dispatch key by their extensions.
- ``triton``: Triton kernel in ``aad_fast.kernels`` (CUDA tensors; CPU tensors under
              ``TRITON_INTERPRET=1``, which is how the tests run it without a GPU).

Nothing is imported or compiled at ``import aad_fast``: each loader runs on first use and
its answer is cached.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import SimpleNamespace

import torch

from ..tuning import cached, decide, store, time_candidates, valid

BACKENDS = ("torch", "cpp", "triton", "cuda")
# Preference for the default choice, per device type (fastest first).
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


@functools.cache
def load_cpp():
    """The C++ extension's kernels (``.select``, ``.aad_topk``: the ops
    ``aad_fast::select_native`` and ``aad_fast::aad_topk_native``, whose CPU kernels loading
    ``aad_fast._C`` registers), or ``None`` when the extension was not built."""
    try:
        import aad_fast._C as ext  # registers the CPU kernels
    except ImportError:
        return None
    if not _registers(ext, "CPU"):
        return None
    return SimpleNamespace(select=torch.ops.aad_fast.select_native.default,
                           aad_topk=torch.ops.aad_fast.aad_topk_native.default)


@functools.cache
def load_cuda():
    """The CUDA extension's kernel (``.select``: the op ``aad_fast::select_native``, whose CUDA
    kernel loading ``aad_fast._cuda`` registers), or ``None``."""
    if not torch.cuda.is_available():
        return None
    try:
        import aad_fast._cuda as ext  # registers the CUDA kernel
    except ImportError:
        return None
    if not _registers(ext, "CUDA"):
        return None
    return SimpleNamespace(select=torch.ops.aad_fast.select_native.default)


def _registers(ext, key: str) -> bool:
    """Whether loading ``ext`` gave ``aad_fast::select_native`` its ``key`` kernel. An extension
    built from other sources (a stale build, another checkout's) is refused with a warning: the
    other backends serve instead."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("aad_fast::select_native", key):
        return True
    warnings.warn(f"aad_fast: {getattr(ext, '__file__', ext)} registers no {key} kernel of "
                  f"aad_fast::select_native (built from other sources?); rebuild it with "
                  f"`python setup.py build_ext --inplace` or `pip install .`. Using the other "
                  f"backends.", stacklevel=3)
    return False


@functools.cache
def load_triton():
    """The ``aad_fast.kernels.select`` module, or ``None`` when Triton is missing or unusable."""
    try:
        from aad_fast.kernels import select
    except ImportError:
        return None
    return select


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA when available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    out = ["torch"]
    if kind == "cpu":
        if load_cpp() is not None:
            out.append("cpp")
        if triton_interpreted() and load_triton() is not None:
            out.append("triton")
    elif kind == "cuda":
        if load_triton() is not None and not triton_interpreted():
            out.append("triton")
        if load_cuda() is not None:
            out.append("cuda")
    return out


def pick_backend(device: torch.device, backend: str | None) -> str:
    """Resolve ``backend`` (``None`` = the fastest available) for tensors on ``device``. Where
    more than one is available, the fastest is measured on this machine once and cached
    (``fastest_backend``; the PyTorch reference is the plain candidate)."""
    have = available_backends(device)
    if backend is None:
        cands = [n for n in _PREFERENCE.get(device.type, ("torch",)) if n in have]
        if len(cands) <= 1:
            return cands[0] if cands else "torch"
        return fastest_backend(torch.device(device), cands)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend not in have:
        raise ValueError(
            f"backend={backend!r} is not available for {device.type} tensors on this machine "
            f"(available: {have}); see docs/install.md 'Backends' for how to build it")
    return backend


def measure_backends(device: torch.device, candidates: list) -> dict:
    """ms of one AAD selection (B=1, V=131072, float32 logits) on each backend."""
    from . import select_core  # the public op, which dispatches through this module
    g = torch.Generator().manual_seed(0)
    a, r = (torch.randn(1, 131072, generator=g).to(device) for _ in range(2))
    log_rel = torch.full((1,), -2.302585, device=device)
    floor = torch.full((1,), float("-inf"), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(name):
        def fn():
            select_core(a, r, 131072, 1.0, 0.0, 1.0, -1.0, log_rel, floor, None, None, name)
            sync()
        return fn
    with torch.inference_mode():
        return time_candidates({name: run(name) for name in candidates})


def fastest_backend(device: torch.device, candidates: list, measure=None) -> str:
    """The default selection backend among ``candidates`` (preference order) on ``device``: the
    measured fastest, unless it beats the PyTorch reference by no more than noise."""
    entry = f"backend/{device.type}/{'+'.join(candidates)}"
    rec = cached(entry)
    if not valid(rec, candidates):
        times = (measure or measure_backends)(device, candidates)
        plain = "torch" if "torch" in times else candidates[0]
        rec = {"choice": decide(times, plain),
               "ms": {k: v for k, v in times.items() if k != "stable"},
               "stable": times.get("stable", True)}
        store(entry, rec, persist=rec["stable"])
    return rec["choice"]
