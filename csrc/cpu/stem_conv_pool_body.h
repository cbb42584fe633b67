// The per-SIMD-path body of csrc/cpu/stem_conv_pool.cpp, included there once per path inside a namespace of its
// own, under that path's `#pragma GCC target` and with that path's vector width W defined before it (no include
// guard: it is meant to be included several times). Every function here is compiled for its path. Written as
// the other kernels are (always-inline helpers outside any target region, inlined into one target-marked function
// per path), GCC 12 compiled the conv's register tiles and the max-pool's selects for the baseline, lane by lane
// and spilled (helpers two calls below the target function, where the other kernels' bodies are one): the kernel
// ran at 42 GFLOP/s instead of 183 on lgd3d_tiny's stem (2 threads, AVX-512).

// NaN-propagating max (ATen's max-pool keeps a NaN it meets).
LGD_INLINE vf<W> vmax(vf<W> a, vf<W> b) {
  const vf<W> m = (a > b) ? a : b;
  return (a != a) ? a : m;
}

#ifdef LGD_STEM_DOT
// The bfloat16 dot-product path (AVX512_BF16, W = 16): the slab holds pairs of input planes (2q, 2q + 1) as one
// 32-bit word per position, the weights the same pairs per output channel, and one vdpbf16ps adds both planes'
// products to a float32 lane: half the instructions of the float32 tiles for the same multiply-adds. An odd last
// plane (LGD-2D's three: kt = 1) pairs its own neighbouring columns instead: after the pairs, a slab plane of words
// (x[col], x[col + 1]) serves its taps (kw, kw + 1) for kw = 0, 2, 4 (both inside the pixel's window, so no value
// of another window meets a zero weight: an infinity there would make NaN), and its half-empty pair word (x[col], 0)
// the tap kw = 6: 4 instructions a row instead of 7.
using Slab = uint32_t;

template <int P, int V>
LGD_INLINE void conv_tile(const StemArgs& a, const uint32_t* __restrict__ slab, int64_t oh, int64_t ow0,
                          int64_t cb, float* __restrict__ dst) {
  __m512 acc[P][V];
  for (int v = 0; v < V; ++v) {
    const __m512 b = _mm512_loadu_ps(a.bias + cb + W * v);
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  // one tap's step: V weight words from wr, P input words row[2 p] (stride 2), P x V dot products
  const auto step = [&](const uint32_t* row, const uint32_t* wr) __attribute__((always_inline)) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wr + W * v);
    for (int p = 0; p < P; ++p) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(row[2 * p]));
      for (int v = 0; v < V; ++v) acc[p][v] = _mm512_dpbf16_ps(acc[p][v], xv, w[v]);
    }
  };
  const int64_t full = a.planes / 2;  // pairs of two planes
  for (int64_t q = 0; q < full; ++q) {
    for (int kh = 0; kh < kTaps; ++kh) {
      const uint32_t* row = slab + q * a.ps + (2 * oh + kh) * a.rs + 2 * ow0;
      const uint32_t* wr = a.wpair + ((q * kTaps + kh) * kTaps) * a.cpad + cb;
#pragma GCC unroll 7
      for (int kw = 0; kw < kTaps; ++kw) step(row + kw, wr + kw * a.cpad);
    }
  }
  if (full < a.pairs) {  // the odd last plane: its column pairs, then its tap kw = 6 from its half-empty pair
    for (int kh = 0; kh < kTaps; ++kh) {
      const int64_t at = (2 * oh + kh) * a.rs + 2 * ow0;
      const uint32_t* cols = slab + a.pairs * a.ps + at;
      for (int j = 0; j < 3; ++j) step(cols + 2 * j, a.wcols + (kh * 3 + j) * a.cpad + cb);
      step(slab + full * a.ps + at + 6, a.wpair + ((full * kTaps + kh) * kTaps + 6) * a.cpad + cb);
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < V; ++v) {
      const vf<W> r = simd::relu(reinterpret_cast<const vf<W>&>(acc[p][v]));
      std::memcpy(dst + (ow0 + p) * a.cpad + cb + W * v, &r, sizeof(r));
    }
  }
}

// 16 bfloat16 values of x from s (float32 rounded to nearest even by the hardware, or bfloat16 as they are).
LGD_INLINE __m256i bf16_row(const float* s) { return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s)); }
LGD_INLINE __m256i bf16_row(const c10::BFloat16* s) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)); }

// fill_slab's pairs, 16 columns per step where x's rows are unit-stride (the contiguous clip), else fill_slab.
template <typename T>
void fill_pairs(const T* x, const int64_t* size, const int64_t* stride, const StemArgs& a, int64_t n, int64_t t,
                int64_t h0, int64_t h1, uint32_t* slab) {
  if (stride[4] != 1) return fill_slab(x, size, stride, a, n, t, h0, h1, slab);
  const int64_t Wd = size[4];
  for (int64_t q = 0; q < a.pairs; ++q) {
    const T* s0 = input_plane(x, stride, a, n, t, 2 * q);
    const T* s1 = 2 * q + 1 < a.planes ? input_plane(x, stride, a, n, t, 2 * q + 1) : nullptr;
    for (int64_t h = h0; h < h1; ++h) {
      const T* r0 = s0 + h * stride[3];
      const T* r1 = s1 == nullptr ? nullptr : s1 + h * stride[3];
      uint32_t* d = slab + q * a.ps + (h + 3) * a.rs + 3;
      int64_t w = 0;
      for (; w + W <= Wd; w += W) {
        const __m512i lo = _mm512_cvtepu16_epi32(bf16_row(r0 + w));
        const __m512i hi = r1 == nullptr ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(bf16_row(r1 + w));
        _mm512_storeu_si512(d + w, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
      if (w < Wd) {  // the last columns copied into a zeroed block of 16, converted as one, stored masked
        const __mmask16 m = static_cast<__mmask16>((1u << (Wd - w)) - 1);
        alignas(64) T tail[2][W] = {};
        std::memcpy(tail[0], r0 + w, (Wd - w) * sizeof(T));
        if (r1 != nullptr) std::memcpy(tail[1], r1 + w, (Wd - w) * sizeof(T));
        const __m512i lo = _mm512_cvtepu16_epi32(bf16_row(tail[0]));
        const __m512i hi = _mm512_cvtepu16_epi32(bf16_row(tail[1]));
        _mm512_mask_storeu_epi32(d + w, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

// The odd last plane's column pairs for input rows [h0, h1): word (x[col], x[col + 1]) from its half-empty pair
// words (x[col], 0) (the row's last word has no right neighbour: its high half stays zero).
LGD_INLINE void column_pairs(const StemArgs& a, int64_t h0, int64_t h1, uint32_t* slab) {
  const uint32_t* half = slab + (a.pairs - 1) * a.ps;
  uint32_t* cols = slab + a.pairs * a.ps;
  for (int64_t h = h0 + 3; h < h1 + 3; ++h) {
    const uint32_t* src = half + h * a.rs;
    uint32_t* dst = cols + h * a.rs;
    for (int64_t c = 0; c + 1 < a.rs; ++c) dst[c] = src[c] | src[c + 1] << 16;
    dst[a.rs - 1] = src[a.rs - 1];
  }
}
#else
using Slab = float;

// P output pixels (ow0 ..) x V vectors of channels (from cb) of conv row oh, ReLU'd, into dst (Wc x cpad).
template <int P, int V>
LGD_INLINE void conv_tile(const StemArgs& a, const float* __restrict__ slab, int64_t oh, int64_t ow0, int64_t cb,
                          float* __restrict__ dst) {
  using F = vf<W>;
  F acc[P][V];
  for (int v = 0; v < V; ++v) {
    const F b = load<W>(a.bias + cb + W * v);
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int64_t pl = 0; pl < a.planes; ++pl) {
    for (int kh = 0; kh < kTaps; ++kh) {
      const float* row = slab + pl * a.ps + (2 * oh + kh) * a.rs + 2 * ow0;
      const float* wr = a.weight + ((pl * kTaps + kh) * kTaps) * a.cpad + cb;
#pragma GCC unroll 7
      for (int kw = 0; kw < kTaps; ++kw) {
        F w[V];
        for (int v = 0; v < V; ++v) w[v] = load<W>(wr + kw * a.cpad + W * v);
        for (int p = 0; p < P; ++p) {
          const float xv = row[2 * p + kw];
          for (int v = 0; v < V; ++v) acc[p][v] += xv * w[v];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < V; ++v) {
      const F r = simd::relu(acc[p][v]);
      std::memcpy(dst + (ow0 + p) * a.cpad + cb + W * v, &r, sizeof(F));
    }
  }
}
#endif

// Pixels of conv row oh for the V vectors from cb: tiles of P, then one pixel at a time.
template <int P, int V>
LGD_INLINE void conv_columns(const StemArgs& a, const Slab* slab, int64_t oh, int64_t cb, float* dst) {
  int64_t ow = 0;
  for (; ow + P <= a.Wc; ow += P) conv_tile<P, V>(a, slab, oh, ow, cb, dst);
  for (; ow < a.Wc; ++ow) conv_tile<1, V>(a, slab, oh, ow, cb, dst);
}

// Conv row oh (all channels) into dst, or zeros past the last row (the pool's padding). Not inlined: one copy
// serves both input dtypes (the tiles are most of this file's code and compile time).
__attribute__((noinline)) void conv_row(const StemArgs& a, const Slab* slab, int64_t oh, float* dst) {
  if (oh >= a.Hc) {
    std::fill(dst, dst + a.Wc * a.cpad, 0.f);
    return;
  }
  // Register tiles: AVX-512 has 32 vector registers, AVX2 and SSE 16 (accumulators + weights + a broadcast).
  constexpr int kMaxV = W == 16 ? 4 : 2;
  const int64_t vectors = a.cpad / W;
  for (int64_t v0 = 0; v0 < vectors; v0 += kMaxV) {
    const int64_t cb = v0 * W;
    switch (std::min<int64_t>(kMaxV, vectors - v0)) {
      case 1: conv_columns<8, 1>(a, slab, oh, cb, dst); break;
      case 2: conv_columns<(W == 16 ? 6 : 5), 2>(a, slab, oh, cb, dst); break;
      case 3: conv_columns<6, (W == 16 ? 3 : 1)>(a, slab, oh, cb, dst); break;
      default: conv_columns<4, (W == 16 ? 4 : 1)>(a, slab, oh, cb, dst); break;
    }
  }
}

// dst[i] = max(x[i], y[i], z[i]) over n floats (n a multiple of W).
LGD_INLINE void max3(float* dst, const float* x, const float* y, const float* z, int64_t n) {
  for (int64_t i = 0; i < n; i += W) {
    const vf<W> m = vmax(vmax(load<W>(x + i), load<W>(y + i)), load<W>(z + i));
    std::memcpy(dst + i, &m, sizeof(m));
  }
}

// Tasks [b0, b1) (task = (n * T_out + t) * chunks + chunk): conv, ReLU and pool of the chunk's pooled rows of
// output frame t of video n, stored into out.
template <typename T, typename TOut>
void stem_tasks(const T* x, const int64_t* size, const int64_t* stride, const StemArgs& a, TOut* out,
                const int64_t* ostride, int64_t b0, int64_t b1) {
#ifdef LGD_STEM_DOT
  std::vector<Slab> slab(static_cast<size_t>((a.pairs + a.planes % 2) * a.ps), 0u);  // (+ the column pairs)
#else
  std::vector<Slab> slab(static_cast<size_t>(a.planes * a.ps), 0.f);
#endif
  const int64_t row = a.Wc * a.cpad;
  std::vector<float> rows(static_cast<size_t>(4 * row + a.cpad), 0.f);
  float* prev = rows.data();  // conv row 2ph - 1 (zeros above the first)
  float* upper = prev + row;  // conv row 2ph
  float* lower = upper + row;  // conv row 2ph + 1
  float* colmax = lower + row;  // the three rows' max, column by column
  const float* zeros = colmax + row;  // a zero pixel (left and right padding)
  const int64_t cout = a.cout, H = size[3];
  for (int64_t task = b0; task < b1; ++task) {
    const int64_t frame = task / a.chunks, chunk = task % a.chunks;
    const int64_t n = frame / a.T_out, t = frame % a.T_out;
    const int64_t ph0 = chunk * a.chunk_rows, ph1 = std::min(a.Hp, ph0 + a.chunk_rows);
    // conv rows [2 ph0 - 1, 2 ph1 - 1] read padded rows [2 r, 2 r + 6]: input rows [2 r - 3, 2 r + 3]
    const int64_t r0 = std::max<int64_t>(0, 2 * ph0 - 1), r1 = std::min(a.Hc - 1, 2 * ph1 - 1);
#ifdef LGD_STEM_DOT
    fill_pairs(x, size, stride, a, n, t, std::max<int64_t>(0, 2 * r0 - 3), std::min(H, 2 * r1 + 4), slab.data());
    if (a.planes % 2 == 1) column_pairs(a, std::max<int64_t>(0, 2 * r0 - 3), std::min(H, 2 * r1 + 4), slab.data());
#else
    fill_slab(x, size, stride, a, n, t, std::max<int64_t>(0, 2 * r0 - 3), std::min(H, 2 * r1 + 4), slab.data());
#endif
    if (ph0 == 0) {
      std::fill(prev, prev + row, 0.f);
    } else {
      conv_row(a, slab.data(), 2 * ph0 - 1, prev);
    }
    TOut* o = out + n * ostride[0] + t * ostride[2];
    for (int64_t ph = ph0; ph < ph1; ++ph) {
      conv_row(a, slab.data(), 2 * ph, upper);
      conv_row(a, slab.data(), 2 * ph + 1, lower);
      max3(colmax, prev, upper, lower, row);
      std::swap(prev, lower);
      for (int64_t pw = 0; pw < a.Wp; ++pw) {
        const float* l = pw > 0 ? colmax + (2 * pw - 1) * a.cpad : zeros;
        const float* m = colmax + 2 * pw * a.cpad;
        const float* r = 2 * pw + 1 < a.Wc ? colmax + (2 * pw + 1) * a.cpad : zeros;
        TOut* dst = o + ph * ostride[3] + pw * ostride[4];
        int64_t c = 0;
        for (; c + W <= cout; c += W) {
          simd::store<W>(dst + c, vmax(vmax(load<W>(l + c), load<W>(m + c)), load<W>(r + c)));
        }
        for (; c < cout; ++c) simd::store1(dst + c, max1(max1(l[c], m[c]), r[c]));
      }
    }
  }
}

