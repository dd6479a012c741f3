// CPU kernels of the aad_fast selection ops. The maths is the docstring of aad_fast/reference.py;
// the user-facing argument checks are in aad_fast/ops.py (check_core), the invariants
// in bindings.cpp, so these functions assume valid arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace aad_fast {

// reference.select_ref. a [B, Va], r [B, Vr] float32/float16/bfloat16 CPU tensors, any strides;
// 1 <= vocab <= min(Va, Vr); log_rel, floor float [B] or [1]; seed int64 [B] or [1] and step int64
// scalar, both or neither. Returns int64 [B], -1 for a row with no candidate.
at::Tensor select_cpu(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                      double mr, double sa, double sr, const at::Tensor& log_rel,
                      const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& step);

}  // namespace aad_fast
