// Which SIMD code path the CPU kernels run, shared by every csrc/cpu kernel.
//
// A kernel that wants wide SIMD compiles its hot loops once per path (a function template marked
// LGD_TARGET_AVX512 / LGD_TARGET_AVX2 / nothing, written with GCC/Clang vector extensions whose width the
// target decides) and switches on current_isa() when called. setup.py passes no -march, so the baseline is
// plain x86-64 (SSE2) and the wider paths exist only inside those target-marked functions.
//
// current_isa() is the widest path the CPU runs, capped by ATEN_CPU_CAPABILITY=default|avx2 as ATen is;
// set_cpu_isa() forces one (tests run every path).

#pragma once

#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define LGD_X86_DISPATCH 1
#define LGD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LGD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif
#define LGD_INLINE inline __attribute__((always_inline))
// The AVX512_BF16 dot-product code needs the intrinsics inside a GCC target region (clang ignores
// `#pragma GCC target`): built with GCC only; with clang bf16_dot_products() is false.
#if defined(LGD_X86_DISPATCH) && !defined(__clang__)
#define LGD_BF16_DOT 1
#endif

namespace lgd_fast {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// "avx512", "avx2" or "baseline".
const char* isa_name(CpuIsa isa);

// The widest path this CPU supports, whatever the environment or set_cpu_isa say.
CpuIsa hardware_isa();

// The path the kernels take now (detected once, then whatever set_cpu_isa last chose).
CpuIsa current_isa();

// The path the CPU kernels use, by name (lgd_fast._C.cpu_isa()).
std::string cpu_isa();

// Whether this CPU has AVX512_BF16 (vdpbf16ps: bfloat16 pair products summed into float32 lanes), whatever the
// path chosen.
bool hardware_avx512_bf16();

// Whether bfloat16 kernels use those dot products now: built with them (LGD_BF16_DOT), the AVX-512 path is taken,
// the CPU has them and set_bf16_dot_products(false) was not called (lgd_fast._C.bf16_dot_products()).
bool bf16_dot_products();

// Allows (true, the default) or forbids the dot products where bf16_dot_products() would say yes: tests run the
// AVX-512 float32 tiles on bfloat16 weights with it, as a CPU without AVX512_BF16 runs them.
void set_bf16_dot_products(bool allowed);

// Forces a path ("avx512", "avx2", "baseline"), or "auto" to detect again; errors if the CPU lacks it.
void set_cpu_isa(const std::string& name);

}  // namespace lgd_fast
