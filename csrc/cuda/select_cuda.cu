// Selection core on CUDA: reference.select_ref exactly (aad_fast/reference.py has the maths).
// The same three steps as the Triton kernels (kernels/select.py has the reasoning):
//
// 1. select_chunk_kernel, grid (B, n_chunks), kChunk ids per block read with 16-byte vector loads
//    where the row is contiguous and aligned: the chunk max of m (NaN ignored) and, when the row's
//    log_rel is -inf (exact) or the score reads no stream the mask does not (one pass, local
//    threshold max(floor, chunk_max + log_rel)), the chunk's best packed (score, id) key and that
//    token's m. AAD/Contrastive rows (m = a) read only a here.
// 2. select_fixup_kernel, grid (B, n_chunks): M = max of the row's chunk maxima,
//    t = max(floor, M + log_rel); a chunk with chunk_max >= t whose stored best is missing or has
//    m < t is scanned again with t, all such chunks in parallel.
// 3. select_combine_kernel, grid (B,): the largest key over the chunks with chunk_max >= t.
//
// Packed key (uint64, larger wins): high word the score mapped to an order-preserving uint32
// (NaN -> -inf, -0 -> +0), low word 0xFFFFFFFF - id (equal scores -> lowest id). A candidate's key
// is never 0, so 0 means "no candidate" and a -inf-score candidate still wins over none.
//
// Products and sums are rounded one by one (__fmul_rn / __fadd_rn: never contracted to an FMA,
// whatever --fmad says); the Gumbel log is logf, the function PyTorch's CUDA log kernel calls.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>

namespace aad_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;                    // ids per thread per chunk
constexpr int64_t kChunk = kThreads * kItems;  // 2048 ids per block
constexpr uint32_t kGolden = 0x9E3779B9u;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

struct Params {
  const void* a;
  const void* r;
  int64_t a_rs, a_cs, r_rs, r_cs;  // strides in elements
  int64_t vocab;
  float ma, mr, sa, sr;
  const float* log_rel;
  int64_t lr_s;
  const float* floor;
  int64_t fl_s;
  const int64_t* seed;  // nullptr: no noise
  int64_t seed_s;
  const int64_t* step;
  int64_t n_chunks;
  bool one_pass;               // the score reads no stream the mask does not
  unsigned long long* ws_key;  // [B, n_chunks]
  float* ws_cmax;              // [B, n_chunks]
  float* ws_bm;                // [B, n_chunks]
  int64_t* out;                // [B]
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---- the maths of reference.py -------------------------------------------------------------

// ca*a + cr*r with a zero coefficient's term dropped (no 0 * inf), each op rounded on its own.
__device__ __forceinline__ float linear2(float a, float r, float ca, float cr) {
  if (ca != 0.f) {
    float x = __fmul_rn(a, ca);
    return cr != 0.f ? __fadd_rn(x, __fmul_rn(r, cr)) : x;
  }
  return cr != 0.f ? __fmul_rn(r, cr) : 0.f;
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {  // lowbias32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t row_noise_key(const Params& p, int64_t row) {
  const uint32_t seed = static_cast<uint32_t>(p.seed[row * p.seed_s]);  // mod 2**32
  const uint32_t step = static_cast<uint32_t>(*p.step);
  return mix32(mix32(seed) ^ step);
}

__device__ __forceinline__ float gumbel(uint32_t key, uint32_t id) {
  const uint32_t h = mix32(key ^ (id * kGolden));
  const float u = __fmul_rn(__fadd_rn(static_cast<float>(h >> 9), 0.5f), 1.1920928955078125e-07f);
  return -logf(-logf(u));
}

// max(floor, big + log_rel), the relative part -inf when log_rel == -inf; NaN wins (torch.maximum).
__device__ __forceinline__ float threshold(float floor, float big, float log_rel) {
  const float rel = log_rel == neg_inf() ? neg_inf() : __fadd_rn(big, log_rel);
  if (isnan(floor) || isnan(rel)) return __int_as_float(0x7fc00000);
  return fmaxf(floor, rel);
}

__device__ __forceinline__ unsigned long long pack(float s, uint32_t id) {
  s = isnan(s) ? neg_inf() : s;
  s = s == 0.f ? 0.f : s;  // -0 ties with +0
  uint32_t b = __float_as_uint(s);
  b ^= (b & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u;
  return (static_cast<unsigned long long>(b) << 32) | (0xFFFFFFFFu - id);
}

// ---- loads: one chunk's m and s into registers ---------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

template <typename T, int N>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int64_t cs, int64_t col,
                                           int64_t vocab, bool vec, float (&out)[N]) {
  if (vec && col + N <= vocab) {
    const Pack<T, N> x = *reinterpret_cast<const Pack<T, N>*>(row + col);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = col + j < vocab ? to_f32(row[(col + j) * cs]) : 0.f;
  }
}

// Thread `tid` owns ids base + (u * kThreads + tid) * kVec + j, u < kUnroll, j < kVec: each warp
// load instruction covers a contiguous span, kVec ids of the wider type making 16 bytes.
template <typename TA, typename TR>
struct Chunk {
  static constexpr int kWide = sizeof(TA) > sizeof(TR) ? sizeof(TA) : sizeof(TR);
  static constexpr int kVec = 16 / kWide < kItems ? 16 / kWide : kItems;
  static constexpr int kUnroll = kItems / kVec;

  __device__ static __forceinline__ int64_t id(int64_t base, int i) {
    return base + ((i / kVec) * kThreads + static_cast<int64_t>(threadIdx.x)) * kVec + i % kVec;
  }

  // m (NaN and ids >= vocab -> -inf) and, with `with_s`, s (with noise) for the chunk starting
  // at `base`. Without `with_s` only the mask's streams are read.
  __device__ static __forceinline__ void load(const Params& p, int64_t row, int64_t base,
                                              uint32_t key, bool with_s, float (&m)[kItems],
                                              float (&s)[kItems]) {
    const TA* a_row = static_cast<const TA*>(p.a) + row * p.a_rs;
    const TR* r_row = static_cast<const TR*>(p.r) + row * p.r_rs;
    const bool use_a = p.ma != 0.f || (with_s && p.sa != 0.f);
    const bool use_r = p.mr != 0.f || (with_s && p.sr != 0.f);
    const bool vec = (!use_a || (p.a_cs == 1 && aligned<TA, kVec>(a_row))) &&
                     (!use_r || (p.r_cs == 1 && aligned<TR, kVec>(r_row)));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t col = base + (u * kThreads + static_cast<int64_t>(threadIdx.x)) * kVec;
      float av[kVec], rv[kVec];
      if (use_a) {
        load_group<TA, kVec>(a_row, p.a_cs, col, p.vocab, vec, av);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) av[j] = 0.f;
      }
      if (use_r) {
        load_group<TR, kVec>(r_row, p.r_cs, col, p.vocab, vec, rv);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) rv[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int i = u * kVec + j;
        const bool inside = col + j < p.vocab;
        const float mm = linear2(av[j], rv[j], p.ma, p.mr);
        m[i] = inside && !isnan(mm) ? mm : neg_inf();
        if (with_s) {
          float ss = linear2(av[j], rv[j], p.sa, p.sr);
          if (p.seed != nullptr && inside) {
            ss = __fadd_rn(ss, gumbel(key, static_cast<uint32_t>(col + j)));
          }
          s[i] = ss;
        }
      }
    }
  }
};

// ---- block reductions -------------------------------------------------------------------------

__device__ __forceinline__ float block_max(float x, float* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = x;
  __syncthreads();
  x = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) x = fmaxf(x, sh[w]);
  __syncthreads();  // sh may be reused
  return x;
}

// The largest key and the m that travels with it (keys of candidates are distinct).
__device__ __forceinline__ void block_best(unsigned long long& k, float& m,
                                           unsigned long long* sh_k, float* sh_m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, k, o);
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    if (k2 > k) {
      k = k2;
      m = m2;
    }
  }
  if (threadIdx.x % 32 == 0) {
    sh_k[threadIdx.x / 32] = k;
    sh_m[threadIdx.x / 32] = m;
  }
  __syncthreads();
  k = sh_k[0];
  m = sh_m[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (sh_k[w] > k) {
      k = sh_k[w];
      m = sh_m[w];
    }
  }
  __syncthreads();
}

// ---- kernels ----------------------------------------------------------------------------------

// Best candidate (m >= t, m > -inf) of a chunk held in registers: this thread's key and m.
template <typename TA, typename TR>
__device__ __forceinline__ void thread_best(const float (&m)[kItems], const float (&s)[kItems],
                                            int64_t base, float t, unsigned long long& best,
                                            float& best_m) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (m[i] > neg_inf() && m[i] >= t) {
      const unsigned long long k = pack(s[i], static_cast<uint32_t>(Chunk<TA, TR>::id(base, i)));
      if (k > best) {
        best = k;
        best_m = m[i];
      }
    }
  }
}

// t of a row from its chunk maxima (every thread gets it).
__device__ __forceinline__ float row_threshold(const Params& p, int64_t row, float* sh) {
  const int64_t ws = row * p.n_chunks;
  float lm = neg_inf();
  for (int64_t c = threadIdx.x; c < p.n_chunks; c += kThreads) lm = fmaxf(lm, p.ws_cmax[ws + c]);
  const float big = block_max(lm, sh);
  return threshold(p.floor[row * p.fl_s], big, p.log_rel[row * p.lr_s]);
}

template <typename TA, typename TR>
__global__ void __launch_bounds__(kThreads) select_chunk_kernel(const Params p) {
  __shared__ float sh_f[kWarps];
  __shared__ unsigned long long sh_k[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t base = chunk * kChunk;
  const float log_rel = p.log_rel[row * p.lr_s];
  const bool with_s = p.one_pass || log_rel == neg_inf();  // block-uniform
  const uint32_t key = p.seed != nullptr && with_s ? row_noise_key(p, row) : 0u;
  float m[kItems], s[kItems];
  Chunk<TA, TR>::load(p, row, base, key, with_s, m, s);
  float lm = neg_inf();
#pragma unroll
  for (int i = 0; i < kItems; ++i) lm = fmaxf(lm, m[i]);
  const float cmax = block_max(lm, sh_f);
  unsigned long long best = 0;
  float best_m = neg_inf();
  if (with_s) {
    const float t = threshold(p.floor[row * p.fl_s], cmax, log_rel);
    thread_best<TA, TR>(m, s, base, t, best, best_m);
    block_best(best, best_m, sh_k, sh_f);
  }
  if (threadIdx.x == 0) {
    const int64_t w = row * p.n_chunks + chunk;
    p.ws_key[w] = best;
    p.ws_cmax[w] = cmax;
    p.ws_bm[w] = best_m;
  }
}

template <typename TA, typename TR>
__global__ void __launch_bounds__(kThreads) select_fixup_kernel(const Params p) {
  __shared__ float sh_f[kWarps];
  __shared__ unsigned long long sh_k[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t w = row * p.n_chunks + chunk;
  const float t = row_threshold(p, row, sh_f);
  const float cm = p.ws_cmax[w];
  if (!(cm > neg_inf() && cm >= t) || p.ws_bm[w] >= t) return;  // block-uniform
  const int64_t base = chunk * kChunk;
  const uint32_t key = p.seed != nullptr ? row_noise_key(p, row) : 0u;
  float m[kItems], s[kItems];
  Chunk<TA, TR>::load(p, row, base, key, true, m, s);
  unsigned long long best = 0;
  float best_m = neg_inf();
  thread_best<TA, TR>(m, s, base, t, best, best_m);
  block_best(best, best_m, sh_k, sh_f);
  if (threadIdx.x == 0) {
    p.ws_key[w] = best;
    p.ws_bm[w] = cm;  // the chunk's best is exact now: mark it valid (cm >= t)
  }
}

__global__ void __launch_bounds__(kThreads) select_combine_kernel(const Params p) {
  __shared__ float sh_f[kWarps];
  __shared__ unsigned long long sh_k[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t ws = row * p.n_chunks;
  const float t = row_threshold(p, row, sh_f);
  unsigned long long best = 0;
  for (int64_t c = threadIdx.x; c < p.n_chunks; c += kThreads) {
    const float cm = p.ws_cmax[ws + c];
    if (cm > neg_inf() && cm >= t && p.ws_bm[ws + c] >= t) best = max(best, p.ws_key[ws + c]);
  }
  float unused = 0.f;
  block_best(best, unused, sh_k, sh_f);
  if (threadIdx.x == 0) {
    p.out[row] = best == 0 ? -1 : static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(best));
  }
}

template <typename TA, typename TR>
void launch(const Params& p, int64_t batch, cudaStream_t stream) {
  const dim3 grid1(static_cast<unsigned>(batch), static_cast<unsigned>(p.n_chunks));
  select_chunk_kernel<TA, TR><<<grid1, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  select_fixup_kernel<TA, TR><<<grid1, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  select_combine_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TA>
void dispatch_r(const Params& p, int64_t batch, at::ScalarType tr, cudaStream_t stream) {
  switch (tr) {
    case at::kFloat: return launch<TA, float>(p, batch, stream);
    case at::kHalf: return launch<TA, __half>(p, batch, stream);
    case at::kBFloat16: return launch<TA, __nv_bfloat16>(p, batch, stream);
    default: TORCH_CHECK(false, "aad_fast_cuda: unsupported dtype of r: ", tr);
  }
}

}  // namespace

int64_t max_vocab() { return int64_t(65535) * kChunk; }

// Arguments are checked in bindings_cuda.cpp (devices, shapes, dtypes); the caller holds the
// device guard. log_rel, floor: float32 with numel 1 or B; seed int64 numel 1 or B; step int64
// numel 1. Allocates the output and a small workspace with the caching allocator (graph-safe).
at::Tensor select_cuda(const at::Tensor& a, const at::Tensor& r, int64_t vocab, double ma,
                       double mr, double sa, double sr, const at::Tensor& log_rel,
                       const at::Tensor& floor, const std::optional<at::Tensor>& seed,
                       const std::optional<at::Tensor>& step) {
  const int64_t batch = a.size(0);
  at::Tensor out = at::empty({batch}, a.options().dtype(at::kLong));
  if (batch == 0) return out;
  const int64_t n_chunks = (vocab + kChunk - 1) / kChunk;
  at::Tensor ws = at::empty({2 * batch * n_chunks}, a.options().dtype(at::kLong));
  Params p;
  p.a = a.data_ptr();
  p.r = r.data_ptr();
  p.a_rs = a.stride(0);
  p.a_cs = a.stride(1);
  p.r_rs = r.stride(0);
  p.r_cs = r.stride(1);
  p.vocab = vocab;
  p.ma = static_cast<float>(ma);
  p.mr = static_cast<float>(mr);
  p.sa = static_cast<float>(sa);
  p.sr = static_cast<float>(sr);
  p.log_rel = log_rel.data_ptr<float>();
  p.lr_s = log_rel.numel() == 1 ? 0 : log_rel.stride(0);
  p.floor = floor.data_ptr<float>();
  p.fl_s = floor.numel() == 1 ? 0 : floor.stride(0);
  p.seed = seed.has_value() ? seed->data_ptr<int64_t>() : nullptr;
  p.seed_s = seed.has_value() && seed->numel() != 1 ? seed->stride(0) : 0;
  p.step = step.has_value() ? step->data_ptr<int64_t>() : nullptr;
  p.n_chunks = n_chunks;
  p.one_pass = (p.sa == 0.f || p.ma != 0.f) && (p.sr == 0.f || p.mr != 0.f);
  int64_t* w = ws.data_ptr<int64_t>();
  p.ws_key = reinterpret_cast<unsigned long long*>(w);
  p.ws_cmax = reinterpret_cast<float*>(w + batch * n_chunks);
  p.ws_bm = p.ws_cmax + batch * n_chunks;
  p.out = out.data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (a.scalar_type()) {
    case at::kFloat: dispatch_r<float>(p, batch, r.scalar_type(), stream); break;
    case at::kHalf: dispatch_r<__half>(p, batch, r.scalar_type(), stream); break;
    case at::kBFloat16: dispatch_r<__nv_bfloat16>(p, batch, r.scalar_type(), stream); break;
    default: TORCH_CHECK(false, "aad_fast_cuda: unsupported dtype of a: ", a.scalar_type());
  }
  return out;
}

}  // namespace aad_fast_cuda
