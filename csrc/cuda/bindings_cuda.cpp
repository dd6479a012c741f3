// CUDA kernel of the op aad_fast::select_native.
//
// The schema and the fake (meta) implementation are defined once, in aad_fast/ops.py; the C++
// extension gives the same op its CPU kernel (csrc/cpu/bindings.cpp). The user-facing argument
// checks, with errors that name the argument, are in aad_fast/ops.py (check_core); this file
// holds only the invariants the kernels rely on (TORCH_CHECK), the device guard, the conversion
// of the per-row arguments to the dtypes the kernels read, and the registration for the CUDA
// dispatch key. The kernels are in select_cuda.cu; the maths is the docstring of
// aad_fast/reference.py.

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

namespace aad_fast_cuda {
// select_cuda.cu: arguments already checked, device guard held by the caller.
at::Tensor select_cuda(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                       double mr, double sa, double sr, const at::Tensor& log_rel,
                       const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                       const std::optional<at::Tensor>& step);
int64_t max_vocab();
}  // namespace aad_fast_cuda

namespace {

bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A per-row argument: B values or one (broadcast), on a's device; returned as `dtype` [numel].
at::Tensor row_vector(const at::Tensor& x, const char* name, int64_t batch,
                      const at::Device& device, at::ScalarType dtype) {
  const bool floating = dtype == at::kFloat;
  TORCH_CHECK(x.device() == device && x.dim() <= 1 && (x.numel() == batch || x.numel() == 1) &&
                  (floating ? x.is_floating_point() : !x.is_floating_point() && !x.is_complex()),
              "aad_fast (cuda): ", name, " must be a ", floating ? "float" : "integer",
              " tensor of shape [", batch, "] or [1] on ", device, ", got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  return x.reshape({x.numel()}).to(dtype);
}

at::Tensor select_op(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                     double mr, double sa, double sr, const at::Tensor& log_rel,
                     const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                     const std::optional<at::Tensor>& step) {
  const at::Device device = a.device();
  for (const at::Tensor* x : {&a, &r}) {
    TORCH_CHECK(x->is_cuda() && x->device() == device && x->dim() == 2 &&
                    is_logit_dtype(x->scalar_type()),
                "aad_fast (cuda): logits must be 2-D float32/float16/bfloat16 tensors on ",
                device, ", got ", x->sizes(), " ", x->scalar_type(), " on ", x->device());
  }
  TORCH_CHECK(a.size(0) == r.size(0), "aad_fast (cuda): batch sizes differ: ", a.size(0),
              " vs ", r.size(0));
  TORCH_CHECK(a.size(0) <= int64_t(0x7fffffff), "aad_fast (cuda): batch too large: ", a.size(0));
  TORCH_CHECK(vocab >= 1 && vocab <= a.size(1) && vocab <= r.size(1) &&
                  vocab <= aad_fast_cuda::max_vocab(),
              "aad_fast (cuda): vocab must be in [1, ",
              std::min({a.size(1), r.size(1), aad_fast_cuda::max_vocab()}), "], got ", vocab);
  TORCH_CHECK(seed.has_value() == step.has_value(),
              "aad_fast (cuda): seed and step must be given together");
  const c10::cuda::CUDAGuard guard(device);
  const int64_t batch = a.size(0);
  at::Tensor lr = row_vector(log_rel, "log_rel", batch, device, at::kFloat);
  at::Tensor fl = row_vector(floor, "floor", batch, device, at::kFloat);
  std::optional<at::Tensor> sd, st;
  if (seed.has_value()) {
    sd = row_vector(*seed, "seed", batch, device, at::kLong);
    st = row_vector(*step, "step", 1, device, at::kLong);
  }
  return aad_fast_cuda::select_cuda(a, r, vocab, ma, mr, sa, sr, lr, fl, sd, st);
}

}  // namespace

TORCH_LIBRARY_IMPL(aad_fast, CUDA, m) { m.impl("select_native", &select_op); }

// `import aad_fast._cuda` loads this library, which registers the kernel above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
