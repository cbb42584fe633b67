"""diffusion_epilogue and global_update: the fused ops vs the eager composite vs torch.compile of it.

Forward (out and mean) and forward+backward (all five gradients), fp32 and bf16 (and fp16 on CUDA),
contiguous and channels_last_3d, measured side by side in one run (method: benchmarks/_harness.py), against
the memory floor from the measured copy bandwidth of the same device. The brief's shape is N=8, C=256, T=8,
H=W=28 (LGD-3D R50 res2); res5 (8, 2048, 2, 4, 4) shows the short-row end. Also the global path
(global_update: one call vs six nn.Linear calls), whose cost is launches and latency, not bytes.

On the CPU the fused op is the cpp backend; on a CUDA device (``--device cuda``) the cuda and triton
backends both run, the first of them (cuda where lgd_fast._C_cuda is built) is the one the targets check.
Writes benchmarks/results/diffusion_epilogue_{cpu|<gpu name>}.{json,png}.

    python benchmarks/run_diffusion_epilogue.py                  # full CPU run, a few minutes on 2 cores
    python benchmarks/run_diffusion_epilogue.py --quick          # the brief's shape only, fewer repeats
    python benchmarks/run_diffusion_epilogue.py --device cuda    # on a GPU machine
    python benchmarks/run_diffusion_epilogue.py --smoke          # tiny shapes, fp32, seconds: checks the code runs

Targets (PERF.md), fp32 at the brief's shape: forward >= 70% of copy bandwidth (80% on a GPU), >= 2x eager,
>= 1.2x compiled; forward+backward >= 2x eager autograd.
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

from lgd_fast.bench import device_slug, write_json  # noqa: E402
from lgd_fast.ops import (  # noqa: E402
    _backend,
    diffusion_epilogue,
    diffusion_epilogue_reference,
    extension_available,
    extension_error,
    global_update,
    global_update_reference,
)

SHAPES = {"res2": (8, 256, 8, 28, 28), "res5": (8, 2048, 2, 4, 4)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_DTYPES = {**DTYPES, "fp16": torch.float16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("forward", "forward+backward")
COLORS = {"cpp": "tab:blue", "cuda": "tab:blue", "triton": "tab:green", "reference": "tab:gray",
          "compiled": "tab:orange"}  # fmt: skip
TARGETS = {
    "forward": {"copy_bw_fraction": 0.7, "vs_reference": 2.0, "vs_compiled": 1.2},
    "forward+backward": {"vs_reference": 2.0},
}
GPU_COPY_BW_TARGET = 0.8
# global_update at LGD-3D R50's block widths (N, C_in, C_out), hidden = C_out / 16.
GLOBAL_SHAPES = {"res2": (8, 64, 256), "res5": (8, 1024, 2048)}
# --smoke (the GPU suite's CPU check of its own plumbing): one tiny shape, fp32, channels_last_3d; no figure.
SMOKE_SHAPES, SMOKE_GLOBAL_SHAPES = {"smoke": (2, 16, 2, 6, 6)}, {"smoke": (2, 16, 32)}


def fused_backends(device: str) -> list[str]:
    """The fused backends timed on ``device``, the one the targets check first."""
    if device == "cpu":
        return ["cpp"]
    names = ["cuda", "triton"]
    return [b for b in names if _backend.backend_unavailable_reason(b, "cuda") is None]


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move. Forward: read r, s, write out. Backward adds: read grad_out, out, r, write
    grad_r, grad_s. The (N, C) and (C,) tensors are under 0.1% and left out."""
    big = torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()
    return 3 * big if pass_ == "forward" else 8 * big


def make_inputs(shape, dtype, memory_format, pass_: str, count: int, device: str = "cpu") -> list[Any]:
    """Input sets: r, s around 0 (ReLU cuts about half), d, scale, shift float32; for backward the upstream grads."""
    n, c = shape[:2]
    sets = []

    def big(offset: float) -> torch.Tensor:
        return (torch.randn(shape, device=device) + offset).to(dtype=dtype, memory_format=memory_format)

    for _ in range(count):
        small = [0.5 * torch.randn(n, c), 0.5 + torch.rand(c), 0.2 * torch.randn(c)]
        args = (big(-0.5), big(0.5), *(t.to(device) for t in small))
        if pass_ == "forward":
            sets.append(args)
        else:
            args = tuple(t.requires_grad_(True) for t in args)
            upstream = (big(0.0), torch.randn(n, c, device=device).to(dtype))
            sets.append((args, upstream))
    return sets


def make_candidates(pass_: str, device: str = "cpu") -> dict[str, Callable[[Any], Any]]:
    torch._dynamo.reset()  # a fresh compile per configuration, no recompile limit reached

    def fused(name):
        return lambda *a: diffusion_epilogue(*a, backend=name)

    fns = {name: fused(name) for name in fused_backends(device)}
    fns["reference"] = diffusion_epilogue_reference
    fns["compiled"] = torch.compile(diffusion_epilogue_reference, backend="inductor", dynamic=False)
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


def _global_candidates(fast: str, weights: list[torch.Tensor], compiled) -> dict[str, Callable[[Any], Any]]:
    def fused(name):
        return lambda x: global_update(*x, *weights, backend=name)

    return {
        fast: fused(fast),
        **({"cpp": fused("cpp")} if fast != "cpp" else {}),
        "reference": lambda x: global_update_reference(*x, *weights),
        "compiled": lambda x: compiled(*x, *weights),
    }


def _with_global_backward(fn: Callable[[Any], Any], weights: list[torch.Tensor]) -> Callable[[Any], Any]:
    """``fn`` then autograd.grad of (g', d) with respect to m, g and every weight (the upstream gradients drawn
    once per input set, with it)."""

    def run(x):
        m, g, grads = x
        return torch.autograd.grad(fn((m, g)), [m, g, *weights], grads)

    return run


def global_update_rows(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """global_update forward, and forward+backward: the fused backend (triton on CUDA, cpp on the CPU) and the cpp
    op's ATen GEMMs vs six nn.Linear calls (reference) and torch.compile of them, per call (latency; the bytes are
    the weights: read once forward; read again and their gradients written once backward, so 3x for both)."""
    fast = "triton" if device == "cuda" and "triton" in fused_backends(device) else "cpp"
    rows = []
    shapes, dtypes = (SMOKE_GLOBAL_SHAPES, {"fp32": torch.float32}) if args.smoke else (GLOBAL_SHAPES, DTYPES)
    for shape_name, (n, c_in, c_out) in shapes.items():
        for dtype_name, dtype in dtypes.items():
            hidden = c_out // 16
            dims = [(hidden, c_in), (c_out, hidden), (hidden, c_in), (c_out, hidden), (hidden, c_out), (c_out, hidden)]
            weights = [t for o, k in dims for t in (torch.randn(o, k) / k**0.5, 0.1 * torch.randn(o))]
            weights = [w.to(device=device, dtype=dtype) for w in weights]
            inputs = [(torch.rand(n, c_in, device=device).to(dtype), torch.randn(n, c_in, device=device).to(dtype))
                      for _ in range(8)]  # fmt: skip
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            for pass_ in PASSES:
                if pass_ == "forward+backward" and dtype != torch.float32:
                    continue  # see the notes: inductor fails to compile the bf16 reference's backward on the CPU
                torch._dynamo.reset()
                compiled = torch.compile(global_update_reference, backend="inductor", dynamic=False)
                candidates = _global_candidates(fast, weights, compiled)
                pass_inputs = inputs
                if pass_ == "forward+backward":
                    for w in weights:
                        w.requires_grad_()
                    candidates = {k: _with_global_backward(fn, weights) for k, fn in candidates.items()}
                    pass_inputs = [(m.clone().requires_grad_(), g.clone().requires_grad_(),
                                    [torch.randn(n, c_out, device=device).to(dtype) for _ in range(2)])
                                   for m, g in inputs]  # fmt: skip
                describe = {"shape_name": shape_name, "shape": [n, c_in, c_out], "dtype": dtype_name, "pass": pass_}
                rows.append(h.measure_op_row(candidates, pass_inputs, args, describe=describe,
                                             nbytes=nbytes * (1 if pass_ == "forward" else 3),
                                             bytes_per_s=args.bandwidth, fast=fast, device=device))  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not extension_available():
        raise SystemExit(f"lgd_fast._C is not built: {extension_error()}")
    from lgd_fast import _C

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    backends = fused_backends(device)
    if not backends:
        reasons = {b: _backend.backend_unavailable_reason(b, "cuda") for b in ("cuda", "triton")}
        raise SystemExit(f"no fused backend runs on {device}: {reasons}")
    fast = backends[0]
    setup = h.prepare_run(args, device=device)
    bandwidth = setup["copy_bandwidth"]
    args.bandwidth = bandwidth["bytes_per_s"]
    print(f"copy bandwidth on {device}: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (read + write); fused: {backends}")
    shapes = {"res2": SHAPES["res2"]} if args.quick else SHAPES
    dtypes = GPU_DTYPES if device == "cuda" else DTYPES
    formats = FORMATS
    if args.smoke:
        shapes, dtypes = SMOKE_SHAPES, {"fp32": torch.float32}
        formats = {"channels_last_3d": torch.channels_last_3d}
    results = []
    others = ("reference", "compiled")
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in dtypes.items():
            for format_name, memory_format in formats.items():
                for pass_ in PASSES:
                    nbytes = bytes_moved(shape, dtype, pass_)
                    # enough sets that their big inputs (r, s, and grad_out for backward) exceed the cache
                    big = bytes_moved(shape, dtype, "forward") // 3
                    count = h.input_set_count(big * (2 if pass_ == "forward" else 3)) if device == "cpu" else 3
                    inputs = make_inputs(shape, dtype, memory_format, pass_, count, device)
                    candidates = make_candidates(pass_, device)
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": pass_}
                    results.append(
                        h.measure_op_row(candidates, inputs, args, describe=describe, nbytes=nbytes, fast=fast,
                                         bytes_per_s=bandwidth["bytes_per_s"], others=others, device=device)
                    )
    targets = TARGETS if device == "cpu" else {**TARGETS, "forward": {**TARGETS["forward"],
                                                                      "copy_bw_fraction": GPU_COPY_BW_TARGET}}
    return {
        "benchmark": "diffusion_epilogue",
        "device": device,
        "fast": fast,
        "machine": {**h.machine_info(), "lgd_fast_cpu_isa": _C.cpu_isa()},
        "settings": {
            "quick": args.quick,
            "smoke": args.smoke,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "steady_malloc": setup["steady_malloc"],
        },
        "copy_bandwidth": bandwidth,
        "foreign_load_before_cores": setup["foreign_load_before_cores"],
        "targets": targets,
        "target_check": check_targets(results, fast, targets),
        "global_update": global_update_rows(args, device),
        "notes": [
            f"timings: median seconds per call over interleaved repeats; speedup = other's median / {fast} median",
            f"candidates: {' / '.join(backends)} = diffusion_epilogue(..., backend=that); reference = "
            "diffusion_epilogue_reference "
            "(the eager composite: r * scale + shift + s + d, ReLU, mean; bf16 computed in float32); compiled = "
            "torch.compile(reference, inductor); forward+backward = autograd.grad of (out, mean) w.r.t. all five "
            "inputs",
            "copy_bw_fraction = roofline_s / median, roofline_s = bytes_moved / copy bandwidth (read + write bytes "
            "of dst.copy_(src) on 256 MiB)",
            "steady_malloc: glibc told to reuse freed memory (no mmap, no trim; see _harness.steady_malloc)",
            "foreign_load_cores: CPU cores other processes kept busy while that row was timed (shared machine)",
            "global_update rows: the global path's forward, and forward+backward (autograd.grad of (g', d) w.r.t. "
            "m, g and the 12 weights); bytes_moved = the weights (forward), 3x them (forward+backward: read twice, "
            "their gradients written once); on CUDA 'cpp' is the same op as ATen GEMM launches, the fused one is one "
            "Triton launch forward; forward+backward in float32 only (torch 2.13's inductor failed to compile the "
            "bf16 reference's backward on the CPU: a C++ 'conflicting declaration' in its generated kernel)",
        ],
        "results": results,
    }


def check_targets(results: list[dict], fast: str = "cpp", targets: dict = TARGETS) -> list[dict]:
    """Each PERF.md target at the brief's shape (res2, fp32, both layouts): the measured value and pass/fail."""
    checks = []
    for row in results:
        if row["shape_name"] != "res2" or row["dtype"] != "fp32":
            continue
        measured = {
            "copy_bw_fraction": row["copy_bw_fraction"][fast],
            "vs_reference": row["speedup_vs_reference"],
            "vs_compiled": row["speedup_vs_compiled"],
        }
        for name, target in targets[row["pass"]].items():
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
    fast = payload.get("fast", "cpp")
    impls = list(payload["results"][0]["timings"])
    return h.plot_op_benchmark(
        payload, path, op="diffusion_epilogue", fast=fast, impls=impls, colors=COLORS,
        extra_speedups=[i for i in impls if i not in (fast, "reference", "compiled")],
        bandwidth_line=payload["targets"]["forward"]["copy_bw_fraction"],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_arguments(parser, default_out=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tensors live")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape in fp32: checks the code, no figure")
    args = parser.parse_args(argv)
    if args.smoke and args.repeats is None:
        args.repeats = 2
    if args.out is None:
        args.out = h.RESULTS_DIR / f"diffusion_epilogue_{device_slug(args.device)}.json"
    payload = run(args)
    print("wrote", write_json(args.out, payload))
    print("wrote", plot(payload, args.plot or args.out.with_suffix(".png")))
    for check in payload["target_check"]:
        print(
            f"target {check['pass']} {check['memory_format']} {check['metric']}: measured {check['measured']:.2f}, "
            f"target {check['target']:.2f} -> {'met' if check['met'] else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
