"""How often each float32 implementation's gradient jumps away from float64: the fast model and PyTorch in both layouts.

A ReLU input within float32 rounding of zero falls on either side in two implementations; the gradients then
differ by one position's share, far above rounding (tests/test_fused_training_numerics.py's docstring). Such a
jump is an "outlier": a (parameter, draw) where one implementation's error against float64 is over ``--ratio``
times the smaller of the other two implementations' errors. This script counts them for three float32
implementations at the same inputs: the fast model on its fused code (``ours``), the reference in contiguous
layout and the reference in channels_last_3d. If the fast model's forward rounding were worse than PyTorch's,
its ReLU inputs would land on the wrong side more often and it would have more outliers; a defect in a
gradient would make an outlier of every draw. Over the draws without an outlier at a parameter, the 2x rule is
then checked on what is left, rounding (``clean_pooled``). Written to benchmarks/results/gradient_outliers_cpu.json.

    PYTHONPATH=.:tests python benchmarks/run_gradient_outliers.py --arch lgd3d_r101 --seeds 0,1,2,3 --draws 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from p3d_cases import rel  # noqa: E402
from run_fused_numerics import SHAPES  # noqa: E402
from test_fused_training_numerics import _gradients, author_models, channels_last_gradients  # noqa: E402

import author_fixture  # noqa: E402
from lgd_fast.plan import forced  # noqa: E402

IMPLEMENTATIONS = ("ours", "reference_contiguous", "reference_channels_last_3d")


def draw_errors(reference, fast, shape, gen) -> dict[str, dict[str, float]]:
    """implementation -> parameter (and "input") -> relative error of its gradient against float64."""
    x = torch.randn(shape, generator=gen)
    upstream = [torch.randn(shape[0], author_fixture.NUM_CLASSES, generator=gen) for _ in range(2)]
    want = _gradients(copy.deepcopy(reference).double(), x.double(), upstream)
    grads = {
        "reference_contiguous": _gradients(copy.deepcopy(reference), x, upstream),
        "reference_channels_last_3d": channels_last_gradients(reference, x, upstream),
    }
    with forced():
        grads["ours"] = _gradients(copy.deepcopy(fast), x, upstream)
    return {name: {k: rel(g[k], w) for k, w in want.items()} for name, g in grads.items()}


def is_outlier(err: dict[str, dict[str, float]], name: str, key: str, ratio: float) -> bool:
    """``name``'s error at ``key`` in one draw is over ``ratio`` times the smaller of the other two's."""
    return err[name][key] > ratio * max(min(err[o][key] for o in IMPLEMENTATIONS if o != name), 1e-7)


def count(errors: list[dict[str, dict[str, float]]], ratio: float) -> dict[str, dict]:
    """Per implementation: outlier (parameter, draw) pairs, the draws holding one, and each draw's count."""
    out = {}
    for name in IMPLEMENTATIONS:
        per_draw = [sum(1 for k in err[name] if is_outlier(err, name, k, ratio)) for err in errors]
        out[name] = {"pairs": sum(per_draw), "draws": sum(1 for n in per_draw if n), "per_draw": per_draw}
    return out


def clean_pooled(errors: list[dict[str, dict[str, float]]], ratio: float) -> dict[str, dict]:
    """The 2x rule without the kinks: per parameter, over the draws where no implementation's error at it is an
    outlier, our summed error over each reference's; the worst parameter and how many draws it kept."""
    out = {}
    for ref in IMPLEMENTATIONS[1:]:
        worst = ("", 0.0, 0)
        for k in errors[0]["ours"]:
            kept = [err for err in errors if not any(is_outlier(err, n, k, ratio) for n in IMPLEMENTATIONS)]
            if kept:
                r = sum(e["ours"][k] for e in kept) / (sum(e[ref][k] for e in kept) + 2.0**-23)
                worst = max(worst, (k, r, len(kept)), key=lambda w: w[1])
        out[f"vs_{ref}"] = {"worst_parameter": worst[0], "ratio": worst[1], "draws_kept": worst[2]}
    return out


def write_record(path: str, **fields) -> None:
    """The result file: torch's version and the command, then ``fields``."""
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "command": " ".join(sys.argv), **fields}, f, indent=1)
    print("wrote", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lgd3d_r101", choices=tuple(SHAPES))
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--draws", type=int, default=16, help="fresh inputs and upstream gradients per seed")
    parser.add_argument("--ratio", type=float, default=10.0, help="an outlier's error over the others' smaller one")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gradient_outliers_cpu.json"))
    args = parser.parse_args(argv)
    shape = SHAPES[args.arch]
    reference, fast = author_models(args.arch)
    runs, errors_all = [], []
    start = time.perf_counter()
    for seed in map(int, args.seeds.split(",")):
        gen = torch.Generator().manual_seed(seed)
        errors = [draw_errors(reference, fast, shape, gen) for _ in range(args.draws)]
        errors_all += errors
        runs.append(
            {"seed": seed, "outliers": count(errors, args.ratio), "clean_pooled": clean_pooled(errors, args.ratio)}
        )
        print(f"{args.arch} {shape} seed {seed}:",
              ", ".join(f"{n} {c['pairs']} pairs in {c['draws']} draws" for n, c in runs[-1]["outliers"].items()),
              "; without them, worst pooled ratio",
              ", ".join(f"{n} {c['worst_parameter']} {c['ratio']:.2f}" for n, c in runs[-1]["clean_pooled"].items()),
              flush=True)  # fmt: skip
    total = count(errors_all, args.ratio)
    print(f"all {len(errors_all)} draws:", ", ".join(f"{n} {c['pairs']} pairs in {c['draws']} draws"
                                                    for n, c in total.items()))  # fmt: skip
    write_record(
        args.out,
        arch=args.arch,
        shape=shape,
        threads=torch.get_num_threads(),
        ratio=args.ratio,
        seconds=round(time.perf_counter() - start, 1),
        runs=runs,
        total={n: {k: v for k, v in c.items() if k != "per_draw"} for n, c in total.items()},
        clean_pooled_all_draws=clean_pooled(errors_all, args.ratio),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
