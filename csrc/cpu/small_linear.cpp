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

}  // namespace lgd_fast
