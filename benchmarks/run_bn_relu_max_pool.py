"""The stem's training BatchNorm + ReLU + 1x3x3 max-pool: lgd_fast's op vs ATen's modules vs torch.compile of them.

What a fast LGD-3D's stem runs after conv1 in training: the batch statistics of y, ``max_pool(relu(BN(y)))`` and, in
the backward, BatchNorm's training gradient through it. Candidates, each forward (training statistics, running
statistics updated, no autograd) and forward+backward (the gradients of y, the BatchNorm's weight and bias):

- ``cpp``: :func:`lgd_fast.ops.bn_relu_max_pool` with its cpp backend named (``auto`` runs it on channels_last_3d
  y only: the contiguous rows show why);
- ``reference``: ``F.max_pool3d(torch.relu(F.batch_norm(y, ...)), (1, 3, 3), (1, 2, 2), (0, 1, 1))``, the op's reference
  and what the stem's own modules run (ATen's kernels);
- ``compiled``: ``torch.compile`` of that.

At conv1's output of lgd3d_tiny (batch 16 at 16x32x32: (16, 16, 8, 16, 16)) and of LGD-3D R50 (batch 4 at
16x112x112: (4, 64, 8, 56, 56)), fp32 and bf16, both layouts, interleaved (benchmarks/_harness.py), against the
bytes the op's passes move at the measured copy bandwidth: forward reads y twice (statistics, pooling) and writes the
pooled output and a byte per pooled value; the backward reads the pooled gradient and bytes twice and y at the taps
(the sums), then y, and writes dx.

    python benchmarks/run_bn_relu_max_pool.py            # writes benchmarks/results/bn_relu_max_pool_cpu.{json,png}
    python benchmarks/run_bn_relu_max_pool.py --quick    # channels_last_3d fp32 only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.ops.bn_relu_max_pool import _cpp_takes, bn_relu_max_pool, bn_relu_max_pool_reference  # noqa: E402

SHAPES = {"lgd3d_tiny": (16, 16, 8, 16, 16), "lgd3d_r50": (4, 64, 8, 56, 56)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"channels_last_3d": torch.channels_last_3d, "contiguous": torch.contiguous_format}
PASSES = ("forward", "forward+backward")
COLORS = {"cpp": "tab:blue", "reference": "tab:purple", "compiled": "tab:orange"}


def make_inputs(shape, dtype, memory_format, pass_: str, count: int) -> list[Any]:
    sets = []
    N, C, T, H, W = shape
    pooled = (N, C, T, (H - 1) // 2 + 1, (W - 1) // 2 + 1)
    for _ in range(count):
        y = (torch.randn(shape) + 0.3).to(dtype).contiguous(memory_format=memory_format)
        upstream = torch.randn(pooled).to(dtype).contiguous(memory_format=memory_format)
        if pass_ != "forward":
            y.requires_grad_(True)
        sets.append((y, upstream))
    return sets


def make_candidates(shape, pass_: str) -> dict[str, Any]:
    torch._dynamo.reset()
    norm = torch.nn.BatchNorm3d(shape[1]).train()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0.0, 0.2)
    compiled = torch.compile(bn_relu_max_pool_reference, backend="inductor", dynamic=False)

    def args(y):
        return y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.1, norm.eps

    fns = {"cpp": lambda y: bn_relu_max_pool(*args(y), backend="cpp"),
           "reference": lambda y: bn_relu_max_pool_reference(*args(y)),
           "compiled": lambda y: compiled(*args(y))}  # fmt: skip
    if pass_ == "forward":
        return {name: (lambda inputs, fn=fn: fn(inputs[0])) for name, fn in fns.items()}

    def with_backward(fn):
        def run(inputs):
            y, upstream = inputs
            return torch.autograd.grad(fn(y), (y, norm.weight, norm.bias), upstream)

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def floor_bytes(shape, dtype, pass_: str) -> int:
    """The bytes the op's passes move (module docstring)."""
    N, C, T, H, W = shape
    size = torch.empty((), dtype=dtype).element_size()
    y = N * C * T * H * W * size
    taps = N * C * T * ((H - 1) // 2 + 1) * ((W - 1) // 2 + 1)  # one byte each
    pooled = taps * size
    forward = 2 * y + pooled + taps
    return forward if pass_ == "forward" else forward + 2 * y + 3 * pooled + 2 * taps


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    dtypes = {"fp32": torch.float32} if args.quick else DTYPES
    formats = {"channels_last_3d": torch.channels_last_3d} if args.quick else FORMATS
    results = []
    for shape_name, shape in SHAPES.items():
        for dtype_name, dtype in dtypes.items():
            for format_name, memory_format in formats.items():
                for pass_ in PASSES:
                    big = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                    inputs = make_inputs(shape, dtype, memory_format, pass_, h.input_set_count(big))
                    assert _cpp_takes(inputs[0][0]) is None  # (named: auto runs contiguous y on the reference)
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": pass_}  # fmt: skip
                    results.append(h.measure_op_row(make_candidates(shape, pass_), inputs, args, describe=describe,
                                                    nbytes=floor_bytes(shape, dtype, pass_),
                                                    bytes_per_s=bandwidth["bytes_per_s"],
                                                    others=("reference", "compiled")))  # fmt: skip
    return h.op_payload(
        "bn_relu_max_pool",
        args,
        setup,
        fast="cpp",
        notes=[
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp's",
            "cpp = lgd_fast.ops.bn_relu_max_pool; reference = max_pool3d(relu(F.batch_norm(training))) (the reference, "
            "the stem's modules); compiled = torch.compile of it",
            "copy_bw_fraction = (bytes the op's passes move / copy bandwidth) / median",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    impls = list(payload["results"][0]["timings"])
    return h.plot_op_benchmark(payload, path, op="bn_relu_max_pool", fast="cpp", impls=impls, colors=COLORS)


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="bn_relu_max_pool_cpu.json", repeats=(30, 10), plot=plot)


if __name__ == "__main__":
    main()
