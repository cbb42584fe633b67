"""The training stem's BatchNorm + ReLU + max-pool as one bn_relu_max_pool op against the stem's own modules (ATen's
BatchNorm, ReLU and max-pool after conv1), measured as a fast model trains: two fast models of the same weights under
the deterministic default plan, the second planned while the op is refused (so its stem runs its modules in
channels_last_3d, every other layer the same choice); then their training steps (``lgd_fast.bench.pass_call``'s:
forward of both heads, cross-entropy, backward, SGD with momentum, as ``lgd-fast bench`` times it, on contiguous
clips) alternate, the order flipped every round; medians. ``--control`` is the A/A run: both models run the op (how
much two instances of one plan differ). The first step's losses of the two are recorded (equal up to rounding: the
same weights, clips and dropout draws).

    PYTHONPATH=. python benchmarks/run_stem_pool_op_ab.py --model lgd3d_tiny --batch 16 --size 32 \\
        --out benchmarks/results/stem_pool_op_ab_tiny_cpu.json
    PYTHONPATH=. python benchmarks/run_stem_pool_op_ab.py --control ...   # A/A: both run the op
"""

import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import bench  # noqa: E402
from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402

NAMES = ("op", "modules")


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=16, size=32, rounds=30,
                            control="an A/A control: both models run the op")  # fmt: skip
    args = parser.parse_args()
    reference, clips, labels = h.ab_training_inputs(args)
    calls, models, losses = {}, {}, {}
    for name in NAMES:
        model = models[name] = create_model(args.model, 400, classifier="two_heads", fast=True, plan="default")
        model.load_state_dict(reference.state_dict())
        refuse = name == "modules" and not args.control
        with mock.patch.object(planning, "_stem_pool_op_takes", lambda *a, **k: False) if refuse else mock.MagicMock():
            losses[name] = h.ab_first_step_loss(model, model, clips[0], labels)
        calls[name] = bench.pass_call("training", model, model, clips, labels, torch.autocast("cpu", enabled=False))
        for _ in range(3):
            calls[name]()
    plans = {name: str(m.execution_plan).splitlines()[2].strip() for name, m in models.items()}  # the stem's
    for name, line in plans.items():
        print(f"{name}: {line}")
    runs_op = {name: m._lgd_plan.choices and all(c.end and not c.fused for c in m._lgd_plan.choices.values())
               for name, m in models.items()}  # fmt: skip
    if not runs_op["op"] or runs_op["modules"] != args.control:
        raise SystemExit(f"the stems' choices are not the comparison asked for: {plans}")
    _, median = h.ab_medians(calls, args.rounds)
    payload = h.ab_payload("stem_pool_op_ab", "run_stem_pool_op_ab.py", args, median, NAMES, **{"pass": "training"},
                           stem_choices=plans, first_step_losses=losses)  # fmt: skip
    print(f"op {median['op']:.2f} ms, modules {median['modules']:.2f} ms: {payload['speedup_op_vs_modules']:.3f}x "
          f"(first losses {losses['op']:.6f} / {losses['modules']:.6f})")  # fmt: skip
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
