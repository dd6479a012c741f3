"""The package's layers (docs/architecture.md): each module imports only from its own layer or the
layers below, at the top of a file or inside a function alike, so there is no import circle and
no climb. The check reads the source (an AST walk), imports nothing, and is itself tested on a
planted climb."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "aad_fast"

# bottom to top; a module's layer is the first entry that is its name or a folder above it
LAYERS = [
    ("rules", "tuning", "version", "kernels", "_C", "_cuda"),
    ("ops",),
    ("model",),
    ("decode",),
    ("decoder", "processor"),
    ("__init__", "hf"),  # the public API (`import aad_fast as af`) and its old path aad_fast.hf
    ("serve", "jobs"),
    ("bench",),
    ("toy",),
    ("cli",),
    ("ray_data",),  # the old path of jobs.ray_data, which also re-exports toy's MakePairs
]


def layer_of(module: str) -> int:
    """``module``: dotted, relative to ``aad_fast`` (``decode.steps``); ``""`` is the package."""
    head = module.split(".")[0] if module else "__init__"
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"aad_fast.{module} is in no layer: add it to LAYERS")


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, source: str | None = None):
    """(line, imported module relative to aad_fast) for every import of the package in ``path``."""
    parts = module_of(path).split(".") if module_of(path) else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    tree = ast.parse(source if source is not None else path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "aad_fast" or a.name.startswith("aad_fast."):
                    yield node.lineno, a.name[len("aad_fast."):] if "." in a.name else ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif node.module == "aad_fast" or (node.module or "").startswith("aad_fast."):
                base = []
            else:
                continue
            mod = node.module if node.level else node.module[len("aad_fast"):].lstrip(".")
            target = ".".join(base + ([mod] if mod else []))
            for a in node.names:  # `from . import engine` imports a module of that name
                sub = f"{target}.{a.name}" if target else a.name
                is_mod = (PKG / sub.replace(".", "/")).is_dir() or \
                    (PKG / (sub.replace(".", "/") + ".py")).exists()
                yield node.lineno, sub if is_mod else target


def climbs(path: Path, source: str | None = None) -> list:
    here = layer_of(module_of(path))
    return [f"{path.relative_to(PKG.parent)}:{line} imports aad_fast.{target or '__init__'} "
            f"(layer {layer_of(target)} above {here})"
            for line, target in imports(path, source) if layer_of(target) > here]


def test_no_module_imports_a_layer_above_its_own():
    bad = [c for p in sorted(PKG.rglob("*.py")) if "default_pair" not in p.parts
           for c in climbs(p)]
    assert bad == [], "\n".join(bad)


def test_the_check_catches_a_planted_climb_and_a_hidden_one():
    steps = PKG / "decode" / "steps.py"
    src = steps.read_text()
    assert climbs(steps, src) == []
    top = "from ..decoder import Decoder\n" + src
    hidden = src + "\n\ndef _planted():\n    from aad_fast.serve import http\n    return http\n"
    assert any("aad_fast.decoder" in c for c in climbs(steps, top))
    assert any("aad_fast.serve.http" in c for c in climbs(steps, hidden))


def test_same_layer_imports_are_allowed_but_each_module_is_placed():
    for p in sorted(PKG.rglob("*.py")):
        if "default_pair" not in p.parts:
            layer_of(module_of(p))  # raises for a module no layer names
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("newthing")
