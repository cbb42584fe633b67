"""stem_conv_pool on the CPU: an LGD stem at inference (conv1 with its BatchNorm folded, ReLU, 1x3x3 max-pool) as
the cpp op, against what the fast models ran before it and against PyTorch, on lgd3d_tiny's and R50's stems.

Candidates, each from the contiguous clip a model is given, forward only, measured side by side in one run
(method: benchmarks/_harness.py):

- ``cpp``: ``stem_conv_pool(x, folded weight, bias)`` (reads the clip as it comes);
- ``onednn``: the fast model's stem before the op: the clip to channels_last_3d (``to_channels_last_3d``), one
  oneDNN conv with the folded, packed weight and ReLU as its post-op (``conv_bn`` at inference), ATen's max-pool;
- ``reference``: the modules in eager PyTorch on the clip made channels_last_3d (conv3d, batch_norm, ReLU,
  max-pool);
- ``compiled``: ``torch.compile`` with inductor's freezing of those modules in channels_last_3d, given the clip
  already in channels_last_3d (as ``lgd-fast bench`` gives the frozen reference its clips: its best case).

bf16: the clip, conv and BatchNorm in bfloat16, the op given the weight folded in bfloat16; autocast: float32
modules and clips, every candidate called under bf16 autocast, the op given the weight folded in bfloat16 (it
rounds the clip itself). With a bfloat16 weight the op's products are bfloat16 ones, on AVX512_BF16's dot
products where the CPU has them (``bf16_dot_products`` in the result). Floors: the convs' multiply-adds at the
conv peak measured in the run in the products' dtype (``lgd_fast.bench.conv_peak``: fp32 for fp32, bf16 for bf16
and autocast) and the clip's read plus the output's write at the copy bandwidth; ``peak_fraction`` = compute
floor / median. Writes benchmarks/results/stem_conv_pool_cpu.{json,png}.

    PYTHONPATH=. python benchmarks/run_stem_conv_pool.py            # about 2 minutes on 2 cores
    PYTHONPATH=. python benchmarks/run_stem_conv_pool.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import _compiled, conv_peak  # noqa: E402
from lgd_fast.ops import stem_conv_pool, to_channels_last_3d  # noqa: E402
from lgd_fast.ops.conv_bn import _folded, conv_bn  # noqa: E402
from lgd_fast.ops.stem_conv_pool import bf16_dot_products  # noqa: E402

# name -> (clip shape, stem width, kt): lgd3d_tiny's stem (16 channels, 2x7x7 of temporal stride 2) at batch 16
# and 1, LGD-3D R50's (64 channels, 4x7x7 of temporal stride 4: early_stride 4) at batch 4 and 1 (16x112x112
# clips), LGD-2D R50's (64 channels, 7x7 over each of 3 frames of 224x224: kt 1) at batch 1
SHAPES = {
    "tiny_b16": ((16, 3, 16, 32, 32), 16, 2),
    "tiny_b1": ((1, 3, 16, 32, 32), 16, 2),
    "r50_b4": ((4, 3, 16, 112, 112), 64, 4),
    "r50_b1": ((1, 3, 16, 112, 112), 64, 4),
    "lgd2d_b1": ((1, 3, 3, 224, 224), 64, 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast": torch.float32}  # (autocast: float32 modules)
IMPLS = ("cpp", "onednn", "reference", "compiled")
COLORS = {"cpp": "tab:blue", "onednn": "tab:green", "reference": "tab:gray", "compiled": "tab:orange"}


def _under_autocast(fn):
    def call(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x)

    return call


class Stem(nn.Sequential):
    """The LGD-3D stem's modules: conv1, bn1, ReLU, the 1x3x3 max-pool."""

    def __init__(self, width: int, kt: int):
        super().__init__(
            nn.Conv3d(3, width, (kt, 7, 7), stride=(kt, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )


def _stem(width: int, kt: int, dtype: torch.dtype, gen: torch.Generator) -> Stem:
    """A stem with trained-like BatchNorm statistics (not the identity it starts as), in eval."""
    stem = Stem(width, kt)
    conv, bn = stem[0], stem[1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / (3 * kt * 49) ** 0.5)
        bn.weight.copy_(0.5 + torch.rand(width, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(width, generator=gen))
        bn.running_mean.copy_(0.1 * torch.randn(width, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(width, generator=gen))
    return stem.eval().to(dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:

    setup = h.start_op_run(args)
    bandwidth = setup["copy_bandwidth"]
    peak = conv_peak(torch.device("cpu"), "fp32")
    peak_bf16 = conv_peak(torch.device("cpu"), "bf16")
    print(f"conv peak fp32 {peak['gflops_per_s']:.0f}, bf16 {peak_bf16['gflops_per_s']:.0f} GFLOP/s; "
          f"bf16 dot products: {bf16_dot_products()}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    results = []
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k in ("tiny_b16", "r50_b1", "lgd2d_b1")}
    for shape_name, (shape, width, kt) in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            stem = _stem(width, kt, dtype, gen)
            conv, bn, pool = stem[0], stem[1], stem[3]
            cl_stem = _stem(width, kt, dtype, gen)
            cl_stem.load_state_dict(stem.state_dict())
            cl_stem = cl_stem.to(memory_format=torch.channels_last_3d)
            N, _, T, H, W = shape
            out_numel = N * width * (T // kt) * ((H - 1) // 2 // 2 + 1) * ((W - 1) // 2 // 2 + 1)
            conv_numel = N * width * (T // kt) * ((H - 1) // 2 + 1) * ((W - 1) // 2 + 1)
            flops = 2 * conv_numel * 3 * kt * 49
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = (torch.Size(shape).numel() + out_numel) * itemsize
            count = h.input_set_count(torch.Size(shape).numel() * itemsize)
            clips = [torch.randn(shape, generator=gen).to(dtype) for _ in range(count)]  # never zeros
            cl_clips = {id(c): c.contiguous(memory_format=torch.channels_last_3d) for c in clips}
            torch._dynamo.reset()
            frozen = _compiled(cl_stem, freezing=True, compile_mode=None)  # (lgd-fast bench's frozen reference)

            low = torch.bfloat16 if dtype_name != "fp32" else torch.float32  # the products' dtype

            def cpp(x, conv=conv, bn=bn, low=low):
                weight, bias = _folded(conv, bn, low)
                return stem_conv_pool(x, weight, bias, stride_t=conv.stride[0], backend="cpp")

            def onednn(x, conv=conv, bn=bn, pool=pool):
                return pool(conv_bn(to_channels_last_3d(x), conv, bn, relu=True))

            def reference(x, stem=cl_stem):
                return stem(x.contiguous(memory_format=torch.channels_last_3d))

            def compiled(x, frozen=frozen, cl_clips=cl_clips):
                return frozen(cl_clips[id(x)])

            candidates = {"cpp": cpp, "onednn": onednn, "reference": reference, "compiled": compiled}
            if dtype_name == "autocast":
                candidates = {name: _under_autocast(fn) for name, fn in candidates.items()}
            with torch.inference_mode():
                want = reference(clips[0]).float()
                for name, fn in candidates.items():  # the same stem, within each dtype's rounding
                    err = ((fn(clips[0]).float() - want).norm() / want.norm()).item()
                    if err > (1e-5 if low == torch.float32 else 2e-2):
                        raise SystemExit(f"{shape_name} {dtype_name}: {name} differs from the reference by {err:.2e}")
                describe = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                            "memory_format": "contiguous", "pass": "forward"}  # fmt: skip
                row = h.measure_op_row(candidates, clips, args, describe=describe, nbytes=nbytes,
                                       bytes_per_s=bandwidth["bytes_per_s"], others=IMPLS[1:])  # fmt: skip
            compute_floor = flops / ((peak if low == torch.float32 else peak_bf16)["gflops_per_s"] * 1e9)
            row["flops"] = flops
            row["compute_floor_s"] = compute_floor
            row["peak_fraction"] = {n: compute_floor / t["median_s"] for n, t in row["timings"].items()}
            shares = ", ".join(f"{n} {f:.0%}" for n, f in row["peak_fraction"].items())
            print(f"    share of the {'fp32' if low == torch.float32 else 'bf16'} conv peak: {shares}")
            results.append(row)
    return h.op_payload(
        "stem_conv_pool",
        args,
        setup,
        command="python benchmarks/run_stem_conv_pool.py" + (" --quick" if args.quick else ""),
        conv_peak_fp32=peak,
        conv_peak_bf16=peak_bf16,
        bf16_dot_products=bf16_dot_products(),
        notes=[
            "timings: median seconds per call over interleaved repeats; speedup = other's median / cpp median",
            "cpp = stem_conv_pool on the contiguous clip; onednn = to_channels_last_3d + conv_bn (one oneDNN conv, "
            "folded packed weight, ReLU post-op) + ATen max-pool (the fast models' stem before the op); reference = "
            "the modules in channels_last_3d, eager, the clip converted in the call; compiled = torch.compile with "
            "freezing of the channels_last_3d modules, given the clip already in channels_last_3d",
            "bf16 rows: bfloat16 clip and modules, the op's weight folded in bfloat16; autocast rows: float32 clip and "
            "modules called under bf16 autocast, the op's weight folded in bfloat16 (bfloat16 products)",
            "peak_fraction = compute floor (2 * conv multiply-adds / the conv peak in the products' dtype) / median; "
            "copy_bw_fraction = "
            "(read the clip + write the output) / copy bandwidth / median",
        ],
        results=results,
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows = payload["results"]
    labels = [f"{r['shape_name']} {r['dtype']}" for r in rows]
    fig, (ax_speed, ax_peak) = h.new_figure(1, 2, figsize=(14, 0.5 * len(rows) + 2.0))
    speed = {n: [r["timings"]["reference"]["median_s"] / r["timings"][n]["median_s"] for r in rows] for n in IMPLS}
    h.grouped_barh(ax_speed, labels, speed, colors=COLORS, value_format="{:.2f}x", reference_line=1.0, log=True)
    ax_speed.set_title("speedup over the eager channels-last modules, log scale (>1: faster)")
    share = {n: [r["peak_fraction"][n] for r in rows] for n in IMPLS}
    h.grouped_barh(ax_peak, labels, share, colors=COLORS, value_format="{:.0%}", reference_line=1.0)
    ax_peak.set_title("share of the measured fp32 conv peak (compute floor / median)")
    m = payload["machine"]
    fig.suptitle(f"stem_conv_pool, {m['device']} ({m['torch_threads']} threads, {m['lgd_fast_cpu_isa']}), torch "
                 f"{m['torch']}, fp32 conv peak {payload['conv_peak_fp32']['gflops_per_s']:.0f} GFLOP/s, commit "
                 f"{(m['commit'] or 'unknown')[:10]}", fontsize=10)  # fmt: skip
    return h.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    h.op_script_main(argv, __doc__, run, out="stem_conv_pool_cpu.json", repeats=(40, 10), plot=plot)


if __name__ == "__main__":
    main()
