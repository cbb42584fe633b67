"""P3D units of LGD-3D R50 on a GPU: the fused Triton unit against the eager cuDNN conv + BN + ReLU sequence.

Every distinct R50 bottleneck (batch 4, 16x112x112 clips; shapes read from the model, as in run_p3d_cpu.py),
the body up to bn3, forward (eval) and forward+backward (training), fp32 and bf16 (autocast), channels_last_3d:

- reference: the unit's own modules (cuDNN convs, BatchNorm, ReLU), eager;
- compiled: ``torch.compile`` of that;
- fast: ``lgd_fast.models.p3d.bottleneck_body`` (p3d_conv's Triton kernels, BatchNorm, ReLU and additions in
  the conv epilogues, statistics from the epilogues in training).

Target (issue: fused P3D convolutions): fast at least 1.3x the eager reference. Writes
benchmarks/results/p3d_units_<gpu name>.json. ``--device cpu`` runs the same code on the CPU (a smoke test:
the CPU's fast path is oneDNN there, and its figures are run_p3d_cpu.py's business).

    python benchmarks/run_p3d_gpu.py            # on a GPU machine
    python benchmarks/run_p3d_gpu.py --quick    # two units, fewer repeats
    python benchmarks/run_p3d_gpu.py --device cpu --smoke --no-compile    # one tiny unit: checks the code, seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as h  # noqa: E402
from run_p3d_cpu import _randomise, r50_units  # noqa: E402

from lgd_fast.bench import device_slug, time_interleaved, write_json  # noqa: E402
from lgd_fast.models import P3DBottleneck  # noqa: E402
from lgd_fast.models.p3d import bottleneck_body, to_fast_unit  # noqa: E402

CL3D = torch.channels_last_3d
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("forward", "forward+backward")
TARGET = 1.3
# --smoke: one small bottleneck (variant A, stride 1), to check the script's code path; no figure to report.
SMOKE_UNIT = {"name": "smoke A s1", "variant": "A", "stride": 1, "in_shape": [1, 32, 2, 8, 8], "planes": 8, "count": 1}


def _time(fns: dict[str, Any], repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    samples, _ = time_interleaved(fns, repeats=repeats, warmup=2, device=device)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "repeats": len(v)} for k, v in samples.items()}


def bench_unit(u: dict[str, Any], dtype: torch.dtype, pass_: str, device: torch.device, *, repeats: int,
               compile_: bool) -> dict[str, Any]:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    block = _randomise(P3DBottleneck(u["in_shape"][1], u["planes"], variant=u["variant"], stride=u["stride"]), gen)
    block = block.to(device).train(pass_ != "forward")
    fast = to_fast_unit(copy.deepcopy(block))
    x = (torch.randn(u["in_shape"], generator=gen) + 0.5).to(device).contiguous(memory_format=CL3D)
    training = pass_ != "forward"
    x.requires_grad_(training)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    bodies = {
        "reference": lambda: P3DBottleneck.residual_body(block, x),
        "fast": lambda: bottleneck_body(fast, x)[0],
    }
    if compile_:
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: P3DBottleneck.residual_body(block, t))
        bodies["compiled"] = lambda: compiled(x)

    def make(body):
        def run():
            with autocast:
                out = body()
            if training:
                out.backward(torch.ones_like(out))  # fresh gradients of x and every parameter
            return out

        return run

    with torch.inference_mode(not training):
        timings = _time({k: make(v) for k, v in bodies.items()}, repeats, device)
    row = {"unit": u["name"], "count": u["count"], "in_shape": u["in_shape"], "pass": pass_,
           "dtype": "bf16" if dtype == torch.bfloat16 else "fp32", "timings": timings}  # fmt: skip
    row["fast_vs_reference"] = timings["reference"]["median_s"] / timings["fast"]["median_s"]
    if compile_:
        row["fast_vs_compiled"] = timings["compiled"]["median_s"] / timings["fast"]["median_s"]
    print(f"{u['name']:<14} {pass_:<17} {row['dtype']}: " + " ".join(
        f"{k} {v['median_s'] * 1e3:.3f} ms" for k, v in timings.items()) + f"  x{row['fast_vs_reference']:.2f}")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="two units, 10 repeats")
    parser.add_argument("--smoke", action="store_true", help="one tiny unit, 2 repeats: checks the code, no figure")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per candidate (default 50)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run_p3d_gpu.py: torch sees no CUDA device (use --device cpu for a smoke run)")
    repeats = args.repeats or (2 if args.smoke else 10 if args.quick else 50)
    if args.smoke:
        units = [SMOKE_UNIT]
    else:
        units = r50_units()[:2] if args.quick else r50_units()
    rows = [bench_unit(u, dtype, pass_, device, repeats=repeats, compile_=not args.no_compile)
            for u in units for dtype in DTYPES.values() for pass_ in PASSES]  # fmt: skip
    totals = {}
    for dtype in DTYPES:
        for pass_ in PASSES:
            sel = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
            ref = sum(r["timings"]["reference"]["median_s"] * r["count"] for r in sel)
            fast = sum(r["timings"]["fast"]["median_s"] * r["count"] for r in sel)
            totals[f"{dtype} {pass_}"] = {"reference_s": ref, "fast_s": fast, "fast_vs_reference": ref / fast,
                                          "target": TARGET, "met": None if args.smoke else ref / fast >= TARGET}
    payload = {
        "benchmark": "p3d_units_gpu",
        "machine": h.machine_info(),
        "device": args.device,
        "settings": {"repeats": repeats, "quick": args.quick, "smoke": args.smoke, "compile": not args.no_compile},
        "notes": [
            "body up to bn3 of each distinct R50 bottleneck, channels_last_3d input; reference = the unit's modules "
            "eager (cuDNN conv, BatchNorm, ReLU); fast = lgd_fast.models.p3d.bottleneck_body; bf16 = autocast",
            "forward+backward: backward of the output with ones (input and every parameter gradient)",
            "r50_totals: medians weighted by how often each unit occurs among R50's 16 bottlenecks",
        ],
        "results": rows,
        "r50_totals": totals,
    }
    out = args.out or h.RESULTS_DIR / f"p3d_units_{device_slug(device)}.json"
    print("wrote", write_json(out, payload))
    if args.smoke:
        print("smoke run: a tiny unit, no target judged")
        return
    for key, total in totals.items():
        print(f"R50 units {key}: fast x{total['fast_vs_reference']:.2f} vs eager (target {TARGET}) "
              f"{'met' if total['met'] else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
