#!/usr/bin/env bash
# The one prepared GPU check (issues 10 and 27): install the package with its CUDA extension
# (no network: nothing is fetched), check that the extension loads, run the GPU tests, time the
# selection kernels and decode the Llama-3.2-1B and Llama-3.1-8B shapes (bf16, random weights).
# The lent machines are an H100 or an H200 (sm_90; torch 2.11+cu130, triton 3.6, transformers
# 5.17); the rows of other open issues (speculative decoding) join the bench phases as they land.
#
#   bench/gpu_check.sh [--dry-run] OUT_DIR        (or GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh OUT_DIR)
#
# Writes at most 8 files under OUT_DIR, each cut to 4 MiB: summary.md (one row per phase: exit
# code, seconds; then the environment and the test counts), check.log (every phase's output,
# the bench tables included) and three bench results, JSON and PNG each: the kernels and the
# decode, <device>-<date>[-HHMMSS].*, apart (so a decode that runs out of time still leaves the
# kernel numbers), and the speculative rows of issue 26, spec-<device>-<date>.* (the toy pair
# with its n-gram and shipped drafts, and the oracle sweep on the Llama-3.2-1B shape). Every
# phase has its own time limit (GPU_CHECK_T_BUILD/_TEST/_KERNELS/_DECODE/_SPEC, seconds; the
# defaults 130 + 15 + 110 + 50 + 170 + 120 fit in 10 minutes) and a failed phase does not stop
# the next; the exit code is 1 if any phase failed. GPU_CHECK_BENCH_ARGS adds options to the
# kernels and decode bench commands.
#
# build: `pip install --no-build-isolation --no-deps --no-index -e .` with the CUDA extension
# for sm_90 only (AAD_FAST_CUDA_ARCHS=9.0; the CPU extension is skipped: the GPU check runs no
# CPU kernel). setup.py never fails an install over an extension, so the ext phase checks that
# `aad_fast._cuda` loads and registers its kernel, and logs its registers and spills.
#
# --dry-run: the same phases on CPU with tiny shapes (the install command with pip's --dry-run,
# no CUDA build, a small test selection under TRITON_INTERPRET=1, model `tiny`, 4 tokens), as
# CI runs it (tests/test_gpu_check.py).
# Nothing heavy is installed: torch, triton, transformers and peft must be there; pytest,
# hypothesis and pytest-benchmark are pip-installed only if missing.
set -u
dry=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && { dry=1; shift; }
out=${1:?usage: bench/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
[ -z "$(ls -A "$out")" ] || { echo "gpu_check: OUT_DIR $out is not empty; give a new folder" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=$out/summary.md
status=0
methods=hf_generate,hf_naive_aad,greedy,aad_two,aad_lora

phase() {  # phase NAME LIMIT_S CMD...: run CMD with a time limit into check.log, one summary row
    local name=$1 limit=$2 log=$out/check.log t0 rc
    shift 2
    t0=$(date +%s)
    echo "## $name: $*" >>"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    [ "$rc" -eq 124 ] && echo "## $name: stopped at its limit of $limit s" >>"$log"
    echo "| $name | $rc | $(($(date +%s) - t0)) |" >>"$summary"
}

mode=GPU
[ "$dry" = 1 ] && mode="dry run (CPU)"
{
    echo "# gpu_check: $mode, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "| phase | exit code | seconds |"
    echo "| --- | --- | --- |"
} >"$summary"

python -c "import pytest, hypothesis, pytest_benchmark" 2>/dev/null ||
    phase deps 120 python -m pip install -q pytest hypothesis pytest-benchmark

install=(python -m pip install --no-build-isolation --no-deps --no-index -v -e .)
if [ "$dry" = 1 ]; then
    export TRITON_INTERPRET=1
    phase build 60 "${install[@]}" --dry-run
    phase ext 60 python -c "import aad_fast.ops.backends as b; print(b.available_backends('cpu'))"
    phase tests 60 python -m pytest -q -rfEs -p no:cacheprovider \
        tests/test_selectors.py::test_per_row_floor_equals_mix_floor \
        "tests/test_capture.py::test_a_planted_unsafe_line_fails_the_check[item]"
    bench=(python -m aad_fast.cli bench --quick --device cpu --models tiny --batch 1
           --kernel-batches 1 --kernel-vocabs 1000 --new-tokens 4 --prompt-lens 8
           --decode-prompt-len 8 --repeats 1)
    limits=(60 90)
    spec=(python -m aad_fast.cli bench --speculative --device cpu --spec-shape tiny
          --spec-prompts 1 --new-tokens 4 --decode-prompt-len 8 --repeats 1 --no-toy)
    spec_limit=120
else
    phase build "${GPU_CHECK_T_BUILD:-130}" env AAD_FAST_CUDA_ARCHS=9.0 AAD_FAST_SKIP_CPU_BUILD=1 \
        "${install[@]}"
    phase ext 15 bash -c 'python -c "import aad_fast._cuda, aad_fast.ops.backends as b; \
        bs = b.available_backends(\"cuda\"); print(bs); assert \"cuda\" in bs" &&
        { cuobjdump --dump-resource-usage aad_fast/_cuda*.so | c++filt || true; }'
    phase tests "${GPU_CHECK_T_TEST:-110}" python -m pytest -q -m gpu -rfEs -p no:cacheprovider tests
    bench=(python -m aad_fast.cli bench --device cuda --dtype bfloat16
           --models llama-3.2-1b,llama-3.1-8b --batch 1,8 --kernel-batches 1,256
           --kernel-vocabs 128256,151936 --new-tokens 64 --prompt-lens 128 --repeats 2)
    limits=("${GPU_CHECK_T_KERNELS:-50}" "${GPU_CHECK_T_DECODE:-170}")
    spec=(python -m aad_fast.cli bench --speculative --device cuda --dtype bfloat16
          --spec-shape llama-3.2-1b --spec-prompts 4 --new-tokens 64 --decode-prompt-len 128
          --repeats 2)
    spec_limit=${GPU_CHECK_T_SPEC:-120}
fi
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of options
phase kernels "${limits[0]}" "${bench[@]}" --no-decode --methods "$methods" --out "$out" \
    ${GPU_CHECK_BENCH_ARGS:-}
# shellcheck disable=SC2086
phase decode "${limits[1]}" "${bench[@]}" --no-kernels --methods "$methods" --out "$out" \
    ${GPU_CHECK_BENCH_ARGS:-}
# issue 26: the toy pair with its drafts (k 2/4/6) and the oracle sweep (p x k 2/4/8)
phase speculative "$spec_limit" "${spec[@]}" --out "$out"
# at most 8 files come back: the bench tables are in check.log, so the .md copies go
for f in "$out"/*.md; do [ "$(basename "$f")" = summary.md ] || rm -f "$f"; done

{
    echo
    echo '```'
    python -c "import torch, transformers; from aad_fast import backends as b; d = 'cuda' if torch.cuda.is_available() else 'cpu'; print('torch', torch.__version__, '| transformers', transformers.__version__, '| device', torch.cuda.get_device_name() if d == 'cuda' else 'cpu', '| backends', b.available_backends(d))" 2>&1 | tail -n 3
    grep -E "[0-9]+ (passed|failed|skipped|error)" "$out/check.log" | tail -n 3
    echo '```'
} >>"$summary"
for f in "$out"/check.log "$out"/*.md; do  # keep every file well under the 16 MiB limit
    [ -f "$f" ] && [ "$(wc -c <"$f")" -gt 4194304 ] && { tail -c 4194304 "$f" >"$f.cut" && mv "$f.cut" "$f"; }
done
cat "$summary"
exit $status
