// lgd_fast::global_update: the global path of an LGD block in one call (any device: ATen GEMMs).
//
//   g' = ReLU(W2 (W1 m + b1) + b2 + W4 (W3 g + b3) + b4)      m = GAP of the block input, (N, C_in)
//   d  = W6 (W5 g' + b5) + b6                                 the global->local diffusion vector
//
// W1, W3: (H, C_in); W2, W4: (C_out, H); W5: (H, C_out); W6: (C_out, H) as nn.Linear stores them.
// The backward (global_update_backward below, registered as the op's autograd formula from Python:
// lgd_fast/ops/global_update.py) recomputes the three hidden (N, H) activations, which are tiny, instead of
// saving them.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cpu/small_linear.h"

namespace lgd_fast {
namespace {

void check_linear(const at::Tensor& w, const at::Tensor& b, const char* name, int64_t in, const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "global_update: ", name, " weight must have shape (out, ", in,
              "), got ", w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "global_update: ", name, " bias must have shape (",
              w.size(0), ",), got ", b.sizes());
  TORCH_CHECK(w.device() == like.device() && b.device() == like.device(), "global_update: ", name,
              " is on ", w.device(), " but m is on ", like.device());
  TORCH_CHECK(w.scalar_type() == like.scalar_type() && b.scalar_type() == like.scalar_type(), "global_update: ",
              name, " has dtype ", w.scalar_type(), " but m has dtype ", like.scalar_type());
}

// x W^T + b: cpu/small_linear.h's kernel where it applies (CPU float32, a few rows), else ATen's addmm.
at::Tensor few_row_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return small_linear_applies(x, w, b) ? small_linear(x, w, b) : at::addmm(b, x, w.t());
}

void global_update_checks(const at::Tensor& m, const at::Tensor& g, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                          const at::Tensor& w4, const at::Tensor& b4, const at::Tensor& w5, const at::Tensor& b5,
                          const at::Tensor& w6, const at::Tensor& b6) {
  TORCH_CHECK(m.dim() == 2, "global_update: m must be (N, C_in), got shape ", m.sizes());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == m.size(0) && g.size(1) == m.size(1),
              "global_update: g must have m's shape ", m.sizes(), ", got ", g.sizes());
  TORCH_CHECK(at::isFloatingType(m.scalar_type()), "global_update: m must be floating point, got ", m.scalar_type());
  TORCH_CHECK(g.scalar_type() == m.scalar_type() && g.device() == m.device(),
              "global_update: g must match m's dtype and device");
  const int64_t c_in = m.size(1);
  check_linear(w1, b1, "fc1", c_in, m);
  const int64_t hidden = w1.size(0);
  check_linear(w2, b2, "fc2", hidden, m);
  check_linear(w3, b3, "fc3", c_in, m);
  check_linear(w4, b4, "fc4", hidden, m);
  const int64_t c_out = w2.size(0);
  TORCH_CHECK(w4.size(0) == c_out, "global_update: fc4 has ", w4.size(0), " outputs but fc2 has ", c_out);
  check_linear(w5, b5, "fc5", c_out, m);
  check_linear(w6, b6, "fc6", w5.size(0), m);
  TORCH_CHECK(w6.size(0) == c_out, "global_update: fc6 has ", w6.size(0), " outputs, expected ", c_out);
}

std::tuple<at::Tensor, at::Tensor> global_update(const at::Tensor& m, const at::Tensor& g, const at::Tensor& w1,
                                                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                 const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& w4,
                                                 const at::Tensor& b4, const at::Tensor& w5, const at::Tensor& b5,
                                                 const at::Tensor& w6, const at::Tensor& b6) {
  global_update_checks(m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6);

  // Computed in the inputs' dtype: autocast must not recast the GEMMs below (the caller chose the dtype).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (small_linear_applies(m, w1, b1)) {  // CPU float32, a few clips: cpu/small_linear.h's kernel, not ATen's GEMM
    const auto& lin = few_row_linear;
    at::Tensor g_new = lin(lin(m, w1, b1), w2, b2).add_(lin(lin(g, w3, b3), w4, b4)).clamp_min_(0);
    return {g_new, lin(lin(g_new, w5, b5), w6, b6)};
  }
  at::Tensor a = at::addmm(b2, at::addmm(b1, m, w1.t()), w2.t());
  a.addmm_(at::addmm(b3, g, w3.t()), w4.t()).add_(b4);
  at::Tensor g_new = a.clamp_min_(0);
  at::Tensor d = at::addmm(b6, at::addmm(b5, g_new, w5.t()), w6.t());
  return {g_new, d};
}

// The gradients of global_update (14, in its inputs' order) from those of (g', d), recomputing the three hidden
// activations; lgd_fast/ops/global_update.py's _grad is the same formula in PyTorch. CPU float32 with at most
// kSmallLinearMaxRows rows runs cpu/small_linear.h's kernels (each weight streamed once per 4 rows, each weight
// gradient written once), where ATen's GEMMs ran these 4-row products far below the memory bound; elsewhere
// ATen's GEMMs.
std::vector<at::Tensor> global_update_backward(
    const at::Tensor& grad_g, const at::Tensor& grad_d, const at::Tensor& m, const at::Tensor& g,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
    const at::Tensor& b3, const at::Tensor& w4, const at::Tensor& b4, const at::Tensor& w5, const at::Tensor& b5,
    const at::Tensor& w6, const at::Tensor& b6, const at::Tensor& g_new) {
  global_update_checks(m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_g", grad_g}, {"grad_d", grad_d},
                                {"g_new", g_new}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == m.size(0) && t.size(1) == w2.size(0), "global_update_backward: ", name,
                " must be (N, C_out) = (", m.size(0), ", ", w2.size(0), "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == m.scalar_type() && t.device() == m.device(), "global_update_backward: ", name,
                " is ", t.scalar_type(), " on ", t.device(), " but m is ", m.scalar_type(), " on ", m.device());
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor gd = grad_d.contiguous(), gn = g_new.contiguous(), mc = m.contiguous(), gc = g.contiguous();
  const bool kernels = small_linear_applies(mc, w1, b1);
  const auto lin = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    return kernels ? few_row_linear(x, w, b) : at::addmm(b, x, w.t());
  };
  const auto times = [&](const at::Tensor& x, const at::Tensor& w) {  // x W
    return kernels && w.is_contiguous() ? small_matmul(x, w) : at::mm(x, w);
  };
  const auto weight_grad = [&](const at::Tensor& gy, const at::Tensor& x) {  // gy^T x
    return kernels ? small_outer(gy, x) : at::mm(gy.t(), x);
  };
  const at::Tensor h5 = lin(gn, w5, b5);
  at::Tensor grad_w6 = weight_grad(gd, h5), grad_b6 = gd.sum(0);
  const at::Tensor grad_h5 = times(gd, w6);
  at::Tensor grad_w5 = weight_grad(grad_h5, gn), grad_b5 = grad_h5.sum(0);
  const at::Tensor grad_a = times(grad_h5, w5).add_(grad_g).mul_(gn.gt(0));  // through the ReLU
  const at::Tensor h1 = lin(mc, w1, b1), h3 = lin(gc, w3, b3);
  at::Tensor grad_w2 = weight_grad(grad_a, h1), grad_b2 = grad_a.sum(0), grad_h1 = times(grad_a, w2);
  at::Tensor grad_w4 = weight_grad(grad_a, h3), grad_b4 = grad_b2.clone(), grad_h3 = times(grad_a, w4);
  at::Tensor grad_w1 = weight_grad(grad_h1, mc), grad_b1 = grad_h1.sum(0), grad_m = times(grad_h1, w1);
  at::Tensor grad_w3 = weight_grad(grad_h3, gc), grad_b3 = grad_h3.sum(0), grad_g_in = times(grad_h3, w3);
  return {grad_m, grad_g_in, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3,
          grad_b3, grad_w4, grad_b4, grad_w5, grad_b5, grad_w6, grad_b6};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgd_fast, m) {
  m.set_python_module("lgd_fast.ops.global_update");
  m.def(
      "global_update(Tensor m, Tensor g, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, "
      "Tensor w4, Tensor b4, Tensor w5, Tensor b5, Tensor w6, Tensor b6) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "global_update_backward(Tensor grad_g, Tensor grad_d, Tensor m, Tensor g, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, Tensor w3, Tensor b3, Tensor w4, Tensor b4, Tensor w5, Tensor b5, Tensor w6, Tensor b6, "
      "Tensor g_new) -> Tensor[]",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lgd_fast, CompositeExplicitAutograd, m) {
  m.impl("global_update", &global_update);
  m.impl("global_update_backward", &global_update_backward);
}

}  // namespace lgd_fast
