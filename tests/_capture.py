"""A checker that a decode step is CUDA-graph capture-safe, run on CPU.

``with CaptureChecker() as chk: step()`` records every op the step dispatches and fails
(``chk.assert_safe()``) on anything a captured graph cannot hold:

* **host syncs**: ``aten._local_scalar_dense`` / ``item`` / ``is_nonzero`` / ``equal`` (what
  ``.item()``, ``bool(t)``, ``int(t)``, ``if t:`` lower to), and at the Python level
  ``Tensor.item/tolist/numpy/cpu/__bool__/__int__/__float__/__index__`` (``tolist`` and ``cpu``
  dispatch nothing on a CPU tensor, so a ``TorchFunctionMode`` watches for them) and
  ``torch.cuda.synchronize``;
* **data-dependent output shapes**: ``nonzero``, ``argwhere``, ``masked_select``, ``unique*``,
  ``bincount``, ``repeat_interleave`` without ``output_size``, ``index``/``index_put`` with a
  bool mask, and ``isin`` (its sorting path calls ``unique``; use a broadcast compare);
* **tensors made from host data inside the step**, three ways, because on CPU every tensor is a
  CPU tensor and "copied from the host" cannot be read off a device:
  1. ``torch.tensor``/``as_tensor``/``asarray``/``from_numpy``/``frombuffer``/``new_tensor``
     seen by the ``TorchFunctionMode``, and a factory (``arange``, ``zeros``, ``full``, ...)
     called without ``device=`` (on a GPU run it would land on the host);
  2. ``aten.lift_fresh`` in the dispatch trace (every Python-data constructor, legacy
     ``torch.LongTensor([...])`` included, ends in it);
  3. provenance: before the step the checker notes the storage of every live tensor
     (``gc``); inside, an op input whose storage is neither one of those nor the output of an
     op dispatched inside the step came from nowhere the dispatcher saw, i.e. from host data.

Custom ops (``aad_fast::select``) are opaque here: their backend is checked by running the
step with the PyTorch reference inlined (see ``tests/test_capture.py``).
"""
from __future__ import annotations

import gc
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}
DYNAMIC_OPS = {"nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive", "bincount", "isin"}
HOST_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}
BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}

_T = torch.Tensor
HOST_READS = {_T.item: "item", _T.tolist: "tolist", _T.numpy: "numpy", _T.cpu: "cpu",
              _T.__bool__: "__bool__", _T.__int__: "__int__", _T.__float__: "__float__",
              _T.__index__: "__index__"}
HOST_CTORS = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor",
              torch.asarray: "torch.asarray", torch.from_numpy: "torch.from_numpy",
              torch.frombuffer: "torch.frombuffer", _T.new_tensor: "Tensor.new_tensor"}
FACTORIES = {f: f.__name__ for f in (
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn,
    torch.randint, torch.eye, torch.linspace, torch.logspace, torch.empty_strided,
    torch.scalar_tensor, torch.randperm)}


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _Functions(TorchFunctionMode):
    def __init__(self, chk):
        super().__init__()
        self.chk = chk

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.chk._bad(f"host read Tensor.{HOST_READS[func]}()")
        elif func in HOST_CTORS:
            self.chk._bad(f"tensor made from host data: {HOST_CTORS[func]}(...)")
        elif func in FACTORIES and kwargs.get("device") is None:
            self.chk._bad(f"torch.{FACTORIES[func]}(...) without device= (lands on the host)")
        elif func is _T.to and any(a == "cpu" for a in list(args[1:]) + list(kwargs.values())):
            self.chk._bad("host copy Tensor.to('cpu')")
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, chk):
        super().__init__()
        self.chk = chk

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        chk = self.chk
        name = func._schema.name.split("::")[-1]
        chk.ops[str(func)] += 1
        if name in SYNC_OPS:
            chk._bad(f"host sync {func}")
        elif name in DYNAMIC_OPS:
            chk._bad(f"data-dependent shape {func}")
        elif name in HOST_DATA_OPS:
            chk._bad(f"tensor made from host data ({func})")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            chk._bad(f"data-dependent shape {func} (no output_size)")
        flat, _ = tree_flatten((args, kwargs))
        if name in BOOL_INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in (idx or [])):
                chk._bad(f"data-dependent shape {func} with a bool mask")
        for t in flat:
            if isinstance(t, torch.Tensor) and t.numel() > 0 and t.device.type != "meta":
                key = _storage_key(t)
                if key is not None and key not in chk._known and key not in chk._made:
                    chk._bad(f"{func} reads a tensor {tuple(t.shape)} {t.dtype} that no op made "
                             "inside the step and that did not exist before it (host data)")
                    chk._made.add(key)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is not None:
                    chk._made.add(key)
        return out


class CaptureChecker:
    """Context manager; ``violations`` lists what a captured graph could not hold."""

    def __init__(self):
        self.violations: list[str] = []
        self.ops: Counter = Counter()
        self._known: set = set()
        self._made: set = set()
        self._saved_sync = None

    def _bad(self, what: str) -> None:
        self.violations.append(what)

    def __enter__(self):
        # type(), not isinstance(): gc also lists weakref proxies (torch.compile keeps some),
        # and isinstance() on a dead one raises ReferenceError
        self._known = {_storage_key(o) for o in gc.get_objects()
                       if issubclass(type(o), torch.Tensor)}
        self._known.discard(None)
        self._saved_sync = torch.cuda.synchronize

        def sync(*a, **k):
            self._bad("torch.cuda.synchronize()")
        torch.cuda.synchronize = sync
        self._fmode, self._dmode = _Functions(self), _Dispatch(self)
        self._fmode.__enter__()
        self._dmode.__enter__()
        return self

    def __exit__(self, *exc):
        self._dmode.__exit__(*exc)
        self._fmode.__exit__(*exc)
        torch.cuda.synchronize = self._saved_sync
        return False

    def assert_safe(self, what: str = "step") -> None:
        assert self.ops, f"{what}: the checker recorded no op at all"
        assert not self.violations, (f"{what} is not capture-safe:\n  "
                                     + "\n  ".join(dict.fromkeys(self.violations)))
