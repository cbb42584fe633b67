// What the CPU kernel files share about the tensors they take: the float32 / bfloat16 switch and the layout test.

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

// channels_last_3d and not also contiguous (C == 1 or one position: both, and then read as contiguous).
inline bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

}  // namespace lgd_fast
