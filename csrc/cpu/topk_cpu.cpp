// Beam-search step of BeamAAD on CPU: reference.aad_topk_ref without its two full sorts and its
// dozen vocabulary-sized temporaries.
//
// la and lr come from ATen's own log_softmax, so every score (la - lr, or la + ln|K| on a flat
// row) and max la are bitwise the reference's, and so are the ids. Then, per row and in parallel
// over rows: pass 1 finds K = {a > -inf, a >= max a + ln alpha}, |K|, max la and the reference
// entropy H = sum over K of -p_r ln p_r (products in float32 as the reference forms them, the sum
// in double: within float32 rounding of the reference's float32 sum, which is the one quantity
// that is not bitwise); pass 2 ranks K by (score desc, id asc) with a partial sort of k.

#include "topk_cpu.h"

#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace aad_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kSerialWork = int64_t(1) << 15;  // ids below which threads do not pay off

struct Cand {
  float score;  // NaN already mapped to -inf
  int64_t id;
};

inline bool ranks_before(const Cand& x, const Cand& y) {
  return x.score > y.score || (x.score == y.score && x.id < y.id);
}

inline bool is_candidate(float a, float t) { return a > -kInf && a >= t; }  // NaN: false

// f(v) for every candidate id v of the row, in increasing order; groups of four ids with no
// candidate (most of them, for alpha > 0) cost one vector compare.
template <typename F>
inline void for_each_candidate(const float* x, int64_t vocab, float t, F&& f) {
  const simd::f32x4 tv = simd::splat(t), ninf = simd::splat(-kInf);
  int64_t v = 0;
  for (; v + 4 <= vocab; v += 4) {
    const simd::f32x4 xv = simd::loadu(x + v);
    if (!simd::any((xv > ninf) & (xv >= tv))) continue;
    for (int64_t u = v; u < v + 4; ++u) {
      if (is_candidate(x[u], t)) f(u);
    }
  }
  for (; v < vocab; ++v) {
    if (is_candidate(x[v], t)) f(v);
  }
}

// max over n floats, NaN ignored (-inf when none).
inline float max_nonan(const float* x, int64_t n) {
  simd::f32x4 acc[2] = {simd::splat(-kInf), simd::splat(-kInf)};
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    acc[0] = simd::max_into(acc[0], simd::loadu(x + v));
    acc[1] = simd::max_into(acc[1], simd::loadu(x + v + 4));
  }
  float m = simd::hmax(simd::max_into(acc[0], acc[1]));
  for (; v < n; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aad_topk_cpu(
    const at::Tensor& a, const at::Tensor& r, int64_t vocab, const at::Tensor& log_alpha,
    int64_t k, std::optional<double> tau) {
  const int64_t B = a.size(0);
  // the reference's own tensors: a[:, :vocab].float() and its log_softmax
  // NaN a_v: no candidate (-inf); NaN r_v: out of lr's normaliser, its own score NaN (as the reference)
  at::Tensor af = a.narrow(1, 0, vocab).to(at::kFloat).contiguous();
  af = af.masked_fill(af.isnan(), -INFINITY);
  const at::Tensor rf = r.narrow(1, 0, vocab).to(at::kFloat).contiguous();
  const at::Tensor r_nan = rf.isnan();
  const at::Tensor la = at::log_softmax(af, 1).contiguous();
  const at::Tensor lr =
      at::log_softmax(rf.masked_fill(r_nan, -INFINITY), 1).masked_fill(r_nan, NAN).contiguous();
  const at::Tensor lg = log_alpha.to(at::kFloat).reshape({-1}).expand({B}).contiguous();
  const auto opts = af.options();
  at::Tensor scores = at::full({B, k}, -kInf, opts);
  at::Tensor ids = at::full({B, k}, -1, opts.dtype(at::kLong));
  at::Tensor n_cand = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor entropy = at::empty({B}, opts);
  at::Tensor log_pmax = at::empty({B}, opts);
  if (B == 0) return {scores, ids, n_cand, entropy, log_pmax};

  const float* ap = af.data_ptr<float>();
  const float* lap = la.data_ptr<float>();
  const float* lrp = lr.data_ptr<float>();
  const float* lgp = lg.data_ptr<float>();
  int64_t* ncp = n_cand.data_ptr<int64_t>();
  float* entp = entropy.data_ptr<float>();
  float* lpmp = log_pmax.data_ptr<float>();
  std::vector<float> thr(B);
  const int64_t grain = std::max<int64_t>(1, kSerialWork / vocab);

  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = ap + b * vocab;
      const float* l = lap + b * vocab;
      const float* y = lrp + b * vocab;
      const float big = max_nonan(x, vocab);
      const float t = lgp[b] == -kInf ? -kInf : big + lgp[b];
      int64_t n = 0;
      double h = 0.0;
      for_each_candidate(x, vocab, t, [&](int64_t v) {
        ++n;
        const float p = std::exp(y[v]);
        if (p > 0.f) h += static_cast<double>(-p * y[v]);
      });
      thr[b] = t;
      ncp[b] = n;
      entp[b] = static_cast<float>(h);
      lpmp[b] = max_nonan(l, vocab);
    }
  });

  // Flat rows (docs/rules.md BeamAAD: H <= tau): s = la + ln|K|, with ATen's log as the reference takes it.
  std::vector<uint8_t> flat(B, 0);
  at::Tensor log_n;
  const float* lnp = nullptr;
  if (tau.has_value()) {
    log_n = at::log(n_cand.clamp_min(1).to(at::kFloat)).contiguous();
    lnp = log_n.data_ptr<float>();
    const float tau_f = static_cast<float>(*tau);  // the reference compares in float32
    for (int64_t b = 0; b < B; ++b) flat[b] = entp[b] <= tau_f && ncp[b] > 0;
  }

  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<Cand> cands;
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = ap + b * vocab;
      const float* l = lap + b * vocab;
      const float* y = lrp + b * vocab;
      const float t = thr[b];
      cands.clear();
      cands.reserve(ncp[b]);
      for_each_candidate(x, vocab, t, [&](int64_t v) {
        const float s = flat[b] ? l[v] + lnp[b] : l[v] - y[v];
        cands.push_back({s == s ? s : -kInf, v});
      });
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
      std::partial_sort(cands.begin(), cands.begin() + m, cands.end(), ranks_before);
      for (int64_t j = 0; j < m; ++j) {
        sp[b * k + j] = cands[j].score;
        ip[b * k + j] = cands[j].id;
      }
    }
  });
  return {scores, ids, n_cand, entropy, log_pmax};
}

}  // namespace aad_fast
