"""The checkout never shadows a package that a dependency imports (issue 22).

``python -m pytest``, ``python -c``, a notebook or a Ray worker started in the checkout put its root
first on ``sys.path``. transformers >= 5.2x imports Hugging Face's ``kernels`` package when a model
module loads; a regular package named ``kernels`` at the checkout's root would win and break every
``from_pretrained``. The Triton sources stay in ``kernels/`` (the design card's top level), as a
folder without ``__init__.py``: a namespace portion, which loses to a regular package later on the
path. ``aad_fast.kernels`` reaches them through the link ``aad_fast/kernels -> ../kernels`` (editable
install, checkout) or the wheel's package mapping (``setup.py``).

Each check runs in a fresh interpreter started in the checkout's root, as a user's would be.
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in ("aad_fast",))


def _python(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def test_no_top_level_folder_is_a_regular_package():
    """A top-level folder with ``__init__.py`` would shadow any installed package of its name."""
    regular = [name for name in TOP_LEVEL if (ROOT / name / "__init__.py").exists()]
    assert regular == [], f"top-level folders that are regular packages: {regular}"


def test_import_kernels_in_the_checkout_is_not_this_repository(tmp_path):
    try:  # the distribution, not find_spec: this checkout's folder is a namespace portion
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    out = _python("""
        import sys, kernels
        print(getattr(kernels, "__file__", None))
        print(list(getattr(kernels, "__path__", [])))
    """, tmp_path)
    file, path = out.splitlines()[:2]
    assert file != "None" and not Path(file).resolve().is_relative_to(ROOT), out
    assert str(ROOT / "kernels") not in path, out


def test_models_load_from_the_checkout_root_beside_aad_fast_kernels(tmp_path):
    """transformers' model modules import (and with them ``kernels`` where transformers wants it),
    ``aad_fast.kernels`` finds the Triton sources of this checkout, and ``from_pretrained`` loads a
    tiny model saved to a local folder, all in one process started in the checkout's root."""
    pytest.importorskip("transformers")
    out = _python("""
        import sys
        from pathlib import Path
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
        import transformers.models.llama.modeling_llama  # what loads the hub-kernels integration
        import aad_fast.kernels.select as sel
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print(type(model).__name__)
        print(Path(sel.__file__).resolve())
    """, tmp_path)
    name, select_file = out.splitlines()[:2]
    assert name == "LlamaForCausalLM"
    assert Path(select_file) == (ROOT / "kernels" / "select.py").resolve()
