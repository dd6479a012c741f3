// Four-lane float32/int32 vectors on GCC/Clang vector extensions: SSE2 on x86-64, NEON on arm64,
// with no -march flag, so the built extension runs on any CPU of its architecture.
// Only exact IEEE operations: no FMA (the build uses -ffp-contract=off), no fast-math.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace aad_fast {
namespace simd {

using f32x4 = float __attribute__((vector_size(16)));
using i32x4 = int32_t __attribute__((vector_size(16)));
using u32x4 = uint32_t __attribute__((vector_size(16)));
using u16x4 = uint16_t __attribute__((vector_size(8)));

inline f32x4 splat(float x) { return f32x4{x, x, x, x}; }
inline i32x4 splat_i(int32_t x) { return i32x4{x, x, x, x}; }
inline i32x4 iota() { return i32x4{0, 1, 2, 3}; }

inline f32x4 loadu(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storeu(float* p, f32x4 v) { std::memcpy(p, &v, sizeof(v)); }

// mask ? x : y, lane by lane; mask lanes are all ones or all zeros (a comparison result).
inline f32x4 select(i32x4 mask, f32x4 x, f32x4 y) {
  return reinterpret_cast<f32x4>((reinterpret_cast<i32x4>(x) & mask) |
                                 (reinterpret_cast<i32x4>(y) & ~mask));
}
inline i32x4 select(i32x4 mask, i32x4 x, i32x4 y) { return (x & mask) | (y & ~mask); }

// max(acc, x) for an accumulator that is never NaN: x > acc ? x : acc, so a NaN x leaves acc
// unchanged. That is exactly the rule of x86 maxps(x, acc), which compilers do not emit for the
// ternary on their own.
inline f32x4 max_into(f32x4 acc, f32x4 x) {
#if defined(__SSE__)
  return reinterpret_cast<f32x4>(_mm_max_ps(reinterpret_cast<__m128>(x),
                                            reinterpret_cast<__m128>(acc)));
#else
  return select(x > acc, x, acc);
#endif
}

inline float hmax(f32x4 x) {  // no NaN lanes
  x = max_into(x, __builtin_shufflevector(x, x, 2, 3, 0, 1));
  x = max_into(x, __builtin_shufflevector(x, x, 1, 0, 3, 2));
  return x[0];
}

inline bool any(i32x4 mask) {
#if defined(__SSE__)
  return _mm_movemask_ps(reinterpret_cast<__m128>(mask)) != 0;
#else
  return (mask[0] | mask[1] | mask[2] | mask[3]) != 0;
#endif
}

// NaN -> -inf (NaN is the only value not equal to itself).
inline f32x4 nan_to_ninf(f32x4 x) {
  return select(x == x, x, splat(-std::numeric_limits<float>::infinity()));
}

// IEEE half bits -> float32, exact (the branch-free conversion of the FP16 library, which c10
// uses too): normal numbers, infinities and NaN by rebiasing the exponent, subnormals through a
// float subtraction that is exact.
inline f32x4 half_to_float(u32x4 h) {
  const u32x4 w = h << 16;
  const u32x4 sign = w & 0x80000000u;
  const u32x4 two_w = w + w;
  const f32x4 normal =
      reinterpret_cast<f32x4>((two_w >> 4) + (0xE0u << 23)) * splat(0x1.0p-112f);
  const f32x4 subnormal = reinterpret_cast<f32x4>((two_w >> 17) | (126u << 23)) - splat(0.5f);
  const i32x4 is_sub = reinterpret_cast<i32x4>((h & 0x7C00u) == 0u);  // zero exponent
  return reinterpret_cast<f32x4>(sign | reinterpret_cast<u32x4>(select(is_sub, subnormal, normal)));
}

inline f32x4 bfloat16_to_float(u32x4 h) { return reinterpret_cast<f32x4>(h << 16); }

// n (a multiple of 4) 16-bit floats -> float32; Half: IEEE half, else bfloat16.
template <bool Half>
inline void widen16(const uint16_t* in, int n, float* out) {
  for (int j = 0; j < n; j += 4) {
    u16x4 v;
    std::memcpy(&v, in + j, sizeof(v));
    const u32x4 h = __builtin_convertvector(v, u32x4);
    storeu(out + j, Half ? half_to_float(h) : bfloat16_to_float(h));
  }
}

}  // namespace simd
}  // namespace aad_fast
