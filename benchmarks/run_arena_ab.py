"""The activation arena's gain in the fast model, measured as a model runs: the fast LGD-3D eager at CPU inference
with and without its arena (``model.activation_arena``), the same model and input, calls alternating (order
flipped every round), medians; outputs checked equal. Writes JSON with the arena's counters.

    PYTHONPATH=. python benchmarks/run_arena_ab.py --batch 4 --rounds 10 --out benchmarks/results/arena_ab_cpu.json
"""

import argparse
import json
import statistics
import time

import torch

import lgd_fast
from lgd_fast.bench import git_commit, machine_info
from lgd_fast.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    fast = create_model(args.model, num_classes=400, fast=True).eval()
    clips = [torch.randn(args.batch, 3, 16, 112, 112) for _ in range(2)]  # rotated, never zeros
    times = {True: [], False: []}
    with torch.inference_mode():
        expected = [fast(c) for c in clips]  # the plan decides and the weights fold on the first calls
        for arena in (True, False):
            fast.activation_arena = arena
            fast(clips[0])
        for i in range(args.rounds):
            for arena in (True, False) if i % 2 else (False, True):
                fast.activation_arena = arena
                start = time.perf_counter()
                out = fast(clips[i % 2])
                times[arena].append(time.perf_counter() - start)
                assert all(torch.equal(a, b) for a, b in zip(out, expected[i % 2], strict=True))
    result = {
        "benchmark": "run_arena_ab", "model": args.model, "input": list(clips[0].shape), "rounds": args.rounds,
        "median_ms": {"arena": statistics.median(times[True]) * 1e3, "no_arena": statistics.median(times[False]) * 1e3},
        "samples_ms": {"arena": [t * 1e3 for t in times[True]], "no_arena": [t * 1e3 for t in times[False]]},
        "arena": lgd_fast.arena_stats().as_dict(), "machine": machine_info(torch.device("cpu")), "commit": git_commit(),
    }  # fmt: skip
    result["speedup"] = result["median_ms"]["no_arena"] / result["median_ms"]["arena"]
    print(json.dumps({k: result[k] for k in ("input", "median_ms", "speedup")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
