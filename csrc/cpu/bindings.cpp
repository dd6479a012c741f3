// CPU kernels of the ops aad_fast::select_native and aad_fast::aad_topk_native.
//
// The schemas and the fake (meta) implementations are defined once, in aad_fast/ops.py; the CUDA
// extension gives select_native its CUDA kernel (csrc/cuda/bindings_cuda.cpp). The user-facing
// argument checks, with errors that name the argument, are in aad_fast/ops.py (check_core); this
// file holds only the invariants the loops rely on (TORCH_CHECK), the registration for the CPU
// dispatch key, and nothing else. The loops are in select_cpu.cpp and topk_cpu.cpp; the maths is
// the docstring of aad_fast/reference.py.

#include <torch/extension.h>

#include "select_cpu.h"
#include "topk_cpu.h"

namespace {

bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_pair(const at::Tensor& a, const at::Tensor& r, int64_t vocab) {
  for (const at::Tensor* x : {&a, &r}) {
    TORCH_CHECK(x->device().is_cpu() && x->dim() == 2 && is_logit_dtype(x->scalar_type()),
                "aad_fast (cpu): logits must be 2-D float32/float16/bfloat16 CPU tensors, got ",
                x->sizes(), " ", x->scalar_type(), " on ", x->device());
  }
  TORCH_CHECK(a.size(0) == r.size(0), "aad_fast (cpu): batch sizes differ: ", a.size(0), " vs ",
              r.size(0));
  TORCH_CHECK(vocab >= 1 && vocab <= a.size(1) && vocab <= r.size(1),
              "aad_fast (cpu): vocab must be in [1, ", std::min(a.size(1), r.size(1)), "], got ",
              vocab);
}

// A per-row argument: B values or one (broadcast), on the CPU.
void check_row(const at::Tensor& x, const char* name, int64_t batch, bool floating) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() <= 1 && (x.numel() == batch || x.numel() == 1) &&
                  (floating ? x.is_floating_point() : !x.is_floating_point() && !x.is_complex()),
              "aad_fast (cpu): ", name, " must be a CPU ", floating ? "float" : "integer",
              " tensor of shape [", batch, "] or [1], got ", x.sizes(), " ", x.scalar_type(),
              " on ", x.device());
}

at::Tensor select_op(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                     double mr, double sa, double sr, const at::Tensor& log_rel,
                     const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                     const std::optional<at::Tensor>& step) {
  check_pair(a, r, vocab);
  check_row(log_rel, "log_rel", a.size(0), true);
  check_row(floor, "floor", a.size(0), true);
  TORCH_CHECK(seed.has_value() == step.has_value(),
              "aad_fast (cpu): seed and step must be given together");
  if (seed.has_value()) {
    check_row(*seed, "seed", a.size(0), false);
    check_row(*step, "step", 1, false);
  }
  return aad_fast::select_cpu(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aad_topk_op(
    const at::Tensor& a, const at::Tensor& r, int64_t vocab, const at::Tensor& log_alpha,
    int64_t k, std::optional<double> tau) {
  check_pair(a, r, vocab);
  check_row(log_alpha, "log_alpha", a.size(0), true);
  TORCH_CHECK(k >= 1, "aad_fast (cpu): k must be >= 1, got ", k);
  return aad_fast::aad_topk_cpu(a, r, vocab, log_alpha, k, tau);
}

}  // namespace

TORCH_LIBRARY_IMPL(aad_fast, CPU, m) {
  m.impl("select_native", &select_op);
  m.impl("aad_topk_native", &aad_topk_op);
}

// `import aad_fast._C` loads this library, which registers the kernels above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
