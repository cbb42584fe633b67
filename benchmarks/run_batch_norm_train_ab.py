"""The batch_norm_train kernels in a fast model's training step: the same fast LGD-3D trained with the kernels and
with the PyTorch code they replace (``batch_norm_train.kernel_applies`` patched to False for the second model's
calls: the fused units' normalisation and every statistics pass, block ends included), steps alternating (order
flipped every round), each model with its own SGD (momentum 0.9), medians; each model's plan is decided by its own
first calls (measured), and the choices are written out.

    PYTHONPATH=. python benchmarks/run_batch_norm_train_ab.py --out benchmarks/results/batch_norm_train_ab_cpu.json
"""

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from lgd_fast.bench import machine_info, write_json
from lgd_fast.models import create_model
from lgd_fast.ops import batch_norm_train


@contextlib.contextmanager
def _kernels(on: bool):
    real = batch_norm_train.kernel_applies
    if not on:
        batch_norm_train.kernel_applies = lambda *args, **kwargs: False
    try:
        yield
    finally:
        batch_norm_train.kernel_applies = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="H = W of the 16-frame clips")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    clips = torch.randn(args.batch, 3, 16, args.size, args.size, generator=gen)
    labels = torch.randint(0, 400, (args.batch,), generator=gen)
    reference = create_model(args.model, 400, classifier="two_heads")
    runs = {}
    for on in (True, False):
        model = create_model(args.model, 400, classifier="two_heads", fast=True).train()
        model.load_state_dict(reference.state_dict())
        runs[on] = (model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))

    def step(on: bool) -> float:
        model, optimizer = runs[on]
        with _kernels(on):
            optimizer.zero_grad(set_to_none=True)
            local, global_ = model(clips)
            loss = F.cross_entropy(local, labels) + F.cross_entropy(global_, labels)
            loss.backward()
            optimizer.step()
        return loss.item()

    first = {on: step(on) for on in (True, False)}  # plans measured and decided here
    for on in (True, False):
        step(on), step(on)
    times = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            step(on)
            times[on].append(time.perf_counter() - start)
    results = {}
    for on, name in ((True, "kernels"), (False, "pytorch")):
        lines = [line for line in str(runs[on][0].execution_plan).splitlines() if "cpu train" in line]
        choices = [line.split(":")[1].split(";")[0].strip() for line in lines]
        results[name] = {
            "median_ms": statistics.median(times[on]) * 1e3,
            "steps_ms": [t * 1e3 for t in times[on]],
            "first_loss": first[on],
            "plan_choices": {c: choices.count(c) for c in sorted(set(choices))},
        }
        print(f"{name:8s} {results[name]['median_ms']:7.1f} ms  plan {results[name]['plan_choices']}")
    speedup = results["pytorch"]["median_ms"] / results["kernels"]["median_ms"]
    print(f"kernels: x{speedup:.3f}; first losses {first[True]:.6f} / {first[False]:.6f}")
    payload = {
        "benchmark": "batch_norm_train_ab",
        "machine": machine_info(torch.device("cpu")),
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "rounds": args.rounds,
        "speedup": speedup,
        "results": results,
    }
    if args.out:
        print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
