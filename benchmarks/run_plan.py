"""The execution plan's two modes end to end: the fast LGD-3D with its measured plan against its default plan.

LGD-3D R50 (or ``--model``), fp32, inference (eval, inference_mode) and a training step (forward,
cross-entropy, backward, SGD), timed in alternation with the reference (eager, and eager channels-last for
inference) after checking that each fast model's outputs equal the reference's. glibc's own malloc settings
(what a user has) unless --steady-malloc. Writes benchmarks/results/plan_<model>_cpu.json with both plans
as ``lgd-fast plan`` prints them.

    python benchmarks/run_plan.py               # lgd3d_r50, batch 4, 16x112x112
    python benchmarks/run_plan.py --quick       # batch 2, 8x112x112, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as h  # noqa: E402

from lgd_fast import create_model  # noqa: E402
from lgd_fast.bench import time_interleaved, write_json  # noqa: E402


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_arguments(parser, default_out=None, repeats=(10, 4))
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--steady-malloc", action="store_true", help="the benchmarks' process-wide malloc settings")
    args = parser.parse_args(argv)
    args.system_malloc = not args.steady_malloc
    setup = h.prepare_run(args)
    out = args.out or h.RESULTS_DIR / f"plan_{args.model}_cpu.json"
    shape = (2, 3, 8, 112, 112) if args.quick else (4, 3, 16, 112, 112)
    torch.manual_seed(0)
    reference = create_model(args.model, 400, classifier="two_heads")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    models = {"reference": reference}
    for mode in ("default", "measure"):
        models[f"fast_{mode}"] = create_model(args.model, 400, classifier="two_heads", fast=True, plan=mode)
        models[f"fast_{mode}"].load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(1)
    clips = [torch.randn(shape, generator=gen) for _ in range(2)]
    labels = torch.randint(0, 400, (shape[0],), generator=gen)
    rows, plans = {}, {}

    for model in models.values():
        model.eval()
    reference_cl = copy.deepcopy(reference).to(memory_format=torch.channels_last_3d)
    cl = [c.contiguous(memory_format=torch.channels_last_3d) for c in clips]
    with torch.inference_mode():
        want = reference(clips[0])
        errors = {name: _rel(models[name](clips[0]), want) for name in ("fast_default", "fast_measure")}
        candidates = {name: (lambda i, m=m: m(clips[i])) for name, m in models.items()}
        candidates["reference_cl3d"] = lambda i: reference_cl(cl[i])
        samples, _ = time_interleaved(candidates, inputs=[0, 1], warmup=args.warmup, repeats=args.repeats)
    plans["inference"] = {name: str(models[name].execution_plan) for name in ("fast_default", "fast_measure")}
    rows["inference"] = {"output_rel_error": errors,
                         "timings": {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}}  # fmt: skip

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run(i):
            local, _ = model.train()(clips[i])
            loss = torch.nn.functional.cross_entropy(local, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    steps = {name: step(m) for name, m in models.items()}
    samples, _ = time_interleaved(steps, inputs=[0, 1], warmup=1, repeats=max(2, args.repeats // 2))
    plans["training_step"] = {name: str(models[name].execution_plan) for name in ("fast_default", "fast_measure")}
    rows["training_step"] = {"timings": {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}}
    for name, row in rows.items():
        med = {k: t["median_s"] for k, t in row["timings"].items()}
        row["speedup_vs_reference"] = {k: med["reference"] / v for k, v in med.items()}
        print(name, " ".join(f"{k} {v * 1e3:.0f} ms (x{med['reference'] / v:.2f})" for k, v in med.items()))
    payload = {
        "benchmark": "plan",
        "model": f"{args.model}, 400 classes, two_heads, fp32",
        "input": list(shape),
        "machine": h.machine_info(),
        "settings": {"quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
                     "steady_malloc": setup["steady_malloc"]},  # fmt: skip
        "notes": [
            "fast_default: create_model(..., fast=True, plan='default') (the deterministic rule); fast_measure: "
            "plan='measure' (every layer's candidates timed on first use); reference_cl3d: the reference moved to "
            "channels_last_3d with channels_last_3d clips (inference only)",
            "inference under torch.inference_mode; training_step: forward, cross-entropy of the local head, "
            "backward, SGD; the models train from the same weights, so the steps diverge slightly (timing only)",
            "timings: seconds per call over interleaved repeats; speedup_vs_reference = reference / candidate",
        ],
        "plans": plans,
        "results": rows,
    }
    print("wrote", write_json(out, payload))


if __name__ == "__main__":
    main()
