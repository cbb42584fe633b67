"""Channels-last conv weights in training (``lgd_fast.plan.CL_WEIGHTS_IN_TRAINING``), on and off, measured as a model
trains: one fast model planned (measure mode) with the switch off, a second of the same weights taking the very same
choices from the plan's measurement cache with the switch on (so the two differ only in their conv weights' layout),
then their training steps (``lgd_fast.bench.pass_call``'s, as ``lgd-fast bench`` times them: forward of both heads,
cross-entropy, backward, SGD with momentum) alternating, order flipped every round; medians. Writes JSON with the
plan's layouts and which layers' weights were made channels-last.

    PYTHONPATH=. python benchmarks/run_cl_weights_ab.py --model lgd3d_tiny --batch 16 --size 32 --rounds 60 \\
        --out benchmarks/results/cl_weights_ab_tiny_cpu.json
"""

import argparse
import contextlib
import json
import statistics
import time

import torch

from lgd_fast import plan as planning
from lgd_fast.bench import git_commit, machine_info, pass_call, trained_like
from lgd_fast.models import create_model


def _layers(model) -> list[tuple[str, str, bool]]:
    """(layer, layout, weights made channels-last) of every training choice."""
    return [(name or "(model)", c.layout, "conv weights made channels_last_3d" in c.why)
            for name, plan in model.execution_plan.layers() for key, c in plan.choices.items()
            if key[1] == "train"]  # fmt: skip


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
    steps, models = {}, {}
    planning._MEASURED.clear()
    for on in (False, True):  # off first: it measures; on takes the same choices from the cache
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="measure")
        model.load_state_dict(reference.state_dict())
        step = pass_call("training", model, model, clips, labels, contextlib.nullcontext())  # next clip each call
        planning.CL_WEIGHTS_IN_TRAINING = on
        try:
            for _ in clips:
                step()
        finally:
            planning.CL_WEIGHTS_IN_TRAINING = True
        steps[on], models[on] = step, model
    layers = {on: _layers(models[on]) for on in (False, True)}
    if [lay[:2] for lay in layers[False]] != [lay[:2] for lay in layers[True]]:
        raise SystemExit(f"the two models' plans differ: {layers}")
    times = {True: [], False: []}
    for i in range(args.rounds):
        for on in (True, False) if i % 2 else (False, True):
            start = time.perf_counter()
            steps[on]()
            times[on].append(time.perf_counter() - start)
    median = {k: statistics.median(times[k]) * 1e3 for k in (True, False)}
    payload = {
        "benchmark": "cl_weights_ab",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "machine": machine_info(torch.device("cpu")),
        "git": git_commit(),
        "median_ms": {"channels_last_weights": median[True], "contiguous_weights": median[False]},
        "speedup": median[False] / median[True],
        "layers": [{"layer": n, "layout": lay, "weights_channels_last": w} for n, lay, w in layers[True]],
        "samples_s": {"channels_last_weights": times[True], "contiguous_weights": times[False]},
    }
    print(f"{args.model} training step: channels-last conv weights {median[True]:.2f} ms, contiguous "
          f"{median[False]:.2f} ms ({payload['speedup']:.3f}x)")  # fmt: skip
    print("  " + " ".join(f"{n}:{lay[:4]}{'+w' if w else ''}" for n, lay, w in layers[True]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
