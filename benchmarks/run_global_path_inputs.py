"""The rounding an LGD block's global path receives in training: the fast model against PyTorch, both against float64.

For one block of the fast LGD-3D (every layer on its fused code) and of the float32 reference, in training
mode, this records the two inputs of the block's global update (the video mean of the block input, and g) and
compares each with the float64 reference's, per draw. It also reports the float64 pre-activation of g' nearest
zero (a ReLU a float32 run could flip there) and where each float32 run puts it. It answers whether the fast
model's jumps in that block's gradients (benchmarks/run_gradient_outliers.py) start in its own forward
rounding there or arrive from downstream. The draws are those of run_gradient_outliers.py for the same seed.
Written to benchmarks/results/global_path_inputs_cpu.json.

    PYTHONPATH=.:tests python benchmarks/run_global_path_inputs.py --block layer3.18 --seed 0 --draws 16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from p3d_cases import rel  # noqa: E402
from run_gradient_outliers import SHAPES, write_record  # noqa: E402
from test_fused_training_numerics import author_models  # noqa: E402

import author_fixture  # noqa: E402
import lgd_fast.models.fast as fast_models  # noqa: E402
from lgd_fast.models.blocks import video_mean  # noqa: E402
from lgd_fast.plan import forced  # noqa: E402


def reference_inputs(model, block_name: str, x) -> dict[str, torch.Tensor]:
    """The reference's global-update inputs at ``block_name`` in one training forward."""
    block, seen = model.get_submodule(block_name), {}
    update = type(block).update_global

    def recording(x_in, g):
        seen["mean"], seen["g"] = video_mean(x_in, g.shape[0]).detach().double(), g.detach().double()
        return update(block, x_in, g)

    block.update_global = recording
    model.train()
    model(x)
    return seen


def fast_inputs(model, block_index: int, x) -> dict[str, torch.Tensor]:
    """The fast model's global-update inputs at its ``block_index``-th LGD block (the fused block end's call)."""
    calls, real = [], fast_models.global_update

    def recording(x_mean, g, *weights, **kwargs):
        calls.append((x_mean.detach().double(), g.detach().double()))
        return real(x_mean, g, *weights, **kwargs)

    fast_models.global_update = recording
    try:
        model.train()
        with forced():
            model(x)
    finally:
        fast_models.global_update = real
    mean, g = calls[block_index]
    return {"mean": mean, "g": g}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lgd3d_r101", choices=tuple(SHAPES))
    parser.add_argument("--block", default="layer3.18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "global_path_inputs_cpu.json"))
    args = parser.parse_args(argv)
    shape = SHAPES[args.arch]
    reference, fast = author_models(args.arch)
    blocks = [n for n, _ in fast.named_modules() if n.startswith("layer") and n.count(".") == 1]
    index = blocks.index(args.block)
    b = reference.get_submodule(args.block)
    w = [t.detach().double() for fc in (b.fc1, b.fc2, b.fc3, b.fc4) for t in (fc.weight, fc.bias)]

    def pre_activation(inputs):  # g' = ReLU(fc2(fc1(mean)) + fc4(fc3(g))), before the ReLU, in float64
        local = F.linear(F.linear(inputs["mean"], w[0], w[1]), w[2], w[3])
        return (local + F.linear(F.linear(inputs["g"], w[4], w[5]), w[6], w[7]))[0]

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for draw in range(args.draws):
        x = torch.randn(shape, generator=gen)
        [torch.randn(shape[0], author_fixture.NUM_CLASSES, generator=gen) for _ in range(2)]  # as the draws do
        exact = reference_inputs(copy.deepcopy(reference).double(), args.block, x.double())
        plain = reference_inputs(copy.deepcopy(reference), args.block, x)
        ours = fast_inputs(copy.deepcopy(fast), index, x)
        p64, p_plain, p_ours = pre_activation(exact), pre_activation(plain), pre_activation(ours)
        i = p64.abs().argmin()
        row = {
            "draw": draw,
            "input_error": {
                name: {k: rel(got[k], exact[k]) for k in ("mean", "g")}
                for name, got in (("ours", ours), ("pytorch", plain))
            },
            "pre_activation_nearest_zero": {
                "float64": p64[i].item(),
                "ours": p_ours[i].item(),
                "pytorch": p_plain[i].item(),
            },
        }
        rows.append(row)
        e = row["input_error"]
        print(
            f"draw {draw}: input error ours mean {e['ours']['mean']:.1e} g {e['ours']['g']:.1e}, PyTorch mean "
            f"{e['pytorch']['mean']:.1e} g {e['pytorch']['g']:.1e}; pre-activation nearest zero "
            f"{p64[i].item():+.2e} (ours {p_ours[i].item():+.2e}, PyTorch {p_plain[i].item():+.2e})",
            flush=True,
        )
    ratio = sum(r["input_error"]["ours"]["g"] for r in rows) / sum(r["input_error"]["pytorch"]["g"] for r in rows)
    flips = sum(
        (r["pre_activation_nearest_zero"]["ours"] > 0) != (r["pre_activation_nearest_zero"]["float64"] > 0)
        for r in rows
    )
    print(f"summed input error of g, ours over PyTorch's: {ratio:.2f}; draws where ours flips that ReLU: {flips}")
    write_record(
        args.out,
        arch=args.arch,
        shape=shape,
        block=args.block,
        seed=args.seed,
        g_error_ratio=ratio,
        ours_flips=flips,
        draws=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
