// What the CPU kernel files share about the tensors they take: the float32 / bfloat16 switch, the per-channel
// tensors' check and the layout test.

#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

namespace lgd_fast {

// fn(float{}) for float32, fn(c10::BFloat16{}) otherwise (the callers check the dtype first).
template <typename F>
void dispatch_float_bf16(at::ScalarType dtype, F&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

// A per-channel (C,) CPU tensor of float32, bfloat16 or float16 (op and name for the errors), as float32 contiguous.
inline at::Tensor per_channel(const char* op, const at::Tensor& t, const char* name, int64_t C) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C, "), got ", t.sizes());
  TORCH_CHECK(t.is_floating_point() && t.scalar_type() != at::kDouble, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// channels_last_3d and not also contiguous (C == 1 or one position: both, and then read as contiguous).
inline bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

}  // namespace lgd_fast
