"""squeeze_excite (with SiLU) on the CPU: the cpp op vs the modules a model runs, the eager reference and
torch.compile of the modules.

Inference (the op exists for it), fp32 and bf16, channels_last_3d (what a converted model feeds it) and
contiguous, at the shapes of the X3D that ``benchmarks/run_convert.py --model x3d`` measures (1x3x8x112x112, inner
widths 48, 96, 192, 384), measured side by side in one run (benchmarks/_harness.py), against a floor of two reads
and one write of x at the measured copy bandwidth. Writes benchmarks/results/squeeze_excite_cpu.{json,png}.

    python benchmarks/run_squeeze_excite.py            # the four shapes, fp32 and bf16, both layouts
    python benchmarks/run_squeeze_excite.py --quick    # res2 only, fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.ops import squeeze_excite, squeeze_excite_reference  # noqa: E402

# (N, C, T, H, W) of the converted X3D's squeeze-excitations (inner width C, reduced to max(C // 16, 2)).
SHAPES = {"res2": (1, 48, 8, 28, 28), "res3": (1, 96, 8, 14, 14), "res4": (1, 192, 8, 7, 7),
          "res5": (1, 384, 8, 4, 4)}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"channels_last_3d": torch.channels_last_3d, "contiguous": torch.contiguous_format}
IMPLS = ("cpp", "reference", "compiled", "modules")
COLORS = {"cpp": "tab:blue", "reference": "tab:gray", "compiled": "tab:orange", "modules": "tab:green"}


class SqueezeExciteSiLU(nn.Module):
    """What a model runs: the mean, the excitation Sequential of two 1x1x1 convs, the product, then SiLU."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = max(channels // 16, 2)
        self.excitation = nn.Sequential(nn.Conv3d(channels, reduced, 1), nn.ReLU(), nn.Conv3d(reduced, channels, 1),
                                        nn.Sigmoid())  # fmt: skip

    def forward(self, x):
        return nn.functional.silu(x * self.excitation(x.mean((2, 3, 4), keepdim=True)))


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Two reads of x (the means, then the product) and one write of the output."""
    return 3 * torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()


def make_candidates(module: SqueezeExciteSiLU) -> dict[str, Callable[[Any], Any]]:
    torch._dynamo.reset()  # a fresh compile per configuration, no recompile limit reached
    fc1, fc2 = module.excitation[0], module.excitation[2]
    weights = (fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias)
    return {
        "cpp": lambda x: squeeze_excite(x, *weights, backend="cpp"),
        "reference": lambda x: squeeze_excite_reference(x, *weights),
        "compiled": torch.compile(module, backend="inductor", dynamic=False),
        "modules": module,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:

    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    shapes = {"res2": SHAPES["res2"]} if args.quick else SHAPES
    results = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for shape_name, shape in shapes.items():
            for dtype_name, dtype in DTYPES.items():
                module = SqueezeExciteSiLU(shape[1]).eval().to(dtype)
                for format_name, memory_format in FORMATS.items():
                    nbytes = bytes_moved(shape, dtype)
                    count = h.input_set_count(nbytes)
                    inputs = [torch.randn(shape).to(dtype=dtype, memory_format=memory_format) for _ in range(count)]
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": "forward"}  # fmt: skip
                    results.append(h.measure_op_row(make_candidates(module), inputs, args, describe=describe,
                                                    nbytes=nbytes, bytes_per_s=bandwidth["bytes_per_s"],
                                                    others=IMPLS[1:]))  # fmt: skip
    return h.op_payload(
        "squeeze_excite",
        args,
        setup,
        notes=[
            "timings: median seconds per call over interleaved repeats, under torch.inference_mode; speedup = "
            "other's median / cpp median",
            "candidates: cpp = squeeze_excite(x, ..., silu=True, backend='cpp'); reference = "
            "squeeze_excite_reference (eager, bf16 computed in float32); modules = the mean, the excitation "
            "Sequential (Conv3d 1x1x1, ReLU, Conv3d 1x1x1, Sigmoid), the product and F.silu, as a model runs them, "
            "weights in x's dtype; compiled = torch.compile(modules, inductor)",
            "copy_bw_fraction = roofline_s / median, roofline_s = bytes_moved / copy bandwidth, bytes_moved = two "
            "reads of x and one write of the output",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    return h.plot_op_benchmark(payload, path, op="squeeze_excite (+SiLU)", fast="cpp", impls=IMPLS, colors=COLORS,
                               extra_speedups=("modules",))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="squeeze_excite_cpu.json", repeats=(100, 30), plot=plot)


if __name__ == "__main__":
    main()
