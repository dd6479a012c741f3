"""The toy preference task, its tokenizer, training script and the embedded default pair.

Import the submodules directly (``aad_fast.toy.task``, ``.tokenizer``, ``.assets``, ``.train``);
nothing here loads a model at import.
"""
