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
// count), so results are bitwise reproducible. bfloat16 tensors are computed in float32 and rounded once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace lgd_fast {
namespace {

constexpr int64_t kStretch = 1024;    // values a float32 partial sum covers before folding into float64
constexpr int64_t kPosChunk = 256;    // channels_last: positions one task handles
constexpr int64_t kTaskElems = 16384; // smallest amount of work worth a thread

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) { p[i] = c10::BFloat16(v); }
// The value as stored, read back: the mean is the mean of the output the caller actually gets.
inline float rounded(float v, float*) { return v; }
inline float rounded(float v, c10::BFloat16*) { return static_cast<float>(c10::BFloat16(v)); }

template <typename F>
void dispatch_float_bf16(at::ScalarType dtype, F&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

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

// ---- forward --------------------------------------------------------------------------------------

template <typename T>
void forward_rows(const T* r, const T* s, const float* scale, const float* bias, T* out, float* mean,
                  int64_t rows, int64_t C, int64_t L) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float a = scale[row % C], b = bias[row];
      const T* rr = r + row * L;
      const T* ss = s + row * L;
      T* oo = out + row * L;
      double total = 0.0;
      for (int64_t start = 0; start < L; start += kStretch) {
        const int64_t stop = std::min(L, start + kStretch);
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t l = start; l < stop; ++l) {
          const float v = std::max(load(rr, l) * a + b + load(ss, l), 0.f);
          store(oo, l, v);
          acc += rounded(v, oo);
        }
        total += acc;
      }
      mean[row] = static_cast<float>(total / static_cast<double>(L));
    }
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
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
      const int64_t p0 = chunk * kPosChunk, p1 = std::min(L, p0 + kPosChunk);
      const float* bn = bias + n * C;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = (n * L + p) * C;
        const T* rr = r + base;
        const T* ss = s + base;
        T* oo = out + base;
        float* a = acc.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float v = std::max(load(rr, c) * scale[c] + bn[c] + load(ss, c), 0.f);
          store(oo, c, v);
          a[c] += rounded(v, oo);
        }
      }
      double* dst = partial.data() + task * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = acc[c];
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[(n * chunks + chunk) * C + c];
      mean[n * C + c] = static_cast<float>(total / static_cast<double>(L));
    }
  }
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

// ---- backward -------------------------------------------------------------------------------------

template <typename T>
void backward_rows(const T* gout, const float* gmean, const T* out, const T* r, const float* scale, T* grad_r,
                   T* grad_s, double* sum_g, double* sum_gr, int64_t rows, int64_t C, int64_t L) {
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(L, 1));
  const float inv_L = 1.f / static_cast<float>(L);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float a = scale[row % C], gm = gmean[row] * inv_L;
      const int64_t off = row * L;
      double tg = 0.0, tgr = 0.0;
      for (int64_t start = 0; start < L; start += kStretch) {
        const int64_t stop = std::min(L, start + kStretch);
        float ag = 0.f, agr = 0.f;
#pragma omp simd reduction(+ : ag, agr)
        for (int64_t l = start; l < stop; ++l) {
          const float g = load(out + off, l) > 0.f ? load(gout + off, l) + gm : 0.f;
          store(grad_s + off, l, g);
          store(grad_r + off, l, g * a);
          ag += g;
          agr += g * load(r + off, l);
        }
        tg += ag;
        tgr += agr;
      }
      sum_g[row] = tg;
      sum_gr[row] = tgr;
    }
  });
}

template <typename T>
void backward_channels_last(const T* gout, const float* gmean, const T* out, const T* r, const float* scale,
                            T* grad_r, T* grad_s, double* sum_g, double* sum_gr, int64_t N, int64_t C, int64_t L) {
  const int64_t chunks = (L + kPosChunk - 1) / kPosChunk;
  std::vector<double> part_g(static_cast<size_t>(N * chunks * C)), part_gr(part_g.size());
  const int64_t grain = std::max<int64_t>(1, kTaskElems / (kPosChunk * std::max<int64_t>(C, 1)));
  const float inv_L = 1.f / static_cast<float>(L);
  at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> ag(static_cast<size_t>(C)), agr(static_cast<size_t>(C)), gm(static_cast<size_t>(C));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
      const int64_t p0 = chunk * kPosChunk, p1 = std::min(L, p0 + kPosChunk);
      for (int64_t c = 0; c < C; ++c) gm[c] = gmean[n * C + c] * inv_L;
      std::fill(ag.begin(), ag.end(), 0.f);
      std::fill(agr.begin(), agr.end(), 0.f);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t off = (n * L + p) * C;
        float *a = ag.data(), *b = agr.data();
        const float* m = gm.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float g = load(out + off, c) > 0.f ? load(gout + off, c) + m[c] : 0.f;
          store(grad_s + off, c, g);
          store(grad_r + off, c, g * scale[c]);
          a[c] += g;
          b[c] += g * load(r + off, c);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        part_g[task * C + c] = ag[c];
        part_gr[task * C + c] = agr[c];
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double tg = 0.0, tgr = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        tg += part_g[(n * chunks + chunk) * C + c];
        tgr += part_gr[(n * chunks + chunk) * C + c];
      }
      sum_g[n * C + c] = tg;
      sum_gr[n * C + c] = tgr;
    }
  }
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
