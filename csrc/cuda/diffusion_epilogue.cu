// CUDA kernels of lgd_fast::diffusion_epilogue (schemas in csrc/ext.cpp, CPU kernels in
// csrc/cpu/diffusion_epilogue.cpp, Triton kernels in kernels/diffusion_epilogue.py):
//
//   out[n,c,l]  = ReLU(r[n,c,l] * scale[c] + bias[n,c] + s[n,c,l])     bias = shift[c] + d[n,c]
//   mean[n,c]   = mean_l out[n,c,l]
//   g[n,c,l]    = (grad_out[n,c,l] + grad_mean[n,c] / L) * (out[n,c,l] > 0)
//   grad_r = g * scale[c]   grad_s = g   grad_d = sum_l g   grad_scale = sum_{n,l} g * r   grad_shift = sum_n grad_d
//
// One pass over the large tensors each way. L is cut into `splits` stretches chosen from the shape alone;
// each block writes float32 partial sums of its stretch (fixed reduction order, no atomics) and the
// (splits, N, C) partials are added by at::sum: the same bits every run. Layouts: contiguous (one warp per
// (n, c) row) and channels_last_3d (a block covers 32 channels x 8 position lanes of one sample).
// float32, bfloat16 and float16 tensors, computed in float32 and rounded once on store.

// Per-op ATen headers rather than ATen/ATen.h: the same API, a fraction of nvcc's parse time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

namespace lgd_fast {
namespace {

constexpr int64_t kSplitQuantum = 1024;  // a stretch of L is a multiple of this
constexpr int64_t kTargetBlocks = 2048;  // blocks (rows or channel tiles x stretches) a launch aims for
constexpr int kRowsPerBlock = 8;         // contiguous: warps per block, one row each
constexpr int kTileC = 32;               // channels_last: channels per block (threadIdx.x)
constexpr int kLanesP = 8;               // channels_last: position lanes per block (threadIdx.y)

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}
template <typename T>
__device__ __forceinline__ T cast(float v) {
  return static_cast<T>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// ---- forward ---------------------------------------------------------------------------------------

template <typename T>
__global__ void forward_rows_kernel(const T* __restrict__ r, const T* __restrict__ s, const float* __restrict__ scale,
                                    const float* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
                                    int64_t rows, int64_t C, int64_t L, int64_t split_len) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * split_len, l1 = min(L, l0 + split_len);
  const float a = scale[row % C], b = bias[row];
  const int64_t base = row * L;
  float acc = 0.f;
  for (int64_t l = l0 + threadIdx.x; l < l1; l += 32) {
    const T v = cast<T>(fmaxf(load(r, base + l) * a + b + load(s, base + l), 0.f));
    out[base + l] = v;
    acc += static_cast<float>(v);
  }
  acc = warp_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.y * rows + row] = acc;
}

// Per block: kLanesP x kTileC partial sums reduced over the lanes in a fixed order.
__device__ __forceinline__ float lane_sum(float v, float (*smem)[kTileC]) {
  smem[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.y == 0) {
    for (int p = 0; p < kLanesP; ++p) total += smem[p][threadIdx.x];
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void forward_cl_kernel(const T* __restrict__ r, const T* __restrict__ s, const float* __restrict__ scale,
                                  const float* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
                                  int64_t N, int64_t C, int64_t L, int64_t split_len) {
  __shared__ float smem[kLanesP][kTileC];
  const int64_t c_blocks = (C + kTileC - 1) / kTileC;
  const int64_t n = blockIdx.x / c_blocks;
  const int64_t c = (blockIdx.x % c_blocks) * kTileC + threadIdx.x;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * split_len, l1 = min(L, l0 + split_len);
  float acc = 0.f;
  if (c < C) {
    const float a = scale[c], b = bias[n * C + c];
    for (int64_t l = l0 + threadIdx.y; l < l1; l += kLanesP) {
      const int64_t i = (n * L + l) * C + c;
      const T v = cast<T>(fmaxf(load(r, i) * a + b + load(s, i), 0.f));
      out[i] = v;
      acc += static_cast<float>(v);
    }
  }
  const float total = lane_sum(acc, smem);
  if (threadIdx.y == 0 && c < C) partial[(blockIdx.y * N + n) * C + c] = total;
}

// ---- backward --------------------------------------------------------------------------------------

template <typename T>
__global__ void backward_rows_kernel(const T* __restrict__ gout, const T* __restrict__ out, const T* __restrict__ r,
                                     const float* __restrict__ scale, const float* __restrict__ gmean,
                                     T* __restrict__ grad_r, T* __restrict__ grad_s, float* __restrict__ part_g,
                                     float* __restrict__ part_gr, int64_t rows, int64_t C, int64_t L,
                                     int64_t split_len) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * split_len, l1 = min(L, l0 + split_len);
  const float a = scale[row % C], gm = gmean[row];
  const int64_t base = row * L;
  float acc_g = 0.f, acc_gr = 0.f;
  for (int64_t l = l0 + threadIdx.x; l < l1; l += 32) {
    const int64_t i = base + l;
    const float g = load(out, i) > 0.f ? load(gout, i) + gm : 0.f;
    grad_s[i] = cast<T>(g);
    grad_r[i] = cast<T>(g * a);
    acc_g += g;
    acc_gr += g * load(r, i);
  }
  acc_g = warp_sum(acc_g);
  acc_gr = warp_sum(acc_gr);
  if (threadIdx.x == 0) {
    part_g[blockIdx.y * rows + row] = acc_g;
    part_gr[blockIdx.y * rows + row] = acc_gr;
  }
}

template <typename T>
__global__ void backward_cl_kernel(const T* __restrict__ gout, const T* __restrict__ out, const T* __restrict__ r,
                                   const float* __restrict__ scale, const float* __restrict__ gmean,
                                   T* __restrict__ grad_r, T* __restrict__ grad_s, float* __restrict__ part_g,
                                   float* __restrict__ part_gr, int64_t N, int64_t C, int64_t L, int64_t split_len) {
  __shared__ float smem[kLanesP][kTileC];
  const int64_t c_blocks = (C + kTileC - 1) / kTileC;
  const int64_t n = blockIdx.x / c_blocks;
  const int64_t c = (blockIdx.x % c_blocks) * kTileC + threadIdx.x;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * split_len, l1 = min(L, l0 + split_len);
  float acc_g = 0.f, acc_gr = 0.f;
  if (c < C) {
    const float a = scale[c], gm = gmean[n * C + c];
    for (int64_t l = l0 + threadIdx.y; l < l1; l += kLanesP) {
      const int64_t i = (n * L + l) * C + c;
      const float g = load(out, i) > 0.f ? load(gout, i) + gm : 0.f;
      grad_s[i] = cast<T>(g);
      grad_r[i] = cast<T>(g * a);
      acc_g += g;
      acc_gr += g * load(r, i);
    }
  }
  const float total_g = lane_sum(acc_g, smem);
  const float total_gr = lane_sum(acc_gr, smem);
  if (threadIdx.y == 0 && c < C) {
    part_g[(blockIdx.y * N + n) * C + c] = total_g;
    part_gr[(blockIdx.y * N + n) * C + c] = total_gr;
  }
}

// ---- host side -------------------------------------------------------------------------------------

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

void check_large(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "diffusion_epilogue (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "diffusion_epilogue (cuda): ", name, " is on ", t.device(),
              " but r is on ", like.device());
  TORCH_CHECK(t.dim() == 5, "diffusion_epilogue (cuda): ", name, " must be 5-D (N, C, T, H, W), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "diffusion_epilogue (cuda): ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "diffusion_epilogue (cuda): ", name, " has shape ", t.sizes(),
              " but r has shape ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "diffusion_epilogue (cuda): ", name, " has dtype ",
              t.scalar_type(), " but r has dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast3d), "diffusion_epilogue (cuda): ",
              name, " must be contiguous or channels_last_3d, got strides ", t.strides());
  TORCH_CHECK(is_channels_last(t) == is_channels_last(like), "diffusion_epilogue (cuda): ", name,
              " and r must share a memory format (both contiguous or both channels_last_3d)");
}

at::Tensor small_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "diffusion_epilogue (cuda): ", name, " is on ", t.device(),
              " but r is on ", like.device());
  TORCH_CHECK(t.sizes() == shape, "diffusion_epilogue (cuda): ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "diffusion_epilogue (cuda): ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// (split_len, splits) from the shape alone, as in kernels/diffusion_epilogue.py.
std::pair<int64_t, int64_t> split(int64_t rows, int64_t L) {
  const int64_t want = std::max<int64_t>(
      1, std::min((L + kSplitQuantum - 1) / kSplitQuantum, (kTargetBlocks + std::max<int64_t>(rows, 1) - 1) /
                                                               std::max<int64_t>(rows, 1)));
  const int64_t per = (L + want - 1) / want;
  const int64_t split_len = (per + kSplitQuantum - 1) / kSplitQuantum * kSplitQuantum;
  return {split_len, (L + split_len - 1) / split_len};
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else if (dtype == at::kBFloat16) {
    fn(at::BFloat16{});
  } else {
    fn(at::Half{});
  }
}

std::tuple<at::Tensor, at::Tensor> diffusion_epilogue_cuda(const at::Tensor& r, const at::Tensor& s,
                                                           const at::Tensor& d, const at::Tensor& scale,
                                                           const at::Tensor& shift) {
  check_large(r, "r", r);
  check_large(s, "s", r);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t N = r.size(0), C = r.size(1), L = r.size(2) * r.size(3) * r.size(4);
  const at::Tensor scale32 = small_f32(scale, "scale", {C}, r);
  const at::Tensor shift32 = small_f32(shift, "shift", {C}, r);
  const at::Tensor d32 = small_f32(d, "d", {N, C}, r);
  const at::Tensor bias = d32.add(shift32.unsqueeze(0)).contiguous();
  const bool cl = is_channels_last(r);
  at::Tensor out = at::empty_like(r, cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  if (L == 0 || N * C == 0) return {out, at::full({N, C}, NAN, r.options())};
  const std::pair<int64_t, int64_t> stretch = split(N * C, L);
  const int64_t split_len = stretch.first, splits = stretch.second;
  TORCH_CHECK(splits <= 65535, "diffusion_epilogue (cuda): too many stretches of L (", splits, ")");
  at::Tensor partial = at::empty({splits, N, C}, r.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(r.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float *a = scale32.data_ptr<float>(), *b = bias.data_ptr<float>();
    if (cl) {
      const dim3 grid(static_cast<unsigned>(N * ((C + kTileC - 1) / kTileC)), static_cast<unsigned>(splits));
      forward_cl_kernel<T><<<grid, dim3(kTileC, kLanesP), 0, stream>>>(
          r.const_data_ptr<T>(), s.const_data_ptr<T>(), a, b, out.mutable_data_ptr<T>(),
          partial.mutable_data_ptr<float>(), N, C, L, split_len);
    } else {
      const dim3 grid(static_cast<unsigned>((N * C + kRowsPerBlock - 1) / kRowsPerBlock),
                      static_cast<unsigned>(splits));
      forward_rows_kernel<T><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(
          r.const_data_ptr<T>(), s.const_data_ptr<T>(), a, b, out.mutable_data_ptr<T>(),
          partial.mutable_data_ptr<float>(), N * C, C, L, split_len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, partial.sum(0).div(static_cast<double>(L)).to(r.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diffusion_epilogue_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_mean, const at::Tensor& out, const at::Tensor& r,
    const at::Tensor& scale) {
  check_large(r, "r", r);
  check_large(out, "out", r);
  TORCH_CHECK(grad_out.is_cuda() && grad_out.device() == r.device(), "diffusion_epilogue_backward (cuda): grad_out is on ",
              grad_out.device(), " but r is on ", r.device());
  TORCH_CHECK(grad_out.sizes() == r.sizes(), "diffusion_epilogue_backward (cuda): grad_out has shape ",
              grad_out.sizes(), " but r has shape ", r.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()),
              "diffusion_epilogue_backward (cuda): grad_out must be floating-point, got ", grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t N = r.size(0), C = r.size(1), L = r.size(2) * r.size(3) * r.size(4);
  const at::Tensor scale32 = small_f32(scale, "scale", {C}, r);
  const at::Tensor gmean32 = small_f32(grad_mean, "grad_mean", {N, C}, r);
  const bool cl = is_channels_last(r);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  const at::Tensor gout = grad_out.to(r.scalar_type()).contiguous(fmt);  // autograd may hand any layout
  at::Tensor grad_r = at::empty_like(r, fmt), grad_s = at::empty_like(r, fmt);
  if (L == 0 || N * C == 0) {
    const at::Tensor zeros = at::zeros({N, C}, r.options().dtype(at::kFloat));
    return {grad_r, grad_s, zeros, zeros.sum(0), zeros.sum(0)};
  }
  const at::Tensor gm = gmean32.div(static_cast<double>(L)).contiguous();
  const std::pair<int64_t, int64_t> stretch = split(N * C, L);
  const int64_t split_len = stretch.first, splits = stretch.second;
  TORCH_CHECK(splits <= 65535, "diffusion_epilogue_backward (cuda): too many stretches of L (", splits, ")");
  at::Tensor part_g = at::empty({splits, N, C}, r.options().dtype(at::kFloat));
  at::Tensor part_gr = at::empty({splits, N, C}, r.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(r.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float *a = scale32.data_ptr<float>(), *g = gm.data_ptr<float>();
    if (cl) {
      const dim3 grid(static_cast<unsigned>(N * ((C + kTileC - 1) / kTileC)), static_cast<unsigned>(splits));
      backward_cl_kernel<T><<<grid, dim3(kTileC, kLanesP), 0, stream>>>(
          gout.const_data_ptr<T>(), out.const_data_ptr<T>(), r.const_data_ptr<T>(), a, g,
          grad_r.mutable_data_ptr<T>(), grad_s.mutable_data_ptr<T>(), part_g.mutable_data_ptr<float>(),
          part_gr.mutable_data_ptr<float>(), N, C, L, split_len);
    } else {
      const dim3 grid(static_cast<unsigned>((N * C + kRowsPerBlock - 1) / kRowsPerBlock),
                      static_cast<unsigned>(splits));
      backward_rows_kernel<T><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(
          gout.const_data_ptr<T>(), out.const_data_ptr<T>(), r.const_data_ptr<T>(), a, g,
          grad_r.mutable_data_ptr<T>(), grad_s.mutable_data_ptr<T>(), part_g.mutable_data_ptr<float>(),
          part_gr.mutable_data_ptr<float>(), N * C, C, L, split_len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor grad_d = part_g.sum(0);
  return {grad_r, grad_s, grad_d, part_gr.sum(at::IntArrayRef{0, 1}), grad_d.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CUDA, m) {
  m.impl("diffusion_epilogue", &diffusion_epilogue_cuda);
  m.impl("diffusion_epilogue_backward", &diffusion_epilogue_backward_cuda);
}

}  // namespace lgd_fast
