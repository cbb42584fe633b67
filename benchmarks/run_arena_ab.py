"""One switch of the fast model, measured as a model runs: the fast LGD-3D eager at CPU inference with the switch on
and off, the same model and inputs, calls alternating (order flipped every round), medians; outputs checked equal.
The switches: ``activation_arena`` (lgd_fast.arena) and ``recorded_inference`` (lgd_fast.recorded: the forward as
its recorded program of op calls). ``--training``: a training step instead (forward of both heads, cross-entropy,
backward, SGD with momentum), the arena switched (its forward and backward in the arena or not); the step's
gradients are checked equal once before the timings, and each side's peak memory is measured after them (the
process's peak resident memory over one step, as ``lgd-fast bench`` measures it, free arena blocks released
first). Writes JSON with the arena's counters.

    PYTHONPATH=. python benchmarks/run_arena_ab.py --batch 4 --rounds 10 --out benchmarks/results/arena_ab_cpu.json
    PYTHONPATH=. python benchmarks/run_arena_ab.py --switch recorded_inference --batch 1 --rounds 20 \\
        --out benchmarks/results/recorded_ab_b1_cpu.json
    PYTHONPATH=. python benchmarks/run_arena_ab.py --training --batch 4 --rounds 10 \\
        --out benchmarks/results/arena_ab_training_cpu.json
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
    parser.add_argument("--switch", default="activation_arena", choices=("activation_arena", "recorded_inference"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="H = W of the 16-frame clips")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--training", action="store_true", help="a training step (the activation_arena switch)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.training:
        if args.switch != "activation_arena":
            parser.error("--training switches the activation arena (recorded programs are for inference)")
        return training_ab(args)
    torch.manual_seed(0)
    fast = create_model(args.model, num_classes=400, fast=True).eval()
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size) for _ in range(2)]  # rotated, never zeros
    times = {True: [], False: []}
    with torch.inference_mode():
        setattr(fast, args.switch, False)
        expected = [fast(c) for c in clips]  # the plan decides and the weights fold on the first calls
        for on in (True, False, True, True):  # with recording on: eager, recorded, then the program
            setattr(fast, args.switch, on)
            fast(clips[0])
        for i in range(args.rounds):
            for on in (True, False) if i % 2 else (False, True):
                setattr(fast, args.switch, on)
                start = time.perf_counter()
                out = fast(clips[i % 2])
                times[on].append(time.perf_counter() - start)
                assert all(torch.equal(a, b) for a, b in zip(out, expected[i % 2], strict=True))
    median = {"on": statistics.median(times[True]) * 1e3, "off": statistics.median(times[False]) * 1e3}
    result = {
        "benchmark": "run_arena_ab", "switch": args.switch, "model": args.model, "input": list(clips[0].shape),
        "rounds": args.rounds, "median_ms": median,
        "samples_ms": {"on": [t * 1e3 for t in times[True]], "off": [t * 1e3 for t in times[False]]},
        "speedup": median["off"] / median["on"], "recorded_programs": {
            str(k): repr(v) for k, v in lgd_fast.recorded_programs(fast).items()},
        "arena": lgd_fast.arena_stats().as_dict(), "machine": machine_info(torch.device("cpu")), "commit": git_commit(),
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("switch", "input", "median_ms", "speedup")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def training_ab(args) -> None:
    import torch.nn.functional as F

    from lgd_fast import bench

    torch.manual_seed(0)
    fast = create_model(args.model, num_classes=400, classifier="two_heads", fast=True).train()
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size) for _ in range(2)]  # rotated, never zeros
    labels = torch.randint(0, 400, (args.batch,))
    optimizer = torch.optim.SGD(fast.parameters(), lr=1e-4, momentum=0.9)

    def step(on: bool, clip: torch.Tensor, update: bool = True) -> list[torch.Tensor]:
        fast.activation_arena = on
        torch.manual_seed(1)  # the same dropout draws on both sides
        local, global_ = fast(clip)
        loss = F.cross_entropy(local, labels) + F.cross_entropy(global_, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.clone() for p in fast.parameters()] if not update else []
        if update:
            optimizer.step()
        return grads

    step(False, clips[0])  # the plan decides on the first call
    off, on = step(False, clips[0], update=False), step(True, clips[0], update=False)
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True)), "the arena changed the gradients"
    del off, on
    step(True, clips[1])
    times = {True: [], False: []}
    for i in range(args.rounds):
        for arena_on in (True, False) if i % 2 else (False, True):
            start = time.perf_counter()
            step(arena_on, clips[i % 2])
            times[arena_on].append(time.perf_counter() - start)
    memory = {}
    for arena_on in (True, False):  # _peak_memory releases the arena's free blocks first
        memory["on" if arena_on else "off"] = bench._peak_memory(lambda a=arena_on: step(a, clips[0]),
                                                                 torch.device("cpu"))  # fmt: skip
    median = {"on": statistics.median(times[True]) * 1e3, "off": statistics.median(times[False]) * 1e3}
    result = {
        "benchmark": "run_arena_ab", "switch": "activation_arena", "pass": "training", "model": args.model,
        "input": list(clips[0].shape), "rounds": args.rounds, "median_ms": median,
        "samples_ms": {"on": [t * 1e3 for t in times[True]], "off": [t * 1e3 for t in times[False]]},
        "speedup": median["off"] / median["on"], "peak_memory_bytes": memory,
        "arena": lgd_fast.arena_stats().as_dict(), "machine": machine_info(torch.device("cpu")), "commit": git_commit(),
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("pass", "input", "median_ms", "speedup", "peak_memory_bytes")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
