// y = x W^T + b for a few rows of x: small_linear.h says why. Each pass streams W once, row by row, against up
// to 4 rows of x held in L1, two rows of W at a time (8 accumulators of W lanes), once per SIMD path (simd.h).

#include "small_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "simd.h"

namespace lgd_fast {
namespace {

using simd::hsum;
using simd::load;
using simd::store;
using simd::vf;

// y's columns h .. h + P - 1 (P rows of W: independent accumulators, each W vector loaded once for the R rows)
// for the R rows of x starting at x (row stride C) into y (row stride H).
template <int W, int R, int P>
LGD_INLINE void w_rows(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                       float* __restrict__ y, int64_t C, int64_t H, int64_t h) {
  using V = vf<W>;
  V acc[P][R];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = V{};
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V u[P];
    for (int p = 0; p < P; ++p) u[p] = load<W>(w + (h + p) * C + c);
    for (int r = 0; r < R; ++r) {
      const V v = load<W>(x + r * C + c);
      for (int p = 0; p < P; ++p) acc[p][r] += u[p] * v;
    }
  }
  for (int p = 0; p < P; ++p) {
    const float* wp = w + (h + p) * C;
    for (int r = 0; r < R; ++r) {
      float t = 0.f;
      for (int64_t k = c; k < C; ++k) t += wp[k] * x[r * C + k];
      y[r * H + h + p] = hsum(acc[p][r]) + t + b[h + p];
    }
  }
}

// Columns [h0, h1) of y for the R rows of x: two rows of W at a time, then the odd one.
template <int W, int R>
LGD_INLINE void rows_body(const float* x, const float* w, const float* b, float* y, int64_t C, int64_t H, int64_t h0,
                          int64_t h1) {
  int64_t h = h0;
  for (; h + 2 <= h1; h += 2) w_rows<W, R, 2>(x, w, b, y, C, H, h);
  if (h < h1) w_rows<W, R, 1>(x, w, b, y, C, H, h);
}

template <int W>
LGD_INLINE void linear_body(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t C,
                            int64_t H, int64_t h0, int64_t h1) {
  for (int64_t n = 0; n < N; n += 4) {  // up to 4 rows of x per pass over W
    const float* xs = x + n * C;
    float* ys = y + n * H;
    switch (std::min<int64_t>(4, N - n)) {
      case 4:
        rows_body<W, 4>(xs, w, b, ys, C, H, h0, h1);
        break;
      case 3:
        rows_body<W, 3>(xs, w, b, ys, C, H, h0, h1);
        break;
      case 2:
        rows_body<W, 2>(xs, w, b, ys, C, H, h0, h1);
        break;
      default:
        rows_body<W, 1>(xs, w, b, ys, C, H, h0, h1);
    }
  }
}

#define LGD_DEFINE_SMALL_LINEAR(ISA, TARGET, W)                                                          \
  template <typename T>                                                                                 \
  TARGET void linear_##ISA(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t H, \
                           int64_t h0, int64_t h1) {                                                    \
    linear_body<W>(x, w, b, y, N, C, H, h0, h1);                                                        \
  }

LGD_DEFINE_SMALL_LINEAR(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_SMALL_LINEAR(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_SMALL_LINEAR(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void linear_isa(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t H, int64_t h0,
                int64_t h1) {
  LGD_CALL_FOR_ISA(linear, T, x, w, b, y, N, C, H, h0, h1);
}

// The k positions matmul sums in registers before adding into y: two-level sums (a chunk's in registers, the chunks'
// in y), whose float32 error grows with kMatmulChunk + K / kMatmulChunk terms, not with K. Summed in k order all
// the way, a 4x1000 by 1000x62 product came out at 2.1-2.3x the error of ATen's GEMM against float64; in chunks of
// 32, a cancelling 80-term sum (one draw in some 300 test seeds) at 4x; in chunks of 8 the gradients' median error
// is 0.67x ATen's and that draw's 1.7x.
constexpr int64_t kMatmulChunk = 8;

// x W for the R rows of x starting at x (row stride K) into y (row stride C), columns c .. c + P W - 1 of W (K, C):
// P vectors of W's columns, R x P accumulators, each W vector loaded once for the R rows.
template <int W, int R, int P>
LGD_INLINE void matmul_columns(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                               int64_t K, int64_t C, int64_t c) {
  using V = vf<W>;
  for (int64_t k0 = 0; k0 < K; k0 += kMatmulChunk) {
    V acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = V{};
    for (int64_t k = k0; k < std::min(K, k0 + kMatmulChunk); ++k) {
      V u[P];
      for (int p = 0; p < P; ++p) u[p] = load<W>(w + k * C + c + p * W);
      for (int r = 0; r < R; ++r) {
        const V v = V{} + x[r * K + k];
        for (int p = 0; p < P; ++p) acc[r][p] += v * u[p];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) {
        float* out = y + r * C + c + p * W;
        store<W>(out, k0 == 0 ? acc[r][p] : load<W>(out) + acc[r][p]);
      }
  }
}

template <int W, int R>
LGD_INLINE void matmul_rows(const float* x, const float* w, float* y, int64_t K, int64_t C, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 4 * W <= c1; c += 4 * W) matmul_columns<W, R, 4>(x, w, y, K, C, c);
  for (; c + W <= c1; c += W) matmul_columns<W, R, 1>(x, w, y, K, C, c);
  for (; c < c1; ++c)  // the columns past the last whole vector, summed the same way
    for (int r = 0; r < R; ++r) {
      float total = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += kMatmulChunk) {
        float t = 0.f;
        for (int64_t k = k0; k < std::min(K, k0 + kMatmulChunk); ++k) t += x[r * K + k] * w[k * C + c];
        total += t;
      }
      y[r * C + c] = total;
    }
}

template <int W>
LGD_INLINE void matmul_body(const float* x, const float* w, float* y, int64_t N, int64_t K, int64_t C, int64_t c0,
                            int64_t c1) {
  for (int64_t n = 0; n < N; n += 4) {  // up to 4 rows of x per pass over W
    const float* xs = x + n * K;
    float* ys = y + n * C;
    switch (std::min<int64_t>(4, N - n)) {
      case 4:
        matmul_rows<W, 4>(xs, w, ys, K, C, c0, c1);
        break;
      case 3:
        matmul_rows<W, 3>(xs, w, ys, K, C, c0, c1);
        break;
      case 2:
        matmul_rows<W, 2>(xs, w, ys, K, C, c0, c1);
        break;
      default:
        matmul_rows<W, 1>(xs, w, ys, K, C, c0, c1);
    }
  }
}

// Rows [o0, o1) of gy^T x: out[o, :] = sum over r of gy[r, o] x[r, :], in r order.
template <int W>
LGD_INLINE void outer_body(const float* gy, const float* x, float* out, int64_t N, int64_t O, int64_t I, int64_t o0,
                           int64_t o1) {
  using V = vf<W>;
  for (int64_t o = o0; o < o1; ++o) {
    float* row = out + o * I;
    int64_t i = 0;
    for (; i + W <= I; i += W) {
      V acc = (V{} + gy[o]) * load<W>(x + i);
      for (int64_t r = 1; r < N; ++r) acc += (V{} + gy[r * O + o]) * load<W>(x + r * I + i);
      store<W>(row + i, acc);
    }
    for (; i < I; ++i) {
      float t = gy[o] * x[i];
      for (int64_t r = 1; r < N; ++r) t += gy[r * O + o] * x[r * I + i];
      row[i] = t;
    }
  }
}

#define LGD_DEFINE_SMALL_BACKWARD(ISA, TARGET, W)                                                                  \
  template <typename T>                                                                                           \
  TARGET void matmul_##ISA(const T* x, const T* w, T* y, int64_t N, int64_t K, int64_t C, int64_t c0, int64_t c1) { \
    matmul_body<W>(x, w, y, N, K, C, c0, c1);                                                                     \
  }                                                                                                               \
  template <typename T>                                                                                           \
  TARGET void outer_##ISA(const T* gy, const T* x, T* out, int64_t N, int64_t O, int64_t I, int64_t o0,           \
                          int64_t o1) {                                                                           \
    outer_body<W>(gy, x, out, N, O, I, o0, o1);                                                                   \
  }

LGD_DEFINE_SMALL_BACKWARD(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_SMALL_BACKWARD(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_SMALL_BACKWARD(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void matmul_isa(const T* x, const T* w, T* y, int64_t N, int64_t K, int64_t C, int64_t c0, int64_t c1) {
  LGD_CALL_FOR_ISA(matmul, T, x, w, y, N, K, C, c0, c1);
}

template <typename T>
void outer_isa(const T* gy, const T* x, T* out, int64_t N, int64_t O, int64_t I, int64_t o0, int64_t o1) {
  LGD_CALL_FOR_ISA(outer, T, gy, x, out, N, O, I, o0, o1);
}

bool few_float32_rows(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) >= 1 &&
         t.size(0) <= kSmallLinearMaxRows && t.is_contiguous();
}

}  // namespace

bool small_linear_applies(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kSmallLinearMaxRows &&
         x.size(1) >= 1 && w.dim() == 2 && w.size(1) == x.size(1) && w.size(0) >= 1 && b.dim() == 1 &&
         b.size(0) == w.size(0) && x.is_contiguous() && w.is_contiguous() && b.is_contiguous();
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(small_linear_applies(x, w, b), "small_linear: float32 CPU x (N <= ", kSmallLinearMaxRows,
              ", C), W (H, C), b (H), contiguous, got x ", x.sizes(), " ", x.scalar_type(),
              ", W ", w.sizes(), ", b ", b.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = w.size(0);
  at::Tensor y = at::empty({N, H}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads only where each task streams at least 256 KB of W: below that a fork and join costs more than it saves.
  const int64_t grain = std::max<int64_t>(2, (int64_t{1} << 16) / C);
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) { linear_isa<float>(xp, wp, bp, yp, N, C, H, h0, h1); });
  return y;
}

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(few_float32_rows(x) && w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 &&
                  w.size(0) == x.size(1) && w.is_contiguous(),
              "small_matmul: float32 CPU x (N <= ", kSmallLinearMaxRows, ", K), W (K, C), contiguous, got x ",
              x.sizes(), " ", x.scalar_type(), ", W ", w.sizes(), " ", w.scalar_type());
  const int64_t N = x.size(0), K = x.size(1), C = w.size(1);
  at::Tensor y = at::empty({N, C}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Tasks of whole 64-column blocks, each streaming at least 256 KB of W (a fork and join costs more below that).
  const int64_t blocks = (C + 63) / 64;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 64 * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    matmul_isa<float>(xp, wp, yp, N, K, C, b0 * 64, std::min(C, b1 * 64));
  });
  return y;
}

at::Tensor small_outer(const at::Tensor& gy, const at::Tensor& x) {
  TORCH_CHECK(few_float32_rows(gy) && few_float32_rows(x) && x.size(0) == gy.size(0),
              "small_outer: float32 CPU gy (N <= ", kSmallLinearMaxRows, ", O) and x (N, I), contiguous, got gy ",
              gy.sizes(), " ", gy.scalar_type(), ", x ", x.sizes(), " ", x.scalar_type());
  const int64_t N = gy.size(0), O = gy.size(1), I = x.size(1);
  at::Tensor out = at::empty({O, I}, gy.options());
  const float *gp = gy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, I));  // 256 KB written a task
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) { outer_isa<float>(gp, xp, op, N, O, I, o0, o1); });
  return out;
}

}  // namespace lgd_fast
