// CPU kernel of lgd_fast::stem_conv_pool: an LGD stem at inference in one pass,
//   out = max_pool(1x3x3, stride (1, 2, 2), pad (0, 1, 1)) of ReLU(conv(x, weight) + bias),
//   the conv (kt x 7 x 7, stride (st, 2, 2), padding (0, 3, 3)) over a clip of a few channels (RGB),
// with the eval BatchNorm folded into weight and bias by the caller (lgd_fast/ops/stem_conv_pool.py).
//
// Why a kernel of its own: oneDNN runs this conv (3 input channels, 7x7 taps, stride 2) at 70-85% of the
// machine's FMA peak here, and the max-pool then reads the conv's output (4x the pooled size) back from memory.
// Here one task takes one output frame of one video (n, t), or a chunk of its pooled rows where frames are fewer
// than twice the threads: it copies the rows it reads of the frame's kt input frames, each channel plane
// zero-padded by 3, into a float32 slab (reading x in any strides and in float32 or bfloat16), then makes the
// conv's output two rows at a time and pools them while they are in L1, writing only the pooled rows.
// A conv row is a register tile of P output pixels x V vectors of output channels: per tap, V weight vectors
// and P broadcast inputs feed P x V fused multiply-adds (the weights are repacked per call into
// (C_in * kt * 49, C_out) rows, C_out padded to the vector width). Every pooling window holds at least one conv
// output, every conv output is ReLU'd (>= 0 or NaN), so zeros stand in for the pool's -inf padding, and the max
// lets NaN through as ATen's max-pool does.
//
// Arithmetic: float32 multiply-adds in the tap order (c, dt, kh, kw), bias first; a bfloat16 output is rounded
// once, at the store (max commutes with rounding). A bfloat16 weight makes the products bfloat16 ones, as a conv
// under bf16 autocast computes them: x rounded to bfloat16, each product exact in float32, the sums in float32, the
// output bfloat16. On a CPU with AVX512_BF16 (the AVX-512 path) those run as vdpbf16ps dot products, two input
// planes (c, dt) per instruction in the order (plane pair, kh, kw), each pair's two products added in turn (round
// to nearest even; subnormal inputs and results flushed to zero, as the instruction does); elsewhere as the
// float32 tiles on the rounded x. Every output is computed the same way whichever task makes it,
// so results are the same for any number of threads (which sets how a frame's rows are split).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "isa.h"  // (LGD_BF16_DOT)
#ifdef LGD_BF16_DOT
#include <immintrin.h>  // the AVX512_BF16 dot products
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace lgd_fast {

namespace {

using simd::load;
using simd::vf;

constexpr int kTaps = 7;  // the stem's 7x7 spatial kernel (stride 2, padding 3)

// What a task needs: the slab geometry and the packed weights, shared by every task.
struct StemArgs {
  const float* weight;     // (planes * 49, cpad): planes = C_in * kt (the float32 tiles)
  const uint32_t* wpair;   // (pairs * 49, cpad) bfloat16 pairs of planes (2q, 2q + 1) (the dot-product tiles)
  const uint32_t* wcols;   // (7 * 3, cpad): an odd last plane's taps (kh, 2j) and (kh, 2j + 1) in pairs, j < 3
  const float* bias;       // (cpad,)
  bool round_x;            // x rounded to bfloat16 in the slab (a bfloat16 weight on the float32 tiles)
  int64_t planes, pairs, kt, st, cout, cpad;
  int64_t T_out, Hc, Wc, Hp, Wp;  // conv output rows / columns, pooled rows / columns
  int64_t rs, ps;                 // slab row stride and plane stride (floats)
  int64_t chunks, chunk_rows;     // each output frame's pooled rows in chunks of chunk_rows (a task each)
};

// Input plane pl = c * kt + dt of output frame t of video n: its first row.
template <typename T>
LGD_INLINE const T* input_plane(const T* x, const int64_t* stride, const StemArgs& a, int64_t n, int64_t t,
                                int64_t pl) {
  return x + n * stride[0] + (pl / a.kt) * stride[1] + (t * a.st + pl % a.kt) * stride[2];
}

// Copies rows [h0, h1) of the kt input frames of output frame t of video n, every channel, into the slab's
// interiors (the borders are never written, so they stay zero; a task reads only the rows it copied).
template <typename T>
void fill_slab(const T* x, const int64_t* size, const int64_t* stride, const StemArgs& a, int64_t n, int64_t t,
               int64_t h0, int64_t h1, float* slab) {
  const int64_t Wd = size[4];
  for (int64_t pl = 0; pl < a.planes; ++pl) {
    const T* src = input_plane(x, stride, a, n, t, pl);
    float* dst = slab + pl * a.ps + 3 * a.rs + 3;
    for (int64_t h = h0; h < h1; ++h) {
      const T* s = src + h * stride[3];
      float* d = dst + h * a.rs;
      if (a.round_x) {
        for (int64_t w = 0; w < Wd; ++w) d[w] = static_cast<float>(c10::BFloat16(static_cast<float>(s[w * stride[4]])));
      } else if (stride[4] == 1) {
        for (int64_t w = 0; w < Wd; ++w) d[w] = static_cast<float>(s[w]);
      } else {
        for (int64_t w = 0; w < Wd; ++w) d[w] = static_cast<float>(s[w * stride[4]]);
      }
    }
  }
}

// The same rows for the dot-product tiles: x rounded to bfloat16, planes (c * kt + dt) in pairs, plane 2q in the
// low half of pair q's 32-bit words and 2q + 1 in the high half (an odd last plane's partner stays zero).
template <typename T>
void fill_slab(const T* x, const int64_t* size, const int64_t* stride, const StemArgs& a, int64_t n, int64_t t,
               int64_t h0, int64_t h1, uint32_t* slab) {
  const int64_t Wd = size[4];
  uint16_t* halves = reinterpret_cast<uint16_t*>(slab);
  for (int64_t pl = 0; pl < a.planes; ++pl) {
    const T* src = input_plane(x, stride, a, n, t, pl);
    uint16_t* dst = halves + 2 * ((pl / 2) * a.ps + 3 * a.rs + 3) + (pl & 1);
    for (int64_t h = h0; h < h1; ++h) {
      const T* s = src + h * stride[3];
      uint16_t* d = dst + 2 * h * a.rs;
      for (int64_t w = 0; w < Wd; ++w) d[2 * w] = c10::BFloat16(static_cast<float>(s[w * stride[4]])).x;
    }
  }
}

LGD_INLINE float max1(float a, float b) { return (a > b || a != a) ? a : b; }

// The body once per SIMD path (stem_conv_pool_body.h says why each is a region of its own).
namespace baseline {
constexpr int W = 4;
#include "stem_conv_pool_body.h"
}  // namespace baseline
#ifdef LGD_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int W = 8;
#include "stem_conv_pool_body.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
constexpr int W = 16;
#include "stem_conv_pool_body.h"
}  // namespace avx512
#pragma GCC pop_options
#endif
#ifdef LGD_BF16_DOT
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
namespace avx512_bf16 {
constexpr int W = 16;
#define LGD_STEM_DOT 1
#include "stem_conv_pool_body.h"
#undef LGD_STEM_DOT
}  // namespace avx512_bf16
#pragma GCC pop_options
#endif

// dot: the bfloat16 dot-product tiles (a bfloat16 weight on the AVX-512 path of a CPU with AVX512_BF16).
template <typename T, typename TOut>
void stem_tasks_isa(CpuIsa isa, bool dot, const T* x, const int64_t* size, const int64_t* stride, const StemArgs& a,
                    TOut* out, const int64_t* ostride, int64_t b0, int64_t b1) {
#ifdef LGD_BF16_DOT
  if (dot) return avx512_bf16::stem_tasks<T, TOut>(x, size, stride, a, out, ostride, b0, b1);
#endif
#ifdef LGD_X86_DISPATCH
  switch (isa) {
    case CpuIsa::kAvx512: return avx512::stem_tasks<T, TOut>(x, size, stride, a, out, ostride, b0, b1);
    case CpuIsa::kAvx2: return avx2::stem_tasks<T, TOut>(x, size, stride, a, out, ostride, b0, b1);
    default: break;
  }
#endif
  TORCH_CHECK(!dot, "lgd_fast::stem_conv_pool: internal error: no bfloat16 dot-product path in this build");
  baseline::stem_tasks<T, TOut>(x, size, stride, a, out, ostride, b0, b1);
}
int vector_width(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return 16;
    case CpuIsa::kAvx2: return 8;
    default: return 4;
  }
}

#define STEM_CHECK(cond, ...) TORCH_CHECK(cond, "lgd_fast::stem_conv_pool: ", __VA_ARGS__)

at::Tensor stem_conv_pool_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t stride_t) {
  STEM_CHECK(x.dim() == 5, "x must be a 5-D tensor (N, C, T, H, W), got shape ", x.sizes());
  STEM_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
             "x must be float32 or bfloat16, got ", x.scalar_type());
  STEM_CHECK(weight.dim() == 5 && weight.size(1) == x.size(1) && weight.size(3) == kTaps && weight.size(4) == kTaps,
             "weight must be (C_out, ", x.size(1), ", kt, 7, 7) for x with ", x.size(1), " channels, got shape ",
             weight.sizes());
  STEM_CHECK((weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                 weight.device() == x.device(),
             "weight must be a float32 or bfloat16 tensor on ", x.device(), ", got ", weight.scalar_type(), " on ",
             weight.device());
  STEM_CHECK(stride_t >= 1, "stride_t must be at least 1, got ", stride_t);
  const int64_t kt = weight.size(2), cout = weight.size(0), T = x.size(2), H = x.size(3), Wd = x.size(4);
  STEM_CHECK(kt >= 1 && T >= kt, "the clip has ", T, " frames, fewer than the kernel's ", kt);
  STEM_CHECK(cout >= 1 && H >= 1 && Wd >= 1, "empty weight or frames: weight ", weight.sizes(), ", x ", x.sizes());
  if (bias.has_value()) {
    STEM_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->is_floating_point() && bias->device() == x.device(),
               "bias must be a floating (", cout, ",) tensor on ", x.device(), ", got ", bias->sizes(), " ",
               bias->scalar_type(), " on ", bias->device());
  }
  StemArgs a{};
  a.kt = kt;
  a.st = stride_t;
  a.cout = cout;
  a.planes = x.size(1) * kt;
  a.T_out = (T - kt) / stride_t + 1;
  a.Hc = (H - 1) / 2 + 1;  // (H + 2 * 3 - 7) / 2 + 1
  a.Wc = (Wd - 1) / 2 + 1;
  a.Hp = (a.Hc - 1) / 2 + 1;  // (Hc + 2 * 1 - 3) / 2 + 1
  a.Wp = (a.Wc - 1) / 2 + 1;
  a.rs = 2 * a.Wc + 6;  // padded columns 0 .. 2 * (Wc - 1) + 6
  a.ps = a.rs * (2 * a.Hc + 6);
  const CpuIsa isa = current_isa();  // (read once: the padded width and the path taken must agree)
  const int W = vector_width(isa);
  a.cpad = (cout + W - 1) / W * W;
  // A bfloat16 weight sets the products' precision: x rounded to bfloat16 (as under autocast), each product exact in
  // float32; AVX512_BF16's dot products where the CPU has them, else the float32 tiles on the rounded x.
  const bool low = weight.scalar_type() == at::kBFloat16;
  const bool dot = low && isa == CpuIsa::kAvx512 && bf16_dot_products();
  a.round_x = low && !dot && x.scalar_type() == at::kFloat;  // (a bfloat16 clip is rounded already)
  a.pairs = (a.planes + 1) / 2;  // (an odd last plane: a pair of its own with zeros, plus its column pairs)

  const int64_t N = x.size(0);
  const auto out_dtype = (low || x.scalar_type() == at::kBFloat16) ? at::kBFloat16 : at::kFloat;
  at::Tensor out = at::empty({N, cout, a.T_out, a.Hp, a.Wp},
                             x.options().dtype(out_dtype).memory_format(at::MemoryFormat::ChannelsLast3d));
  if (out.numel() == 0) {
    return out;
  }
  const int64_t taps = a.planes * kTaps * kTaps;
  std::vector<float> packed;
  std::vector<uint32_t> pairs, cols;
  const at::Tensor w2 = weight.contiguous().reshape({cout, taps});
  if (dot) {  // weight -> (pairs * 49, cpad) words: planes (2q, 2q + 1) at one tap, channels padded with zeros
    pairs.assign(static_cast<size_t>(a.pairs * kTaps * kTaps * a.cpad), 0u);
    const auto wa = w2.accessor<c10::BFloat16, 2>();
    for (int64_t co = 0; co < cout; ++co) {
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t pl = k / (kTaps * kTaps), tap = k % (kTaps * kTaps);
        const uint32_t bits = wa[co][k].x;
        pairs[((pl / 2) * kTaps * kTaps + tap) * a.cpad + co] |= (pl & 1) ? bits << 16 : bits;
      }
    }
    if (a.planes % 2 == 1) {  // the odd last plane's taps (kh, 2j), (kh, 2j + 1), j < 3, in pairs
      cols.assign(static_cast<size_t>(kTaps * 3 * a.cpad), 0u);
      const int64_t last = (a.planes - 1) * kTaps * kTaps;
      for (int64_t co = 0; co < cout; ++co) {
        for (int64_t kh = 0; kh < kTaps; ++kh) {
          for (int64_t j = 0; j < 3; ++j) {
            const uint32_t lo = wa[co][last + kh * kTaps + 2 * j].x, hi = wa[co][last + kh * kTaps + 2 * j + 1].x;
            cols[(kh * 3 + j) * a.cpad + co] = lo | hi << 16;
          }
        }
      }
    }
  } else {  // weight -> (C_in * kt * 49, cpad) float32, channels padded with zeros
    packed.assign(static_cast<size_t>(taps * a.cpad), 0.f);
    const at::Tensor wf = w2.to(at::kFloat);
    const auto wa = wf.accessor<float, 2>();
    for (int64_t co = 0; co < cout; ++co) {
      for (int64_t k = 0; k < taps; ++k) packed[k * a.cpad + co] = wa[co][k];
    }
  }
  std::vector<float> b(static_cast<size_t>(a.cpad), 0.f);
  if (bias.has_value()) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.const_data_ptr<float>(), bf.const_data_ptr<float>() + cout, b.begin());
  }
  a.weight = packed.data();
  a.wpair = pairs.data();
  a.wcols = cols.data();
  a.bias = b.data();

  const int64_t size[5] = {N, x.size(1), T, H, Wd};
  const int64_t stride[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  const int64_t ostride[5] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3), out.stride(4)};
  // Tasks: (video, output frame, chunk of pooled rows). Where videos x frames are fewer than twice the threads
  // (batch-1 latency), each frame's rows are split, in chunks of at least 4 pooled rows (a chunk recomputes the
  // conv row above it). The split moves no value: every output is computed the same way whatever the chunks.
  const int64_t frames = N * a.T_out, threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + frames - 1) / frames);
  a.chunks = std::min<int64_t>(wanted, std::max<int64_t>(1, a.Hp / 4));
  a.chunk_rows = (a.Hp + a.chunks - 1) / a.chunks;
  a.chunks = (a.Hp + a.chunk_rows - 1) / a.chunk_rows;
  at::parallel_for(0, frames * a.chunks, 1, [&](int64_t b0, int64_t b1) {
    if (x.scalar_type() == at::kBFloat16) {
      stem_tasks_isa(isa, dot, x.const_data_ptr<c10::BFloat16>(), size, stride, a,
                     out.mutable_data_ptr<c10::BFloat16>(), ostride, b0, b1);
    } else if (out_dtype == at::kBFloat16) {  // float32 clips, a bfloat16 weight (autocast's stem)
      stem_tasks_isa(isa, dot, x.const_data_ptr<float>(), size, stride, a, out.mutable_data_ptr<c10::BFloat16>(),
                     ostride, b0, b1);
    } else {
      stem_tasks_isa(isa, dot, x.const_data_ptr<float>(), size, stride, a, out.mutable_data_ptr<float>(), ostride,
                     b0, b1);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("stem_conv_pool", &stem_conv_pool_cpu);
}

}  // namespace lgd_fast
