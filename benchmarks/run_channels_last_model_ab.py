"""The fast model converted as the channels-last reference is (``model.to(memory_format=torch.channels_last_3d)``
before its optimizer is made: conv weights in channels_last_3d, so a conv on channels-last input reorders no weight
and its weight gradient arrives in the parameter's layout) against the fast model as made (contiguous weights),
measured as it trains: two fast models of the same weights and plan mode, each measuring its own plan (recorded),
their training steps
(``lgd_fast.bench.pass_call``'s: forward of both heads, cross-entropy, backward, SGD with momentum, as ``lgd-fast
bench`` times it, on contiguous clips) alternating, the order flipped every round; medians. ``--control`` is the A/A
run: both as made. The first step's losses of the two are recorded (equal up to rounding).

    PYTHONPATH=. python benchmarks/run_channels_last_model_ab.py --model lgd3d_r50 --batch 4 --size 112 --rounds 12 \\
        --out benchmarks/results/channels_last_model_ab_r50_b4_cpu.json
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import bench  # noqa: E402
from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402

NAMES = ("channels_last", "as_made")


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=4, size=112, rounds=12,
                            control="an A/A control: both models as made")  # fmt: skip
    parser.add_argument("--plan", default="measure", help="the fast models' plan mode")
    args = parser.parse_args()
    reference, clips, labels = h.ab_training_inputs(args)
    calls, losses, weights, plans = {}, {}, {}, {}
    for name in NAMES:
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan=args.plan)
        model.load_state_dict(reference.state_dict())
        if name == "channels_last" and not args.control:
            model.to(memory_format=torch.channels_last_3d)  # (before pass_call makes the optimizer)
        weights[name] = sum(1 for p in model.parameters() if p.dim() == 5 and not p.is_contiguous())
        planning._MEASURED.clear()  # each model measures its own plan (the cache keys on shapes, not weight layouts)
        losses[name] = h.ab_first_step_loss(model, model, clips[0], labels)
        calls[name] = bench.pass_call("training", model, model, clips, labels, torch.autocast("cpu", enabled=False))
        for _ in range(2):
            calls[name]()
        plans[name] = {layer or "(model)": [f"{c.label(p.kind)}, {c.layout}" for c in p.choices.values()]
                       for layer, p in planning.ExecutionPlan(model).layers()}  # fmt: skip
        print(f"{name}: {weights[name]} channels-last conv weights (1x1x1 ones are both layouts); plan "
              f"{sorted(set(v for c in plans[name].values() for v in c))}", flush=True)  # fmt: skip
    _, median = h.ab_medians(calls, args.rounds)
    payload = h.ab_payload("channels_last_model_ab", "run_channels_last_model_ab.py", args, median, NAMES,
                           options=("model", "batch", "size", "rounds", "plan"), **{"pass": "training"},
                           plan=args.plan, channels_last_conv_weights=weights, plans=plans,
                           first_step_losses=losses)  # fmt: skip
    print(f"channels-last {median['channels_last']:.1f} ms, as made {median['as_made']:.1f} ms: "
          f"{payload['speedup_channels_last_vs_as_made']:.3f}x (first losses {losses['channels_last']:.6f} / "
          f"{losses['as_made']:.6f})")  # fmt: skip
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
