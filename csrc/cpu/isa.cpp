// Run-time choice of the CPU kernels' SIMD path; see isa.h.

#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace lgd_fast {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

CpuIsa hardware_isa() {
#ifdef LGD_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

bool hardware_avx512_bf16() {
#ifdef LGD_X86_DISPATCH
  __builtin_cpu_init();
  return hardware_isa() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

namespace {

CpuIsa detect_isa() {
  CpuIsa isa = hardware_isa();
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {  // the same cap ATen obeys
    const std::string s(cap);
    if (s == "default") isa = CpuIsa::kBaseline;
    if (s == "avx2") isa = std::min(isa, CpuIsa::kAvx2);
  }
  return isa;
}

std::atomic<int> g_isa{-1};

}  // namespace

CpuIsa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(detect_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

std::string cpu_isa() { return isa_name(current_isa()); }

namespace {
std::atomic<bool> g_bf16_dot_allowed{true};
}  // namespace

bool bf16_dot_products() {
#ifdef LGD_BF16_DOT
  static const bool hardware = hardware_avx512_bf16();
  return hardware && current_isa() == CpuIsa::kAvx512 && g_bf16_dot_allowed.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void set_bf16_dot_products(bool allowed) { g_bf16_dot_allowed.store(allowed); }

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(static_cast<int>(detect_isa()));
    return;
  }
  CpuIsa want;
  if (name == "avx512") {
    want = CpuIsa::kAvx512;
  } else if (name == "avx2") {
    want = CpuIsa::kAvx2;
  } else if (name == "baseline") {
    want = CpuIsa::kBaseline;
  } else {
    TORCH_CHECK(false, "set_cpu_isa: name must be one of avx512, avx2, baseline, auto; got '", name, "'");
  }
  TORCH_CHECK(want <= hardware_isa(), "set_cpu_isa: this CPU cannot run the ", name, " path (it supports up to ",
              isa_name(hardware_isa()), ")");
  g_isa.store(static_cast<int>(want));
}

}  // namespace lgd_fast
