// CPU kernel of the beam-search step (reference.aad_topk_ref). Argument checks: aad_fast/ops.py;
// invariants: bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace aad_fast {

// reference.aad_topk_ref. a [B, Va], r [B, Vr] float32/float16/bfloat16 CPU tensors, any strides;
// 1 <= vocab <= min(Va, Vr); log_alpha float [B] or [1]; k >= 1. Returns (scores [B, k] float32,
// ids [B, k] int64, n_cand [B] int64, entropy [B] float32, log_pmax [B] float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aad_topk_cpu(
    const at::Tensor& a, const at::Tensor& r, int64_t vocab, const at::Tensor& log_alpha,
    int64_t k, std::optional<double> tau);

}  // namespace aad_fast
