"""The default plan's training layout for narrow blocks under 14x14 frames (``lgd_fast.plan.CPU_TRAIN_CL_MAX_CHANNELS``:
channels_last_3d for at most 64 input channels) against the rule before it (every such block contiguous), measured as
a fast model trains: two fast models of the same weights under the deterministic default plan, the second planned
(and, with ``--compiled``, traced by ``torch.compile``, which runs the default rule: choices are not measured while
traced) under the old rule; then their training steps (``lgd_fast.bench.pass_call``'s: forward of both heads,
cross-entropy, backward, SGD with momentum, as ``lgd-fast bench`` times it, on contiguous clips) alternate, the order
flipped every round; medians. ``--control`` is the A/A run: both models under the new rule. The first step's losses
of the two are recorded (equal up to rounding: the same weights, clips and dropout draws).

    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --model lgd3d_tiny --batch 16 --size 32 \\
        --out benchmarks/results/train_layout_rule_ab_tiny_cpu.json
    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --compiled ...   # both models under torch.compile
    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --control ...    # A/A: both under the new rule
"""

import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import bench  # noqa: E402
from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.bench import git_commit, machine_info  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402

NAMES = ("rule", "old_rule")


def block_layouts(model) -> dict[str, list[str]]:
    """The layouts the plan recorded per block (an eager model's; a compiled one records none)."""
    return {name: sorted({c.layout for c in p.choices.values()}) for name, p in
            ((n, m._lgd_plan) for n, m in model.named_modules() if hasattr(m, "_lgd_plan")) if p.kind == "lgd_block"}


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=16, size=32, rounds=30,
                            control="an A/A control: both models under the new rule")  # fmt: skip
    parser.add_argument("--compiled", action="store_true", help="both models under torch.compile (no freezing)")
    args = parser.parse_args()
    reference, clips = h.ab_reference_and_clips(args)
    labels = torch.randint(0, 400, (args.batch,), generator=torch.Generator().manual_seed(1))
    calls, layouts, losses = {}, {}, {}
    for name in NAMES:
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="default")
        model.load_state_dict(reference.state_dict())
        runner = bench._compiled(model, freezing=False, compile_mode=None) if args.compiled else model
        old = name == "old_rule" and not args.control
        with mock.patch.object(planning, "CPU_TRAIN_CL_MAX_CHANNELS", 0) if old else contextlib.nullcontext():
            model.train()
            torch.manual_seed(2)  # the same dropout draws in both models' first step
            local, global_ = runner(clips[0])
            losses[name] = (F.cross_entropy(local, labels) + F.cross_entropy(global_, labels)).item()
            no_autocast = torch.autocast("cpu", enabled=False)
            calls[name] = bench.pass_call("training", model, runner, clips, labels, no_autocast)
            for _ in range(3):  # (a compiled model traces its backward on the first step)
                calls[name]()
        layouts[name] = block_layouts(model)
        print(f"{name}: {layouts[name]}")
    if not args.compiled and (layouts["rule"] == layouts["old_rule"]) != args.control:
        raise SystemExit(f"the blocks' layouts are not the comparison asked for: {layouts}")
    _, median = h.ab_medians(calls, args.rounds)
    payload = {
        "benchmark": "train_layout_rule_ab",
        "pass": "training",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "compiled": args.compiled,
        "control": args.control,  # (then "old_rule" names the second model, which runs the new rule too)
        "block_layouts": layouts,  # (empty for compiled models: traced choices are not recorded)
        "first_step_losses": losses,
        "median_ms": median,
        "speedup_rule_vs_old_rule": median["old_rule"] / median["rule"],
        "machine": {**machine_info(torch.device("cpu")), **git_commit()},
        "command": h.ab_command("run_train_layout_rule_ab.py", args, ("model", "batch", "size", "rounds"))
        + (" --compiled" if args.compiled else ""),
    }
    print(f"rule {median['rule']:.2f} ms, old rule {median['old_rule']:.2f} ms: "
          f"{payload['speedup_rule_vs_old_rule']:.3f}x (first losses {losses['rule']:.6f} / {losses['old_rule']:.6f})")
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
