"""This CPU's arithmetic peak, measured: fused multiply-adds in registers, against oneDNN's conv peak.

``lgd-fast bench`` measures the conv peak as oneDNN's own channels-last 1x3x3 convolution at an R50 res2 shape
(``lgd_fast.bench.conv_peak``), and the fast model's convolutions run at about that rate. Is that rate the
hardware's, or could a better convolution go faster? This measures the machine's floating-point peak directly:
on every core (one OpenMP thread per torch thread), independent chains of vector FMAs held in registers (12
accumulators, no memory traffic), float32 with 512-bit ``vfmadd`` (``_mm512_fmadd_ps``: 32 FLOP per instruction)
and with 256-bit ones, and bfloat16 dot products (``_mm512_dpbf16_ps``: 32 bf16 pairs into 16 float32 lanes, 64
FLOP per instruction) where the CPU has avx512_bf16. Then oneDNN's conv peak in the same run, fp32 and bf16, and
its share of the FMA peak. Compiled at run time with the build's compiler (``torch.utils.cpp_extension``).
Writes benchmarks/results/fma_peak_cpu.json.

    PYTHONPATH=. python benchmarks/run_fma_peak.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import torch
from torch.utils.cpp_extension import load_inline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402

from lgd_fast.bench import conv_peak, write_json  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <cstdint>

// Seconds for `iters` rounds of 12 independent FMA chains on every thread; the sums go to `sink` so that nothing
// is optimised away (the inner loops unrolled: the 12 accumulators stay in registers). kind: 0 = float32
// 512-bit FMA, 1 = float32 256-bit FMA, 2 = bfloat16 512-bit dot product.
double fma_seconds(int64_t iters, int64_t threads, int64_t kind) {
  volatile float sink = 0.f;
  double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
  {
    float total = 0.f;
    if (kind == 0) {
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
      const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
      for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
      for (int i = 0; i < 12; ++i) total += _mm512_reduce_add_ps(acc[i]);
    } else if (kind == 1) {
      __m256 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1e-3f * i);
      const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
      float lanes[8];
      for (int i = 0; i < 12; ++i) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (float v : lanes) total += v;
      }
    } else {
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
      const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(3e-3f));
      for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      for (int i = 0; i < 12; ++i) total += _mm512_reduce_add_ps(acc[i]);
    }
#pragma omp atomic
    sink += total;
  }
  return omp_get_wtime() - start;
}
"""

KINDS = {"fp32_fma_512": (0, 32), "fp32_fma_256": (1, 16), "bf16_dot_512": (2, 64)}  # name: (kind, FLOP/instr.)


def cpu_flags() -> set[str]:
    return set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()


def build_fma_extension(has_bf16: bool):
    """The FMA-chain timer above, compiled at run time."""
    return load_inline(
        "lgd_fast_fma_peak", cpp_sources=SOURCE, functions=["fma_seconds"], verbose=False,
        build_directory=tempfile.mkdtemp(prefix="fma_peak_"),
        extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx2", "-mfma"] + (["-mavx512bf16"] if has_bf16 else []),
        extra_ldflags=["-fopenmp"],
    )  # fmt: skip


def fma_peak(ext, name: str, *, iters: int, repeats: int, threads: int) -> dict:
    """GFLOP/s of ``KINDS[name]`` on ``threads`` threads: the median of ``repeats`` calls after a warm-up."""
    kind, flop = KINDS[name]
    ext.fma_seconds(iters // 10, threads, kind)  # warm-up: clocks up
    seconds = [ext.fma_seconds(iters, threads, kind) for _ in range(repeats)]
    flops = flop * 12 * iters * threads
    return {"gflops_per_s": flops / statistics.median(seconds) / 1e9,
            "best_gflops_per_s": flops / min(seconds) / 1e9, "seconds": seconds}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20_000_000, help="rounds of 12 FMAs per thread per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fma_peak_cpu.json"))
    args = parser.parse_args(argv)
    flags = cpu_flags()
    if "avx512f" not in flags or "fma" not in flags:
        print(f"run_fma_peak.py: error: this measures AVX-512 and FMA instructions, which this CPU "
              f"({platform.machine()}, /proc/cpuinfo {'read' if flags else 'not found'}) does not report",
              file=sys.stderr)  # fmt: skip
        return 2
    has_bf16 = "avx512_bf16" in flags
    ext = build_fma_extension(has_bf16)
    threads = torch.get_num_threads()
    rows = {}
    for name, (kind, _) in KINDS.items():
        if kind == 2 and not has_bf16:
            continue
        rows[name] = fma_peak(ext, name, iters=args.iters, repeats=args.repeats, threads=threads)
        print(f"{name}: {rows[name]['gflops_per_s']:.0f} GFLOP/s (best {rows[name]['best_gflops_per_s']:.0f}) "
              f"on {threads} threads")
    convs = {}
    for dtype in ("fp32", "bf16"):
        if dtype == "bf16" and not has_bf16:
            continue
        peak = conv_peak(torch.device("cpu"), dtype)
        fma = rows["fp32_fma_512" if dtype == "fp32" else "bf16_dot_512"]["gflops_per_s"]
        convs[dtype] = {**peak, "share_of_fma_peak": peak["gflops_per_s"] / fma}
        print(f"oneDNN conv peak {dtype}: {peak['gflops_per_s']:.0f} GFLOP/s, {peak['gflops_per_s'] / fma:.0%} of the "
              f"measured {'FMA' if dtype == 'fp32' else 'bf16 dot-product'} peak")
    record = {"benchmark": "fma_peak", "command": " ".join(["python"] + sys.argv), "machine": h.machine_info(),
              "threads": threads, "iters": args.iters, "fma": rows, "conv_peak": convs}  # fmt: skip
    print("wrote", write_json(args.out, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
