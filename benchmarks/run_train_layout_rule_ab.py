"""The default plan's training layout for narrow blocks under 14x14 frames (``lgd_fast.plan.CPU_TRAIN_CL_MAX_CHANNELS``:
channels_last_3d for at most 64 input channels) against the rule before it (every such block contiguous), measured as
a fast model trains: two fast models of the same weights under the deterministic default plan, the second planned
(and, with ``--compiled``, traced by ``torch.compile``, which runs the default rule: choices are not measured while
traced) under the old rule; then their training steps (``lgd_fast.bench.pass_call``'s: forward of both heads,
cross-entropy, backward, SGD with momentum, as ``lgd-fast bench`` times it, on contiguous clips) alternate, the order
flipped every round; medians. ``--control`` is the A/A run: both models under the new rule. The first step's losses
of the two are recorded (equal up to rounding: the same weights, clips and dropout draws).

    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --model lgd3d_tiny --batch 16 --size 32 \\
        --out benchmarks/results/train_layout_rule_ab_tiny_b16_cpu.json
    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --compiled ...   # both models under torch.compile
    PYTHONPATH=. python benchmarks/run_train_layout_rule_ab.py --control ...    # A/A: both under the new rule
"""

import functools
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import bench  # noqa: E402
from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402

NAMES = ("rule", "old_rule")


def spying_on_block_layouts(seen: list[str]):
    """A patch of the plan's decision that appends each LGD block's layout to ``seen`` (also while dynamo traces)."""
    real = planning._decide

    def spy(plan, *args):
        choice = real(plan, *args)
        if plan.kind == "lgd_block":
            seen.append(choice.layout)
        return choice

    return mock.patch.object(planning, "_decide", spy)


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=16, size=32, rounds=30,
                            control="an A/A control: both models under the new rule")  # fmt: skip
    parser.add_argument("--compiled", action="store_true", help="both models under torch.compile (no freezing)")
    args = parser.parse_args()
    reference, clips, labels = h.ab_training_inputs(args)
    calls, layouts, losses = {}, {}, {}
    for name in NAMES:
        model = create_model(args.model, 400, classifier="two_heads", fast=True, plan="default")
        model.load_state_dict(reference.state_dict())
        runner = bench._compiled(model, freezing=False, compile_mode=None) if args.compiled else model
        # every call of each model under its rule: dynamo guards on the constant it read while tracing, so a compiled
        # model called under the other value would be traced again, under that rule
        value = 0 if name == "old_rule" and not args.control else planning.CPU_TRAIN_CL_MAX_CHANNELS
        rule = functools.partial(mock.patch.object, planning, "CPU_TRAIN_CL_MAX_CHANNELS", value)
        layouts[name] = []
        # the first call plans (and traces) the blocks under the spy; a compiled model is traced once more in its
        # warm-up below, the spy gone (dynamo guards on _decide), under the same rule: the same deterministic choices.
        # (A spy kept on would not do: dynamo guards on its list's length, traces every call and, past its recompile
        # limit, runs the model eagerly.)
        with rule(), spying_on_block_layouts(layouts[name]):
            losses[name] = h.ab_first_step_loss(model, runner, clips[0], labels)
        step = bench.pass_call("training", model, runner, clips, labels, torch.autocast("cpu", enabled=False))

        def call(step=step, rule=rule):
            with rule():
                step()

        calls[name] = call
        for _ in range(3):  # (a compiled model traces its backward on the first step)
            call()
        print(f"{name}: blocks {layouts[name]}")
    if (layouts["rule"] == layouts["old_rule"]) != args.control:
        raise SystemExit(f"the blocks' layouts are not the comparison asked for: {layouts}")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, median = h.ab_medians(calls, args.rounds)
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        raise SystemExit("a model was traced again while timed: the comparison is not the one asked for")
    payload = h.ab_payload("train_layout_rule_ab", "run_train_layout_rule_ab.py", args, median, NAMES,
                           options=("model", "batch", "size", "rounds", "compiled"), **{"pass": "training"},
                           compiled=args.compiled, block_layouts=layouts, first_step_losses=losses)  # fmt: skip
    print(f"rule {median['rule']:.2f} ms, old rule {median['old_rule']:.2f} ms: "
          f"{payload['speedup_rule_vs_old_rule']:.3f}x (first losses {losses['rule']:.6f} / {losses['old_rule']:.6f})")
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
