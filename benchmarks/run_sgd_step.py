"""The training engine's optimizer step on a model's parameters: the recipe's SGD (momentum 0.9, Nesterov, weight
decay 1e-4) as torch runs it per parameter (``foreach=False``, and the default, which on the CPU is the same loop),
with ``foreach=True``, and fused (one kernel over every parameter: ``lgd_fast.engine.train.make_sgd``), plus the
gradient clipping of the step (``clip_grad_norm_``, default and ``foreach=True``). Fresh random gradients, the
settings interleaved per round, median over the rounds of each round's median of ``--calls`` steps.

    PYTHONPATH=. python benchmarks/run_sgd_step.py --out benchmarks/results/sgd_step_cpu.json
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import machine_info, write_json  # noqa: E402
from lgd_fast.engine.config import OptimConfig
from lgd_fast.engine.train import make_sgd
from lgd_fast.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = [p for p in create_model(args.model, 400).parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    recipe = OptimConfig()
    sgd = dict(lr=1e-4, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    settings = {
        "sgd per parameter (foreach=False)": lambda: torch.optim.SGD(params, foreach=False, **sgd).step,
        "sgd default": lambda: torch.optim.SGD(params, **sgd).step,
        "sgd foreach=True": lambda: torch.optim.SGD(params, foreach=True, **sgd).step,
        "sgd fused (make_sgd)": lambda: make_sgd(params, recipe, 1e-4).step,
        "clip_grad_norm_ default": lambda: lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
        "clip_grad_norm_ foreach=True": lambda: lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
    }
    rounds = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, make in settings.items():
            rounds[name].append(h.median_ms(make(), args.calls, warmup=1))
    results = {name: {"median_ms": statistics.median(v), "rounds_ms": v} for name, v in rounds.items()}
    for name, r in results.items():
        print(f"{name:36s} {r['median_ms']:7.1f} ms  (rounds: {', '.join(f'{t:.1f}' for t in r['rounds_ms'])})")
    payload = {"benchmark": "sgd_step", "machine": machine_info(torch.device("cpu")), "model": args.model,
               "parameters": len(params), "elements": sum(p.numel() for p in params), "sgd": sgd,
               "results": results}  # fmt: skip
    if args.out:
        print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
