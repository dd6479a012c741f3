// Registration of the CPU ops as torch.ops.aad_fast_cpu.*, with their argument checks.
// The loops are in select_cpu.cpp; the maths is the docstring of aad_fast/reference.py.

#include <torch/extension.h>

#include "select_cpu.h"
#include "topk_cpu.h"

namespace {

bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "aad_fast_cpu: ", name, " must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "aad_fast_cpu: ", name, " must be 2-D [batch, vocab], got shape ",
              x.sizes());
  TORCH_CHECK(is_logit_dtype(x.scalar_type()), "aad_fast_cpu: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

void check_row_vector(const at::Tensor& x, const char* name, int64_t batch, bool floating) {
  TORCH_CHECK(x.device().is_cpu(), "aad_fast_cpu: ", name, " must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.numel() == batch && x.dim() <= 1, "aad_fast_cpu: ", name,
              " must have shape [", batch, "], got ", x.sizes());
  TORCH_CHECK(floating ? x.is_floating_point() : !x.is_floating_point() && !x.is_complex(),
              "aad_fast_cpu: ", name, " must be ", floating ? "floating point" : "an integer",
              " tensor, got ", x.scalar_type());
}

void check_noise_args(const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& step,
                      int64_t batch) {
  TORCH_CHECK(seed.has_value() == step.has_value(),
              "aad_fast_cpu: seed and step must be given together (both or neither)");
  if (!seed.has_value()) return;
  check_row_vector(*seed, "seed", batch, false);
  TORCH_CHECK(step->numel() == 1 && step->device().is_cpu() && !step->is_floating_point(),
              "aad_fast_cpu: step must be an integer CPU scalar tensor, got shape ",
              step->sizes(), " dtype ", step->scalar_type(), " on ", step->device());
}

at::Tensor select_op(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma, double mr,
                  double sa, double sr, const at::Tensor& log_rel, const at::Tensor& floor,
                  const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& step) {
  check_logits(a, "a");
  check_logits(r, "r");
  TORCH_CHECK(a.size(0) == r.size(0), "aad_fast_cpu: a and r have different batch sizes: ",
              a.size(0), " vs ", r.size(0));
  TORCH_CHECK(vocab >= 1 && vocab <= a.size(1) && vocab <= r.size(1),
              "aad_fast_cpu: vocab must be in [1, min(V_a, V_r)] = [1, ",
              std::min(a.size(1), r.size(1)), "], got ", vocab);
  check_row_vector(log_rel, "log_rel", a.size(0), true);
  check_row_vector(floor, "floor", a.size(0), true);
  check_noise_args(seed, step, a.size(0));
  return aad_fast::select_cpu(a, r, vocab, ma, mr, sa, sr, log_rel, floor, seed, step);
}

at::Tensor select_meta(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                       double mr, double sa, double sr, const at::Tensor& log_rel,
                       const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                       const std::optional<at::Tensor>& step) {
  return at::empty({a.size(0)}, a.options().dtype(at::kLong));
}

using TopK = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TopK aad_topk_op(const at::Tensor& a, const at::Tensor& r, int64_t vocab,
                 const at::Tensor& log_alpha, int64_t k, std::optional<double> tau) {
  check_logits(a, "a");
  check_logits(r, "r");
  TORCH_CHECK(a.size(0) == r.size(0), "aad_fast_cpu: a and r have different batch sizes: ",
              a.size(0), " vs ", r.size(0));
  TORCH_CHECK(vocab >= 1 && vocab <= a.size(1) && vocab <= r.size(1),
              "aad_fast_cpu: vocab must be in [1, min(V_a, V_r)] = [1, ",
              std::min(a.size(1), r.size(1)), "], got ", vocab);
  check_row_vector(log_alpha, "log_alpha", a.size(0), true);
  TORCH_CHECK(k >= 1, "aad_fast_cpu: k must be >= 1, got ", k);
  return aad_fast::aad_topk_cpu(a, r, vocab, log_alpha, k, tau);
}

TopK aad_topk_meta(const at::Tensor& a, const at::Tensor& r, int64_t vocab,
                   const at::Tensor& log_alpha, int64_t k, std::optional<double> tau) {
  const int64_t b = a.size(0);
  const auto f = a.options().dtype(at::kFloat);
  return {at::empty({b, k}, f), at::empty({b, k}, f.dtype(at::kLong)),
          at::empty({b}, f.dtype(at::kLong)), at::empty({b}, f), at::empty({b}, f)};
}

at::Tensor gumbel_noise_op(const at::Tensor& seed, const at::Tensor& step, int64_t vocab) {
  TORCH_CHECK(vocab >= 1, "aad_fast_cpu: vocab must be >= 1, got ", vocab);
  check_row_vector(seed, "seed", seed.numel(), false);
  check_noise_args(seed, step, seed.numel());
  return aad_fast::gumbel_noise_cpu(seed, step, vocab);
}

}  // namespace

TORCH_LIBRARY(aad_fast_cpu, m) {
  m.def(
      "select(Tensor a, Tensor r, int vocab, float ma, float mr, float sa, float sr, "
      "Tensor log_rel, Tensor floor, Tensor? seed, Tensor? step) -> Tensor");
  m.def("gumbel_noise(Tensor seed, Tensor step, int vocab) -> Tensor");
  m.def(
      "aad_topk(Tensor a, Tensor r, int vocab, Tensor log_alpha, int k, float? tau) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aad_fast_cpu, CPU, m) {
  m.impl("select", &select_op);
  m.impl("gumbel_noise", &gumbel_noise_op);
  m.impl("aad_topk", &aad_topk_op);
}

TORCH_LIBRARY_IMPL(aad_fast_cpu, Meta, m) {
  m.impl("select", &select_meta);
  m.impl("aad_topk", &aad_topk_meta);
}

// `import aad_fast._C` loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
