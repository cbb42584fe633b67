// y = x W^T + b for a few rows of x (float32, CPU): the GEMMs of an LGD block's global path, whose M is the
// batch (1 to 8 clips). oneDNN/MKL run these far below the memory bound (a 4x2048 by 2048x128 product took
// 200 us where streaming its 1 MB of weights takes some 10), so global_update calls this instead where it
// applies (small_linear_applies) and ATen's addmm elsewhere.

#pragma once

#include <ATen/ATen.h>

namespace lgd_fast {

// The rows this kernel takes at most: beyond them each pass over W serves 4 rows, and a GEMM library's
// blocking wins.
constexpr int64_t kSmallLinearMaxRows = 8;

// True where small_linear runs: CPU, float32, x (N <= kSmallLinearMaxRows, C) and W (H, C) contiguous, b (H).
bool small_linear_applies(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// x (N, C) W (H, C) b (H) -> (N, H) float32, each row's sums in float32 over W lanes, then a horizontal sum. A
// kernel for ops' forwards below autograd (global_update's): it records no gradient.
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// The two products of a linear layer's backward, for the same few rows (float32 CPU, contiguous, checked):
// x (N <= kSmallLinearMaxRows, K) W (K, C) -> x W (N, C), the input's gradient (W streamed once per 4 rows of x, each
// sum in float32 in k order, as a GEMM's), and gy (N, O) x (N, I) -> gy^T x (O, I), the weight's gradient (a rank-N
// update, written once). No autograd.
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w);
at::Tensor small_outer(const at::Tensor& gy, const at::Tensor& x);

}  // namespace lgd_fast
