"""Is this model the base of that LoRA adapter? A cheap, exact check on a few sampled tensors.

docs/stopping-and-input.md refuses a LoRA adapter whose base is not the given reference model. Two checkpoints of the
same architecture have the same shapes, so shapes prove nothing; comparing every weight costs a
second load of the model. Instead a few tensors that any fine-tune changes are compared exactly:
the input embedding, the norms and first weight of the first and last decoder layer, the final
norm and the output head (each only if it has at most ``MAX_ELEMENTS`` elements). A tensor is
read from a checkpoint directory without loading the rest (``safetensors.safe_open``), or
taken from a model object (LoRA wrappers' ``base_layer`` weights count as the plain weight).

Dtypes: both tensors are cast to the coarser of the two dtypes before comparing, so a bfloat16
reference loaded from a float32 base still matches, while a different fine-tune does not.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MAX_ELEMENTS = 1 << 26
_LAYER = re.compile(r"\.(\d+)\.")


class ModuleWeights:
    """Named tensors of a model object (``named_parameters``; PEFT's LoRA tensors skipped and
    ``.base_layer.`` names mapped to the wrapped layer's name)."""

    def __init__(self, model):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        self.tensors = {}
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            self.tensors[name.replace(".base_layer.", ".")] = p

    def names(self) -> list:
        return list(self.tensors)

    def get(self, name):
        return self.tensors.get(name)


class CheckpointWeights:
    """Named tensors of a checkpoint directory (``*.safetensors``, sharded or not, else
    ``pytorch_model*.bin`` memory-mapped), read one at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = {}
        for index in sorted(self.path.glob("*.safetensors.index.json")):
            for name, f in json.loads(index.read_text()).get("weight_map", {}).items():
                self.files[name] = self.path / f
        if not self.files:
            for f in sorted(self.path.glob("*.safetensors")):
                from safetensors import safe_open
                with safe_open(str(f), "pt") as h:
                    for name in h.keys():
                        self.files[name] = f
        self._bin = None
        if not self.files:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if bins:
                self._bin = {}
                for f in bins:
                    self._bin.update(torch.load(f, map_location="cpu", mmap=True,
                                                weights_only=True))

    def names(self) -> list:
        return list(self.files) if self._bin is None else list(self._bin)

    def get(self, name):
        if self._bin is not None:
            return self._bin.get(name)
        f = self.files.get(name)
        if f is None:
            return None
        from safetensors import safe_open
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(name)


def weights_of(src):
    """``CheckpointWeights`` for a directory path, ``ModuleWeights`` for a model."""
    if isinstance(src, (str, Path)):
        return CheckpointWeights(src)
    return ModuleWeights(src)


def sample_names(names: list) -> list:
    """The few tensors compared (see the module docstring), in ``names``' order."""
    layers = sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})
    picked = [n for n in names if "embed" in n][:1]
    for layer in (layers[:1] + layers[-1:]) if layers else []:
        mine = [n for n in names if (m := _LAYER.search(n)) and int(m.group(1)) == layer]
        picked += [n for n in mine if "norm" in n] + [n for n in mine if "norm" not in n][:1]
    tail = [n for n in names if not _LAYER.search(n)]
    picked += [n for n in tail if "norm" in n] + [n for n in tail if "head" in n]
    return list(dict.fromkeys(picked))


def _coarser(x: torch.dtype, y: torch.dtype) -> torch.dtype:
    if not (x.is_floating_point and y.is_floating_point):
        return x
    return x if torch.finfo(x).eps >= torch.finfo(y).eps else y


def first_difference(base, reference) -> str | None:
    """``None`` when the sampled tensors of ``base`` and ``reference`` (models or checkpoint
    directories) are equal, else a sentence naming the first tensor that differs. Raises
    nothing when no sampled tensor is comparable (then ``None``: nothing proves a mismatch)."""
    wb, wr = weights_of(base), weights_of(reference)
    ref_names = set(wr.names())
    for name in sample_names(wb.names()):
        if name not in ref_names:
            continue
        p, q = wb.get(name), wr.get(name)
        if p is None or q is None or p.device.type == "meta" or q.device.type == "meta":
            continue
        if p.shape != q.shape:
            return f"{name} has shape {tuple(q.shape)} in the reference, {tuple(p.shape)} in the base"
        if p.numel() > MAX_ELEMENTS:
            continue
        dt = _coarser(p.dtype, q.dtype)
        p, q = p.detach().to("cpu", dt), q.detach().to("cpu", dt)
        if not torch.equal(p, q):
            diff = (p.float() - q.float()).abs().max().item()
            return f"tensor {name} differs (max |difference| {diff:.3g})"
    return None
