"""Build of aad_fast: pure Python package plus two optional extensions.

- ``aad_fast._C``    C++ selection kernels for CPU tensors (needs a C++ compiler).
  Skip with ``AAD_FAST_SKIP_CPU_BUILD=1``.
- ``aad_fast._cuda`` CUDA C++ selection kernels (needs CUDA torch and nvcc).
  Skip with ``AAD_FAST_SKIP_CUDA_BUILD=1``; archs from ``AAD_FAST_CUDA_ARCHS`` (default
  ``8.0;8.6;9.0``).

A failed or skipped extension never fails the install: the package falls back to the other
backends and ``aad_fast.available_backends()`` says what it has. No downloads, no git calls.
"""
import os
import sys
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("aad_fast: torch is not importable at build time; building no extension "
                      "(install torch first and use --no-build-isolation)")
        return [], {}
    exts = []
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]
    if sys.platform != "darwin":
        cxx += ["-fopenmp"]
    cpu_srcs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not _flag("AAD_FAST_SKIP_CPU_BUILD") and cpu_srcs:
        exts.append(cpp_extension.CppExtension(
            "aad_fast._C",
            sources=cpu_srcs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [],
        ))
    if not _flag("AAD_FAST_SKIP_CUDA_BUILD"):
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            print("aad_fast: CUDA extension skipped (torch without CUDA or no nvcc found)")
        else:
            archs = os.environ.get("AAD_FAST_CUDA_ARCHS", "8.0;8.6;9.0")
            gencode = []
            for arch in archs.replace(",", ";").split(";"):
                arch = arch.strip().replace(".", "")
                if arch:
                    gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            srcs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.c*"))
            exts.append(cpp_extension.CUDAExtension(
                "aad_fast._cuda", sources=srcs,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    "nvcc": ["-O3", "--fmad=false", "-std=c++17"] + gencode},
            ))
    if not exts:
        return [], {}

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build each extension on its own; a failure warns instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, nvcc error, ...
                msg = (f"aad_fast: building {ext.name} failed ({type(exc).__name__}: {exc}); "
                       f"the package will use its other backends")
                warnings.warn(msg)
                print(msg, file=sys.stderr)

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["aad_fast", "aad_fast.ops", "aad_fast.model", "aad_fast.decode", "aad_fast.serve",
              "aad_fast.jobs", "aad_fast.bench", "aad_fast.toy", "aad_fast.cli", "aad_fast.kernels"],
    package_dir={"aad_fast": "aad_fast", "aad_fast.kernels": "kernels"},
    package_data={"aad_fast": ["default_pair/*", "default_pair/*/*"],
                  "aad_fast.bench": ["configs/*.json"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
