"""Triton kernels of aad_fast, installed as ``aad_fast.kernels``; one op per file.

This file imports nothing on purpose: Triton loads on first use (``aad_fast.backends``), and a
checkout's top-level ``kernels/`` directory on ``sys.path`` must stay harmless to libraries that
probe for an unrelated package of that name (transformers does).
"""
