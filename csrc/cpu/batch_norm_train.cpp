// CPU kernels of the fused units' training BatchNorm (lgd_fast/ops/batch_norm_train.py): the batch statistics
// of a conv's output, and the normalisation with its shortcut and ReLU, forward and backward.
//
//   channel_moments(z)            -> (2, C) float64: sum_c and M2_c = sum (z - mean_c)^2 over (N, T, H, W)
//   bn_relu_forward(y, ...)       -> out = act((y - mean_c) * invstd_c * w_c + b_c + s)
//   bn_relu_backward_sums(g, ...) -> (2, C): sum g' and sum g' * xhat, g' = g * [pre > 0 if relu],
//                                    xhat = (y - mean_c) * invstd_c, pre the forward's value before the ReLU
//   bn_relu_backward_apply(...)   -> grad_y = w_c * invstd_c * (g' - mean_g_c - xhat * mean_gx_c), grad_s = g'
//
// BatchNorm's training backward is the last two with mean_g = sum g' / count and mean_gx = sum g' xhat / count,
// which the caller forms (and all-reduces over a process group first, as SyncBatchNorm does). The ReLU mask is
// recomputed from y (and s) instead of read from a saved output.
//
// One read pass for the statistics: each stretch of values (contiguous: up to 256 of a row; channels_last: a
// block of positions whose C values stay in L2) is summed, then its deviations from that (rounded) mean and their
// squares are summed while it is still in the caches, in float32 (the corrected two-pass algorithm: the summed
// deviations correct the mean and M2 for the mean's rounding); the stretches merge in float64 by Chan's rule, in an order fixed by the
// shape (not the thread count), so the results are bitwise reproducible and free of E[z^2] - E[z]^2 cancellation.
// The element-wise passes compute in float32 and round once (bfloat16: round to nearest even, as c10::BFloat16).
// float32 and bfloat16 tensors, contiguous or channels_last_3d; float64 stays in PyTorch (the caller's).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "isa.h"
#include "simd.h"
#include "tensor_dispatch.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {
namespace {

using namespace simd;  // csrc/cpu/simd.h

// Every float32 partial sum covers at most 256 values (64 per lane at 4 lanes) before it folds into float64: a
// lane summing 256 squares of deviations lost ~3e-6 of M2 against float64 (bfloat16 values around 100).
constexpr int64_t kStretch = 256;         // contiguous: values one float32 partial covers
constexpr int64_t kBlockBytes = 1 << 17;  // channels_last: a statistics block's bytes at most (in L2 for pass two)
constexpr int64_t kMaxBlockRows = 64;     // channels_last: positions per block at most (each channel's partial)
constexpr int64_t kTaskElems = 16384;     // smallest amount of work worth a thread

// Per-channel parameters of one call, float32: centre (mean), a (invstd * w: the scale of y - mean), b (bias);
// for the backward also invstd, mg and mgx (the means of g' and g' * xhat); grad_y scales by a too.
// The bodies take it by value: a local copy, which the vector stores (memcpy) cannot alias, so the compiler keeps
// the pointers in registers (through a reference it reloaded them after every vector written: 1.5-2x slower).
struct Params {
  const float* __restrict__ mean;
  const float* __restrict__ invstd;
  const float* __restrict__ a;
  const float* __restrict__ b;
  const float* __restrict__ mg;
  const float* __restrict__ mgx;
};

// ---- statistics -------------------------------------------------------------------------------------------

// Contiguous rows [begin, end) of L values: per row, the stretches' (count, mean, M2) merged by Chan's rule.
template <typename T, int W>
LGD_INLINE void moments_rows_body(const T* __restrict__ z, double* count, double* mean, double* m2, int64_t begin,
                                  int64_t end, int64_t L) {
  using V = vf<W>;
  for (int64_t row = begin; row < end; ++row) {
    const T* zz = z + row * L;
    double n = 0.0, mu = 0.0, q = 0.0;
    for (int64_t start = 0; start < L; start += kStretch) {
      const int64_t stop = std::min(L, start + kStretch), cnt = stop - start;
      V acc = {};
      int64_t l = start;
      for (; l + W <= stop; l += W) acc += load<W>(zz + l);
      float s = hsum(acc);
      for (; l < stop; ++l) s += load1(zz + l);
      const float m = s / static_cast<float>(cnt);
      V sq = {}, res = {};
      l = start;
      for (; l + W <= stop; l += W) {
        const V d = load<W>(zz + l) - m;
        res += d;
        sq += d * d;
      }
      float qs = hsum(sq), rs = hsum(res);
      for (; l < stop; ++l) {
        const float d = load1(zz + l) - m;
        rs += d;
        qs += d * d;
      }
      // the stretch's exact mean and M2 from m (rounded) and the residuals (corrected two-pass), then Chan's rule
      const double c = static_cast<double>(cnt), r = static_cast<double>(rs);
      const double stretch_mean = static_cast<double>(m) + r / c, stretch_m2 = static_cast<double>(qs) - r * r / c;
      const double total = n + c, delta = stretch_mean - mu;
      mu += delta * (c / total);
      q += stretch_m2 + delta * delta * (n * c / total);
      n = total;
    }
    count[row] = n;
    mean[row] = mu;
    m2[row] = q;
  }
}

// channels_last blocks [begin, end) of `rows` positions each (the last may be shorter) over P positions of C
// values: per block and channel its (mean, M2) in float64; acc is scratch for 3C floats.
template <typename T, int W>
LGD_INLINE void moments_channels_last_body(const T* __restrict__ z, double* part_mean, double* part_m2,
                                           float* __restrict__ acc, int64_t begin, int64_t end, int64_t rows,
                                           int64_t P, int64_t C) {
  using V = vf<W>;
  float* sum = acc;
  float* sq = acc + C;
  float* res = acc + 2 * C;
  const int64_t Cv = C - C % W;
  for (int64_t block = begin; block < end; ++block) {
    const int64_t p0 = block * rows, p1 = std::min(P, p0 + rows);
    const float inv = 1.f / static_cast<float>(p1 - p0);
    std::fill(sum, sum + 3 * C, 0.f);
    // row after row (the order the memory is in), four at a time: each channel's partial is loaded and stored
    // once per four positions
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) {
      const T *z0 = z + p * C, *z1 = z0 + C, *z2 = z1 + C, *z3 = z2 + C;
      for (int64_t c = 0; c < Cv; c += W) {
        store<W>(sum + c, load<W>(sum + c) + ((load<W>(z0 + c) + load<W>(z1 + c)) + (load<W>(z2 + c) + load<W>(z3 + c))));
      }
      for (int64_t c = Cv; c < C; ++c) sum[c] += (load1(z0 + c) + load1(z1 + c)) + (load1(z2 + c) + load1(z3 + c));
    }
    for (; p < p1; ++p) {
      const T* zz = z + p * C;
      for (int64_t c = 0; c < Cv; c += W) store<W>(sum + c, load<W>(sum + c) + load<W>(zz + c));
      for (int64_t c = Cv; c < C; ++c) sum[c] += load1(zz + c);
    }
    for (int64_t c = 0; c < C; ++c) sum[c] *= inv;  // the block's (rounded) mean
    for (p = p0; p + 4 <= p1; p += 4) {  // the block is in L2 now
      const T *z0 = z + p * C, *z1 = z0 + C, *z2 = z1 + C, *z3 = z2 + C;
      for (int64_t c = 0; c < Cv; c += W) {
        const V m = load<W>(sum + c);
        const V d0 = load<W>(z0 + c) - m, d1 = load<W>(z1 + c) - m, d2 = load<W>(z2 + c) - m, d3 = load<W>(z3 + c) - m;
        store<W>(res + c, load<W>(res + c) + ((d0 + d1) + (d2 + d3)));
        store<W>(sq + c, load<W>(sq + c) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
      }
      for (int64_t c = Cv; c < C; ++c) {
        const float m = sum[c];
        const float d0 = load1(z0 + c) - m, d1 = load1(z1 + c) - m, d2 = load1(z2 + c) - m, d3 = load1(z3 + c) - m;
        res[c] += (d0 + d1) + (d2 + d3);
        sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      }
    }
    for (; p < p1; ++p) {
      const T* zz = z + p * C;
      for (int64_t c = 0; c < Cv; c += W) {
        const V d = load<W>(zz + c) - load<W>(sum + c);
        store<W>(res + c, load<W>(res + c) + d);
        store<W>(sq + c, load<W>(sq + c) + d * d);
      }
      for (int64_t c = Cv; c < C; ++c) {
        const float d = load1(zz + c) - sum[c];
        res[c] += d;
        sq[c] += d * d;
      }
    }
    const double cnt = static_cast<double>(p1 - p0);
    for (int64_t c = 0; c < C; ++c) {  // corrected two-pass: the block's exact mean and M2 from the rounded one
      const double r = static_cast<double>(res[c]);
      part_mean[block * C + c] = static_cast<double>(sum[c]) + r / cnt;
      part_m2[block * C + c] = static_cast<double>(sq[c]) - r * r / cnt;
    }
  }
}

// ---- the normalisation, forward ---------------------------------------------------------------------------

template <bool kRelu, typename V>
LGD_INLINE V activate(V v) {
  if constexpr (kRelu) {
    return relu(v);
  } else {
    return v;
  }
}

// Contiguous rows [begin, end) of L values, row = n * C + c. s may be null.
template <typename T, int W, bool kRelu>
LGD_INLINE void forward_rows_body(const T* __restrict__ y, const T* __restrict__ s, T* __restrict__ out,
                                  Params q, int64_t begin, int64_t end, int64_t C, int64_t L) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t c = row % C;
    const float m = q.mean[c], a = q.a[c], b = q.b[c];
    const T* yy = y + row * L;
    const T* ss = s ? s + row * L : nullptr;
    T* oo = out + row * L;
    int64_t l = 0;
    if (ss) {
      for (; l + W <= L; l += W) store<W>(oo + l, activate<kRelu>((load<W>(yy + l) - m) * a + b + load<W>(ss + l)));
      for (; l < L; ++l) store1(oo + l, activate<kRelu>((load1(yy + l) - m) * a + b + load1(ss + l)));
    } else {
      for (; l + W <= L; l += W) store<W>(oo + l, activate<kRelu>((load<W>(yy + l) - m) * a + b));
      for (; l < L; ++l) store1(oo + l, activate<kRelu>((load1(yy + l) - m) * a + b));
    }
  }
}

// channels_last positions [begin, end) of C values.
template <typename T, int W, bool kRelu>
LGD_INLINE void forward_channels_last_body(const T* __restrict__ y, const T* __restrict__ s, T* __restrict__ out,
                                           Params q, int64_t begin, int64_t end, int64_t C) {
  // row after row, the order the memory is in (interleaving four rows, to load the parameters once per four, ran
  // 1.5x slower at C = 256: four streams per tensor)
  for (int64_t p = begin; p < end; ++p) {
    const T* yy = y + p * C;
    const T* ss = s ? s + p * C : nullptr;
    T* oo = out + p * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      vf<W> v = (load<W>(yy + c) - load<W>(q.mean + c)) * load<W>(q.a + c) + load<W>(q.b + c);
      if (ss) v += load<W>(ss + c);
      store<W>(oo + c, activate<kRelu>(v));
    }
    for (; c < C; ++c) {
      float v = (load1(yy + c) - q.mean[c]) * q.a[c] + q.b[c];
      if (ss) v += load1(ss + c);
      store1(oo + c, activate<kRelu>(v));
    }
  }
}

// ---- the normalisation, backward --------------------------------------------------------------------------

// g' = g where the forward's pre-activation is > 0 (with the ReLU), else g.
template <bool kRelu, typename V>
LGD_INLINE V masked(V g, V pre) {
  if constexpr (kRelu) {
    const V zero = {};
    return (pre > zero) ? g : zero;
  } else {
    return g;
  }
}

template <bool kRelu>
LGD_INLINE float masked1(float g, float pre) {
  if constexpr (kRelu) {
    return pre > 0.f ? g : 0.f;
  } else {
    return g;
  }
}

// Contiguous rows [begin, end): per row, sum g' and sum g' * xhat in float64 (float32 over stretches).
template <typename T, int W, bool kRelu>
LGD_INLINE void sums_rows_body(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ s,
                               Params q, double* sum_g, double* sum_gx, int64_t begin, int64_t end, int64_t C,
                               int64_t L) {
  using V = vf<W>;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t c = row % C;
    const float m = q.mean[c], a = q.a[c], b = q.b[c], inv = q.invstd[c];
    const int64_t off = row * L;
    const T *gg = g + off, *yy = y + off, *ss = s ? s + off : nullptr;
    double tg = 0.0, tgx = 0.0;
    for (int64_t start = 0; start < L; start += kStretch) {
      const int64_t stop = std::min(L, start + kStretch);
      V ag = {}, agx = {};
      int64_t l = start;
      for (; l + W <= stop; l += W) {
        const V d = load<W>(yy + l) - m;
        V pre = d * a + b;
        if (ss) pre += load<W>(ss + l);
        const V gm = masked<kRelu>(load<W>(gg + l), pre);
        ag += gm;
        agx += gm * (d * inv);
      }
      float tail_g = 0.f, tail_gx = 0.f;
      for (; l < stop; ++l) {
        const float d = load1(yy + l) - m;
        const float gm = masked1<kRelu>(load1(gg + l), d * a + b + (ss ? load1(ss + l) : 0.f));
        tail_g += gm;
        tail_gx += gm * (d * inv);
      }
      tg += static_cast<double>(hsum(ag) + tail_g);
      tgx += static_cast<double>(hsum(agx) + tail_gx);
    }
    sum_g[row] = tg;
    sum_gx[row] = tgx;
  }
}

// channels_last blocks [begin, end) of `rows` positions: per block and channel the float32 sums, as float64.
template <typename T, int W, bool kRelu>
LGD_INLINE void sums_channels_last_body(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ s,
                                        Params q, double* part_g, double* part_gx, float* __restrict__ acc,
                                        int64_t begin, int64_t end, int64_t rows, int64_t P, int64_t C) {
  using V = vf<W>;
  float* __restrict__ ag = acc;
  float* __restrict__ agx = acc + C;
  for (int64_t block = begin; block < end; ++block) {
    const int64_t p0 = block * rows, p1 = std::min(P, p0 + rows);
    std::fill(ag, ag + 2 * C, 0.f);
    for (int64_t p = p0; p < p1; ++p) {  // row after row
      const T *gg = g + p * C, *yy = y + p * C, *ss = s ? s + p * C : nullptr;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        const V d = load<W>(yy + c) - load<W>(q.mean + c);
        V pre = d * load<W>(q.a + c) + load<W>(q.b + c);
        if (ss) pre += load<W>(ss + c);
        const V gm = masked<kRelu>(load<W>(gg + c), pre);
        store<W>(ag + c, load<W>(ag + c) + gm);
        store<W>(agx + c, load<W>(agx + c) + gm * (d * load<W>(q.invstd + c)));
      }
      for (; c < C; ++c) {
        const float d = load1(yy + c) - q.mean[c];
        const float gm = masked1<kRelu>(load1(gg + c), d * q.a[c] + q.b[c] + (ss ? load1(ss + c) : 0.f));
        ag[c] += gm;
        agx[c] += gm * (d * q.invstd[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      part_g[block * C + c] = ag[c];
      part_gx[block * C + c] = agx[c];
    }
  }
}

// Contiguous rows [begin, end): grad_y and (where gs is not null) grad_s.
template <typename T, int W, bool kRelu>
LGD_INLINE void apply_rows_body(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ s,
                                Params q, T* __restrict__ gy, T* __restrict__ gs, int64_t begin, int64_t end,
                                int64_t C, int64_t L) {
  using V = vf<W>;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t c = row % C;
    const float m = q.mean[c], a = q.a[c], b = q.b[c], inv = q.invstd[c], mg = q.mg[c], mgx = q.mgx[c];
    const int64_t off = row * L;
    const T *gg = g + off, *yy = y + off, *ss = s ? s + off : nullptr;
    T *oy = gy + off, *os = gs ? gs + off : nullptr;
    int64_t l = 0;
    for (; l + W <= L; l += W) {
      const V d = load<W>(yy + l) - m;
      V pre = d * a + b;
      if (ss) pre += load<W>(ss + l);
      const V gm = masked<kRelu>(load<W>(gg + l), pre);
      store<W>(oy + l, (gm - mg - (d * inv) * mgx) * a);
      if (os) store<W>(os + l, gm);
    }
    for (; l < L; ++l) {
      const float d = load1(yy + l) - m;
      const float gm = masked1<kRelu>(load1(gg + l), d * a + b + (ss ? load1(ss + l) : 0.f));
      store1(oy + l, (gm - mg - (d * inv) * mgx) * a);
      if (os) store1(os + l, gm);
    }
  }
}

// channels_last positions [begin, end).
template <typename T, int W, bool kRelu>
LGD_INLINE void apply_channels_last_body(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ s,
                                         Params q, T* __restrict__ gy, T* __restrict__ gs, int64_t begin,
                                         int64_t end, int64_t C) {
  using V = vf<W>;
  for (int64_t p = begin; p < end; ++p) {  // row after row
    const T *gg = g + p * C, *yy = y + p * C, *ss = s ? s + p * C : nullptr;
    T *oy = gy + p * C, *os = gs ? gs + p * C : nullptr;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V d = load<W>(yy + c) - load<W>(q.mean + c);
      V pre = d * load<W>(q.a + c) + load<W>(q.b + c);
      if (ss) pre += load<W>(ss + c);
      const V gm = masked<kRelu>(load<W>(gg + c), pre);
      const V xhat = d * load<W>(q.invstd + c);
      store<W>(oy + c, (gm - load<W>(q.mg + c) - xhat * load<W>(q.mgx + c)) * load<W>(q.a + c));
      if (os) store<W>(os + c, gm);
    }
    for (; c < C; ++c) {
      const float d = load1(yy + c) - q.mean[c];
      const float gm = masked1<kRelu>(load1(gg + c), d * q.a[c] + q.b[c] + (ss ? load1(ss + c) : 0.f));
      store1(oy + c, (gm - q.mg[c] - (d * q.invstd[c]) * q.mgx[c]) * q.a[c]);
      if (os) store1(os + c, gm);
    }
  }
}

// ---- one compiled copy of each loop per SIMD path ------------------------------------------------------------

#define LGD_DEFINE_BN_LOOPS(ISA, TARGET, W)                                                                        \
  template <typename T>                                                                                          \
  TARGET void moments_rows_##ISA(const T* z, double* count, double* mean, double* m2, int64_t begin, int64_t end, \
                                 int64_t L) {                                                                   \
    moments_rows_body<T, W>(z, count, mean, m2, begin, end, L);                                                  \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void moments_channels_last_##ISA(const T* z, double* pm, double* pq, float* acc, int64_t begin,         \
                                          int64_t end, int64_t rows, int64_t P, int64_t C) {                    \
    moments_channels_last_body<T, W>(z, pm, pq, acc, begin, end, rows, P, C);                                    \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void forward_rows_##ISA(const T* y, const T* s, T* out, Params q, bool relu, int64_t begin,      \
                                 int64_t end, int64_t C, int64_t L) {                                           \
    if (relu) {                                                                                                  \
      forward_rows_body<T, W, true>(y, s, out, q, begin, end, C, L);                                             \
    } else {                                                                                                     \
      forward_rows_body<T, W, false>(y, s, out, q, begin, end, C, L);                                            \
    }                                                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void forward_channels_last_##ISA(const T* y, const T* s, T* out, Params q, bool relu,            \
                                          int64_t begin, int64_t end, int64_t C) {                              \
    if (relu) {                                                                                                  \
      forward_channels_last_body<T, W, true>(y, s, out, q, begin, end, C);                                       \
    } else {                                                                                                     \
      forward_channels_last_body<T, W, false>(y, s, out, q, begin, end, C);                                      \
    }                                                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void sums_rows_##ISA(const T* g, const T* y, const T* s, Params q, bool relu, double* sg,        \
                              double* sgx, int64_t begin, int64_t end, int64_t C, int64_t L) {                   \
    if (relu) {                                                                                                  \
      sums_rows_body<T, W, true>(g, y, s, q, sg, sgx, begin, end, C, L);                                         \
    } else {                                                                                                     \
      sums_rows_body<T, W, false>(g, y, s, q, sg, sgx, begin, end, C, L);                                        \
    }                                                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void sums_channels_last_##ISA(const T* g, const T* y, const T* s, Params q, bool relu,           \
                                       double* pg, double* pgx, float* acc, int64_t begin, int64_t end,         \
                                       int64_t rows, int64_t P, int64_t C) {                                    \
    if (relu) {                                                                                                  \
      sums_channels_last_body<T, W, true>(g, y, s, q, pg, pgx, acc, begin, end, rows, P, C);                     \
    } else {                                                                                                     \
      sums_channels_last_body<T, W, false>(g, y, s, q, pg, pgx, acc, begin, end, rows, P, C);                    \
    }                                                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void apply_rows_##ISA(const T* g, const T* y, const T* s, Params q, bool relu, T* gy, T* gs,    \
                               int64_t begin, int64_t end, int64_t C, int64_t L) {                              \
    if (relu) {                                                                                                  \
      apply_rows_body<T, W, true>(g, y, s, q, gy, gs, begin, end, C, L);                                         \
    } else {                                                                                                     \
      apply_rows_body<T, W, false>(g, y, s, q, gy, gs, begin, end, C, L);                                        \
    }                                                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  TARGET void apply_channels_last_##ISA(const T* g, const T* y, const T* s, Params q, bool relu, T* gy,  \
                                        T* gs, int64_t begin, int64_t end, int64_t C) {                         \
    if (relu) {                                                                                                  \
      apply_channels_last_body<T, W, true>(g, y, s, q, gy, gs, begin, end, C);                                   \
    } else {                                                                                                     \
      apply_channels_last_body<T, W, false>(g, y, s, q, gy, gs, begin, end, C);                                  \
    }                                                                                                            \
  }

LGD_DEFINE_BN_LOOPS(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_BN_LOOPS(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_BN_LOOPS(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void moments_rows_isa(const T* z, double* count, double* mean, double* m2, int64_t begin, int64_t end, int64_t L) {
  LGD_CALL_FOR_ISA(moments_rows, T, z, count, mean, m2, begin, end, L);
}
template <typename T>
void moments_channels_last_isa(const T* z, double* pm, double* pq, float* acc, int64_t begin, int64_t end,
                               int64_t rows, int64_t P, int64_t C) {
  LGD_CALL_FOR_ISA(moments_channels_last, T, z, pm, pq, acc, begin, end, rows, P, C);
}
template <typename T>
void forward_rows_isa(const T* y, const T* s, T* out, Params q, bool relu, int64_t begin, int64_t end,
                      int64_t C, int64_t L) {
  LGD_CALL_FOR_ISA(forward_rows, T, y, s, out, q, relu, begin, end, C, L);
}
template <typename T>
void forward_channels_last_isa(const T* y, const T* s, T* out, Params q, bool relu, int64_t begin,
                               int64_t end, int64_t C) {
  LGD_CALL_FOR_ISA(forward_channels_last, T, y, s, out, q, relu, begin, end, C);
}
template <typename T>
void sums_rows_isa(const T* g, const T* y, const T* s, Params q, bool relu, double* sg, double* sgx,
                   int64_t begin, int64_t end, int64_t C, int64_t L) {
  LGD_CALL_FOR_ISA(sums_rows, T, g, y, s, q, relu, sg, sgx, begin, end, C, L);
}
template <typename T>
void sums_channels_last_isa(const T* g, const T* y, const T* s, Params q, bool relu, double* pg, double* pgx,
                            float* acc, int64_t begin, int64_t end, int64_t rows, int64_t P, int64_t C) {
  LGD_CALL_FOR_ISA(sums_channels_last, T, g, y, s, q, relu, pg, pgx, acc, begin, end, rows, P, C);
}
template <typename T>
void apply_rows_isa(const T* g, const T* y, const T* s, Params q, bool relu, T* gy, T* gs, int64_t begin,
                    int64_t end, int64_t C, int64_t L) {
  LGD_CALL_FOR_ISA(apply_rows, T, g, y, s, q, relu, gy, gs, begin, end, C, L);
}
template <typename T>
void apply_channels_last_isa(const T* g, const T* y, const T* s, Params q, bool relu, T* gy, T* gs,
                             int64_t begin, int64_t end, int64_t C) {
  LGD_CALL_FOR_ISA(apply_channels_last, T, g, y, s, q, relu, gy, gs, begin, end, C);
}

// ---- checks ----------------------------------------------------------------------------------------------

at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

void check_large(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 5, op, ": ", name, " must be 5-D (N, C, T, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), " but y has shape ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but y has dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast3d), op, ": ", name,
              " must be contiguous or channels_last_3d, got strides ", t.strides());
}

// Positions per statistics block in channels_last: its C values of every position fit kBlockBytes.
int64_t block_rows(int64_t C, int64_t elem_bytes) {
  return std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(C * elem_bytes, 1), 1, kMaxBlockRows);
}

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(elems_per_item, 1));
}

// The per-channel parameters a call needs, float32, kept alive with the call.
struct ParamTensors {
  at::Tensor mean, invstd, a, b, mg, mgx;
  Params view() const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    return {ptr(mean), ptr(invstd), ptr(a), ptr(b), ptr(mg), ptr(mgx)};
  }
};

ParamTensors params(const char* op, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                    const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t C = y.size(1);
  ParamTensors p;
  p.mean = per_channel(op, mean, "mean", C);
  p.invstd = per_channel(op, invstd, "invstd", C);
  const at::Tensor w = per_channel(op, weight, "weight", C);
  p.a = (p.invstd * w).contiguous();  // the scale of y - mean, and of grad_y
  p.b = per_channel(op, bias, "bias", C);
  return p;
}

const at::Tensor* optional_large(const char* op, const std::optional<at::Tensor>& s, const at::Tensor& y) {
  if (!s.has_value() || !s->defined()) return nullptr;
  check_large(op, *s, "shortcut", y);
  TORCH_CHECK(format_of(*s) == format_of(y), op, ": shortcut and y must share a memory format");
  return &*s;
}

// ---- entry points --------------------------------------------------------------------------------------------

at::Tensor channel_moments_cpu(const at::Tensor& z) {
  check_large("channel_moments", z, "z", z);
  const int64_t N = z.size(0), C = z.size(1), L = z.size(2) * z.size(3) * z.size(4);
  at::Tensor out = at::zeros({2, C}, z.options().dtype(at::kDouble));
  if (N * L == 0 || C == 0) return out;
  std::vector<double> sum(static_cast<size_t>(C)), m2(static_cast<size_t>(C));
  dispatch_float_bf16(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* zp = z.data_ptr<T>();
    if (is_channels_last(z)) {
      const int64_t P = N * L, rows = block_rows(C, sizeof(T)), blocks = (P + rows - 1) / rows;
      std::vector<double> pm(static_cast<size_t>(blocks * C)), pq(pm.size());
      at::parallel_for(0, blocks, grain_for(rows * C), [&](int64_t begin, int64_t end) {
        std::vector<float> acc(static_cast<size_t>(3 * C));
        moments_channels_last_isa<T>(zp, pm.data(), pq.data(), acc.data(), begin, end, rows, P, C);
      });
      at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {  // Chan's rule over the blocks, in order
        for (int64_t c = c0; c < c1; ++c) {
          double n = 0.0, mu = 0.0, q = 0.0;
          for (int64_t block = 0; block < blocks; ++block) {
            const double cnt = static_cast<double>(std::min(P, (block + 1) * rows) - block * rows);
            const double total = n + cnt, delta = pm[block * C + c] - mu;
            mu += delta * (cnt / total);
            q += pq[block * C + c] + delta * delta * (n * cnt / total);
            n = total;
          }
          sum[c] = mu * n;
          m2[c] = q;
        }
      });
    } else {
      std::vector<double> cnt(static_cast<size_t>(N * C)), mu(cnt.size()), q(cnt.size());
      at::parallel_for(0, N * C, grain_for(L), [&](int64_t begin, int64_t end) {
        moments_rows_isa<T>(zp, cnt.data(), mu.data(), q.data(), begin, end, L);
      });
      for (int64_t c = 0; c < C; ++c) {  // Chan's rule over the samples, in order
        double n = 0.0, mean = 0.0, acc = 0.0;
        for (int64_t s = 0; s < N; ++s) {
          const int64_t row = s * C + c;
          const double total = n + cnt[row], delta = mu[row] - mean;
          mean += delta * (cnt[row] / total);
          acc += q[row] + delta * delta * (n * cnt[row] / total);
          n = total;
        }
        sum[c] = mean * n;
        m2[c] = acc;
      }
    }
  });
  double* o = out.data_ptr<double>();
  std::copy(sum.begin(), sum.end(), o);
  std::copy(m2.begin(), m2.end(), o + C);
  return out;
}

at::Tensor bn_relu_forward_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& shortcut, bool relu) {
  const char* op = "bn_relu_forward";
  check_large(op, y, "y", y);
  const at::Tensor* s = optional_large(op, shortcut, y);
  const ParamTensors p = params(op, y, mean, invstd, weight, bias);
  const Params q = p.view();
  const int64_t N = y.size(0), C = y.size(1), L = y.size(2) * y.size(3) * y.size(4);
  at::Tensor out = at::empty_like(y, format_of(y));
  if (N * C * L == 0) return out;
  dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *yp = y.data_ptr<T>(), *sp = s ? s->data_ptr<T>() : nullptr;
    T* op_ = out.data_ptr<T>();
    if (is_channels_last(y)) {
      at::parallel_for(0, N * L, grain_for(C), [&](int64_t begin, int64_t end) {
        forward_channels_last_isa<T>(yp, sp, op_, q, relu, begin, end, C);
      });
    } else {
      at::parallel_for(0, N * C, grain_for(L), [&](int64_t begin, int64_t end) {
        forward_rows_isa<T>(yp, sp, op_, q, relu, begin, end, C, L);
      });
    }
  });
  return out;
}

at::Tensor bn_relu_backward_sums_cpu(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                     const std::optional<at::Tensor>& shortcut, bool relu) {
  const char* op = "bn_relu_backward_sums";
  check_large(op, y, "y", y);
  const at::Tensor* s = optional_large(op, shortcut, y);
  TORCH_CHECK(grad.sizes() == y.sizes(), op, ": grad has shape ", grad.sizes(), " but y has shape ", y.sizes());
  const at::Tensor g = grad.to(y.scalar_type()).contiguous(format_of(y));  // autograd may hand any layout
  const ParamTensors p = params(op, y, mean, invstd, weight, bias);
  const Params q = p.view();
  const int64_t N = y.size(0), C = y.size(1), L = y.size(2) * y.size(3) * y.size(4);
  std::vector<double> sg(static_cast<size_t>(C)), sgx(static_cast<size_t>(C));
  if (N * C * L > 0) {
    dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T *gp = g.data_ptr<T>(), *yp = y.data_ptr<T>(), *sp = s ? s->data_ptr<T>() : nullptr;
      if (is_channels_last(y)) {
        const int64_t P = N * L, rows = block_rows(C, sizeof(T)), blocks = (P + rows - 1) / rows;
        std::vector<double> pg(static_cast<size_t>(blocks * C)), pgx(pg.size());
        at::parallel_for(0, blocks, grain_for(rows * C), [&](int64_t begin, int64_t end) {
          std::vector<float> acc(static_cast<size_t>(2 * C));
          sums_channels_last_isa<T>(gp, yp, sp, q, relu, pg.data(), pgx.data(), acc.data(), begin, end, rows, P, C);
        });
        at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t block = 0; block < blocks; ++block) {
              sg[c] += pg[block * C + c];
              sgx[c] += pgx[block * C + c];
            }
          }
        });
      } else {
        std::vector<double> rg(static_cast<size_t>(N * C)), rgx(rg.size());
        at::parallel_for(0, N * C, grain_for(L), [&](int64_t begin, int64_t end) {
          sums_rows_isa<T>(gp, yp, sp, q, relu, rg.data(), rgx.data(), begin, end, C, L);
        });
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t c = 0; c < C; ++c) {
            sg[c] += rg[n * C + c];
            sgx[c] += rgx[n * C + c];
          }
        }
      }
    });
  }
  at::Tensor out = at::empty({2, C}, y.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    o[c] = static_cast<float>(sg[c]);
    o[C + c] = static_cast<float>(sgx[c]);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_apply_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& shortcut, bool relu,
    const at::Tensor& mean_g, const at::Tensor& mean_gx, bool shortcut_grad) {
  const char* op = "bn_relu_backward_apply";
  check_large(op, y, "y", y);
  const at::Tensor* s = optional_large(op, shortcut, y);
  TORCH_CHECK(grad.sizes() == y.sizes(), op, ": grad has shape ", grad.sizes(), " but y has shape ", y.sizes());
  const auto fmt = format_of(y);
  const at::Tensor g = grad.to(y.scalar_type()).contiguous(fmt);
  ParamTensors p = params(op, y, mean, invstd, weight, bias);
  const int64_t N = y.size(0), C = y.size(1), L = y.size(2) * y.size(3) * y.size(4);
  p.mg = per_channel(op, mean_g, "mean_g", C);
  p.mgx = per_channel(op, mean_gx, "mean_gx", C);
  const Params q = p.view();
  at::Tensor gy = at::empty_like(y, fmt);
  at::Tensor gs = shortcut_grad ? at::empty_like(y, fmt) : at::empty({0}, y.options());
  if (N * C * L > 0) {
    dispatch_float_bf16(y.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T *gp = g.data_ptr<T>(), *yp = y.data_ptr<T>(), *sp = s ? s->data_ptr<T>() : nullptr;
      T *gyp = gy.data_ptr<T>(), *gsp = shortcut_grad ? gs.data_ptr<T>() : nullptr;
      if (is_channels_last(y)) {
        at::parallel_for(0, N * L, grain_for(C), [&](int64_t begin, int64_t end) {
          apply_channels_last_isa<T>(gp, yp, sp, q, relu, gyp, gsp, begin, end, C);
        });
      } else {
        at::parallel_for(0, N * C, grain_for(L), [&](int64_t begin, int64_t end) {
          apply_rows_isa<T>(gp, yp, sp, q, relu, gyp, gsp, begin, end, C, L);
        });
      }
    });
  }
  return {gy, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward_sums", &bn_relu_backward_sums_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
}

}  // namespace lgd_fast
