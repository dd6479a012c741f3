#!/usr/bin/env bash
# Compile and link the CUDA extension and compile the Triton kernels for sm_80/86/90 without a
# GPU; registers, shared memory, stack and spills per kernel and arch (bench/cuda_compile_check.py
# has the details; docs/cuda-build.md the results).
#
#   bench/cuda_compile_check.sh OUT_DIR [--archs 8.0,8.6,9.0] [--no-fetch] [--no-triton] ...
#
# The first run downloads the CUDA torch wheel of the installed torch release once (about
# 530 MB) and keeps its headers and link libraries in ${AAD_FAST_CUDA_CACHE:-~/.cache/aad_fast/
# cuda-torch-<release>}. Triton's interpreter must be off for the AOT compile.
set -eu
out=${1:?usage: bench/cuda_compile_check.sh OUT_DIR [options of bench/cuda_compile_check.py]}
shift
cd "$(dirname "$0")/.."
TRITON_INTERPRET=0 exec python bench/cuda_compile_check.py --out "$out" "$@"
