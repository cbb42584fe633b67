"""conv_bn at inference on the CPU (its ops: p3d_conv_onednn / conv3d_onednn eager, conv_bn_folded traced) against
the modules a model runs, torch.compile of them with freezing, and the convolution roofline.

Each case is ``ReLU(BatchNorm(conv(x)) [+ shortcut])`` in eval, channels_last_3d, at shapes of LGD-3D R50 (batch
4, the 16x112x112 clip) and of the X3D that ``run_convert.py`` measures; fp32 and bf16 (model and clip cast):

- ``fast``: ``lgd_fast.ops.conv_bn`` eagerly (the BatchNorm folded into the weight, packed once into oneDNN's
  layout, the shortcut and ReLU as post-ops: ``p3d_conv_onednn`` for P3D geometries, ``conv3d_onednn`` for the
  others);
- ``fast_compiled``: the same module under ``torch.compile`` with freezing (``conv_bn_folded`` traced);
- ``modules``: Conv3d, BatchNorm3d, the addition and ReLU, as a model runs them;
- ``compiled``: ``torch.compile`` of the modules with inductor's freezing (folds and packs the weights itself).

The roofline is the conv's FLOPs at the conv peak measured in the same run (``lgd_fast.bench.conv_peak``: oneDNN's
own channels-last 1x3x3 conv at R50's res2 shape): ``conv_peak_share`` = FLOPs / peak / median. Medians of
interleaved calls (benchmarks/_harness.py). Writes benchmarks/results/conv_bn_cpu.json.

    python benchmarks/run_conv_bn.py            # every shape, fp32 and bf16
    python benchmarks/run_conv_bn.py --quick    # two shapes, fp32, fewer repeats
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import _compiled, conv_peak  # noqa: E402
from lgd_fast.ops.conv_bn import conv_bn, p3d_geometry_reason  # noqa: E402

# name -> (input N, C, T, H, W; out channels; kernel; stride; groups; with a shortcut)
CASES = {
    "r50 res2 1x3x3": ((4, 64, 4, 28, 28), 64, (1, 3, 3), (1, 1, 1), 1, False),
    "r50 res3 3x1x1": ((4, 128, 4, 14, 14), 128, (3, 1, 1), (1, 1, 1), 1, False),
    "r50 res2 1x1x1 block end": ((4, 64, 4, 28, 28), 256, (1, 1, 1), (1, 1, 1), 1, True),
    "r50 res3 1x1x1 stride 2": ((4, 256, 4, 28, 28), 512, (1, 1, 1), (1, 2, 2), 1, False),
    "x3d res2 3x3x3 depthwise": ((1, 48, 8, 28, 28), 48, (3, 3, 3), (1, 1, 1), 48, False),
}
QUICK = ("r50 res2 1x3x3", "x3d res2 3x3x3 depthwise")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fast", "fast_compiled", "modules", "compiled")
CL3D = torch.channels_last_3d


class Modules(nn.Module):
    """What a model runs: the conv, its BatchNorm, the shortcut addition and the ReLU."""

    def __init__(self, c_in, c_out, kernel, stride, groups):
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.norm = nn.BatchNorm3d(c_out)

    def forward(self, inputs):
        x, shortcut = inputs
        y = self.norm(self.conv(x))
        return torch.relu(y if shortcut is None else y + shortcut)


class Fused(nn.Module):
    """The same modules run as one conv_bn call."""

    def __init__(self, modules: Modules):
        super().__init__()
        self.conv, self.norm = modules.conv, modules.norm

    def forward(self, inputs):
        x, shortcut = inputs
        return conv_bn(x, self.conv, self.norm, shortcut=shortcut, relu=True)


def trained_like(modules: Modules, gen: torch.Generator) -> Modules:
    with torch.no_grad():
        c = modules.norm.num_features
        modules.conv.weight.normal_(generator=gen).mul_(math.sqrt(2 / modules.conv.weight[0].numel()))
        modules.norm.weight.copy_(0.5 + torch.rand(c, generator=gen))
        modules.norm.bias.copy_(0.2 * torch.randn(c, generator=gen))
        modules.norm.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        modules.norm.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return modules.eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    names = QUICK if args.quick else tuple(CASES)
    dtypes = {"fp32": DTYPES["fp32"]} if args.quick else DTYPES
    peaks = {d: conv_peak(torch.device("cpu"), d) for d in dtypes}
    print("conv peak: " + ", ".join(f"{d} {p['gflops_per_s']:.0f} GFLOP/s" for d, p in peaks.items()))
    gen = torch.Generator().manual_seed(0)
    results = []
    for name in names:
        shape, c_out, kernel, stride, groups, with_shortcut = CASES[name]
        for dtype_name, dtype in dtypes.items():
            modules = trained_like(Modules(shape[1], c_out, kernel, stride, groups), gen).to(dtype, memory_format=CL3D)
            fused = Fused(modules)
            out_shape = modules((torch.randn(shape, dtype=dtype), None)).shape
            sets = []
            for _ in range(h.input_set_count(2 * torch.Size(shape).numel() * dtype.itemsize)):
                x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=CL3D)
                shortcut = torch.randn(out_shape, generator=gen).to(dtype).contiguous(memory_format=CL3D)
                sets.append((x, shortcut if with_shortcut else None))
            torch._dynamo.reset()
            candidates = {"fast": fused, "fast_compiled": _compiled(fused, freezing=True, compile_mode=None),
                          "modules": modules, "compiled": _compiled(modules, freezing=True, compile_mode=None)}
            flops = 2 * out_shape.numel() * (shape[1] // groups) * math.prod(kernel)
            nbytes = dtype.itemsize * (torch.Size(shape).numel() + (2 if with_shortcut else 1) * out_shape.numel())
            with torch.inference_mode():
                got, want = fused(sets[0]), modules(sets[0])
                error = ((got.double() - want.double()).norm() / want.double().norm()).item()
                p3d = p3d_geometry_reason(modules.conv) is None  # (p3d_conv_onednn, else conv3d_onednn)
                describe = {"case": name, "dtype": dtype_name, "shape": list(shape), "out_channels": c_out,
                            "kernel": list(kernel), "stride": list(stride), "groups": groups,
                            "shortcut": with_shortcut, "p3d_geometry": p3d}  # fmt: skip
                row = h.measure_op_row(candidates, sets, args, describe=describe, nbytes=nbytes,
                                       bytes_per_s=bandwidth["bytes_per_s"], fast="fast", others=IMPLS[1:])  # fmt: skip
            peak = peaks[dtype_name]["gflops_per_s"] * 1e9
            row["gflop"] = flops / 1e9
            row["conv_peak_share"] = {n: flops / peak / t["median_s"] for n, t in row["timings"].items()}
            row["fast_vs_modules_relative_error"] = error
            print("    conv peak share: " + ", ".join(f"{n} {s:.0%}" for n, s in row["conv_peak_share"].items()))
            results.append(row)
    return h.op_payload(
        "conv_bn",
        args,
        setup,
        command="python benchmarks/run_conv_bn.py" + (" --quick" if args.quick else ""),
        conv_peak=peaks,
        notes=[
            "timings: median seconds per call over interleaved repeats, under torch.inference_mode; speedup = "
            "other's median / fast's median",
            "fast = conv_bn eagerly; fast_compiled = torch.compile(conv_bn module) with freezing (conv_bn_folded "
            "traced); modules = Conv3d, BatchNorm3d, + shortcut, ReLU; compiled = torch.compile(modules) with "
            "inductor freezing; everything channels_last_3d, eval, trained-like BatchNorm statistics",
            "conv_peak_share = gflop / conv_peak / median (the roofline: oneDNN's own channels-last 1x3x3 conv at "
            "R50 res2, measured in this run); copy_bw_fraction: bytes (x, shortcut, output) at the copy bandwidth",
            "fast_vs_modules_relative_error: the fast output against the modules' (same dtype), norm relative",
        ],
        results=results,
    )


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="conv_bn_cpu.json", repeats=(40, 10))


if __name__ == "__main__":
    main()
