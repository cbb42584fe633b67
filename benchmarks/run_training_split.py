"""Where a training step's time goes: the forward, backward and SGD of the fast model against the eager and compiled
channels-last references (the bench's own candidates and weights, steps interleaved in one process), and the stem's
BatchNorm + ReLU + max-pool after conv1, forward and backward, as ATen runs it (the fast model's training stem)
against ``torch.compile`` of the same modules. Medians over ``--rounds``.

    PYTHONPATH=. python benchmarks/run_training_split.py --out benchmarks/results/training_split_tiny_cpu.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import bench  # noqa: E402

CANDIDATES = ("fast", "fast_compiled", "reference_channels_last", "reference_channels_last_compiled")
STEM_SHAPES = {"lgd3d_tiny": (16, 16, 8, 16, 16), "lgd3d_r50": (4, 64, 8, 56, 56)}  # conv1's output at the bench sizes


def training_split(model: str, batch: int, size: int, rounds: int, gen: torch.Generator) -> dict:
    models = bench._models(model, 10, torch.device("cpu"), CANDIDATES, None)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    state = {}
    for name, (module, runner, layout) in models.items():
        clips = [torch.randn(batch, 3, 16, size, size, generator=gen).contiguous(memory_format=layout)
                 for _ in range(4)]
        module.train()
        state[name] = (runner, clips, torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9), [], [], [])

    def step(name: str, i: int, keep: bool) -> None:
        runner, clips, optimizer, forward, backward, sgd = state[name]
        t0 = time.perf_counter()
        local, global_ = runner(clips[i % len(clips)])
        loss = F.cross_entropy(local, labels) + F.cross_entropy(global_, labels)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if keep:
            forward.append(t1 - t0), backward.append(t2 - t1), sgd.append(t3 - t2)

    for i in range(6):  # warm-up: compiles, plans, arena
        for name in state:
            step(name, i, False)
    for i in range(rounds):
        for name in state:
            step(name, i, True)
    rows = {}
    for name, (_, _, _, forward, backward, sgd) in state.items():
        steps = [a + b + c for a, b, c in zip(forward, backward, sgd, strict=True)]
        rows[name] = {part: 1e3 * statistics.median(t)
                      for part, t in (("forward_ms", forward), ("backward_ms", backward), ("sgd_ms", sgd),
                                      ("step_ms", steps))}  # fmt: skip
    return rows


def stem_region(shape: tuple[int, ...], rounds: int, gen: torch.Generator) -> dict:
    y = torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    norm, pool = nn.BatchNorm3d(shape[1]), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))

    def region(t):
        return pool(torch.relu(norm(t)))

    def forward_backward(fn):
        leaf = y.clone().requires_grad_()
        upstream = torch.empty_like(fn(leaf)).normal_(generator=gen)  # (in the output's layout, as in the model)

        def call():
            leaf.grad = None
            fn(leaf).backward(upstream)

        return call

    calls = {"aten": forward_backward(region), "compiled": forward_backward(torch.compile(region))}
    times = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(3):
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    split = training_split(args.model, args.batch, args.size, args.rounds, gen)
    stems = {name: stem_region(shape, args.rounds, gen) for name, shape in STEM_SHAPES.items()}
    payload = {
        "benchmark": "training_split",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "seed": args.seed,
        "training_step": split,
        "stem_bn_relu_pool_forward_backward_ms": {f"{name} {tuple(STEM_SHAPES[name])}": row
                                                  for name, row in stems.items()},  # fmt: skip
        "commit": h.git_commit(),
        "machine": h.machine_info(),
    }
    for name, row in split.items():
        print(f"{name:36s} " + " ".join(f"{k[:-3]} {v:6.2f}" for k, v in row.items()))
    for name, row in payload["stem_bn_relu_pool_forward_backward_ms"].items():
        print(f"stem region {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()))
    if args.out:
        print(bench.write_json(args.out, payload))


if __name__ == "__main__":
    main()
