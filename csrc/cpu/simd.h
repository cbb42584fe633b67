// SIMD building blocks of the CPU kernels (csrc/cpu/diffusion_epilogue.cpp, csrc/cpu/batch_norm_train.cpp):
// float32 vectors of W lanes written with GCC/Clang vector extensions, W = 16 / 8 / 4 for AVX-512 / AVX2 / SSE2
// (each kernel compiles its loops once per width inside target-marked functions, isa.h), loads and stores of
// float32 and bfloat16 (widened by a shift, narrowed by round-to-nearest-even as c10::BFloat16), ReLU, horizontal
// sums, scalar twins for the tails, and LGD_CALL_FOR_ISA, the switch between the compiled copies.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "isa.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {
namespace simd {

// ---- SIMD building blocks: float32 vectors of W lanes, W = 16 / 8 / 4 for AVX-512 / AVX2 / SSE2 -------------
// (a vector wider than the target's registers is split by the compiler into halves kept in memory, which
// costs several times the memory traffic here, so each path gets its native width).

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

// Vec<W>: F, W float32 lanes; U, as many uint32 lanes (the bits); H, as many uint16 lanes (bfloat16 bits);
// H2, F seen as 2W uint16 halves.
template <int W>
struct Vec;
template <>
struct Vec<4> {
  using F = f32x4;
  using U = u32x4;
  using H = u16x4;
  using H2 = u16x8;
};
template <>
struct Vec<8> {
  using F = f32x8;
  using U = u32x8;
  using H = u16x8;
  using H2 = u16x16;
};
template <>
struct Vec<16> {
  using F = f32x16;
  using U = u32x16;
  using H = u16x16;
  using H2 = u16x32;
};

template <int W>
using vf = typename Vec<W>::F;

template <int W>
LGD_INLINE vf<W> load(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 is the top half of a float32: widening interleaves zeros below each value (punpcklwd and kin;
// the plain zero-extend-and-shift compiles to slow code without AVX-512).
template <typename H2, typename H, int W, size_t... K>
LGD_INLINE H2 zeros_below(const H& h, std::index_sequence<K...>) {
  return __builtin_shufflevector(H{}, h, ((K % 2) ? W + K / 2 : K / 2)...);
}

template <int W>
LGD_INLINE vf<W> load(const c10::BFloat16* p) {
  typename Vec<W>::H h;
  std::memcpy(&h, p, sizeof(h));
  const auto bits = zeros_below<typename Vec<W>::H2, typename Vec<W>::H, W>(h, std::make_index_sequence<2 * W>{});
  vf<W> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The upper uint16 half of every uint32 lane: narrowing a float32 to its bfloat16 bits.
template <typename H, typename H2, size_t... K>
LGD_INLINE H upper_halves(const H2& v, std::index_sequence<K...>) {
  return __builtin_shufflevector(v, v, (2 * K + 1)...);
}

// Stores v and returns the values as stored (read back), which is what the mean averages.
template <int W>
LGD_INLINE vf<W> store(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof(v));
  return v;
}

// Round to nearest even as c10::BFloat16 does: add 0x7fff plus the lowest kept bit, drop the low half;
// NaN becomes the quiet NaN 0x7fc0.
template <int W>
LGD_INLINE vf<W> store(c10::BFloat16* p, vf<W> v) {
  using U = typename Vec<W>::U;
  U u;
  std::memcpy(&u, &v, sizeof(u));
  U kept = (u + (((u >> 16) & 1u) + 0x7fffu)) & 0xffff0000u;
  const U qnan = U{} + 0x7fc00000u;
  kept = (v != v) ? qnan : kept;
  typename Vec<W>::H2 halves;
  std::memcpy(&halves, &kept, sizeof(halves));
  const auto h = upper_halves<typename Vec<W>::H>(halves, std::make_index_sequence<W>{});
  std::memcpy(p, &h, sizeof(h));
  vf<W> stored;
  std::memcpy(&stored, &kept, sizeof(stored));
  return stored;
}

template <typename V>
LGD_INLINE V relu(V v) {
  const V zero = {};
  return (v < zero) ? zero : v;  // NaN stays NaN, as torch.relu
}

template <typename Half, typename Full>
LGD_INLINE Half fold_halves(const Full& v) {
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(Half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  return lo + hi;
}

LGD_INLINE float hsum(const f32x4& q) { return (q[0] + q[1]) + (q[2] + q[3]); }
LGD_INLINE float hsum(const f32x8& v) { return hsum(fold_halves<f32x4>(v)); }
LGD_INLINE float hsum(const f32x16& v) { return hsum(fold_halves<f32x8>(v)); }

// Scalar versions for the tails that do not fill a vector (same arithmetic, same rounding).
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline float store1(float* p, float v) {
  *p = v;
  return v;
}
inline float store1(c10::BFloat16* p, float v) {
  *p = c10::BFloat16(v);
  return static_cast<float>(*p);
}
inline float relu1(float v) { return v < 0.f ? 0.f : v; }

}  // namespace simd
}  // namespace lgd_fast

// NAME##_<path><T>(args) for the path current_isa() names (each NAME##_<path> defined by the kernel file).
#ifdef LGD_X86_DISPATCH
#define LGD_CALL_FOR_ISA(NAME, T, ...)          \
  switch (current_isa()) {                      \
    case CpuIsa::kAvx512:                       \
      return NAME##_avx512<T>(__VA_ARGS__);     \
    case CpuIsa::kAvx2:                         \
      return NAME##_avx2<T>(__VA_ARGS__);       \
    default:                                    \
      return NAME##_baseline<T>(__VA_ARGS__);   \
  }
#else
#define LGD_CALL_FOR_ISA(NAME, T, ...) return NAME##_baseline<T>(__VA_ARGS__)
#endif
