"""A training step's convolutions, each direction timed alone, against this CPU's measured FMA peak.

Issue 14 asks a fast R50 training step for 1.15x ``torch.compile`` of the channels-last reference; the step is
mostly convolutions (``lgd-fast bench``'s conv floor). How close to the hardware are they, and in which direction?
For every distinct conv call of one LGD-3D forward (``lgd_fast.bench.model_convs``, batch 4 at 16x112x112 by
default), on random data in each layout (channels_last_3d, and contiguous: oneDNN's blocked kernels with reorders
in the call), this times oneDNN's forward (``F.conv3d``), input gradient and weight gradient
(``aten.convolution_backward`` with one output each; no input gradient for the clip's conv), each the fastest of
``--repeats`` calls, and sums them over the calls one step makes. Stride-1 1x1x1 convs are also timed as the GEMMs
they are (``torch.mm`` on the channels-last view), the other formulation a faster weight gradient could come
from. FLOPs are 2 per multiply-add of the full kernel (the padded taps included), so shares at small frames
read high. The FMA peak is measured in the same run (``run_fma_peak.py``'s register-resident FMA chains).

    PYTHONPATH=. python benchmarks/run_training_convs.py --out benchmarks/results/training_convs_cpu.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402
import run_fma_peak  # noqa: E402

from lgd_fast.bench import model_convs, write_json  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402
from lgd_fast.ops.p3d_conv import conv_output_shape  # noqa: E402

LAYOUTS = {"channels_last_3d": torch.channels_last_3d, "contiguous": torch.contiguous_format}
DIRECTIONS = ("forward", "input_grad", "weight_grad")


def fastest(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up (interference only slows a call down)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_call(call: dict, layout: torch.memory_format, gen: torch.Generator, repeats: int) -> dict[str, float]:
    """Seconds of each direction of one conv call in ``layout`` (input, weight and output gradient alike)."""
    shape, kernel = call["input"], call["weight"]
    stride, padding, dilation, groups = call["stride"], list(call["padding"]), call["dilation"], call["groups"]
    x = torch.randn(shape, generator=gen).contiguous(memory_format=layout)
    fan_in = kernel[1] * kernel[2] * kernel[3] * kernel[4]
    w = (torch.randn(kernel, generator=gen) / fan_in**0.5).contiguous(memory_format=layout)
    with torch.no_grad():
        out_shape = F.conv3d(x, w, None, stride, padding, dilation, groups).shape
    g = torch.randn(out_shape, generator=gen).contiguous(memory_format=layout)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, list(stride), padding, list(dilation), False, [0, 0, 0], groups, mask
        )

    with torch.no_grad():
        seconds = {"forward": fastest(lambda: F.conv3d(x, w, None, stride, padding, dilation, groups), repeats),
                   "weight_grad": fastest(backward([False, True, False]), repeats),
                   "input_grad": fastest(backward([True, False, False]), repeats) if call["input_grad"] else 0.0}
    return seconds


def time_gemm(call: dict, gen: torch.Generator, repeats: int) -> dict[str, float] | None:
    """A stride-1 1x1x1 conv's three products as ``torch.mm`` on (N*T*H*W, C) rows: out = x W^T, grad_x = g W,
    grad_W = g^T x. None for other convs."""
    if tuple(call["weight"][2:]) != (1, 1, 1) or tuple(call["stride"]) != (1, 1, 1) or call["groups"] != 1:
        return None
    c_out, c_in = call["weight"][:2]
    n, _, t, hh, ww = call["input"]
    rows = n * t * hh * ww
    x, g = torch.randn(rows, c_in, generator=gen), torch.randn(rows, c_out, generator=gen)
    w = torch.randn(c_out, c_in, generator=gen) / c_in**0.5
    return {"forward": fastest(lambda: torch.mm(x, w.t()), repeats),
            "input_grad": fastest(lambda: torch.mm(g, w), repeats) if call["input_grad"] else 0.0,
            "weight_grad": fastest(lambda: torch.mm(g.t(), x), repeats)}  # fmt: skip


def flops_of(call: dict) -> int:
    """2 per multiply-add of one direction of the call (forward, input gradient and weight gradient alike)."""
    out = conv_output_shape(call["input"], call["weight"], call["stride"], call["padding"], call["dilation"])
    return 2 * math.prod(out) * math.prod(call["weight"][1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=7, help="calls per direction and layout; the fastest counts")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "training_convs_cpu.json"))
    args = parser.parse_args(argv)
    flags = run_fma_peak.cpu_flags()
    if "avx512f" not in flags:
        print("run_training_convs.py: error: the FMA peak is measured with AVX-512, which this CPU lacks",
              file=sys.stderr)  # fmt: skip
        return 2
    threads = torch.get_num_threads()
    ext = run_fma_peak.build_fma_extension(has_bf16="avx512_bf16" in flags)
    peak_before = run_fma_peak.fma_peak(ext, "fp32_fma_512", iters=20_000_000, repeats=5, threads=threads)
    torch.manual_seed(0)
    model = create_model(args.model, 400)
    clip = torch.randn(args.batch, 3, args.frames, args.size, args.size)
    calls = model_convs(model, clip, torch.autocast("cpu", enabled=False))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i, call in enumerate(calls):
        timings = {name: time_call(call, layout, gen, args.repeats) for name, layout in LAYOUTS.items()}
        gemm = time_gemm(call, gen, args.repeats)
        flops = flops_of(call)
        row = {**{k: (str(v) if k == "dtype" else v) for k, v in call.items()}, "flops": flops, "seconds": timings,
               "gemm_seconds": gemm}  # fmt: skip
        rows.append(row)
        cl = timings["channels_last_3d"]
        print(f"[{i + 1}/{len(calls)}] {call['input']} -> {call['weight']} stride {call['stride']} x{call['count']}: "
              + ", ".join(f"{d} {cl[d] * 1e3:.2f} ms ({flops / cl[d] / 1e9:.0f} GFLOP/s)" for d in DIRECTIONS if cl[d])
              + (f"; mm {sum(gemm.values()) * 1e3:.2f} ms" if gemm else ""), flush=True)  # fmt: skip
    peak_after = run_fma_peak.fma_peak(ext, "fp32_fma_512", iters=20_000_000, repeats=5, threads=threads)
    peak = max(peak_before["gflops_per_s"], peak_after["gflops_per_s"])

    def total(pick) -> dict[str, float]:
        return {d: sum(r["count"] * pick(r, d) for r in rows) for d in DIRECTIONS}

    totals = {name: total(lambda r, d, name=name: r["seconds"][name][d]) for name in LAYOUTS}
    totals["best_layout_per_call"] = total(lambda r, d: min(r["seconds"][n][d] for n in LAYOUTS))
    totals["gemm_where_faster"] = total(
        lambda r, d: min(r["seconds"]["channels_last_3d"][d], (r["gemm_seconds"] or {}).get(d, float("inf")))
    )
    step_flops = {d: sum(r["count"] * r["flops"] for r in rows if d != "input_grad" or r["input_grad"])
                  for d in DIRECTIONS}  # fmt: skip
    summary = {
        name: {**{f"{d}_s": s for d, s in t.items()}, "step_s": sum(t.values()),
               **{f"{d}_share_of_fma_peak": step_flops[d] / t[d] / 1e9 / peak for d in DIRECTIONS if t[d]}}
        for name, t in totals.items()
    }  # fmt: skip
    at_peak = sum(step_flops.values()) / 1e9 / peak
    for name, s in summary.items():
        print(f"{name:22s} step {s['step_s'] * 1e3:7.1f} ms: " + ", ".join(
            f"{d} {s[f'{d}_s'] * 1e3:6.1f} ms ({s.get(f'{d}_share_of_fma_peak', 0):.0%} of the FMA peak)"
            for d in DIRECTIONS))  # fmt: skip
    print(f"FMA peak {peak:.0f} GFLOP/s; the step's {sum(step_flops.values()) / 1e9:.1f} GFLOP at that peak: "
          f"{at_peak * 1e3:.1f} ms")
    record = {
        "benchmark": "training_convs",
        "command": " ".join(["python"] + sys.argv),
        "machine": h.machine_info(),
        "model": args.model,
        "input": [args.batch, 3, args.frames, args.size, args.size],
        "threads": threads,
        "fma_peak_gflops_per_s": {"before": peak_before["gflops_per_s"], "after": peak_after["gflops_per_s"]},
        "step_gflop": {d: f / 1e9 for d, f in step_flops.items()},
        "step_at_fma_peak_s": at_peak,
        "summary": summary,
        "calls": rows,
        "notes": [
            "seconds: the fastest of --repeats calls, each direction alone (forward = F.conv3d; input_grad / "
            "weight_grad = aten.convolution_backward with that output only), summed over the calls one step makes",
            "channels_last_3d: input, weight and gradients in channels_last_3d; contiguous: all contiguous (oneDNN "
            "reorders to its blocked layout inside the call)",
            "gemm_seconds: stride-1 1x1x1 convs as torch.mm on (N*T*H*W, C) rows; gemm_where_faster takes the mm "
            "where it beat the channels-last conv",
            "FLOPs: 2 per multiply-add of the full kernel, padded taps included (shares at 4x4 frames read high)",
        ],
    }
    print("wrote", write_json(args.out, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
