// The CPU kernel of lgd_fast::squeeze_excite (autograd and the fake kernel: lgd_fast/ops/squeeze_excite.py).
//
// squeeze_excite(x, w1, b1, w2, b2, silu), x: (N, C, T, H, W), w1: (R, C), w2: (C, R):
//   m = mean of x over (T, H, W)                          (N, C)   one read of x (global_avg_pool.cpp's sums)
//   s = sigmoid(w2 relu(w1 m + b1) + b2)                  (N, C)   a few thousand multiply-adds, in float32
//   out = silu(x * s) if silu else x * s                           one read of x, one write of out
// where PyTorch's modules take a mean, two convolutions, a ReLU, a sigmoid, a product and a SiLU: seven calls and
// two more passes over x. silu(x) = x / (1 + exp(-x)), computed in float32 (bfloat16 widened, rounded once).
//
// exp is this file's own: exp(t) = 2^k * exp(r), k = round(t / ln 2), r = t - k ln 2 (ln 2 in two parts), exp(r)
// by its Taylor polynomial to degree 7 (truncation below 1e-8 relative on |r| <= ln 2 / 2), 2^k put together
// from its bits; t is clamped to [-87, 88] so that 2^k stays a normal float. Its error is that of the float32
// arithmetic, about an ulp (tests/test_op_squeeze_excite.py holds it to twice PyTorch's SiLU error). SiLU of
// v < -88, where exp(-v) would pass the clamp, is v * 0 as PyTorch's v * sigmoid(v) (-0, and NaN for -inf).
//
// The elementwise loops are compiled once per SIMD path (AVX-512, AVX2, baseline x86-64; isa.h), and a vector's
// worth of tail runs through the same vector code on a padded copy, so every element gets the same arithmetic
// wherever it sits. float64 inputs (for exact checks) run plain scalar loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "simd.h"
#include "small_linear.h"
#include "tensor_dispatch.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {

at::Tensor channel_means_f32(const at::Tensor& x);  // global_avg_pool.cpp

namespace {

using simd::vf;

constexpr int64_t kTaskElems = 16384;  // elements a task scales (a multiple of every vector width)

// exp(t), W lanes (see the top of the file). Its multiply-adds are fused where the path has FMA: setup.py's ISO
// C++ mode contracts nothing unless asked, and asking here keeps the rest of the extension as it was.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
template <int W>
LGD_INLINE vf<W> vexp(vf<W> t) {
  using V = vf<W>;
  using U = typename simd::Vec<W>::U;
  const V hi = V{} + 88.0f, lo = V{} - 87.0f;
  t = (t > hi) ? hi : t;  // NaN compares false and stays NaN
  t = (t < lo) ? lo : t;
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  V k = t * 1.44269504088896341f + shifter;
  U kbits;
  std::memcpy(&kbits, &k, sizeof(kbits));
  k -= shifter;
  // ln 2 = 0.693145751953125 (15 bits: k times it is exact) + 1.4286068203e-06
  V r = t - k * 0.693145751953125f;
  r = r - k * 1.428606820309417e-06f;
  V p = V{} + (1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = p * r + c;
  }
  const U bits = (kbits - 0x4B400000u + 127u) << 23;  // k + 127 in the exponent field: 2^k
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <int W>
LGD_INLINE vf<W> vsilu(vf<W> v) {
  const vf<W> s = v / (1.0f + vexp<W>(-v));
  return (v < -88.0f) ? v * 0.0f : s;
}
#pragma GCC pop_options

// out[i] = f(x[i] * scale[i]) for one vector; scale: W lanes (a C-vector slice or one value broadcast).
template <typename T, int W>
LGD_INLINE void scaled_vector(const T* x, T* out, vf<W> scale, bool silu) {
  vf<W> v = simd::load<W>(x) * scale;
  if (silu) v = vsilu<W>(v);
  simd::store<W>(out, v);
}

// The last n < W elements through the same vector code, on a zero-padded copy.
template <typename T, int W>
LGD_INLINE void scaled_tail(const T* x, T* out, const float* scale, float scalar, int64_t n, bool silu) {
  T xs[W] = {};
  T os[W];
  float ss[W];
  std::memcpy(xs, x, n * sizeof(T));
  for (int i = 0; i < W; ++i) ss[i] = scale ? (i < n ? scale[i] : 1.0f) : scalar;
  scaled_vector<T, W>(xs, os, simd::load<W>(ss), silu);
  std::memcpy(out, os, n * sizeof(T));
}

// A run of n elements, all times one scale (contiguous x: one (n, c) row, or any stretch of a flat tensor).
template <typename T, int W>
LGD_INLINE void segment_body(const T* __restrict__ x, T* __restrict__ out, int64_t n, float scale, bool silu) {
  const vf<W> s = vf<W>{} + scale;
  int64_t i = 0;
  for (; i + W <= n; i += W) scaled_vector<T, W>(x + i, out + i, s, silu);
  if (i < n) scaled_tail<T, W>(x + i, out + i, nullptr, scale, n - i, silu);
}

// positions [p0, p1) of one channels-last sample: each a C-vector times scale[0:C].
template <typename T, int W>
LGD_INLINE void positions_body(const T* __restrict__ x, T* __restrict__ out, const float* __restrict__ scale,
                               int64_t p0, int64_t p1, int64_t C, bool silu) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* xr = x + p * C;
    T* orow = out + p * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) scaled_vector<T, W>(xr + c, orow + c, simd::load<W>(scale + c), silu);
    if (c < C) scaled_tail<T, W>(xr + c, orow + c, scale + c, 0.0f, C - c, silu);
  }
}

#define LGD_DEFINE_SCALE_LOOPS(SUFFIX, TARGET, W)                                                                  \
  template <typename T>                                                                                         \
  TARGET void segment_##SUFFIX(const T* x, T* out, int64_t n, float scale, bool silu) {                        \
    segment_body<T, W>(x, out, n, scale, silu);                                                                 \
  }                                                                                                             \
  template <typename T>                                                                                         \
  TARGET void positions_##SUFFIX(const T* x, T* out, const float* scale, int64_t p0, int64_t p1, int64_t C,     \
                                 bool silu) {                                                                   \
    positions_body<T, W>(x, out, scale, p0, p1, C, silu);                                                       \
  }

LGD_DEFINE_SCALE_LOOPS(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_SCALE_LOOPS(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_SCALE_LOOPS(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void segment(const T* x, T* out, int64_t n, float scale, bool silu) {
  LGD_CALL_FOR_ISA(segment, T, x, out, n, scale, silu);
}

template <typename T>
void positions(const T* x, T* out, const float* scale, int64_t p0, int64_t p1, int64_t C, bool silu) {
  LGD_CALL_FOR_ISA(positions, T, x, out, scale, p0, p1, C, silu);
}

// ---- the elementwise pass over x, for each layout -------------------------------------------------------

// x, out: rows x L (contiguous); row r scaled by scale[r].
template <typename T>
void scale_rows(const T* x, T* out, const float* scale, int64_t rows, int64_t L, bool silu) {
  const int64_t chunk = kTaskElems, chunks = (L + chunk - 1) / chunk;  // long rows split, few rows still fill threads
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, std::min(L, chunk)));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / chunks, start = (i % chunks) * chunk;
      const int64_t off = r * L + start;
      segment<T>(x + off, out + off, std::min(chunk, L - start), scale[r], silu);
    }
  });
}

// x, out: N x P x C (channels_last_3d); sample n's positions scaled by scale[n, :].
template <typename T>
void scale_channels_last(const T* x, T* out, const float* scale, int64_t N, int64_t P, int64_t C, bool silu) {
  const int64_t per_task = std::max<int64_t>(1, kTaskElems / C), chunks = (P + per_task - 1) / per_task;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, p0 = (i % chunks) * per_task;
      positions<T>(x + n * P * C, out + n * P * C, scale + n * C, p0, std::min(P, p0 + per_task), C, silu);
    }
  });
}

// ---- the excitation: s = sigmoid(w2 relu(w1 m + b1) + b2), (N, C) from the (N, C) means ------------------

// m (N, K) float32 times w^T (w: (O, K), any float dtype) plus b: small_linear's few-row kernel (float32 sums
// over vector lanes) where it applies, else ATen's addmm.
at::Tensor linear_f32(const at::Tensor& m, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const at::Tensor bf = b ? b->to(at::kFloat).contiguous() : at::zeros({w.size(0)}, wf.options());
  if (small_linear_applies(m, wf, bf)) return small_linear(m, wf, bf);
  return at::addmm(bf, m, wf.t());
}

at::Tensor excitation(const at::Tensor& m, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  if (m.scalar_type() == at::kDouble) {
    const auto d = [](const std::optional<at::Tensor>& t) {
      return t ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
    };
    return at::sigmoid(at::linear(at::relu(at::linear(m, w1.to(at::kDouble), d(b1))), w2.to(at::kDouble), d(b2)));
  }
  at::Tensor h = linear_f32(m, w1, b1);
  float* hp = h.mutable_data_ptr<float>();
  for (int64_t i = 0; i < h.numel(); ++i) hp[i] = simd::relu1(hp[i]);
  at::Tensor s = linear_f32(h.contiguous(), w2, b2).contiguous();
  float* sp = s.mutable_data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i) sp[i] = 1.0f / (1.0f + std::exp(-sp[i]));
  return s;
}

// ---- checks and the ops ------------------------------------------------------------------------------

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "squeeze_excite: x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, "squeeze_excite: x must be a dense (strided) tensor, got layout ",
              x.layout());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "squeeze_excite: x must have dtype float32, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 5, "squeeze_excite: x must be a 5-D tensor (N, C, T, H, W), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast3d),
              "squeeze_excite: x must be contiguous or channels_last_3d, got shape ", x.sizes(), " with strides ",
              x.strides(), "; call x.contiguous() first");
}

void check_weight(const char* name, const at::Tensor& w, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(w.device() == x.device(), "squeeze_excite: ", name, " must be on x's device (", x.device(),
              "), got ", w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, "squeeze_excite: ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", w.scalar_type());
  TORCH_CHECK(w.sizes() == shape, "squeeze_excite: ", name, " must have shape ", shape, ", got ", w.sizes());
}

at::Tensor squeeze_excite_cpu(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                              const at::Tensor& w2, const std::optional<at::Tensor>& b2, bool silu) {
  check_x(x);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3) * x.size(4);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w1.size(0) > 0,
              "squeeze_excite: w1 must have shape (R, C) with C = x.size(1) = ", C, " and R > 0, got ", w1.sizes());
  const int64_t R = w1.size(0);
  check_weight("w1", w1, x, {R, C});
  check_weight("w2", w2, x, {C, R});
  if (b1) check_weight("b1", *b1, x, {R});
  if (b2) check_weight("b2", *b2, x, {C});

  at::Tensor out = at::empty_like(x);  // x's memory format
  if (x.numel() == 0) return out;
  const at::Tensor m = x.scalar_type() == at::kDouble ? x.mean({2, 3, 4}) : channel_means_f32(x);
  const at::Tensor s = excitation(m, w1, b1, w2, b2);
  const bool channels_last = is_channels_last(x);
  if (x.scalar_type() == at::kDouble) {
    const at::Tensor v = x * s.view({N, C, 1, 1, 1});
    return out.copy_(silu ? v * at::sigmoid(v) : v);
  }
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float* sp = s.const_data_ptr<float>();
    if (channels_last) {
      scale_channels_last<T>(x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), sp, N, P, C, silu);
    } else {
      scale_rows<T>(x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), sp, N * C, P, silu);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("squeeze_excite", &squeeze_excite_cpu);
}

}  // namespace lgd_fast
