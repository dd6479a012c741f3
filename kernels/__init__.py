"""Triton kernels of aad_fast, installed as ``aad_fast.kernels``. One op per file."""
from .select import select  # noqa: F401
