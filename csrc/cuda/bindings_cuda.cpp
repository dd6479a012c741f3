// Registration of the CUDA ops as torch.ops.aad_fast_cuda.*, with their argument checks, the
// device guard and the current stream. The kernels are in select_cuda.cu; the maths is the
// docstring of aad_fast/reference.py.

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

void check_logits(const at::Tensor& x, const char* name, const at::Device& device) {
  TORCH_CHECK(x.is_cuda(), "aad_fast_cuda: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == device, "aad_fast_cuda: ", name, " is on ", x.device(),
              " but a is on ", device);
  TORCH_CHECK(x.dim() == 2, "aad_fast_cuda: ", name, " must be 2-D [batch, vocab], got shape ",
              x.sizes());
  TORCH_CHECK(is_logit_dtype(x.scalar_type()), "aad_fast_cuda: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

// A per-row argument: numel 1 (broadcast) or batch, on a's device; returned as `dtype`.
at::Tensor row_vector(const at::Tensor& x, const char* name, int64_t batch,
                      const at::Device& device, at::ScalarType dtype) {
  TORCH_CHECK(x.device() == device, "aad_fast_cuda: ", name, " must be on ", device, ", got ",
              x.device());
  TORCH_CHECK(x.dim() <= 1 && (x.numel() == batch || x.numel() == 1), "aad_fast_cuda: ", name,
              " must have shape [", batch, "] (or one element), got ", x.sizes());
  const bool floating = dtype == at::kFloat;
  TORCH_CHECK(floating ? x.is_floating_point() : !x.is_floating_point() && !x.is_complex(),
              "aad_fast_cuda: ", name, " must be a ", floating ? "floating point" : "integer",
              " tensor, got ", x.scalar_type());
  return x.reshape({x.numel()}).to(dtype);
}

at::Tensor select_op(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                     double mr, double sa, double sr, const at::Tensor& log_rel,
                     const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                     const std::optional<at::Tensor>& step) {
  const at::Device device = a.device();
  check_logits(a, "a", device);
  check_logits(r, "r", device);
  TORCH_CHECK(a.size(0) == r.size(0), "aad_fast_cuda: a and r have different batch sizes: ",
              a.size(0), " vs ", r.size(0));
  TORCH_CHECK(a.size(0) <= int64_t(0x7fffffff), "aad_fast_cuda: batch too large: ", a.size(0));
  TORCH_CHECK(vocab >= 1 && vocab <= a.size(1) && vocab <= r.size(1),
              "aad_fast_cuda: vocab must be in [1, min(V_a, V_r)] = [1, ",
              std::min(a.size(1), r.size(1)), "], got ", vocab);
  TORCH_CHECK(vocab <= aad_fast_cuda::max_vocab(), "aad_fast_cuda: vocab must be <= ",
              aad_fast_cuda::max_vocab(), ", got ", vocab);
  TORCH_CHECK(seed.has_value() == step.has_value(),
              "aad_fast_cuda: seed and step must be given together (both or neither)");
  const c10::cuda::CUDAGuard guard(device);
  const int64_t batch = a.size(0);
  at::Tensor lr = row_vector(log_rel, "log_rel", batch, device, at::kFloat);
  at::Tensor fl = row_vector(floor, "floor", batch, device, at::kFloat);
  std::optional<at::Tensor> sd, st;
  if (seed.has_value()) {
    sd = row_vector(*seed, "seed", batch, device, at::kLong);
    TORCH_CHECK(step->numel() == 1 && step->device() == device && !step->is_floating_point() &&
                    !step->is_complex(),
                "aad_fast_cuda: step must be an integer scalar tensor on ", device,
                ", got shape ", step->sizes(), " dtype ", step->scalar_type(), " on ",
                step->device());
    st = step->reshape({1}).to(at::kLong);
  }
  return aad_fast_cuda::select_cuda(a, r, vocab, ma, mr, sa, sr, lr, fl, sd, st);
}

// Shape-only twin for fake tensors (torch.compile, meta-device tracing).
at::Tensor select_meta(const at::Tensor& a, const at::Tensor&, int64_t, double, double, double,
                       double, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  return at::empty({a.size(0)}, a.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY(aad_fast_cuda, m) {
  m.def(
      "select(Tensor a, Tensor r, int vocab, float ma, float mr, float sa, float sr, "
      "Tensor log_rel, Tensor floor, Tensor? seed, Tensor? step) -> Tensor");
}

TORCH_LIBRARY_IMPL(aad_fast_cuda, CUDA, m) { m.impl("select", &select_op); }

TORCH_LIBRARY_IMPL(aad_fast_cuda, Meta, m) { m.impl("select", &select_meta); }

// `import aad_fast._cuda` loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
