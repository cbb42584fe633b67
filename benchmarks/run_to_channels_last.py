"""to_channels_last_3d on the CPU: the cpp op vs the eager reference (``x.contiguous(memory_format=
channels_last_3d)``) vs torch.compile of it, on the clips a fast LGD model converts at its stem.

Forward only (the clip needs no gradient), fp32 and bf16, measured side by side in one run (method:
benchmarks/_harness.py), against the memory floor (read x, write it once) from the measured copy bandwidth.
Writes benchmarks/results/to_channels_last_cpu.{json,png}.

    python benchmarks/run_to_channels_last.py            # a minute on 2 cores
    python benchmarks/run_to_channels_last.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.ops import to_channels_last_3d, to_channels_last_3d_reference  # noqa: E402

# clips: lgd3d_tiny at batch 16 (the demo's), LGD-3D R50 at batch 4 and 1 (16x112x112)
SHAPES = {"tiny_b16": (16, 3, 16, 32, 32), "r50_b4": (4, 3, 16, 112, 112), "r50_b1": (1, 3, 16, 112, 112)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("cpp", "reference", "compiled")
COLORS = {"cpp": "tab:blue", "reference": "tab:gray", "compiled": "tab:orange"}


def run(args: argparse.Namespace) -> dict[str, Any]:

    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape_name, shape in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            nbytes = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()  # read + write
            count = h.input_set_count(nbytes // 2)
            inputs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(count)]  # never zeros
            torch._dynamo.reset()
            candidates = {
                "cpp": lambda x: to_channels_last_3d(x, backend="cpp"),
                "reference": to_channels_last_3d_reference,
                "compiled": torch.compile(to_channels_last_3d_reference, backend="inductor", dynamic=False),
            }
            describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                        "memory_format": "contiguous", "pass": "forward"}  # fmt: skip
            results.append(h.measure_op_row(candidates, inputs, args, describe=describe, nbytes=nbytes,
                                            bytes_per_s=bandwidth["bytes_per_s"], others=IMPLS[1:]))  # fmt: skip
    return h.op_payload(
        "to_channels_last",
        args,
        setup,
        notes=[
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp median",
            "candidates: cpp = to_channels_last_3d(x, backend='cpp'); reference = x.contiguous(memory_format="
            "channels_last_3d); compiled = torch.compile(reference, inductor)",
            "copy_bw_fraction = roofline_s / median, roofline_s = (read x + write x) / copy bandwidth of "
            "dst.copy_(src) on 256 MiB",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    return h.plot_op_benchmark(payload, path, op="to_channels_last_3d", fast="cpp", impls=IMPLS, colors=COLORS)


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="to_channels_last_cpu.json", plot=plot)


if __name__ == "__main__":
    main()
