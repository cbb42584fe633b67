"""global_avg_pool on the CPU: the cpp op vs the eager reference vs torch.compile of the reference.

Forward and forward+backward, fp32 and bf16, contiguous and channels_last_3d, on LGD-3D R50 shapes, measured
side by side in one run (see benchmarks/_harness.py for the method), against the memory floor from the
measured copy bandwidth. Writes benchmarks/results/global_avg_pool_cpu.{json,png}.

    python benchmarks/run_global_avg_pool.py            # full run, a few minutes on 2 cores
    python benchmarks/run_global_avg_pool.py --quick    # res2 shape only, fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.ops import global_avg_pool, global_avg_pool_reference  # noqa: E402

# (N, C, T, H, W) where LGD-3D R50 pools (16x112x112 clips, batch 8): res2 (the brief's shape) and res5.
SHAPES = {"res2": (8, 256, 8, 28, 28), "res5": (8, 2048, 2, 4, 4)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("forward", "forward+backward")
IMPLS = ("cpp", "reference", "compiled", "torch_mean")
COLORS = {"cpp": "tab:blue", "reference": "tab:gray", "compiled": "tab:orange", "torch_mean": "tab:green"}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move: forward reads x and writes (N, C); backward reads (N, C) and writes x-sized."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    x_bytes = itemsize * torch.Size(shape).numel()
    nc_bytes = itemsize * shape[0] * shape[1]
    return x_bytes + nc_bytes if pass_ == "forward" else 2 * (x_bytes + nc_bytes)


def make_inputs(shape, dtype, memory_format, pass_: str, count: int) -> list[Any]:
    sets = []
    for _ in range(count):
        x = torch.randn(shape, dtype=torch.float32).to(dtype=dtype, memory_format=memory_format)
        if pass_ == "forward":
            sets.append(x)
        else:
            sets.append((x.requires_grad_(True), torch.randn(shape[:2], dtype=dtype)))
    return sets


def make_candidates(pass_: str) -> dict[str, Callable[[Any], Any]]:
    torch._dynamo.reset()  # a fresh compile per configuration, no recompile limit reached
    fns = {
        "cpp": lambda x: global_avg_pool(x, backend="cpp"),
        "reference": global_avg_pool_reference,
        "compiled": torch.compile(global_avg_pool_reference, backend="inductor", dynamic=False),
        # what one would write by hand: x.mean at x's dtype (the reference upcasts bf16 to float32 first)
        "torch_mean": lambda x: x.mean(dim=(2, 3, 4)),
    }
    if pass_ == "forward":
        return fns

    def with_backward(fn):
        def run(inputs):
            x, g = inputs
            return torch.autograd.grad(fn(x), x, g)

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:

    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    shapes = {"res2": SHAPES["res2"]} if args.quick else SHAPES
    results = []
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            for format_name, memory_format in FORMATS.items():
                for pass_ in PASSES:
                    nbytes = bytes_moved(shape, dtype, pass_)
                    count = h.input_set_count(nbytes // (2 if pass_ != "forward" else 1))
                    inputs = make_inputs(shape, dtype, memory_format, pass_, count)
                    candidates = make_candidates(pass_)
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": pass_}
                    results.append(
                        h.measure_op_row(candidates, inputs, args, describe=describe, nbytes=nbytes,
                                         bytes_per_s=bandwidth["bytes_per_s"], others=IMPLS[1:])
                    )
    return h.op_payload(
        "global_avg_pool",
        args,
        setup,
        notes=[
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp median",
            "candidates: cpp = global_avg_pool(x, backend='cpp'); reference = global_avg_pool_reference (eager; "
            "bf16 is averaged in float32); compiled = torch.compile(reference, inductor); torch_mean = x.mean(dim="
            "(2, 3, 4)) at x's dtype",
            "copy_bw_fraction = roofline_s / median, roofline_s = bytes_moved / copy bandwidth (read + write bytes "
            "of dst.copy_(src) on 256 MiB); a read-mostly op can pass 1.0, since reads alone stream faster than a copy",
            "steady_malloc: glibc told to reuse freed memory (no mmap, no trim; see _harness.steady_malloc). With "
            "glibc's defaults (--system-malloc) each forward+backward's fresh x-sized gradient above 32 MiB (fp32 "
            "res2: 51 MB) comes as new pages, every candidate pays ~10-20 ms of page faults and bf16 calls pay "
            "them now and then, depending on what ran before",
            "foreign_load_cores: CPU cores other processes kept busy while that row was timed (shared machine)",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    return h.plot_op_benchmark(
        payload, path, op="global_avg_pool", fast="cpp", impls=IMPLS, colors=COLORS, extra_speedups=("torch_mean",),
        bandwidth_line=1.0,
    )


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="global_avg_pool_cpu.json", plot=plot)


if __name__ == "__main__":
    main()
