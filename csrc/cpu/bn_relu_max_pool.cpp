// CPU kernels of lgd_fast::bn_relu_max_pool (lgd_fast/ops/bn_relu_max_pool.py): an LGD stem's BatchNorm, ReLU and
// 1x3x3 max-pool (stride (1, 2, 2), padding (0, 1, 1)) after conv1, forward and backward, for training.
//
//   bn_relu_max_pool(y, scale, shift)      -> out = max over each 3x3 window of relu(y * scale_c + shift_c),
//                                             arg = the window's tap (kh * 3 + kw) of its first largest
//                                             pre-ReLU value where that value is > 0, else 255 (no gradient)
//   ..._backward_sums(grad, arg, y, mean)  -> (2, C) float64: sum g' and sum g' * (y - mean_c) over the taps the
//                                             gradient reaches (g' = grad routed to its window's tap)
//   ..._backward_apply(grad, arg, y, mean, k, p, q)
//                                          -> dx = k_c * dy + p_c * (y - mean_c) + q_c, dy = the gradient
//                                             routed back (the sum of the windows whose tap is this position)
//
// BatchNorm's training backward through it is apply with k = w * invstd, p = -k * invstd * mean_gx and
// q = -k * mean_g (mean_g, mean_gx the sums over the count), which the caller forms; eval is p = q = 0.
//
// Passes: the forward reads y once (each value from up to four windows, in the caches) and writes the pooled
// output and one byte per pooled value; the sums read the pooled gradient and bytes and y at the taps; apply reads
// y once, the pooled gradient and bytes, and writes dx once, each dx value gathered from the (one, two or four)
// windows that cover it, so nothing is scattered and every value is rounded once. ATen runs BatchNorm, ReLU and
// the pool as six passes over y-sized tensors each way.
//
// Tensors: y, dx (N, C, T, H, W); out, arg, grad (N, C, T, H', W'), H' = (H - 1) / 2 + 1; float32 or bfloat16
// (arithmetic in float32, each output rounded once), contiguous or channels_last_3d (y's layout is every output's).
// channels_last_3d runs W float32 lanes of channels at a time, compiled per SIMD path (isa.h); contiguous runs
// the same arithmetic one value at a time. Per-channel sums are float32 over one pooled row, then float64 in an
// order the shape fixes (not the thread count): bitwise reproducible.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "isa.h"
#include "simd.h"
#include "tensor_dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#ifdef LGD_X86_DISPATCH
#include <immintrin.h>
#endif
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {
namespace {

using namespace simd;

constexpr uint8_t kNoTap = 255;
constexpr int64_t kTaskValues = 16384;  // values read per task at least, where the rows allow

typedef uint8_t u8x4 __attribute__((vector_size(4)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
template <int W>
struct Bytes;
template <>
struct Bytes<4> {
  using B = u8x4;
};
template <>
struct Bytes<8> {
  using B = u8x8;
};
template <>
struct Bytes<16> {
  using B = u8x16;
};

#ifdef LGD_X86_DISPATCH
// The tap bytes widened to uint32 lanes as one vpmovzxbd. (GCC 12 builds __builtin_convertvector's uint8 to
// uint32 from scalar inserts, and a byte shuffle through the stack with a stalled store-to-load forward.) Plain
// inline, not always_inline: GCC inlines these once the generic loops are inlined into their target's function.
LGD_TARGET_AVX512 inline Vec<16>::U widen_taps16(const uint8_t* p) {
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  Vec<16>::U u;
  std::memcpy(&u, &wide, sizeof(u));
  return u;
}

LGD_TARGET_AVX2 inline Vec<8>::U widen_taps8(const uint8_t* p) {
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  Vec<8>::U u;
  std::memcpy(&u, &wide, sizeof(u));
  return u;
}
#endif

template <int W>
LGD_INLINE typename Vec<W>::U load_taps(const uint8_t* p) {
#ifdef LGD_X86_DISPATCH
  if constexpr (W == 16) {
    return widen_taps16(p);
  } else if constexpr (W == 8) {
    return widen_taps8(p);
  }
#endif
  typename Bytes<W>::B b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, typename Vec<W>::U);
}

template <int W>
LGD_INLINE void store_taps(uint8_t* p, typename Vec<W>::U u) {
  const auto b = __builtin_convertvector(u, typename Bytes<W>::B);
  std::memcpy(p, &b, sizeof(b));
}

// Sizes and element strides: y's (and dx's) over (n, c, t, h, w), and the pooled tensors' (out, arg, grad).
struct Geometry {
  int64_t N, C, T, H, W, Ho, Wo;
  int64_t ys[5], ps[5];
  bool cl;
};

// The windows whose tap is input row h (or column): pooled index and tap, one or two of them.
struct Cover {
  int count;
  int64_t at[2];
  int tap[2];
};

inline Cover cover(int64_t h, int64_t Ho) {
  Cover c{0, {0, 0}, {0, 0}};
  if (h % 2 == 0) {  // tap 1 of window h / 2
    c.at[c.count] = h / 2, c.tap[c.count++] = 1;
  } else {  // tap 2 of window (h - 1) / 2, tap 0 of window (h + 1) / 2
    c.at[c.count] = (h - 1) / 2, c.tap[c.count++] = 2;
    if ((h + 1) / 2 < Ho) c.at[c.count] = (h + 1) / 2, c.tap[c.count++] = 0;
  }
  return c;
}

// ---- one value at a time (contiguous tensors, and the channels a vector does not fill) ---------------------------

template <typename T>
inline void forward_one(const T* y, const Geometry& g, const float* scale, const float* shift, T* out, uint8_t* arg,
                        int64_t n, int64_t c, int64_t t, int64_t ho, int64_t wo) {
  const T* yy = y + n * g.ys[0] + c * g.ys[1] + t * g.ys[2];
  float m = -INFINITY;
  int tap = 0;
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t h = 2 * ho - 1 + kh;
    if (h < 0 || h >= g.H) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const int64_t w = 2 * wo - 1 + kw;
      if (w < 0 || w >= g.W) continue;
      const float z = load1(yy + h * g.ys[3] + w * g.ys[4]) * scale[c] + shift[c];
      if (z > m || z != z) m = z, tap = kh * 3 + kw;  // the first largest, NaN taken, as ATen's max-pool
    }
  }
  const int64_t o = n * g.ps[0] + c * g.ps[1] + t * g.ps[2] + ho * g.ps[3] + wo * g.ps[4];
  store1(out + o, (m > 0.f || m != m) ? m : 0.f);
  arg[o] = m > 0.f ? static_cast<uint8_t>(tap) : kNoTap;
}

template <typename T>
inline void sums_one(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean, int64_t n,
                     int64_t c, int64_t t, int64_t ho, int64_t wo, float& sg, float& sgy) {
  const int64_t o = n * g.ps[0] + c * g.ps[1] + t * g.ps[2] + ho * g.ps[3] + wo * g.ps[4];
  const uint8_t tap = arg[o];
  if (tap == kNoTap) return;
  const int64_t h = 2 * ho - 1 + tap / 3, w = 2 * wo - 1 + tap % 3;
  const float gv = load1(grad + o);
  sg += gv;
  sgy += gv * (load1(y + n * g.ys[0] + c * g.ys[1] + t * g.ys[2] + h * g.ys[3] + w * g.ys[4]) - mean[c]);
}

template <typename T>
inline void apply_one(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean,
                      const float* k, const float* p, const float* q, T* dx, int64_t n, int64_t c, int64_t t,
                      int64_t h, int64_t w, const Cover& rows, const Cover& cols) {
  float dy = 0.f;
  const int64_t base = n * g.ps[0] + c * g.ps[1] + t * g.ps[2];
  for (int i = 0; i < rows.count; ++i) {
    for (int j = 0; j < cols.count; ++j) {
      const int64_t o = base + rows.at[i] * g.ps[3] + cols.at[j] * g.ps[4];
      if (arg[o] == rows.tap[i] * 3 + cols.tap[j]) dy += load1(grad + o);
    }
  }
  const int64_t at = n * g.ys[0] + c * g.ys[1] + t * g.ys[2] + h * g.ys[3] + w * g.ys[4];
  store1(dx + at, k[c] * dy + p[c] * (load1(y + at) - mean[c]) + q[c]);
}

// ---- channels_last_3d: W channels at a time ----------------------------------------------------------------------

// The taps of window (ho, wo) inside the frame: their offsets in a channels_last frame and their numbers (kh * 3 +
// kw), in the window's order; returns how many.
inline int window_taps(const Geometry& g, int64_t ho, int64_t wo, int64_t* offset, uint32_t* tap) {
  if (ho >= 1 && 2 * ho + 1 < g.H && wo >= 1 && 2 * wo + 1 < g.W) {  // all nine taps (most windows): no bound checks
    for (int i = 0; i < 9; ++i) {
      offset[i] = ((2 * ho - 1 + i / 3) * g.W + 2 * wo - 1 + i % 3) * g.C, tap[i] = static_cast<uint32_t>(i);
    }
    return 9;
  }
  int count = 0;
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t h = 2 * ho - 1 + kh;
    if (h < 0 || h >= g.H) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const int64_t w = 2 * wo - 1 + kw;
      if (w < 0 || w >= g.W) continue;
      offset[count] = (h * g.W + w) * g.C, tap[count++] = static_cast<uint32_t>(kh * 3 + kw);
    }
  }
  return count;
}

// Pooled rows [begin, end), row = (n * T + t) * Ho + ho. (The taps' bounds are resolved before the vector loop:
// with the checks inside it GCC took the selects apart lane by lane, 15x slower.)
template <typename T, int W>
LGD_INLINE void forward_body(const T* y, const Geometry& g, const float* scale, const float* shift, T* out,
                             uint8_t* arg, int64_t begin, int64_t end) {
  using V = vf<W>;
  using U = typename Vec<W>::U;
  const int64_t C = g.C;
  int64_t offset[9];
  uint32_t taps[9];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t frame = row / g.Ho, ho = row % g.Ho, n = frame / g.T, t = frame % g.T;
    const T* yf = y + frame * g.H * g.W * C;
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      const int count = window_taps(g, ho, wo, offset, taps);
      const int64_t o = (row * g.Wo + wo) * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        const V a = load<W>(scale + c), b = load<W>(shift + c);
        V m = V{} - INFINITY, tap = {}, nan = {};  // (tap as float32 lanes, selected under m's masks)
        for (int i = 0; i < count; ++i) {
          const V z = load<W>(yf + offset[i] + c) * a + b;
          tap = (z > m) ? V{} + static_cast<float>(taps[i]) : tap;
          m = (z > m) ? z : m;
          nan = (z != z) ? z : nan;  // a NaN wins the window, as in ATen's max-pool
        }
        m = (nan != nan) ? nan : m;
        // relu keeps a NaN. (Written as two selects, m > 0 then m != m, or with | or ||, GCC took the masks apart
        // lane by lane.)
        store<W>(out + o + c, relu(m));
        tap = (m > V{}) ? tap : V{} + kNoTap;
        store_taps<W>(arg + o + c, __builtin_convertvector(tap, U));
      }
      for (; c < C; ++c) forward_one(y, g, scale, shift, out, arg, n, c, t, ho, wo);
    }
  }
}

// Pooled rows [begin, end); part[row * 2C + c] = sum g', part[row * 2C + C + c] = sum g' (y - mean) over the row.
template <typename T, int W>
LGD_INLINE void sums_body(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean,
                          double* part, int64_t begin, int64_t end) {
  using V = vf<W>;
  using U = typename Vec<W>::U;
  const int64_t C = g.C;
  int64_t offset[9];
  uint32_t taps[9];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t frame = row / g.Ho, ho = row % g.Ho, n = frame / g.T, t = frame % g.T;
    const T* yf = y + frame * g.H * g.W * C;
    double* out = part + row * 2 * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V mu = load<W>(mean + c);
      V sg = {}, sgy = {};
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        const int count = window_taps(g, ho, wo, offset, taps);
        const int64_t o = (row * g.Wo + wo) * C + c;
        const U tap = load_taps<W>(arg + o);
        V picked = {};
        for (int i = 0; i < count; ++i) picked = (tap == taps[i]) ? load<W>(yf + offset[i] + c) : picked;
        const V gv = (tap != kNoTap) ? load<W>(grad + o) : V{};
        sg += gv;
        sgy += gv * (picked - mu);
      }
      for (int i = 0; i < W; ++i) out[c + i] = sg[i], out[C + c + i] = sgy[i];
    }
    for (; c < C; ++c) {
      float sg = 0.f, sgy = 0.f;
      for (int64_t wo = 0; wo < g.Wo; ++wo) sums_one(grad, arg, y, g, mean, n, c, t, ho, wo, sg, sgy);
      out[c] = sg, out[C + c] = sgy;
    }
  }
}

// Input rows [begin, end), row = (n * T + t) * H + h.
template <typename T, int W>
LGD_INLINE void apply_body(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean,
                           const float* k, const float* p, const float* q, T* dx, int64_t begin, int64_t end) {
  using V = vf<W>;
  const int64_t C = g.C;
  std::vector<Cover> columns(g.W);
  for (int64_t w = 0; w < g.W; ++w) columns[w] = cover(w, g.Wo);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t frame = row / g.H, h = row % g.H, n = frame / g.T, t = frame % g.T;
    const Cover rows = cover(h, g.Ho);
    for (int64_t w = 0; w < g.W; ++w) {
      const Cover& cols = columns[w];
      int64_t at[4];
      uint32_t taps[4];
      int windows = 0;
      for (int i = 0; i < rows.count; ++i) {
        for (int j = 0; j < cols.count; ++j) {
          at[windows] = ((frame * g.Ho + rows.at[i]) * g.Wo + cols.at[j]) * C;
          taps[windows++] = static_cast<uint32_t>(rows.tap[i] * 3 + cols.tap[j]);
        }
      }
      const int64_t base = (row * g.W + w) * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V dy = {};
        for (int i = 0; i < windows; ++i) {
          dy += (load_taps<W>(arg + at[i] + c) == taps[i]) ? load<W>(grad + at[i] + c) : V{};
        }
        const V yv = load<W>(y + base + c);
        store<W>(dx + base + c,
                 load<W>(k + c) * dy + load<W>(p + c) * (yv - load<W>(mean + c)) + load<W>(q + c));
      }
      for (; c < C; ++c) apply_one(grad, arg, y, g, mean, k, p, q, dx, n, c, t, h, w, rows, cols);
    }
  }
}

#define LGD_DEFINE_POOL_LOOPS(ISA, TARGET, W)                                                                      \
  template <typename T>                                                                                           \
  TARGET void forward_##ISA(const T* y, const Geometry& g, const float* scale, const float* shift, T* out,        \
                            uint8_t* arg, int64_t begin, int64_t end) {                                            \
    forward_body<T, W>(y, g, scale, shift, out, arg, begin, end);                                                 \
  }                                                                                                               \
  template <typename T>                                                                                           \
  TARGET void sums_##ISA(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean,      \
                         double* part, int64_t begin, int64_t end) {                                               \
    sums_body<T, W>(grad, arg, y, g, mean, part, begin, end);                                                     \
  }                                                                                                               \
  template <typename T>                                                                                           \
  TARGET void apply_##ISA(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean,     \
                          const float* k, const float* p, const float* q, T* dx, int64_t begin, int64_t end) {     \
    apply_body<T, W>(grad, arg, y, g, mean, k, p, q, dx, begin, end);                                             \
  }

LGD_DEFINE_POOL_LOOPS(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_POOL_LOOPS(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_POOL_LOOPS(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void forward_isa(const T* y, const Geometry& g, const float* scale, const float* shift, T* out, uint8_t* arg,
                 int64_t begin, int64_t end) {
  LGD_CALL_FOR_ISA(forward, T, y, g, scale, shift, out, arg, begin, end);
}

template <typename T>
void sums_isa(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean, double* part,
              int64_t begin, int64_t end) {
  LGD_CALL_FOR_ISA(sums, T, grad, arg, y, g, mean, part, begin, end);
}

template <typename T>
void apply_isa(const T* grad, const uint8_t* arg, const T* y, const Geometry& g, const float* mean, const float* k,
               const float* p, const float* q, T* dx, int64_t begin, int64_t end) {
  LGD_CALL_FOR_ISA(apply, T, grad, arg, y, g, mean, k, p, q, dx, begin, end);
}

// ---- checks and entry points ---------------------------------------------------------------------------------

constexpr const char* kOp = "bn_relu_max_pool";

Geometry geometry(const at::Tensor& y) {
  TORCH_CHECK(y.device().is_cpu(), kOp, ": y must be a CPU tensor, got ", y.device());
  TORCH_CHECK(y.dim() == 5, kOp, ": y must be 5-D (N, C, T, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, kOp,
              ": y must be float32 or bfloat16, got ", y.scalar_type());
  TORCH_CHECK(y.is_contiguous() || y.is_contiguous(at::MemoryFormat::ChannelsLast3d), kOp,
              ": y must be contiguous or channels_last_3d, got strides ", y.strides());
  TORCH_CHECK(y.size(3) > 0 && y.size(4) > 0, kOp, ": y has empty frames: shape ", y.sizes());
  Geometry g{};
  g.N = y.size(0), g.C = y.size(1), g.T = y.size(2), g.H = y.size(3), g.W = y.size(4);
  g.Ho = (g.H - 1) / 2 + 1, g.Wo = (g.W - 1) / 2 + 1;
  g.cl = is_channels_last(y);
  for (int i = 0; i < 5; ++i) g.ys[i] = y.stride(i);
  if (g.cl) {  // (n, t, h, w, c)
    g.ps[1] = 1, g.ps[4] = g.C, g.ps[3] = g.Wo * g.C, g.ps[2] = g.Ho * g.Wo * g.C, g.ps[0] = g.T * g.Ho * g.Wo * g.C;
  } else {
    g.ps[4] = 1, g.ps[3] = g.Wo, g.ps[2] = g.Ho * g.Wo, g.ps[1] = g.T * g.Ho * g.Wo, g.ps[0] = g.C * g.T * g.Ho * g.Wo;
  }
  return g;
}

at::MemoryFormat format_of(const Geometry& g) {
  return g.cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> pooled_sizes(const Geometry& g) { return {g.N, g.C, g.T, g.Ho, g.Wo}; }

// The pooled gradient in y's dtype and the pooled layout (autograd may hand any), and arg checked against it.
at::Tensor pooled_grad(const at::Tensor& grad, const at::Tensor& arg, const at::Tensor& y, const Geometry& g) {
  const auto sizes = pooled_sizes(g);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(sizes), kOp, ": grad has shape ", grad.sizes(), ", the pool of y ",
              y.sizes(), " has ", at::IntArrayRef(sizes));
  TORCH_CHECK(arg.sizes() == at::IntArrayRef(sizes) && arg.scalar_type() == at::kByte, kOp,
              ": arg must be the forward's uint8 taps of shape ", at::IntArrayRef(sizes), ", got ", arg.scalar_type(),
              " of shape ", arg.sizes());
  TORCH_CHECK(arg.is_contiguous(format_of(g)), kOp, ": arg is not in y's layout (strides ", arg.strides(), ")");
  TORCH_CHECK(grad.device().is_cpu(), kOp, ": grad must be a CPU tensor, got ", grad.device());
  return grad.to(y.scalar_type()).contiguous(format_of(g));
}

int64_t grain(int64_t per_row) { return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, per_row)); }

std::tuple<at::Tensor, at::Tensor> bn_relu_max_pool_cpu(const at::Tensor& y, const at::Tensor& scale,
                                                        const at::Tensor& shift) {
  const Geometry g = geometry(y);
  const at::Tensor a = per_channel(kOp, scale, "scale", g.C), b = per_channel(kOp, shift, "shift", g.C);
  at::Tensor out = at::empty(pooled_sizes(g), y.options().memory_format(format_of(g)));
  at::Tensor arg = at::empty(pooled_sizes(g), y.options().dtype(at::kByte).memory_format(format_of(g)));
  const int64_t rows = g.N * g.T * g.Ho;
  if (rows * g.C == 0) return {out, arg};
  dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const V* yp = y.data_ptr<V>();
    V* op = out.data_ptr<V>();
    uint8_t* ap = arg.data_ptr<uint8_t>();
    const float *ap_scale = a.data_ptr<float>(), *ap_shift = b.data_ptr<float>();
    at::parallel_for(0, rows, grain(9 * g.Wo * g.C), [&](int64_t begin, int64_t end) {
      if (g.cl) {
        forward_isa<V>(yp, g, ap_scale, ap_shift, op, ap, begin, end);
        return;
      }
      for (int64_t row = begin; row < end; ++row) {
        const int64_t frame = row / g.Ho, ho = row % g.Ho, n = frame / g.T, t = frame % g.T;
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t wo = 0; wo < g.Wo; ++wo) forward_one(yp, g, ap_scale, ap_shift, op, ap, n, c, t, ho, wo);
      }
    });
  });
  return {out, arg};
}

at::Tensor bn_relu_max_pool_backward_sums_cpu(const at::Tensor& grad, const at::Tensor& arg, const at::Tensor& y,
                                              const at::Tensor& mean) {
  const Geometry g = geometry(y);
  const at::Tensor gr = pooled_grad(grad, arg, y, g);
  const at::Tensor mu = per_channel(kOp, mean, "mean", g.C);
  const int64_t rows = g.N * g.T * g.Ho;
  at::Tensor part = at::zeros({rows, 2, g.C}, y.options().dtype(at::kDouble));
  dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const V *gp = gr.data_ptr<V>(), *yp = y.data_ptr<V>();
    const uint8_t* ap = arg.data_ptr<uint8_t>();
    const float* mp = mu.data_ptr<float>();
    double* pp = part.data_ptr<double>();
    at::parallel_for(0, rows, grain(2 * g.Wo * g.C), [&](int64_t begin, int64_t end) {
      if (g.cl) {
        sums_isa<V>(gp, ap, yp, g, mp, pp, begin, end);
        return;
      }
      for (int64_t row = begin; row < end; ++row) {
        const int64_t frame = row / g.Ho, ho = row % g.Ho, n = frame / g.T, t = frame % g.T;
        for (int64_t c = 0; c < g.C; ++c) {
          float sg = 0.f, sgy = 0.f;
          for (int64_t wo = 0; wo < g.Wo; ++wo) sums_one(gp, ap, yp, g, mp, n, c, t, ho, wo, sg, sgy);
          pp[row * 2 * g.C + c] = sg, pp[row * 2 * g.C + g.C + c] = sgy;
        }
      }
    });
  });
  // The rows' float32 partial sums folded in float64 in row order: the same result on any thread count.
  at::Tensor sums = at::zeros({2, g.C}, y.options().dtype(at::kDouble));
  double* s = sums.data_ptr<double>();
  const double* pp = part.data_ptr<double>();
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t i = 0; i < 2 * g.C; ++i) s[i] += pp[row * 2 * g.C + i];
  return sums;
}

at::Tensor bn_relu_max_pool_backward_apply_cpu(const at::Tensor& grad, const at::Tensor& arg, const at::Tensor& y,
                                               const at::Tensor& mean, const at::Tensor& k, const at::Tensor& p,
                                               const at::Tensor& q) {
  const Geometry g = geometry(y);
  const at::Tensor gr = pooled_grad(grad, arg, y, g);
  const at::Tensor mu = per_channel(kOp, mean, "mean", g.C), k32 = per_channel(kOp, k, "k", g.C);
  const at::Tensor p32 = per_channel(kOp, p, "p", g.C), q32 = per_channel(kOp, q, "q", g.C);
  at::Tensor dx = at::empty_like(y, format_of(g));
  const int64_t rows = g.N * g.T * g.H;
  if (rows * g.C * g.W == 0) return dx;
  dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
    using V = decltype(tag);
    const V *gp = gr.data_ptr<V>(), *yp = y.data_ptr<V>();
    V* dp = dx.data_ptr<V>();
    const uint8_t* ap = arg.data_ptr<uint8_t>();
    const float *mp = mu.data_ptr<float>(), *kp = k32.data_ptr<float>(), *pp = p32.data_ptr<float>(),
                *qp = q32.data_ptr<float>();
    at::parallel_for(0, rows, grain(3 * g.W * g.C), [&](int64_t begin, int64_t end) {
      if (g.cl) {
        apply_isa<V>(gp, ap, yp, g, mp, kp, pp, qp, dp, begin, end);
        return;
      }
      for (int64_t row = begin; row < end; ++row) {
        const int64_t frame = row / g.H, h = row % g.H, n = frame / g.T, t = frame % g.T;
        const Cover rows_ = cover(h, g.Ho);
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t w = 0; w < g.W; ++w)
            apply_one(gp, ap, yp, g, mp, kp, pp, qp, dp, n, c, t, h, w, rows_, cover(w, g.Wo));
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("bn_relu_max_pool", &bn_relu_max_pool_cpu);
  m.impl("bn_relu_max_pool_backward_sums", &bn_relu_max_pool_backward_sums_cpu);
  m.impl("bn_relu_max_pool_backward_apply", &bn_relu_max_pool_backward_apply_cpu);
}

}  // namespace lgd_fast
