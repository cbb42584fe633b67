// CPU kernels of lgd_fast::diffusion_epilogue, the fused end of every LGD block:
//
//   out[n,c,l]  = ReLU(r[n,c,l] * scale[c] + shift[c] + s[n,c,l] + d[n,c])     l over T*H*W positions
//   mean[n,c]   = mean_l out[n,c,l]                                           (the next block's GAP)
//
// and of its backward, given grad_out (N, C, T, H, W) and grad_mean (N, C):
//
//   g[n,c,l]     = (grad_out[n,c,l] + grad_mean[n,c] / L) * (out[n,c,l] > 0)
//   grad_r       = g * scale[c]          grad_s = g
//   grad_d[n,c]  = sum_l g               grad_shift[c] = sum_n grad_d[n,c]
//   grad_scale[c] = sum_{n,l} g * r
//
// One pass over the large tensors each way: forward reads r, s and writes out; backward reads grad_out,
// out, r and writes grad_r, grad_s. Two layouts: contiguous (rows of L values per (n, c)) and
// channels_last_3d (per n, L positions of C contiguous values). Per-channel and per-sample sums are
// float32 over short stretches folded into float64, in an order fixed by the shape (not the thread
// count), so results are bitwise reproducible. bfloat16 tensors are computed in float32 and rounded once
// (round to nearest even, NaN kept, as c10::BFloat16); the mean sums the values as stored.
//
// The loops are written with float32 vectors (GCC/Clang vector extensions) and compiled three times, for
// AVX-512 (16 lanes), AVX2 (8) and baseline x86-64 (SSE2, 4; the only copy elsewhere); isa.h's current_isa()
// picks one per call. bfloat16 is widened by a shift and narrowed by an integer round-to-nearest-even, both in vectors.

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
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {
namespace {

constexpr int64_t kStretch = 1024;     // values a float32 partial sum covers before folding into float64
constexpr int64_t kPosChunk = 256;     // channels_last: positions one task handles
// channels_last backward: positions a channel's float32 sums of g and g * r cover before folding into float64. These
// sums cancel (g and r take both signs), so their error is judged against a small result: over a whole chunk of
// 256 positions grad_scale was seen 2.12e-6 off float64 (seed 3939768605, test_op_diffusion_epilogue), over 32 far
// less.
constexpr int64_t kFoldPositions = 32;
constexpr int64_t kTaskElems = 16384;  // smallest amount of work worth a thread

using namespace simd;  // csrc/cpu/simd.h: vectors, loads and stores, ReLU, sums


// ---- forward --------------------------------------------------------------------------------------

// Contiguous: rows [begin, end) of L values, row = n * C + c; bias[row] = shift[c] + d[n, c].
template <typename T, int W>
LGD_INLINE void forward_rows_body(const T* __restrict__ r, const T* __restrict__ s, const float* scale,
                                  const float* bias, T* __restrict__ out, float* mean, int64_t begin, int64_t end,
                                  int64_t C, int64_t L) {
  for (int64_t row = begin; row < end; ++row) {
    const float a = scale[row % C], b = bias[row];
    const T* rr = r + row * L;
    const T* ss = s + row * L;
    T* oo = out + row * L;
    double total = 0.0;
    for (int64_t start = 0; start < L; start += kStretch) {
      const int64_t stop = std::min(L, start + kStretch);
      using V = vf<W>;
      V acc0 = {}, acc1 = {};
      int64_t l = start;
      for (; l + 2 * W <= stop; l += 2 * W) {
        acc0 += store<W>(oo + l, relu(load<W>(rr + l) * a + b + load<W>(ss + l)));
        acc1 += store<W>(oo + l + W, relu(load<W>(rr + l + W) * a + b + load<W>(ss + l + W)));
      }
      for (; l + W <= stop; l += W) acc0 += store<W>(oo + l, relu(load<W>(rr + l) * a + b + load<W>(ss + l)));
      float tail = 0.f;
      for (; l < stop; ++l) tail += store1(oo + l, relu1(load1(rr + l) * a + b + load1(ss + l)));
      total += static_cast<double>(hsum(acc0 + acc1) + tail);
    }
    mean[row] = static_cast<float>(total / static_cast<double>(L));
  }
}

// channels_last_3d: tasks [begin, end), task = n * chunks + chunk, each kPosChunk positions of C values;
// partial[task, c] = float32 sum of out over the task's positions; acc is scratch for C floats.
template <typename T, int W>
LGD_INLINE void forward_channels_last_body(const T* __restrict__ r, const T* __restrict__ s, const float* scale,
                                           const float* bias, T* __restrict__ out, double* partial,
                                           float* __restrict__ acc, int64_t begin, int64_t end, int64_t C,
                                           int64_t L, int64_t chunks) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / chunks, p0 = (task % chunks) * kPosChunk, p1 = std::min(L, p0 + kPosChunk);
    const float* bn = bias + n * C;
    std::fill(acc, acc + C, 0.f);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = (n * L + p) * C;
      const T* rr = r + base;
      const T* ss = s + base;
      T* oo = out + base;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        const vf<W> v = store<W>(oo + c, relu(load<W>(rr + c) * load<W>(scale + c) + load<W>(bn + c) + load<W>(ss + c)));
        store<W>(acc + c, load<W>(acc + c) + v);
      }
      for (; c < C; ++c) acc[c] += store1(oo + c, relu1(load1(rr + c) * scale[c] + bn[c] + load1(ss + c)));
    }
    for (int64_t c = 0; c < C; ++c) partial[task * C + c] = acc[c];
  }
}

// ---- backward -------------------------------------------------------------------------------------

// Contiguous rows [begin, end): grad_s = g, grad_r = g * scale[c]; sum_g[row] = sum g, sum_gr[row] = sum g*r.
template <typename T, int W>
LGD_INLINE void backward_rows_body(const T* __restrict__ gout, const float* gmean, const T* __restrict__ out,
                                   const T* __restrict__ r, const float* scale, T* __restrict__ grad_r,
                                   T* __restrict__ grad_s, double* sum_g, double* sum_gr, int64_t begin,
                                   int64_t end, int64_t C, int64_t L) {
  const float inv_L = 1.f / static_cast<float>(L);
  using V = vf<W>;
  const V zero = {};
  for (int64_t row = begin; row < end; ++row) {
    const float a = scale[row % C], gm = gmean[row] * inv_L;
    const int64_t off = row * L;
    const T *go = gout + off, *oo = out + off, *rr = r + off;
    T *gr = grad_r + off, *gs = grad_s + off;
    double tg = 0.0, tgr = 0.0;
    for (int64_t start = 0; start < L; start += kStretch) {
      const int64_t stop = std::min(L, start + kStretch);
      V ag0 = {}, ag1 = {}, agr0 = {}, agr1 = {};
      int64_t l = start;
      for (; l + 2 * W <= stop; l += 2 * W) {
        const V g0 = (load<W>(oo + l) > zero) ? load<W>(go + l) + gm : zero;
        const V g1 = (load<W>(oo + l + W) > zero) ? load<W>(go + l + W) + gm : zero;
        store<W>(gs + l, g0);
        store<W>(gs + l + W, g1);
        store<W>(gr + l, g0 * a);
        store<W>(gr + l + W, g1 * a);
        ag0 += g0;
        ag1 += g1;
        agr0 += g0 * load<W>(rr + l);
        agr1 += g1 * load<W>(rr + l + W);
      }
      for (; l + W <= stop; l += W) {
        const V g = (load<W>(oo + l) > zero) ? load<W>(go + l) + gm : zero;
        store<W>(gs + l, g);
        store<W>(gr + l, g * a);
        ag0 += g;
        agr0 += g * load<W>(rr + l);
      }
      float tail_g = 0.f, tail_gr = 0.f;
      for (; l < stop; ++l) {
        const float g = load1(oo + l) > 0.f ? load1(go + l) + gm : 0.f;
        store1(gs + l, g);
        store1(gr + l, g * a);
        tail_g += g;
        tail_gr += g * load1(rr + l);
      }
      tg += static_cast<double>(hsum(ag0 + ag1) + tail_g);
      tgr += static_cast<double>(hsum(agr0 + agr1) + tail_gr);
    }
    sum_g[row] = tg;
    sum_gr[row] = tgr;
  }
}

// channels_last_3d tasks as in the forward; gm, ag, agr are scratch for C floats each.
template <typename T, int W>
LGD_INLINE void backward_channels_last_body(const T* __restrict__ gout, const float* gmean,
                                            const T* __restrict__ out, const T* __restrict__ r, const float* scale,
                                            T* __restrict__ grad_r, T* __restrict__ grad_s, double* part_g,
                                            double* part_gr, float* __restrict__ gm, float* __restrict__ ag,
                                            float* __restrict__ agr, int64_t begin, int64_t end, int64_t C,
                                            int64_t L, int64_t chunks) {
  const float inv_L = 1.f / static_cast<float>(L);
  using V = vf<W>;
  const V zero = {};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / chunks, p0 = (task % chunks) * kPosChunk, p1 = std::min(L, p0 + kPosChunk);
    for (int64_t c = 0; c < C; ++c) gm[c] = gmean[n * C + c] * inv_L;
    double *pg = part_g + task * C, *pgr = part_gr + task * C;
    std::fill(pg, pg + C, 0.0);
    std::fill(pgr, pgr + C, 0.0);
    for (int64_t q0 = p0; q0 < p1; q0 += kFoldPositions) {  // float32 sums of kFoldPositions terms, then float64
      std::fill(ag, ag + C, 0.f);
      std::fill(agr, agr + C, 0.f);
      for (int64_t p = q0, q1 = std::min(p1, q0 + kFoldPositions); p < q1; ++p) {
        const int64_t off = (n * L + p) * C;
        const T *go = gout + off, *oo = out + off, *rr = r + off;
        T *gr = grad_r + off, *gs = grad_s + off;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const V g = (load<W>(oo + c) > zero) ? load<W>(go + c) + load<W>(gm + c) : zero;
          store<W>(gs + c, g);
          store<W>(gr + c, g * load<W>(scale + c));
          store<W>(ag + c, load<W>(ag + c) + g);
          store<W>(agr + c, load<W>(agr + c) + g * load<W>(rr + c));
        }
        for (; c < C; ++c) {
          const float g = load1(oo + c) > 0.f ? load1(go + c) + gm[c] : 0.f;
          store1(gs + c, g);
          store1(gr + c, g * scale[c]);
          ag[c] += g;
          agr[c] += g * load1(rr + c);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        pg[c] += ag[c];
        pgr[c] += agr[c];
      }
    }
  }
}

// ---- one compiled copy of each loop per SIMD path, and the switch between them -----------------------

#define LGD_DEFINE_EPILOGUE_LOOPS(ISA, TARGET, W)                                                                    \
  template <typename T>                                                                                            \
  TARGET void forward_rows_##ISA(const T* r, const T* s, const float* scale, const float* bias, T* out,           \
                                 float* mean, int64_t begin, int64_t end, int64_t C, int64_t L) {                 \
    forward_rows_body<T, W>(r, s, scale, bias, out, mean, begin, end, C, L);                                         \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void forward_channels_last_##ISA(const T* r, const T* s, const float* scale, const float* bias, T* out,  \
                                          double* partial, float* acc, int64_t begin, int64_t end, int64_t C,     \
                                          int64_t L, int64_t chunks) {                                            \
    forward_channels_last_body<T, W>(r, s, scale, bias, out, partial, acc, begin, end, C, L, chunks);                \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void backward_rows_##ISA(const T* gout, const float* gmean, const T* out, const T* r, const float* scale, \
                                  T* grad_r, T* grad_s, double* sum_g, double* sum_gr, int64_t begin, int64_t end, \
                                  int64_t C, int64_t L) {                                                         \
    backward_rows_body<T, W>(gout, gmean, out, r, scale, grad_r, grad_s, sum_g, sum_gr, begin, end, C, L);           \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void backward_channels_last_##ISA(const T* gout, const float* gmean, const T* out, const T* r,           \
                                           const float* scale, T* grad_r, T* grad_s, double* part_g,              \
                                           double* part_gr, float* gm, float* ag, float* agr, int64_t begin,      \
                                           int64_t end, int64_t C, int64_t L, int64_t chunks) {                   \
    backward_channels_last_body<T, W>(gout, gmean, out, r, scale, grad_r, grad_s, part_g, part_gr, gm, ag, agr,      \
                                   begin, end, C, L, chunks);                                                     \
  }

LGD_DEFINE_EPILOGUE_LOOPS(baseline, , 4)
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_EPILOGUE_LOOPS(avx2, LGD_TARGET_AVX2, 8)
LGD_DEFINE_EPILOGUE_LOOPS(avx512, LGD_TARGET_AVX512, 16)
#endif

template <typename T>
void forward_rows_isa(const T* r, const T* s, const float* scale, const float* bias, T* out, float* mean,
                      int64_t begin, int64_t end, int64_t C, int64_t L) {
  LGD_CALL_FOR_ISA(forward_rows, T, r, s, scale, bias, out, mean, begin, end, C, L);
}

template <typename T>
void forward_channels_last_isa(const T* r, const T* s, const float* scale, const float* bias, T* out, double* partial,
                               float* acc, int64_t begin, int64_t end, int64_t C, int64_t L, int64_t chunks) {
  LGD_CALL_FOR_ISA(forward_channels_last, T, r, s, scale, bias, out, partial, acc, begin, end, C, L, chunks);
}

template <typename T>
void backward_rows_isa(const T* gout, const float* gmean, const T* out, const T* r, const float* scale, T* grad_r,
                       T* grad_s, double* sum_g, double* sum_gr, int64_t begin, int64_t end, int64_t C, int64_t L) {
  LGD_CALL_FOR_ISA(backward_rows, T, gout, gmean, out, r, scale, grad_r, grad_s, sum_g, sum_gr, begin, end, C, L);
}

template <typename T>
void backward_channels_last_isa(const T* gout, const float* gmean, const T* out, const T* r, const float* scale,
                                T* grad_r, T* grad_s, double* part_g, double* part_gr, float* gm, float* ag,
                                float* agr, int64_t begin, int64_t end, int64_t C, int64_t L, int64_t chunks) {
  LGD_CALL_FOR_ISA(backward_channels_last, T, gout, gmean, out, r, scale, grad_r, grad_s, part_g, part_gr, gm, ag,
                   agr, begin, end, C, L, chunks);
}

// ---- drivers: split the work by shape (never by thread count) and fold the partial sums -----------------

// dst[n, c] = sum over chunks of partial[n, chunk, c], chunk by chunk in order (parallel over n).
void fold_chunks(const double* partial, int64_t N, int64_t chunks, int64_t C,
                 const std::function<void(int64_t, const double*)>& emit) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(static_cast<size_t>(C));
    for (int64_t n = begin; n < end; ++n) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const double* src = partial + (n * chunks + chunk) * C;
        for (int64_t c = 0; c < C; ++c) total[c] += src[c];
      }
      emit(n, total.data());
    }
  });
}

template <typename T>
void forward_rows(const T* r, const T* s, const float* scale, const float* bias, T* out, float* mean, int64_t rows,
                  int64_t C, int64_t L) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    forward_rows_isa<T>(r, s, scale, bias, out, mean, begin, end, C, L);
  });
}

template <typename T>
void forward_channels_last(const T* r, const T* s, const float* scale, const float* bias, T* out, float* mean,
                           int64_t N, int64_t C, int64_t L) {
  const int64_t chunks = (L + kPosChunk - 1) / kPosChunk;
  std::vector<double> partial(static_cast<size_t>(N * chunks * C));
  const int64_t grain = std::max<int64_t>(1, kTaskElems / (kPosChunk * std::max<int64_t>(C, 1)));
  at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(C));
    forward_channels_last_isa<T>(r, s, scale, bias, out, partial.data(), acc.data(), begin, end, C, L, chunks);
  });
  fold_chunks(partial.data(), N, chunks, C, [&](int64_t n, const double* total) {
    for (int64_t c = 0; c < C; ++c) mean[n * C + c] = static_cast<float>(total[c] / static_cast<double>(L));
  });
}

template <typename T>
void backward_rows(const T* gout, const float* gmean, const T* out, const T* r, const float* scale, T* grad_r,
                   T* grad_s, double* sum_g, double* sum_gr, int64_t rows, int64_t C, int64_t L) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    backward_rows_isa<T>(gout, gmean, out, r, scale, grad_r, grad_s, sum_g, sum_gr, begin, end, C, L);
  });
}

template <typename T>
void backward_channels_last(const T* gout, const float* gmean, const T* out, const T* r, const float* scale,
                            T* grad_r, T* grad_s, double* sum_g, double* sum_gr, int64_t N, int64_t C, int64_t L) {
  const int64_t chunks = (L + kPosChunk - 1) / kPosChunk;
  std::vector<double> part_g(static_cast<size_t>(N * chunks * C)), part_gr(part_g.size());
  const int64_t grain = std::max<int64_t>(1, kTaskElems / (kPosChunk * std::max<int64_t>(C, 1)));
  at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(3 * C));
    float *gm = scratch.data(), *ag = gm + C, *agr = ag + C;
    backward_channels_last_isa<T>(gout, gmean, out, r, scale, grad_r, grad_s, part_g.data(), part_gr.data(), gm, ag,
                                  agr, begin, end, C, L, chunks);
  });
  fold_chunks(part_g.data(), N, chunks, C,
              [&](int64_t n, const double* total) { std::copy(total, total + C, sum_g + n * C); });
  fold_chunks(part_gr.data(), N, chunks, C,
              [&](int64_t n, const double* total) { std::copy(total, total + C, sum_gr + n * C); });
}

// ---- checks and entry points ----------------------------------------------------------------------

void check_large(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "diffusion_epilogue: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 5, "diffusion_epilogue: ", name, " must be 5-D (N, C, T, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "diffusion_epilogue: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "diffusion_epilogue: ", name, " has shape ", t.sizes(),
              " but r has shape ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "diffusion_epilogue: ", name, " has dtype ", t.scalar_type(),
              " but r has dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast3d),
              "diffusion_epilogue: ", name, " must be contiguous or channels_last_3d, got strides ", t.strides());
  TORCH_CHECK(is_channels_last(t) == is_channels_last(like), "diffusion_epilogue: ", name,
              " and r must share a memory format (both contiguous or both channels_last_3d)");
}

at::Tensor small_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "diffusion_epilogue: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == shape, "diffusion_epilogue: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "diffusion_epilogue: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> diffusion_epilogue_cpu(const at::Tensor& r, const at::Tensor& s,
                                                          const at::Tensor& d, const at::Tensor& scale,
                                                          const at::Tensor& shift) {
  check_large(r, "r", r);
  check_large(s, "s", r);
  const int64_t N = r.size(0), C = r.size(1), L = r.size(2) * r.size(3) * r.size(4);
  const at::Tensor scale32 = small_f32(scale, "scale", {C});
  const at::Tensor shift32 = small_f32(shift, "shift", {C});
  const at::Tensor d32 = small_f32(d, "d", {N, C});
  const at::Tensor bias = (d32 + shift32.unsqueeze(0)).contiguous();  // shift[c] + d[n, c], (N, C)
  const bool cl = is_channels_last(r);
  at::Tensor out = at::empty_like(r, cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  at::Tensor mean32 = at::empty({N, C}, r.options().dtype(at::kFloat));
  if (L == 0) {
    mean32.fill_(NAN);  // the mean of nothing, as torch.mean gives
  } else if (N * C > 0) {
    dispatch_float_bf16(r.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const float *a = scale32.data_ptr<float>(), *b = bias.data_ptr<float>();
      float* m = mean32.data_ptr<float>();
      if (cl) {
        forward_channels_last<T>(r.data_ptr<T>(), s.data_ptr<T>(), a, b, out.data_ptr<T>(), m, N, C, L);
      } else {
        forward_rows<T>(r.data_ptr<T>(), s.data_ptr<T>(), a, b, out.data_ptr<T>(), m, N * C, C, L);
      }
    });
  }
  return {out, mean32.to(r.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diffusion_epilogue_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_mean, const at::Tensor& out, const at::Tensor& r,
    const at::Tensor& scale) {
  check_large(r, "r", r);
  check_large(out, "out", r);
  const int64_t N = r.size(0), C = r.size(1), L = r.size(2) * r.size(3) * r.size(4);
  const at::Tensor scale32 = small_f32(scale, "scale", {C});
  const at::Tensor gmean32 = small_f32(grad_mean, "grad_mean", {N, C});
  const bool cl = is_channels_last(r);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad_out.sizes() == r.sizes(), "diffusion_epilogue_backward: grad_out has shape ", grad_out.sizes(),
              " but r has shape ", r.sizes());
  const at::Tensor gout = grad_out.to(r.scalar_type()).contiguous(fmt);  // autograd may hand any layout
  at::Tensor grad_r = at::empty_like(r, fmt), grad_s = at::empty_like(r, fmt);
  at::Tensor sum_g = at::zeros({N, C}, r.options().dtype(at::kDouble));
  at::Tensor sum_gr = at::zeros({N, C}, r.options().dtype(at::kDouble));
  if (N * C * L > 0) {
    dispatch_float_bf16(r.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const float *a = scale32.data_ptr<float>(), *gm = gmean32.data_ptr<float>();
      double *sg = sum_g.data_ptr<double>(), *sgr = sum_gr.data_ptr<double>();
      if (cl) {
        backward_channels_last<T>(gout.data_ptr<T>(), gm, out.data_ptr<T>(), r.data_ptr<T>(), a,
                                  grad_r.data_ptr<T>(), grad_s.data_ptr<T>(), sg, sgr, N, C, L);
      } else {
        backward_rows<T>(gout.data_ptr<T>(), gm, out.data_ptr<T>(), r.data_ptr<T>(), a, grad_r.data_ptr<T>(),
                         grad_s.data_ptr<T>(), sg, sgr, N * C, C, L);
      }
    });
  }
  // grad_d, grad_scale, grad_shift in float32; the caller casts each to its input's dtype.
  return {grad_r, grad_s, sum_g.to(at::kFloat), sum_gr.sum(0).to(at::kFloat), sum_g.sum(0).to(at::kFloat)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("diffusion_epilogue", &diffusion_epilogue_cpu);
  m.impl("diffusion_epilogue_backward", &diffusion_epilogue_backward_cpu);
}

}  // namespace lgd_fast
