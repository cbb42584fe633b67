// lgd_fast._C: the CPU extension module and the schemas of every lgd_fast operator.
//
// Schemas live here (one TORCH_LIBRARY per namespace); each device's kernels register
// themselves from their own file, e.g. csrc/cpu/global_avg_pool.cpp (TORCH_LIBRARY_IMPL).
// Fake (shape-only) kernels and autograd are registered from Python, in lgd_fast/ops/<op>.py.

#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <unordered_map>

namespace lgd_fast {
std::string cpu_isa();                      // csrc/cpu/isa.cpp
void set_cpu_isa(const std::string& name);  // csrc/cpu/isa.cpp
bool bf16_dot_products();                   // csrc/cpu/isa.cpp
void set_bf16_dot_products(bool allowed);   // csrc/cpu/isa.cpp
bool arena_install();                       // csrc/cpu/activation_arena.cpp, wrapped by lgd_fast/arena.py
void arena_enter();
void arena_exit();
int64_t arena_release();
void arena_poison();
void arena_configure(int64_t min_bytes, int64_t idle_scopes);
std::unordered_map<std::string, int64_t> arena_stats();
pybind11::object module_state(pybind11::handle module);  // csrc/module_state.cpp
}  // namespace lgd_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lgd_fast compiled CPU operators; the ops themselves are reached through torch.ops.lgd_fast.*";
  m.def("cpu_isa", &lgd_fast::cpu_isa, "The SIMD path the CPU kernels use: avx512, avx2 or baseline.");
  m.def("bf16_dot_products", &lgd_fast::bf16_dot_products,
        "Whether bfloat16 CPU kernels use AVX512_BF16 dot products now (the avx512 path on a CPU that has them).");
  m.def("module_state", &lgd_fast::module_state,
        "What lgd_fast.recorded.module_state reads, packed into bytes (equal where its tuples are equal); None for "
        "inference tensors; NotImplemented where the Python function must run.");
  m.def("_set_bf16_dot_products", &lgd_fast::set_bf16_dot_products,
        "Allows (True) or forbids the AVX512_BF16 dot products (tests: the AVX-512 float32 tiles on bf16 weights).");
  m.def("_set_cpu_isa", &lgd_fast::set_cpu_isa, "Forces a SIMD path (avx512, avx2, baseline) or 'auto'; for tests.");
  // The activation arena (lgd_fast.arena is the interface).
  m.def("_arena_install", &lgd_fast::arena_install, "Makes the arena the CPU allocator; true if it is.");
  m.def("_arena_enter", &lgd_fast::arena_enter, "Opens an arena scope on this thread.");
  m.def("_arena_exit", &lgd_fast::arena_exit, "Closes this thread's innermost arena scope.");
  m.def("_arena_release", &lgd_fast::arena_release, "Frees every free block; the bytes freed.");
  m.def("_arena_poison", &lgd_fast::arena_poison, "Fills every free block with 0xFF (NaN): for tests.");
  m.def("_arena_configure", &lgd_fast::arena_configure, "Sets min_bytes and idle_scopes.");
  m.def("_arena_stats", &lgd_fast::arena_stats, "The arena's counters.");
}

TORCH_LIBRARY(lgd_fast, m) {
  // Where torch finds the fake kernels of the ops defined after each call, if nobody imported it yet.
  m.set_python_module("lgd_fast.ops.global_avg_pool");
  // x: (N, C, T, H, W) -> (N, C), the mean over (T, H, W).
  m.def("global_avg_pool(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
  // grad: (N, C) -> (N, C, T, H, W) = grad / (T*H*W) broadcast, channels_last_3d if asked.
  m.def("global_avg_pool_backward(Tensor grad, SymInt[] sizes, bool channels_last) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.diffusion_epilogue");
  // The fused end of an LGD block (csrc/cpu/diffusion_epilogue.cpp):
  // r, s: (N, C, T, H, W); d: (N, C); scale, shift: (C,) -> out = ReLU(r*scale + shift + s + d), mean (N, C).
  m.def("diffusion_epilogue(Tensor r, Tensor s, Tensor d, Tensor scale, Tensor shift) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // -> grad_r, grad_s (r's dtype and layout); grad_d (N, C), grad_scale (C,), grad_shift (C,) in float32.
  m.def("diffusion_epilogue_backward(Tensor grad_out, Tensor grad_mean, Tensor out, Tensor r, Tensor scale)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.squeeze_excite");
  // Squeeze-excitation, with the SiLU after it in X3D (csrc/cpu/squeeze_excite.cpp).
  // x: (N, C, T, H, W), w1: (R, C), w2: (C, R) -> x * s (then SiLU when silu),
  // s = sigmoid(w2 relu(w1 mean(x) + b1) + b2) per (n, c); x's dtype and layout.
  m.def("squeeze_excite(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool silu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.to_channels_last");
  // x: contiguous (N, C, T, H, W) -> the same values in channels_last_3d (csrc/cpu/to_channels_last.cpp).
  m.def("to_channels_last_3d(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.stem_conv_pool");
  // An LGD stem at inference (csrc/cpu/stem_conv_pool.cpp): x (N, C, T, H, W), weight (C_out, C, kt, 7, 7) ->
  // max_pool 1x3x3 (stride (1, 2, 2), padding (0, 1, 1)) of ReLU(conv(x, weight, stride (stride_t, 2, 2),
  // padding (0, 3, 3)) + bias), channels_last_3d, x's dtype.
  m.def("stem_conv_pool(Tensor x, Tensor weight, Tensor? bias, int stride_t) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.batch_norm_train");
  // The fused units' training BatchNorm (csrc/cpu/batch_norm_train.cpp). z, y, shortcut, grad: (N, C, T, H, W).
  // -> (2, C) float64: per channel the sum of z and the sum of its squares about the mean.
  m.def("channel_moments(Tensor z) -> Tensor", {at::Tag::pt2_compliant_tag});
  // -> act((y - mean) * invstd * weight + bias + shortcut), y's dtype and layout.
  m.def("bn_relu_forward(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, Tensor? shortcut,"
        " bool relu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // -> (2, C) float32: sum g' and sum g' * xhat (g' the gradient through the ReLU, xhat = (y - mean) * invstd).
  m.def("bn_relu_backward_sums(Tensor grad, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias,"
        " Tensor? shortcut, bool relu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // -> grad_y = weight * invstd * (g' - mean_g - xhat * mean_gx), grad_shortcut = g' (empty unless asked).
  m.def("bn_relu_backward_apply(Tensor grad, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias,"
        " Tensor? shortcut, bool relu, Tensor mean_g, Tensor mean_gx, bool shortcut_grad) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.set_python_module("lgd_fast.ops.bn_relu_max_pool");
  // An LGD stem's BatchNorm, ReLU and 1x3x3 max-pool (stride (1, 2, 2), padding (0, 1, 1)) for training
  // (csrc/cpu/bn_relu_max_pool.cpp). y: (N, C, T, H, W); scale, shift, mean, k, p, q: (C,).
  // -> out = pool(relu(y * scale + shift)) (y's dtype and layout), arg (uint8, same): each window's tap or 255.
  m.def("bn_relu_max_pool(Tensor y, Tensor scale, Tensor shift) -> (Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  // -> (2, C) float64: sum g' and sum g' * (y - mean) over the taps the pooled gradient reaches.
  m.def("bn_relu_max_pool_backward_sums(Tensor grad, Tensor arg, Tensor y, Tensor mean) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // -> dx = k * dy + p * (y - mean) + q, dy the pooled gradient routed back to the taps; y's dtype and layout.
  m.def("bn_relu_max_pool_backward_apply(Tensor grad, Tensor arg, Tensor y, Tensor mean, Tensor k, Tensor p,"
        " Tensor q) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
