"""The eval stem as one stem_conv_pool kernel against the stem the plan ran before it (the clip to channels-last, one
oneDNN conv with bn1 folded and ReLU fused, ATen's max-pool), measured as a fast model runs inference: two fast models
of the same weights under the deterministic default plan, the second planned while the kernel is refused (so its stem
takes the fused oneDNN conv, every other layer the same choice), both recorded; then their calls
(``lgd_fast.bench.pass_call``'s inference, as ``lgd-fast bench`` times it, on contiguous clips) alternate, the
order flipped every round; medians. ``--control`` is the A/A run: both models run the kernel (how much two instances
of one plan differ).

    PYTHONPATH=. python benchmarks/run_stem_kernel_ab.py --model lgd3d_r50 --batch 4 --size 112 --dtype bf16 \\
        --out benchmarks/results/stem_kernel_ab_r50_bf16_cpu.json
    PYTHONPATH=. python benchmarks/run_stem_kernel_ab.py --control ...   # A/A: both run the kernel
"""

import argparse
import contextlib
import json
import statistics

import torch

from lgd_fast import plan as planning
from lgd_fast.bench import git_commit, machine_info, pass_call, time_interleaved, trained_like
from lgd_fast.models import create_model
from lgd_fast.ops.stem_conv_pool import bf16_dot_products

DTYPES = ("fp32", "bf16", "bf16-weights")  # bf16: autocast on float32 models; bf16-weights: bfloat16 models, clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="H = W of the 16-frame clips")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--control", action="store_true", help="an A/A control: both models run the kernel")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = trained_like(create_model(args.model, 400, classifier="two_heads"))
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16-weights" else torch.float32
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size, generator=gen).to(dtype) for _ in range(2)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    calls, plans, takes = {}, {}, planning._stem_kernel_takes
    for name in ("kernel", "onednn"):
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="default")
        model.load_state_dict(reference.state_dict())
        model.to(dtype)
        call = pass_call("inference", model, model, clips, None, autocast)
        if name == "onednn" and not args.control:
            planning._stem_kernel_takes = lambda *a, **k: False
        try:
            for _ in range(4):  # plans, records (second call), runs the program
                call()
        finally:
            planning._stem_kernel_takes = takes
        calls[name] = call
        plans[name] = str(model.execution_plan).splitlines()[2]  # the stem's choice
    for name, line in plans.items():
        print(f"{name}: {line.strip()}")
    if not args.control and "kernel" not in plans["kernel"]:
        raise SystemExit("the default plan did not choose the stem kernel here: nothing to compare")
    with torch.inference_mode(), autocast:
        a, b = (calls[n]().float() for n in ("kernel", "onednn"))
    difference = ((a - b).norm() / b.norm()).item()
    times, _ = time_interleaved(calls, repeats=args.rounds)  # (the order flips every round)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    payload = {
        "benchmark": "stem_kernel_ab",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "dtype": args.dtype,
        "rounds": args.rounds,
        "control": args.control,  # (then "onednn" names the second model, which runs the kernel too)
        "bf16_dot_products": bf16_dot_products(),
        "stem_choices": plans,
        "logits_relative_difference": difference,
        "median_ms": median,
        "speedup_kernel_vs_onednn": median["onednn"] / median["kernel"],
        "machine": {**machine_info(torch.device("cpu")), **git_commit()},
        "command": "python benchmarks/run_stem_kernel_ab.py "
        + " ".join(f"--{k} {getattr(args, k)}" for k in ("model", "batch", "size", "dtype", "rounds"))
        + (" --control" if args.control else ""),
    }
    print(f"kernel {median['kernel']:.2f} ms, onednn {median['onednn']:.2f} ms: "
          f"{payload['speedup_kernel_vs_onednn']:.3f}x (logits differ by {difference:.2e})")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
