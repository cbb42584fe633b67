"""The stem's clip conversion by lgd_fast.ops.to_channels_last_3d against ATen's (``x.contiguous(memory_format=
channels_last_3d)``), measured as a fast model runs inference: two fast models of the same weights and the same plan
(the second takes the first's measured choices from the plan's cache), the second made to convert with ATen's copy
while it records its program, then their calls (``lgd_fast.bench.pass_call``'s inference, as ``lgd-fast bench``
times it, on contiguous clips) alternating, order flipped every round; medians.

    PYTHONPATH=. python benchmarks/run_to_channels_last_ab.py --model lgd3d_tiny --batch 16 --size 32 \\
        --out benchmarks/results/to_channels_last_ab_tiny_cpu.json
    PYTHONPATH=. python benchmarks/run_to_channels_last_ab.py --control ...   # A/A: both convert with the op
"""

import argparse
import contextlib
import json
import statistics

import torch

from lgd_fast import plan as planning
from lgd_fast.bench import git_commit, machine_info, pass_call, time_interleaved, trained_like
from lgd_fast.models import create_model
from lgd_fast.ops import to_channels_last_3d_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="H = W of the 16-frame clips")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--control", action="store_true",
                        help="an A/A control: both models convert with the op (how much two instances differ)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = trained_like(create_model(args.model, 400, classifier="two_heads"))
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size, generator=gen) for _ in range(2)]  # never zeros
    calls = {}
    op = planning.to_channels_last_3d
    for name in ("op", "aten"):
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="measure")
        model.load_state_dict(reference.state_dict())
        call = pass_call("inference", model, model, clips, None, contextlib.nullcontext())
        if name == "aten" and not args.control:
            planning.to_channels_last_3d = lambda x, backend=None: to_channels_last_3d_reference(x)
        try:
            for _ in range(4):  # plans, records (second call), runs the program
                call()
        finally:
            planning.to_channels_last_3d = op
        calls[name] = call
    times, _ = time_interleaved(calls, repeats=args.rounds)  # (the order flips every round)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    payload = {
        "benchmark": "to_channels_last_ab",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "control": args.control,  # (then "aten" names the second model, which converts with the op too)
        "machine": machine_info(torch.device("cpu")),
        "git": git_commit(),
        "median_ms": median,
        "speedup_op_over_aten": median["aten"] / median["op"],
        "samples_s": times,
    }
    second = "the second model, also by the op (A/A control)" if args.control else "by ATen"
    print(f"{args.model} inference, batch {args.batch}: clip converted by the op {median['op']:.3f} ms, {second} "
          f"{median['aten']:.3f} ms ({payload['speedup_op_over_aten']:.3f}x)")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
