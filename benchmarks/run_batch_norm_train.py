"""The fused units' training BatchNorm (+ shortcut + ReLU): the batch_norm_train kernels vs ATen's BatchNorm vs the
plain PyTorch composite vs torch.compile of it.

What one fused training unit does after its conv: the batch statistics of y, ``ReLU(BN(y) + shortcut)``, and in
the backward BatchNorm's gradient through it. Candidates, each forward (no autograd) and forward+backward (the
gradients of y, the shortcut, the BatchNorm's weight and bias):

- ``cpp``: lgd_fast's path, ``conv_bn._normalize_train`` on ``batch_norm_train.channel_moments`` (the kernels);
- ``aten``: ``relu(F.batch_norm(y, ...) + s)``, what a unit on its own modules runs (ATen's BatchNorm kernel);
- ``reference``: the same in plain PyTorch ops (statistics by two passes, then the affine), eager;
- ``compiled``: ``torch.compile`` of that.

At LGD-3D R50's res2 (4, 256, 4, 28, 28) and res4 (4, 1024, 4, 7, 7) shapes, batch 4 at 16x112x112, fp32 and bf16,
both layouts, interleaved (benchmarks/_harness.py), against the bytes the kernels' passes move at the measured copy
bandwidth: forward reads y twice (statistics, normalisation) and the shortcut, writes out (4 tensors); the backward
reads grad, y and the shortcut twice (sums, then the gradients) and writes grad_y and grad_shortcut (8 more).

    python benchmarks/run_batch_norm_train.py            # writes benchmarks/results/batch_norm_train_cpu.{json,png}
    python benchmarks/run_batch_norm_train.py --quick    # res2 fp32 only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.ops.batch_norm_train import channel_moments, kernel_applies  # noqa: E402
from lgd_fast.ops.conv_bn import _normalize_train  # noqa: E402

SHAPES = {"res2": (4, 256, 4, 28, 28), "res4": (4, 1024, 4, 7, 7)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("forward", "forward+backward")
COLORS = {"cpp": "tab:blue", "aten": "tab:purple", "reference": "tab:gray", "compiled": "tab:orange"}
EPS = 1e-5


def composite(y, s, weight, bias):
    """ReLU(BatchNorm(y) + s) with batch statistics, in plain PyTorch (float32 for bf16 inputs)."""
    z = y.float()
    mean = z.mean((0, 2, 3, 4), keepdim=True)
    centred = z - mean
    var = (centred * centred).mean((0, 2, 3, 4), keepdim=True)
    out = centred * torch.rsqrt(var + EPS) * weight[:, None, None, None] + bias[:, None, None, None]
    return torch.relu(out + s.float()).to(y.dtype)


def make_inputs(shape, dtype, memory_format, pass_: str, count: int) -> list[Any]:
    sets = []
    for _ in range(count):
        y = (torch.randn(shape) + 0.5).to(dtype).contiguous(memory_format=memory_format)
        s = (0.5 * torch.randn(shape)).to(dtype).contiguous(memory_format=memory_format)
        upstream = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
        if pass_ != "forward":
            y.requires_grad_(True), s.requires_grad_(True)
        sets.append((y, s, upstream))
    return sets


def make_candidates(shape, pass_: str) -> dict[str, Any]:
    torch._dynamo.reset()
    channels = shape[1]
    norm = torch.nn.BatchNorm3d(channels).train()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0.0, 0.2)
    compiled = torch.compile(composite, backend="inductor", dynamic=False)

    def ours(y, s):
        return _normalize_train(norm, y, channel_moments(y.detach()), True, shortcut=s)

    def aten(y, s):
        return torch.relu(F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.1, EPS)
                          + s)  # fmt: skip

    fns = {"cpp": ours, "aten": aten, "reference": lambda y, s: composite(y, s, norm.weight, norm.bias),
           "compiled": lambda y, s: compiled(y, s, norm.weight, norm.bias)}  # fmt: skip
    if pass_ == "forward":
        return {name: (lambda inputs, fn=fn: fn(*inputs[:2])) for name, fn in fns.items()}

    def with_backward(fn):
        def run(inputs):
            y, s, upstream = inputs
            return torch.autograd.grad(fn(y, s), (y, s, norm.weight, norm.bias), upstream)

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    shapes = {"res2": SHAPES["res2"]} if args.quick else SHAPES
    dtypes = {"fp32": torch.float32} if args.quick else DTYPES
    results = []
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in dtypes.items():
            for format_name, memory_format in FORMATS.items():
                for pass_ in PASSES:
                    big = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                    nbytes = big * (4 if pass_ == "forward" else 12)
                    inputs = make_inputs(shape, dtype, memory_format, pass_, h.input_set_count(3 * big))
                    assert kernel_applies(inputs[0][0].detach(), inputs[0][1].detach())
                    describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                                "memory_format": format_name, "pass": pass_}  # fmt: skip
                    results.append(h.measure_op_row(make_candidates(shape, pass_), inputs, args, describe=describe,
                                                    nbytes=nbytes, bytes_per_s=bandwidth["bytes_per_s"],
                                                    others=("aten", "reference", "compiled")))  # fmt: skip
    return h.op_payload(
        "batch_norm_train",
        args,
        setup,
        fast="cpp",
        notes=[
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp's",
            "cpp = conv_bn._normalize_train on batch_norm_train.channel_moments; aten = relu(F.batch_norm + s); "
            "reference = the plain PyTorch composite; compiled = torch.compile(reference)",
            "copy_bw_fraction = (bytes the kernels' passes move / copy bandwidth) / median",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    impls = list(payload["results"][0]["timings"])
    return h.plot_op_benchmark(payload, path, op="batch_norm_train", fast="cpp", impls=impls, colors=COLORS,
                               extra_speedups=["aten"])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="batch_norm_train_cpu.json", repeats=(30, 10), plot=plot)


if __name__ == "__main__":
    main()
