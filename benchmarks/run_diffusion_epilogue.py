"""diffusion_epilogue on the CPU: the cpp op vs the eager composite vs torch.compile of the composite.

Forward (out and mean) and forward+backward (all five gradients), fp32 and bf16, contiguous and
channels_last_3d, measured side by side in one run (method: benchmarks/_harness.py), against the memory
floor from the measured copy bandwidth. The brief's shape is N=8, C=256, T=8, H=W=28 (LGD-3D R50 res2);
res5 (8, 2048, 2, 4, 4) shows the short-row end. Writes benchmarks/results/diffusion_epilogue_cpu.{json,png}.

    python benchmarks/run_diffusion_epilogue.py            # full run, a few minutes on 2 cores
    python benchmarks/run_diffusion_epilogue.py --quick    # the brief's shape only, fewer repeats

Targets (PERF.md), fp32 at the brief's shape: forward >= 70% of copy bandwidth, >= 2x eager, >= 1.2x
compiled; forward+backward >= 2x eager autograd.
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

from lgd_fast.ops import (  # noqa: E402
    diffusion_epilogue,
    diffusion_epilogue_reference,
    extension_available,
    extension_error,
)

SHAPES = {"res2": (8, 256, 8, 28, 28), "res5": (8, 2048, 2, 4, 4)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("forward", "forward+backward")
IMPLS = ("cpp", "reference", "compiled")
COLORS = {"cpp": "tab:blue", "reference": "tab:gray", "compiled": "tab:orange"}
TARGETS = {
    "forward": {"copy_bw_fraction": 0.7, "vs_reference": 2.0, "vs_compiled": 1.2},
    "forward+backward": {"vs_reference": 2.0},
}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move. Forward: read r, s, write out. Backward adds: read grad_out, out, r, write
    grad_r, grad_s. The (N, C) and (C,) tensors are under 0.1% and left out."""
    big = torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()
    return 3 * big if pass_ == "forward" else 8 * big


def make_inputs(shape, dtype, memory_format, pass_: str, count: int) -> list[Any]:
    """Input sets: r, s around 0 (ReLU cuts about half), d, scale, shift float32; for backward the upstream grads."""
    n, c = shape[:2]
    sets = []
    for _ in range(count):
        r = (torch.randn(shape) - 0.5).to(dtype=dtype, memory_format=memory_format)
        s = (torch.randn(shape) + 0.5).to(dtype=dtype, memory_format=memory_format)
        small = [0.5 * torch.randn(n, c), 0.5 + torch.rand(c), 0.2 * torch.randn(c)]
        args = (r, s, *small)
        if pass_ == "forward":
            sets.append(args)
        else:
            args = tuple(t.requires_grad_(True) for t in args)
            upstream = (torch.randn(shape).to(dtype=dtype, memory_format=memory_format), torch.randn(n, c).to(dtype))
            sets.append((args, upstream))
    return sets


def make_candidates(pass_: str) -> dict[str, Callable[[Any], Any]]:
    torch._dynamo.reset()  # a fresh compile per configuration, no recompile limit reached
    fns = {
        "cpp": lambda *a: diffusion_epilogue(*a, backend="cpp"),
        "reference": diffusion_epilogue_reference,
        "compiled": torch.compile(diffusion_epilogue_reference, backend="inductor", dynamic=False),
    }
    if pass_ == "forward":

        def unpacked(fn):
            return lambda args: fn(*args)

        return {name: unpacked(fn) for name, fn in fns.items()}

    def with_backward(fn):
        def run(inputs):
            args, (gout, gmean) = inputs
            out, mean = fn(*args)
            return torch.autograd.grad((out, mean), args, (gout, gmean))

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not extension_available():
        raise SystemExit(f"lgd_fast._C is not built: {extension_error()}")
    from lgd_fast import _C

    setup = h.prepare_run(args)
    bandwidth = setup["copy_bandwidth"]
    print(f"copy bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (read + write), cpu path {_C.cpu_isa()}")
    shapes = {"res2": SHAPES["res2"]} if args.quick else SHAPES
    results = []
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            for format_name, memory_format in FORMATS.items():
                for pass_ in PASSES:
                    nbytes = bytes_moved(shape, dtype, pass_)
                    # enough sets that their big inputs (r, s, and grad_out for backward) exceed the cache
                    big = bytes_moved(shape, dtype, "forward") // 3
                    count = h.input_set_count(big * (2 if pass_ == "forward" else 3))
                    inputs = make_inputs(shape, dtype, memory_format, pass_, count)
                    candidates = make_candidates(pass_)
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": pass_}
                    results.append(
                        h.measure_op_row(candidates, inputs, args, describe=describe, nbytes=nbytes,
                                         bytes_per_s=bandwidth["bytes_per_s"], others=("reference", "compiled"))
                    )
    return {
        "benchmark": "diffusion_epilogue",
        "machine": {**h.machine_info(), "lgd_fast_cpu_isa": _C.cpu_isa()},
        "settings": {
            "quick": args.quick,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "steady_malloc": setup["steady_malloc"],
        },
        "copy_bandwidth": bandwidth,
        "foreign_load_before_cores": setup["foreign_load_before_cores"],
        "targets": TARGETS,
        "target_check": check_targets(results),
        "notes": [
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp median",
            "candidates: cpp = diffusion_epilogue(..., backend='cpp'); reference = diffusion_epilogue_reference "
            "(the eager composite: r * scale + shift + s + d, ReLU, mean; bf16 computed in float32); compiled = "
            "torch.compile(reference, inductor); forward+backward = autograd.grad of (out, mean) w.r.t. all five "
            "inputs",
            "copy_bw_fraction = roofline_s / median, roofline_s = bytes_moved / copy bandwidth (read + write bytes "
            "of dst.copy_(src) on 256 MiB)",
            "steady_malloc: glibc told to reuse freed memory (no mmap, no trim; see _harness.steady_malloc)",
            "foreign_load_cores: CPU cores other processes kept busy while that row was timed (shared machine)",
        ],
        "results": results,
    }


def check_targets(results: list[dict]) -> list[dict]:
    """Each PERF.md target at the brief's shape (res2, fp32, both layouts): the measured value and pass/fail."""
    checks = []
    for row in results:
        if row["shape_name"] != "res2" or row["dtype"] != "fp32":
            continue
        measured = {
            "copy_bw_fraction": row["copy_bw_fraction"]["cpp"],
            "vs_reference": row["speedup_vs_reference"],
            "vs_compiled": row["speedup_vs_compiled"],
        }
        for name, target in TARGETS[row["pass"]].items():
            checks.append(
                {
                    "pass": row["pass"],
                    "memory_format": row["memory_format"],
                    "metric": name,
                    "target": target,
                    "measured": measured[name],
                    "met": measured[name] >= target,
                }
            )
    return checks


def plot(payload: dict[str, Any], path: Path) -> Path:
    return h.plot_op_benchmark(
        payload, path, op="diffusion_epilogue", fast="cpp", impls=IMPLS, colors=COLORS, extra_speedups=(),
        bandwidth_line=0.7,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_arguments(parser, default_out=h.RESULTS_DIR / "diffusion_epilogue_cpu.json")
    args = parser.parse_args(argv)
    payload = run(args)
    print("wrote", h.write_json(args.out, payload))
    print("wrote", plot(payload, args.plot or args.out.with_suffix(".png")))
    for check in payload["target_check"]:
        print(
            f"target {check['pass']} {check['memory_format']} {check['metric']}: measured {check['measured']:.2f}, "
            f"target {check['target']:.2f} -> {'met' if check['met'] else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
