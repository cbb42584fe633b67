"""The diffusion epilogue at issue 14's shape as a model calls it: between convolutions, with glibc's own malloc.

Issue 14 sets its target at R50's res2 block end, (4, 256, 4, 28, 28) (batch 4, 16x112x112 clips), "interleaved
with other work as in a model": a microbenchmark that calls the op in a loop, or tells glibc to keep freed memory
(``_harness.steady_malloc``, which ``run_diffusion_epilogue.py`` does), measures something a model does not see.
This script never changes malloc's settings. Each timed call is preceded, untimed, by what precedes it in the fast
R50: the block's last 1x1x1 conv (oneDNN, 64 -> 256 channels, packed weight, a fresh output) making ``r`` from a
rotating input, and its output stays alive until the next call's replaces it (as a block's output lives until the
next block has used it). Candidates, interleaved round by round in a rotating order:

- ``cpp_arena``: the op inside :func:`lgd_fast.activation_arena`, conv included, as the fast model runs both;
- ``cpp``: the op with glibc's allocator;
- ``compiled``: ``torch.compile`` (inductor) of the plain composite, ``diffusion_epilogue_reference``;
- ``copy``: ``torch.empty_like(r).copy_(r)``, a fresh copy of ``r`` (two of the op's three big passes).

Reported per candidate: the median time, speedup of the op over the compiled composite, and the share of the
copy-bandwidth floor (the op's three big passes, read r, read s, write out, over ``dst.copy_(src)``'s bandwidth into
an existing buffer, measured in the same run). And the op inside the model: the fast LGD-3D R50's own res2 epilogue
calls (torch.profiler over its recorded inference at batch 4, arena on, both taken from the model's defaults).
Writes benchmarks/results/epilogue_in_model_cpu.json.

    PYTHONPATH=. python benchmarks/run_epilogue_in_model.py [--repeats 40] [--layout channels_last_3d]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402

import lgd_fast  # noqa: E402
from lgd_fast.bench import write_json  # noqa: E402
from lgd_fast.ops import diffusion_epilogue, diffusion_epilogue_reference  # noqa: E402

SHAPE = (4, 256, 4, 28, 28)  # R50 res2 block end at batch 4, 16x112x112 (issue 14)
WIDTH = 64  # the bottleneck's inner width at res2: conv3 is 64 -> 256
TARGETS = {"vs_compiled": 1.2, "copy_bw_fraction": 0.7}


def producer(memory_format, gen):
    """conv3 with its bias, a fresh output: channels_last_3d as the fast model runs it at inference (oneDNN, the
    weight packed once); contiguous, ATen's conv."""
    n, c, t, hh, ww = SHAPE
    z = [torch.randn((n, WIDTH, t, hh, ww), generator=gen).contiguous(memory_format=memory_format) for _ in range(3)]
    w = (torch.randn(c, WIDTH, 1, 1, 1, generator=gen) / WIDTH**0.5).contiguous(memory_format=memory_format)
    bias = 0.1 * torch.randn(c, generator=gen)
    geometry = ([0, 0, 0], [1, 1, 1], [1, 1, 1])
    if memory_format == torch.channels_last_3d:
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, 1, list(z[0].shape))

        def conv(i):
            return torch.ops.mkldnn._convolution_pointwise(z[i % 3], packed, bias, *geometry, 1, "none", [], "")
    else:

        def conv(i):
            return torch.nn.functional.conv3d(z[i % 3], w, bias)

    return conv


def in_model_calls(repeats: int) -> dict:
    """The fast R50's res2 epilogue calls in its own recorded inference at batch 4 (the model's defaults: its
    layout is the one its plan chose, whatever this script's --layout)."""
    model = lgd_fast.create_model("lgd3d_r50", 400, fast=True).eval()
    x = torch.randn(4, 3, 16, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for _ in range(3):  # plan, record, run the program
            model(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            for _ in range(repeats):
                model(x)
    times = [e.cpu_time_total / 1e3 for e in prof.events()
             if e.name == "lgd_fast::diffusion_epilogue" and e.input_shapes and list(e.input_shapes[0]) == list(SHAPE)]
    layouts = {choice["layout"] for layer in model.execution_plan.to_dict() if layer["layer"].startswith("layer1.")
               for choice in layer["choices"]}  # fmt: skip
    return {"calls": len(times), "median_ms": statistics.median(times), "min_ms": min(times),
            "layout_of_the_model_res2_blocks": sorted(layouts)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--layout", choices=("channels_last_3d", "contiguous"), default="channels_last_3d")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "epilogue_in_model_cpu.json"))
    args = parser.parse_args(argv)
    memory_format = torch.channels_last_3d if args.layout == "channels_last_3d" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    n, c = SHAPE[:2]
    conv = producer(memory_format, gen)
    shortcuts = [torch.randn(SHAPE, generator=gen).contiguous(memory_format=memory_format) for _ in range(3)]
    d, scale = 0.5 * torch.randn(n, c, generator=gen), 0.5 + torch.rand(c, generator=gen)
    shift = 0.2 * torch.randn(c, generator=gen)
    compiled = torch.compile(diffusion_epilogue_reference, backend="inductor", dynamic=False)
    ops = {
        "cpp_arena": lambda r, s: diffusion_epilogue(r, s, d, scale, shift),
        "cpp": lambda r, s: diffusion_epilogue(r, s, d, scale, shift),
        "compiled": lambda r, s: compiled(r, s, d, scale, shift),
        "copy": lambda r, s: torch.empty_like(r).copy_(r),
    }
    kept = dict.fromkeys(ops)  # each candidate's last output, alive until its next one
    samples = {name: [] for name in ops}
    names = list(ops)
    for i in range(args.repeats + 3):  # 3 warm-up rounds (the compile among them)
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            scope = lgd_fast.activation_arena() if name == "cpp_arena" else contextlib.nullcontext()
            with torch.inference_mode(), scope:
                r = conv(i)
                start = time.perf_counter()
                out = ops[name](r, shortcuts[i % 3])
                elapsed = time.perf_counter() - start
                kept[name] = out
                del r, out
            if i >= 3:
                samples[name].append(elapsed)
    bandwidth = h.copy_bandwidth()
    nbytes = 3 * torch.Size(SHAPE).numel() * 4  # read r, read s, write out (the (N, C) mean and d are < 0.1%)
    floor_s = nbytes / bandwidth["bytes_per_s"]
    timings = {name: h.Timing.from_samples(v) for name, v in samples.items()}  # the project's percentiles
    rows = {name: {"median_ms": t.median_s * 1e3, "p10_ms": t.p10_s * 1e3, "p90_ms": t.p90_s * 1e3}
            for name, t in timings.items()}  # fmt: skip
    for name in ("cpp_arena", "cpp"):
        rows[name]["vs_compiled"] = rows["compiled"]["median_ms"] / rows[name]["median_ms"]
        rows[name]["copy_bw_fraction"] = floor_s * 1e3 / rows[name]["median_ms"]
    model = in_model_calls(5)
    model["copy_bw_fraction"] = floor_s * 1e3 / model["median_ms"]
    model["vs_compiled_microbench"] = rows["compiled"]["median_ms"] / model["median_ms"]
    checks = [{"candidate": name, "metric": k, "target": t, "measured": rows[name][k], "met": rows[name][k] >= t}
              for name in ("cpp_arena", "cpp") for k, t in TARGETS.items()]  # fmt: skip
    for name, row in rows.items():
        extra = "".join(f", {k} {row[k]:.2f}" for k in TARGETS if k in row)
        print(f"{name:10s} {row['median_ms']:7.3f} ms (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}){extra}")
    print(f"in the model: {model['calls']} res2 epilogue calls, median {model['median_ms']:.3f} ms, "
          f"{model['copy_bw_fraction']:.2f} of the copy floor")
    record = {"benchmark": "epilogue_in_model", "command": " ".join(["python"] + sys.argv), "shape": list(SHAPE),
              "layout": args.layout, "dtype": "fp32", "machine": h.machine_info(), "malloc": "glibc defaults",
              "copy_bandwidth": bandwidth, "floor_ms": floor_s * 1e3, "repeats": args.repeats, "results": rows,
              "in_model": model, "targets": TARGETS, "target_check": checks}  # fmt: skip
    print("wrote", write_json(args.out, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
