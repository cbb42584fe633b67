// CPU kernels of lgd_fast::global_avg_pool (x: (N, C, T, H, W) -> (N, C), the mean over T, H, W)
// and of its backward (grad: (N, C) -> grad / (T*H*W) broadcast to x's shape and memory format).
//
// Two layouts, two code paths, both reading x once as sequential streams with software prefetch:
//   contiguous        x is N*C rows of L = T*H*W elements; a task sums whole rows (or a chunk of a long
//                     row) with four SIMD accumulators.
//   channels_last_3d  x is N blocks of P = T*H*W positions, each a contiguous C-vector; a task sums a chunk
//                     of positions into a C-vector held in L1, and the chunks' C-vectors are added up after.
// Sums run in float32 lanes (float64 for float64 inputs) over short stretches (128 values per lane
// contiguous, 64 positions channels_last) that are then folded into float64, so the rounding error stays
// that of a short float32 sum whatever T*H*W is. Chunking depends on the shape only, never on the thread
// count, so results are bitwise reproducible.
//
// The reductions are compiled three times (AVX-512, AVX2, baseline x86-64; baseline only elsewhere) and
// the path isa.h's current_isa() names runs (the widest the CPU has unless capped or forced).
// The backward is a broadcast fill (memcpy / integer fill), already at memory speed without that.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "isa.h"
#include "simd.h"
#include "tensor_dispatch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vector types only cross always-inlined calls

namespace lgd_fast {

namespace {

// ---- SIMD building blocks (GCC/Clang vector extensions; width set by the enclosing target) ---------
// float32 vectors, their loads (bfloat16 widened) and fold_halves are the shared ones of simd.h; the float64
// vectors the sums fold into are this file's own.

using simd::f32x16;
using simd::f32x4;
using simd::f32x8;
using simd::fold_halves;
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x16 __attribute__((vector_size(128)));

constexpr int64_t kBlock = 8192;          // elements a float32 sum covers (128 per lane) before folding into float64
constexpr int64_t kRowChunk = 32768;      // elements of one row a task handles (multiple of kBlock)
constexpr int64_t kPosBlock = 64;         // channels_last: positions a float32 sum covers
constexpr int64_t kPosChunk = 512;        // channels_last: positions a task handles (multiple of kPosBlock)
constexpr int64_t kTaskElems = 32768;     // smallest amount of work worth handing to a thread
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of the loads to prefetch
constexpr int64_t kLine = 64;             // cache line

// Lanes<T>: V, the accumulator vector of W lanes; D, the float64 vector V folds into; load(p): W values.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  using A = float;
  using V = f32x16;
  using D = f64x16;
  static constexpr int64_t W = 16;
  static LGD_INLINE V load(const float* p) { return simd::load<W>(p); }
  static LGD_INLINE A scalar(float v) { return v; }
};

template <>
struct Lanes<c10::BFloat16> {
  using A = float;
  using V = f32x16;
  using D = f64x16;
  static constexpr int64_t W = 16;
  static LGD_INLINE V load(const c10::BFloat16* p) { return simd::load<W>(p); }  // widened exactly
  static LGD_INLINE A scalar(c10::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};

template <>
struct Lanes<double> {
  using A = double;
  using V = f64x8;
  using D = f64x8;
  static constexpr int64_t W = 8;
  static LGD_INLINE V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static LGD_INLINE A scalar(double v) { return v; }
};

template <typename T>
using acc_t = typename Lanes<T>::A;

// Horizontal sums by halving (vextract + add), never through memory; float32 ones folded into float64.
LGD_INLINE double hsum(const f64x2& v) { return v[0] + v[1]; }
LGD_INLINE double hsum(const f64x4& v) { return hsum(fold_halves<f64x2>(v)); }
LGD_INLINE double hsum(const f64x8& v) { return hsum(fold_halves<f64x4>(v)); }
LGD_INLINE double hsum(const f64x16& v) { return hsum(fold_halves<f64x8>(v)); }
LGD_INLINE double hsum(const f32x4& v) { return static_cast<double>((v[0] + v[1]) + (v[2] + v[3])); }
LGD_INLINE double hsum(const f32x8& v) { return hsum(fold_halves<f32x4>(v)); }
LGD_INLINE double hsum(const f32x16& v) { return hsum(fold_halves<f32x8>(v)); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
LGD_INLINE void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// Sum of x[0:n] with four accumulator vectors: float32 for at most kBlock elements, folded into float64.
template <typename T>
LGD_INLINE double range_sum(const T* __restrict__ x, int64_t n) {
  using S = Lanes<T>;
  using V = typename S::V;
  using D = typename S::D;
  constexpr int64_t W = S::W;
  constexpr int64_t kStep = 4 * W;  // elements per unrolled step
  D total = {};
  int64_t i = 0;
  for (int64_t b = 0; b + W <= n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (i = b; i + kStep <= e; i += kStep) {
      for (int64_t off = 0; off < kStep * static_cast<int64_t>(sizeof(T)); off += kLine) {
        prefetch_ahead(reinterpret_cast<const char*>(x + i) + off);
      }
      a0 += S::load(x + i);
      a1 += S::load(x + i + W);
      a2 += S::load(x + i + 2 * W);
      a3 += S::load(x + i + 3 * W);
    }
    for (; i + W <= e; i += W) {
      prefetch_ahead(x + i);
      a0 += S::load(x + i);
    }
    const V a = (a0 + a1) + (a2 + a3);
    if (n <= kBlock) {  // a single block (short rows): no float64 vector needed
      double sum = hsum(a);
      for (; i < n; ++i) sum += S::scalar(x[i]);
      return sum;
    }
    total += __builtin_convertvector(a, D);
  }
  double sum = hsum(total);
  for (; i < n; ++i) sum += S::scalar(x[i]);
  return sum;
}

// Contiguous x, rows of L: sums[i] = sum of chunk i % chunks of row i / chunks, for i in [begin, end).
template <typename T>
LGD_INLINE void row_sums_body(const T* x, double* sums, int64_t begin, int64_t end, int64_t L, int64_t chunks) {
  if (chunks == 1) {
    for (int64_t r = begin; r < end; ++r) sums[r] = range_sum(x + r * L, L);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = i / chunks, start = (i % chunks) * kRowChunk;
    sums[i] = range_sum(x + r * L + start, std::min(kRowChunk, L - start));
  }
}

// channels_last x, N x P x C: sums[item, :] = sum over the positions of chunk item % chunks of sample
// item / chunks, for item in [begin, end); acc is scratch for C values.
template <typename T>
LGD_INLINE void channel_sums_body(const T* x, double* sums, acc_t<T>* __restrict__ acc, int64_t begin, int64_t end,
                                  int64_t C, int64_t P, int64_t chunks) {
  using S = Lanes<T>;
  using A = acc_t<T>;
  using V = typename S::V;
  constexpr int64_t W = S::W;
  // Position by position, so x is read as one sequential stream; acc (C values) stays in L1.
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / chunks;
    const int64_t p_end = std::min(P, (item % chunks + 1) * kPosChunk);
    double* __restrict__ dst = sums + item * C;
    std::fill(dst, dst + C, 0.0);
    for (int64_t pb = (item % chunks) * kPosChunk; pb < p_end; pb += kPosBlock) {
      const int64_t pe = std::min(p_end, pb + kPosBlock);
      std::fill(acc, acc + C, A(0));
      for (int64_t p = pb; p < pe; ++p) {
        const T* __restrict__ r = x + (n * P + p) * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          prefetch_ahead(r + c);
          V a;
          std::memcpy(&a, acc + c, sizeof(a));
          a += S::load(r + c);
          std::memcpy(acc + c, &a, sizeof(a));
        }
        for (; c < C; ++c) acc[c] += S::scalar(r[c]);
      }
      for (int64_t c = 0; c < C; ++c) dst[c] += acc[c];
    }
  }
}

// One compiled copy of the reductions per SIMD path.
#define LGD_DEFINE_REDUCTIONS(SUFFIX, TARGET)                                                                    \
  template <typename T>                                                                                         \
  TARGET void row_sums_##SUFFIX(const T* x, double* sums, int64_t begin, int64_t end, int64_t L, int64_t chunks) { \
    row_sums_body<T>(x, sums, begin, end, L, chunks);                                                           \
  }                                                                                                             \
  template <typename T>                                                                                         \
  TARGET void channel_sums_##SUFFIX(const T* x, double* sums, acc_t<T>* acc, int64_t begin, int64_t end,       \
                                    int64_t C, int64_t P, int64_t chunks) {                                     \
    channel_sums_body<T>(x, sums, acc, begin, end, C, P, chunks);                                               \
  }

LGD_DEFINE_REDUCTIONS(baseline, )
#ifdef LGD_X86_DISPATCH
LGD_DEFINE_REDUCTIONS(avx2, LGD_TARGET_AVX2)
LGD_DEFINE_REDUCTIONS(avx512, LGD_TARGET_AVX512)
#endif

template <typename T>
void row_sums(const T* x, double* sums, int64_t begin, int64_t end, int64_t L, int64_t chunks) {
  switch (current_isa()) {
#ifdef LGD_X86_DISPATCH
    case CpuIsa::kAvx512:
      return row_sums_avx512<T>(x, sums, begin, end, L, chunks);
    case CpuIsa::kAvx2:
      return row_sums_avx2<T>(x, sums, begin, end, L, chunks);
#endif
    default:
      return row_sums_baseline<T>(x, sums, begin, end, L, chunks);
  }
}

template <typename T>
void channel_sums(const T* x, double* sums, acc_t<T>* acc, int64_t begin, int64_t end, int64_t C, int64_t P,
                  int64_t chunks) {
  switch (current_isa()) {
#ifdef LGD_X86_DISPATCH
    case CpuIsa::kAvx512:
      return channel_sums_avx512<T>(x, sums, acc, begin, end, C, P, chunks);
    case CpuIsa::kAvx2:
      return channel_sums_avx2<T>(x, sums, acc, begin, end, C, P, chunks);
#endif
    default:
      return channel_sums_baseline<T>(x, sums, acc, begin, end, C, P, chunks);
  }
}

// ---- forward and backward -------------------------------------------------------------------------

// x: rows x L, contiguous; out[r] = mean(x[r, :]), rounded once to O (x's type, or float32 for channel_means).
template <typename T, typename O = T>
void forward_contiguous(const T* x, O* out, int64_t rows, int64_t L) {
  const int64_t chunks = ceil_div(L, kRowChunk);  // long rows are split so few rows still fill the threads
  std::vector<double> sums(rows * chunks);
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::min(L, kRowChunk));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    row_sums<T>(x, sums.data(), begin, end, L, chunks);
    if (chunks == 1) {
      for (int64_t r = begin; r < end; ++r) out[r] = static_cast<O>(sums[r] / static_cast<double>(L));
    }
  });
  if (chunks == 1) return;
  for (int64_t r = 0; r < rows; ++r) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += sums[r * chunks + k];
    out[r] = static_cast<O>(total / static_cast<double>(L));
  }
}

// x: N x P x C (channels_last_3d, P = T*H*W positions); out[n, c] = mean_p x[n, p, c].
template <typename T, typename O = T>
void forward_channels_last(const T* x, O* out, int64_t N, int64_t C, int64_t P) {
  const int64_t chunks = ceil_div(P, kPosChunk);
  std::vector<double> sums(N * chunks * C);  // one C-vector per (n, chunk of positions)
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> acc(C);
    channel_sums<T>(x, sums.data(), acc.data(), begin, end, C, P, chunks);
  });
  at::parallel_for(0, N, std::max<int64_t>(1, kTaskElems / (chunks * C)), [&](int64_t begin, int64_t end) {
    std::vector<double> total(C);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const double* src = sums.data() + (n * chunks + k) * C;
        for (int64_t c = 0; c < C; ++c) total[c] += src[c];
      }
      for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<O>(total[c] / static_cast<double>(P));
    }
  });
}

// dst[0:n] = value, stored as same-sized unsigned integers so that the loop vectorises for every T
// (std::fill over c10::BFloat16 stores one element at a time).
template <typename T>
void fill_bits(T* dst, int64_t n, T value) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(U) == sizeof(T), "fill_bits: unsupported element size");
  U bits;
  std::memcpy(&bits, &value, sizeof(bits));
  std::fill(reinterpret_cast<U*>(dst), reinterpret_cast<U*>(dst) + n, bits);
}

// grad: rows, out: rows x L contiguous; out[r, :] = grad[r] / L.
template <typename T>
void backward_contiguous(const T* grad, T* out, int64_t rows, int64_t L) {
  using A = acc_t<T>;
  const int64_t chunks = ceil_div(L, kRowChunk);
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::min(L, kRowChunk));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / chunks, start = (i % chunks) * kRowChunk;
      const T value = static_cast<T>(Lanes<T>::scalar(grad[r]) / static_cast<A>(L));
      fill_bits(out + r * L + start, std::min(kRowChunk, L - start), value);
    }
  });
}

// grad: N x C, out: N x P x C (channels_last_3d); out[n, p, :] = grad[n, :] / P.
template <typename T>
void backward_channels_last(const T* grad, T* out, int64_t N, int64_t C, int64_t P) {
  using A = acc_t<T>;
  // Per n, the scaled C-vector repeated over a few positions, so that small C still copies in bulk.
  const int64_t tile_pos = std::min(P, std::max<int64_t>(1, 4096 / C));
  std::vector<T> tiles(N * tile_pos * C);
  for (int64_t n = 0; n < N; ++n) {
    T* tile = tiles.data() + n * tile_pos * C;
    for (int64_t c = 0; c < C; ++c) {
      tile[c] = static_cast<T>(Lanes<T>::scalar(grad[n * C + c]) / static_cast<A>(P));
    }
    for (int64_t t = 1; t < tile_pos; ++t) std::memcpy(tile + t * C, tile, C * sizeof(T));
  }
  const int64_t chunks = ceil_div(P, kPosChunk);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks;
      const int64_t p_end = std::min(P, (item % chunks + 1) * kPosChunk);
      const T* tile = tiles.data() + n * tile_pos * C;
      for (int64_t p = (item % chunks) * kPosChunk; p < p_end; p += tile_pos) {
        std::memcpy(out + (n * P + p) * C, tile, std::min(tile_pos, p_end - p) * C * sizeof(T));
      }
    }
  });
}

bool is_supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kDouble; }

at::Tensor global_avg_pool_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "global_avg_pool: x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, "global_avg_pool: x must be a dense (strided) tensor, got layout ",
              x.layout());
  TORCH_CHECK(x.dim() == 5, "global_avg_pool: x must be a 5-D tensor (N, C, T, H, W), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()),
              "global_avg_pool: x must have dtype float32, bfloat16 or float64, got ", x.scalar_type());
  const bool contiguous = x.is_contiguous();
  TORCH_CHECK(contiguous || x.is_contiguous(at::MemoryFormat::ChannelsLast3d),
              "global_avg_pool: x must be contiguous or channels_last_3d, got shape ", x.sizes(), " with strides ",
              x.strides(), "; call x.contiguous() first");

  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3) * x.size(4);
  at::Tensor out = at::empty({N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N * C == 0) return out;
  if (L == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // the mean of nothing, as torch.mean
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "global_avg_pool_cpu", [&] {
    if (contiguous) {
      forward_contiguous<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N * C, L);
    } else {
      forward_channels_last<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C, L);
    }
  });
  return out;
}

at::Tensor global_avg_pool_backward_cpu(const at::Tensor& grad, at::IntArrayRef sizes, bool channels_last) {
  TORCH_CHECK(grad.device().is_cpu(), "global_avg_pool_backward: grad must be a CPU tensor, got one on ",
              grad.device());
  TORCH_CHECK(grad.layout() == at::kStrided,
              "global_avg_pool_backward: grad must be a dense (strided) tensor, got layout ", grad.layout());
  TORCH_CHECK(is_supported_dtype(grad.scalar_type()),
              "global_avg_pool_backward: grad must have dtype float32, bfloat16 or float64, got ", grad.scalar_type());
  TORCH_CHECK(sizes.size() == 5, "global_avg_pool_backward: sizes must have 5 entries (N, C, T, H, W), got ",
              sizes);
  for (const int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "global_avg_pool_backward: sizes must be non-negative, got ", sizes);
  }
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == sizes[0] && grad.size(1) == sizes[1],
              "global_avg_pool_backward: grad must have shape (N, C) = (", sizes[0], ", ", sizes[1], "), got ",
              grad.sizes());

  const auto format = channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  at::Tensor grad_x = at::empty(sizes, grad.options().memory_format(format));
  const int64_t N = sizes[0], C = sizes[1], L = sizes[2] * sizes[3] * sizes[4];
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "global_avg_pool_backward_cpu", [&] {
    if (channels_last) {
      backward_channels_last<scalar_t>(g.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), N, C, L);
    } else {
      backward_contiguous<scalar_t>(g.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), N * C, L);
    }
  });
  return grad_x;
}

}  // namespace

at::Tensor channel_means_f32(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3) * x.size(4);
  at::Tensor out = at::empty({N, C}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (N * C == 0) return out;
  if (L == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (is_channels_last(x)) {
      forward_channels_last<T, float>(x.const_data_ptr<T>(), out.mutable_data_ptr<float>(), N, C, L);
    } else {
      forward_contiguous<T, float>(x.const_data_ptr<T>(), out.mutable_data_ptr<float>(), N * C, L);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(lgd_fast, CPU, m) {
  m.impl("global_avg_pool", &global_avg_pool_cpu);
  m.impl("global_avg_pool_backward", &global_avg_pool_backward_cpu);
}

}  // namespace lgd_fast
