"""The measured plan's margin rule with and without staying in the input's layout (``lgd_fast.plan.STAY_IN_LAYOUT``),
measured as a model runs: two fast models of the same weights, each planned (measure mode) on its first training
steps with the switch on or off, then their training steps (``lgd_fast.bench.pass_call``'s, as ``lgd-fast bench``
times them: forward of both heads, cross-entropy, backward, SGD with momentum) alternating, order flipped every
round; medians. Writes JSON with each model's layouts per planned layer.

    PYTHONPATH=. python benchmarks/run_plan_layout_ab.py --model lgd3d_tiny --batch 16 --size 32 --rounds 60 \\
        --out benchmarks/results/plan_layout_ab_tiny_cpu.json
"""

import argparse
import contextlib
import json
import statistics

import torch

from lgd_fast import plan as planning
from lgd_fast.bench import git_commit, machine_info, pass_call, time_interleaved, trained_like
from lgd_fast.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="H = W of the 16-frame clips")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = trained_like(create_model(args.model, 400, classifier="two_heads"))
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size, generator=gen) for _ in range(2)]  # never zeros
    labels = torch.randint(0, 400, (args.batch,), generator=gen)
    steps, layouts = {}, {}
    for stay in (True, False):
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="measure")
        model.load_state_dict(reference.state_dict())
        step = pass_call("training", model, model, clips, labels, contextlib.nullcontext())  # next clip each call
        planning._MEASURED.clear()  # each model measures its own plan under its rule
        planning.STAY_IN_LAYOUT = stay
        try:
            for _ in clips:
                step()
        finally:
            planning.STAY_IN_LAYOUT = True
        steps[stay] = step
        layouts[stay] = [(name or "(model)", c.layout) for name, plan in model.execution_plan.layers()
                         for key, c in plan.choices.items() if key[1] == "train"]  # fmt: skip
    times, _ = time_interleaved(steps, repeats=args.rounds)  # (the order flips every round)
    median = {k: statistics.median(times[k]) * 1e3 for k in (True, False)}
    payload = {
        "benchmark": "plan_layout_ab",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "machine": machine_info(torch.device("cpu")),
        "git": git_commit(),
        "median_ms": {"stay_in_layout": median[True], "old_rule": median[False]},
        "speedup_stay_over_old": median[False] / median[True],
        "layouts": {"stay_in_layout": layouts[True], "old_rule": layouts[False]},
        "samples_s": {"stay_in_layout": times[True], "old_rule": times[False]},
    }
    print(f"{args.model} training step: staying in layout {median[True]:.2f} ms, old rule {median[False]:.2f} ms "
          f"({payload['speedup_stay_over_old']:.3f}x)")  # fmt: skip
    for k in (True, False):
        print(f"  {'stay' if k else 'old '}: " + " ".join(f"{n}:{lay[:4]}" for n, lay in layouts[k]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
