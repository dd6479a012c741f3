// Selection core on CPU: reference.select_ref exactly (aad_fast/reference.py has the maths).
//
// Work items are (row, chunk of kChunk ids) pairs, so a single row of a large vocabulary still
// uses every thread, and a chunk's data stays in L1/L2 while it is read.
//
// Pass 1, only for rows whose threshold is not -inf (log_rel or floor finite): for every block of
//   kBlock ids the max of the mask value m (NaN counts as -inf), and the max of each chunk.
// Per row: M = max over chunks, t = max(floor, M + log_rel), exactly as the reference.
// Pass 2: in each chunk, only the blocks whose max reaches t (all blocks when t = -inf): the best
//   (score, id) among candidates m >= t, m > -inf, NaN scores counted as -inf. 16 vector lanes
//   each keep their first best; lanes, then chunks, are merged by higher score, then lower id; a
//   candidate scoring -inf still beats "no candidate".
//
// Every candidate is tested against the exact global t, so no chunk needs a second look (a local
// threshold per chunk would, whenever its best local candidate falls below the global t) and the
// result does not depend on the split. For AAD, m = a: pass 1 reads only `a`, and pass 2 reads `r`
// only in blocks that hold a candidate.

#include "select_cpu.h"

#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace aad_fast {
namespace {

constexpr int kBlock = 64;                            // ids per block: 4 lines of float32
constexpr int64_t kChunk = 8192;                      // ids per work item; multiple of kBlock
constexpr int kBlocksPerChunk = kChunk / kBlock;
constexpr int64_t kSerialWork = int64_t(1) << 16;     // ids below which threads do not pay off
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr uint32_t kGolden = 0x9E3779B9u;

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// ---- inputs ------------------------------------------------------------------------------------

struct Stream {
  const char* data;
  int64_t row_stride;  // elements
  int64_t col_stride;  // elements
  int64_t elem_size;
  at::ScalarType dtype;
};

Stream make_stream(const at::Tensor& x) {
  return {static_cast<const char*>(x.data_ptr()), x.stride(0), x.stride(1), x.element_size(),
          x.scalar_type()};
}

template <typename T>
inline void gather(const T* p, int64_t cs, int n, T* out) {
  if (cs == 1) {
    std::memcpy(out, p, n * sizeof(T));
  } else {
    for (int j = 0; j < n; ++j) out[j] = p[j * cs];
  }
  for (int j = n; j < kBlock; ++j) out[j] = T(0);
}

// The n <= kBlock values of row b at ids [col, col + n) as float32: a pointer into the tensor
// when it is dense float32 and the block is full, else tmp (kBlock floats, zeros past n).
inline const float* load_block(const Stream& s, int64_t b, int64_t col, int n, float* tmp) {
  const char* p = s.data + (b * s.row_stride + col * s.col_stride) * s.elem_size;
  if (s.dtype == at::kFloat) {
    if (s.col_stride == 1 && n == kBlock) return reinterpret_cast<const float*>(p);
    gather(reinterpret_cast<const float*>(p), s.col_stride, n, tmp);
    return tmp;
  }
  uint16_t bits[kBlock];
  const uint16_t* src = reinterpret_cast<const uint16_t*>(p);
  if (s.col_stride != 1 || n != kBlock) {
    gather(src, s.col_stride, n, bits);
    src = bits;
  }
  if (s.dtype == at::kHalf) {
    simd::widen16<true>(src, kBlock, tmp);
  } else {
    simd::widen16<false>(src, kBlock, tmp);
  }
  return tmp;
}

// ---- arithmetic --------------------------------------------------------------------------------

using simd::f32x4;
using simd::i32x4;

struct Coef {
  f32x4 ma, mr, sa, sr;
};

// ca*a + cr*r on ids [j, j+4) with the terms whose coefficient is 0 dropped (the flags), so 0*inf
// never makes a NaN. Each product and the sum round to float32 on their own: built with
// -ffp-contract=off, so there is no FMA. A coefficient 1 multiplies exactly.
template <bool UA, bool UR>
inline f32x4 lin(const float* a, const float* r, int j, f32x4 ca, f32x4 cr) {
  if constexpr (UA && UR) {
    return simd::loadu(a + j) * ca + simd::loadu(r + j) * cr;
  } else if constexpr (UA) {
    return simd::loadu(a + j) * ca;
  } else if constexpr (UR) {
    return simd::loadu(r + j) * cr;
  } else {
    return simd::splat(0.f);
  }
}

inline float max_nonan(float x, float y) { return x > y ? x : y; }

// lowbias32 (reference.mix32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t row_key(int64_t seed, int64_t step) {
  return mix32(mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(step));
}

// u in (0, 1) for id v, exact in float32 as in the reference: (h >> 9) + 0.5 has 24 significant
// bits, so u never rounds to 1 (which would give g = +inf).
inline float uniform(uint32_t key, int64_t v) {
  const uint32_t h = mix32(key ^ (static_cast<uint32_t>(v) * kGolden));
  return (static_cast<float>(static_cast<int32_t>(h >> 9)) + 0.5f) * 0x1p-23f;
}

// u -> -log(-log(u)) in place, with ATen's own float32 log: the noise is then bitwise the
// reference's whichever log implementation (Sleef, libm) ATen dispatches to on this machine.
void gumbel_from_uniform(float* u, int64_t n) {
  if (n == 0) return;
  at::Tensor x = at::from_blob(u, {n}, at::TensorOptions().dtype(at::kFloat));
  x.log_();
  x.neg_();
  x.log_();
  x.neg_();
}

// ---- the two passes ----------------------------------------------------------------------------

struct ChunkBest {
  float score;
  int32_t idx;  // within the chunk; -1: no candidate
};

struct Ctx {
  Stream a, r;
  int64_t vocab, nchunks, blocks_per_row;
  Coef k;
  const uint8_t* prefilter;  // [B] pass 1 ran for the row
  const float* thr;          // [B] t
  const uint32_t* keys;      // [B] noise keys, or null
  float* block_max;          // [B, blocks_per_row]
  float* chunk_max;          // [B, nchunks]
  ChunkBest* best;           // [B, nchunks]
};

// max of m over the nv <= kBlock ids of one block (NaN ignored; -inf when none).
template <bool MA, bool MR>
inline float block_max(const float* pa, const float* pr, int nv, const Coef& k) {
  const f32x4 ninf = simd::splat(-kInf);
  f32x4 acc[4] = {ninf, ninf, ninf, ninf};
  if (nv == kBlock) {
    for (int q = 0; q < kBlock; q += 16) {
      for (int e = 0; e < 4; ++e) {
        acc[e] = simd::max_into(acc[e], lin<MA, MR>(pa, pr, q + 4 * e, k.ma, k.mr));
      }
    }
  } else {
    for (int q = 0; q < kBlock; q += 16) {
      for (int e = 0; e < 4; ++e) {
        const f32x4 m = lin<MA, MR>(pa, pr, q + 4 * e, k.ma, k.mr);
        const i32x4 valid = simd::iota() + (q + 4 * e) < simd::splat_i(nv);
        acc[e] = simd::max_into(acc[e], simd::select(valid, m, ninf));
      }
    }
  }
  return simd::hmax(simd::max_into(simd::max_into(acc[0], acc[1]),
                                   simd::max_into(acc[2], acc[3])));
}

// Pass 1 on chunk c of row b.
template <int F>
void chunk_maxima(const Ctx& cx, int64_t b, int64_t c) {
  constexpr bool MA = F & 1, MR = F & 2;
  const int64_t c0 = c * kChunk;
  const int64_t n = std::min(kChunk, cx.vocab - c0);
  float* bm = cx.block_max + b * cx.blocks_per_row + c * kBlocksPerChunk;
  alignas(16) float ta[kBlock], tr[kBlock];
  float cmax = -kInf;
  for (int64_t k = 0; k * kBlock < n; ++k) {
    const int nv = static_cast<int>(std::min<int64_t>(kBlock, n - k * kBlock));
    const float* pa = MA ? load_block(cx.a, b, c0 + k * kBlock, nv, ta) : nullptr;
    const float* pr = MR ? load_block(cx.r, b, c0 + k * kBlock, nv, tr) : nullptr;
    bm[k] = block_max<MA, MR>(pa, pr, nv, cx.k);
    cmax = max_nonan(cmax, bm[k]);
  }
  cx.chunk_max[b * cx.nchunks + c] = cmax;
}

// Lane state of pass 2: 16 lanes, each keeps the first id with its best score.
struct Lanes {
  f32x4 v[4];
  i32x4 i[4];
};

// One block of pass 2, ids [base, base + nv) of the chunk.
template <bool MA, bool MR, bool SA, bool SR, bool NOISE>
inline void best_in_block(const float* pa, const float* pr, const float* g, int nv, int32_t base,
                          const Coef& k, f32x4 t, Lanes& l) {
  const f32x4 ninf = simd::splat(-kInf);
  const i32x4 lim = simd::splat_i(nv);
  for (int q = 0; q < kBlock; q += 16) {
    for (int e = 0; e < 4; ++e) {
      const int j = q + 4 * e;
      const f32x4 m = lin<MA, MR>(pa, pr, j, k.ma, k.mr);
      f32x4 s = lin<SA, SR>(pa, pr, j, k.sa, k.sr);
      if constexpr (NOISE) s = s + simd::loadu(g + j);
      s = simd::nan_to_ninf(s);
      const i32x4 pos = simd::iota() + j;
      // NaN m fails both comparisons
      const i32x4 cand = (m >= t) & (m > ninf) & (pos < lim);
      const i32x4 upd = cand & ((s > l.v[e]) | (l.i[e] < simd::splat_i(0)));
      l.v[e] = simd::select(upd, s, l.v[e]);
      l.i[e] = simd::select(upd, pos + base, l.i[e]);
    }
  }
}

// Pass 2 on chunk c of row b. `noise` holds kChunk floats, `blocks` kBlocksPerChunk ints.
template <int F>
void chunk_best(const Ctx& cx, int64_t b, int64_t c, float* noise, int32_t* blocks) {
  constexpr bool MA = F & 1, MR = F & 2, SA = F & 4, SR = F & 8, NOISE = F & 16;
  ChunkBest& out = cx.best[b * cx.nchunks + c];
  out.idx = -1;
  const float t = cx.thr[b];
  if (std::isnan(t)) return;
  const int64_t c0 = c * kChunk;
  const int64_t n = std::min(kChunk, cx.vocab - c0);
  const int nb = static_cast<int>(ceil_div(n, kBlock));
  int cnt = 0;
  if (cx.prefilter[b]) {
    const float cm = cx.chunk_max[b * cx.nchunks + c];
    if (!(cm >= t && cm > -kInf)) return;
    const float* bm = cx.block_max + b * cx.blocks_per_row + c * kBlocksPerChunk;
    for (int k = 0; k < nb; ++k) {
      if (bm[k] >= t && bm[k] > -kInf) blocks[cnt++] = k;
    }
  } else {
    for (int k = 0; k < nb; ++k) blocks[cnt++] = k;
  }
  if constexpr (NOISE) {
    const uint32_t key = cx.keys[b];
    for (int q = 0; q < cnt; ++q) {
      const int64_t v0 = c0 + int64_t(blocks[q]) * kBlock;
      for (int j = 0; j < kBlock; ++j) noise[q * kBlock + j] = uniform(key, v0 + j);
    }
    gumbel_from_uniform(noise, int64_t(cnt) * kBlock);
  }
  Lanes l;
  for (int e = 0; e < 4; ++e) {
    l.v[e] = simd::splat(-kInf);
    l.i[e] = simd::splat_i(-1);
  }
  const f32x4 tv = simd::splat(t);
  alignas(16) float ta[kBlock], tr[kBlock];
  for (int q = 0; q < cnt; ++q) {
    const int64_t col = int64_t(blocks[q]) * kBlock;
    const int nv = static_cast<int>(std::min<int64_t>(kBlock, n - col));
    const float* pa = (MA || SA) ? load_block(cx.a, b, c0 + col, nv, ta) : nullptr;
    const float* pr = (MR || SR) ? load_block(cx.r, b, c0 + col, nv, tr) : nullptr;
    best_in_block<MA, MR, SA, SR, NOISE>(pa, pr, NOISE ? noise + q * kBlock : nullptr, nv,
                                         static_cast<int32_t>(col), cx.k, tv, l);
  }
  for (int e = 0; e < 4; ++e) {
    for (int j = 0; j < 4; ++j) {
      const float v = l.v[e][j];
      const int32_t i = l.i[e][j];
      if (i < 0) continue;
      if (out.idx < 0 || v > out.score || (v == out.score && i < out.idx)) {
        out.score = v;
        out.idx = i;
      }
    }
  }
}

using Pass1Fn = void (*)(const Ctx&, int64_t, int64_t);
using Pass2Fn = void (*)(const Ctx&, int64_t, int64_t, float*, int32_t*);

template <int... F>
constexpr std::array<Pass1Fn, sizeof...(F)> pass1_table(std::integer_sequence<int, F...>) {
  return {&chunk_maxima<F>...};
}
template <int... F>
constexpr std::array<Pass2Fn, sizeof...(F)> pass2_table(std::integer_sequence<int, F...>) {
  return {&chunk_best<F>...};
}
constexpr auto kPass1 = pass1_table(std::make_integer_sequence<int, 4>{});
constexpr auto kPass2 = pass2_table(std::make_integer_sequence<int, 32>{});

}  // namespace

at::Tensor select_cpu(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                      double mr, double sa, double sr, const at::Tensor& log_rel,
                      const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& step) {
  const int64_t B = a.size(0);
  at::Tensor out = at::empty({B}, a.options().dtype(at::kLong));
  if (B == 0) return out;
  // per-row arguments hold B values or one (broadcast over the rows)
  const at::Tensor lr = log_rel.to(at::kFloat).reshape({-1}).expand({B}).contiguous();
  const at::Tensor fl = floor.to(at::kFloat).reshape({-1}).expand({B}).contiguous();
  const float* lrp = lr.data_ptr<float>();
  const float* flp = fl.data_ptr<float>();

  const bool noise = seed.has_value();
  std::vector<uint32_t> keys;
  if (noise) {
    const at::Tensor sd = seed->to(at::kLong).reshape({-1}).expand({B}).contiguous();
    const int64_t st = step->to(at::kLong).reshape({}).item<int64_t>();
    keys.resize(B);
    for (int64_t b = 0; b < B; ++b) keys[b] = row_key(sd.data_ptr<int64_t>()[b], st);
  }

  Ctx cx{};
  cx.a = make_stream(a);
  cx.r = make_stream(r);
  cx.vocab = vocab;
  cx.nchunks = ceil_div(vocab, kChunk);
  cx.blocks_per_row = cx.nchunks * kBlocksPerChunk;
  cx.k = {simd::splat(static_cast<float>(ma)), simd::splat(static_cast<float>(mr)),
          simd::splat(static_cast<float>(sa)), simd::splat(static_cast<float>(sr))};
  const int flags = (ma != 0.0) | (mr != 0.0) << 1 | (sa != 0.0) << 2 | (sr != 0.0) << 3 |
                    int(noise) << 4;

  std::vector<uint8_t> prefilter(B);
  bool any_prefilter = false;
  for (int64_t b = 0; b < B; ++b) {
    prefilter[b] = lrp[b] != -kInf || flp[b] != -kInf;
    any_prefilter |= bool(prefilter[b]);
  }
  std::vector<float> chunk_max(B * cx.nchunks);
  std::unique_ptr<float[]> block_max;
  if (any_prefilter) block_max.reset(new float[B * cx.blocks_per_row]);
  std::vector<ChunkBest> best(B * cx.nchunks);
  std::vector<float> thr(B);
  cx.prefilter = prefilter.data();
  cx.keys = noise ? keys.data() : nullptr;
  cx.block_max = block_max.get();
  cx.chunk_max = chunk_max.data();
  cx.best = best.data();
  cx.thr = thr.data();

  const int64_t items = B * cx.nchunks;
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::min(vocab, kChunk));
  if (any_prefilter) {
    const Pass1Fn pass1 = kPass1[flags & 3];
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / cx.nchunks;
        if (prefilter[b]) pass1(cx, b, it % cx.nchunks);
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    float rel = -kInf;
    if (lrp[b] != -kInf) {
      float big = -kInf;
      for (int64_t c = 0; c < cx.nchunks; ++c) big = max_nonan(big, chunk_max[b * cx.nchunks + c]);
      rel = big + lrp[b];
    }
    // torch.maximum: NaN wins
    thr[b] = (std::isnan(flp[b]) || std::isnan(rel)) ? std::numeric_limits<float>::quiet_NaN()
                                                     : std::max(flp[b], rel);
  }
  const Pass2Fn pass2 = kPass2[flags];
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> noise_buf(noise ? kChunk : 0);
    std::array<int32_t, kBlocksPerChunk> blocks;
    for (int64_t it = begin; it < end; ++it) {
      pass2(cx, it / cx.nchunks, it % cx.nchunks, noise_buf.data(), blocks.data());
    }
  });

  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t id = -1;
    float score = -kInf;
    for (int64_t c = 0; c < cx.nchunks; ++c) {
      const ChunkBest& x = best[b * cx.nchunks + c];
      if (x.idx >= 0 && (id < 0 || x.score > score)) {  // earlier chunk wins ties
        id = c * kChunk + x.idx;
        score = x.score;
      }
    }
    o[b] = id;
  }
  return out;
}

}  // namespace aad_fast
