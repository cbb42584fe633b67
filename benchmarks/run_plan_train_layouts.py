"""Where the default plan runs an LGD block's own modules in training (input frames under 14x14): channels_last_3d
against contiguous, per block, over block widths. Each model is a fast LGD-3D under the deterministic default plan
with trained-like weights; one training forward gives every block its input (x, g). For every block whose input
frames are under ``lgd_fast.plan.CPU_FUSED_MIN_PIXELS``, the block's forward and backward (``run_block`` with its
own modules, in each layout; x a leaf needing its gradient, as in a model, given in that layout, as a run of such
blocks hands it on; random upstream gradients) are timed side by side, interleaved, medians of ``--rounds``. The
rule ``lgd_fast.plan.CPU_TRAIN_CL_MAX_CHANNELS`` reads this file.

    PYTHONPATH=. python benchmarks/run_plan_train_layouts.py --out benchmarks/results/plan_train_small_frames_cpu.json
"""

import argparse
import json
import statistics

import torch

from lgd_fast import bench
from lgd_fast import plan as planning
from lgd_fast.bench import git_commit, machine_info
from lgd_fast.models import create_model, to_fast
from lgd_fast.models.fast import run_block
from lgd_fast.models.registry import lgd3d_tiny

# (label, the reference model, batch, H = W of the 16-frame clips[, bfloat16 autocast]): widths from lgd3d_tiny's to
# R18's, frames from 12x12 to 2x2, basic and bottleneck blocks, LGD-2D's frame blocks, float32 and bf16 autocast
CONFIGS = (
    ("lgd3d_tiny", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads"), 16, 32),
    ("lgd3d_tiny, 48 px", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads"), 16, 48),
    ("lgd3d_tiny, bf16 autocast", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads"), 16, 32, True),
    ("tiny, widths x2", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads", widths=(32, 64, 128, 256),
                                           stem_width=32), 16, 32),  # fmt: skip
    ("tiny, widths x4", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads", widths=(64, 128, 256, 512),
                                           stem_width=64), 8, 32),  # fmt: skip
    ("tiny, width 128", lambda: lgd3d_tiny(num_classes=10, classifier="two_heads", widths=(128,) * 4,
                                           stem_width=128), 4, 56),  # fmt: skip
    ("lgd3d_r18", lambda: create_model("lgd3d_r18", 10, classifier="two_heads"), 4, 112),
    ("lgd3d_r50, 32 px", lambda: create_model("lgd3d_r50", 10, classifier="two_heads"), 4, 32),
    ("lgd2d_r18, 32 px", lambda: create_model("lgd2d_r18", 10, classifier="two_heads"), 4, 32),
)
LAYOUTS = (planning.CL, planning.CONTIGUOUS)
FORMATS = {planning.CL: torch.channels_last_3d, planning.CONTIGUOUS: torch.contiguous_format}


def block_inputs(model, clip: torch.Tensor) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, block, x, g) of every block, from one training forward of ``clip`` (detached copies)."""
    seen = []
    original = run_block

    def recording(block, choice, x, g, x_mean):
        seen.append((block, x.detach().clone(), g.detach().clone()))
        return original(block, choice, x, g, x_mean)

    from lgd_fast.models import fast

    fast.run_block = recording
    try:
        model(clip)
    finally:
        fast.run_block = original
    names = {m: n for n, m in model.named_modules()}
    return [(names[b], b, x, g) for b, x, g in seen]


def time_block(block, x: torch.Tensor, g: torch.Tensor, rounds: int, gen: torch.Generator,
               autocast: bool) -> dict[str, float]:  # fmt: skip
    """Median ms of the block's forward + backward on its own modules, per layout."""
    calls = {}
    for layout in LAYOUTS:
        choice = planning.Choice(False, False, layout, "modules", "timed")
        leaf = x.contiguous(memory_format=FORMATS[layout]).requires_grad_()
        g_leaf = g.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, g_out, _ = run_block(block, choice, leaf, g_leaf, None)
        upstream = (torch.randn(out.shape, generator=gen).to(out.dtype).contiguous(memory_format=FORMATS[layout]),
                    torch.randn(g_out.shape, generator=gen).to(g_out.dtype))  # fmt: skip

        def call(leaf=leaf, g_leaf=g_leaf, choice=choice, upstream=upstream):
            leaf.grad = g_leaf.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, g_out, _ = run_block(block, choice, leaf, g_leaf, None)
            torch.autograd.backward((out, g_out), upstream)

        calls[layout] = call
    times, _ = bench.time_interleaved(calls, repeats=rounds, warmup=3)
    return {layout: 1e3 * statistics.median(t) for layout, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, make, batch, size, *bf16 in CONFIGS:
        autocast = bool(bf16 and bf16[0])
        torch.manual_seed(0)
        model = to_fast(bench.trained_like(make()), plan="default").train()
        clip = torch.randn(batch, 3, 16, size, size, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inputs = block_inputs(model, clip)
        for name, block, x, g in inputs:
            frames = tuple(x.shape[-2:])
            if frames[0] * frames[1] >= planning.CPU_FUSED_MIN_PIXELS:
                continue
            ms = time_block(block, x, g, args.rounds, gen, autocast)
            narrow = x.shape[1] <= planning.CPU_TRAIN_CL_MAX_CHANNELS
            row = {"model": label, "block": name, "input": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
                   "bf16_autocast": autocast, "in_channels": x.shape[1],
                   "frames": list(frames), "ms": ms,
                   "contiguous_over_channels_last": ms[planning.CONTIGUOUS] / ms[planning.CL],
                   "rule": planning.CL if narrow else planning.CONTIGUOUS}  # fmt: skip
            rows.append(row)
            print(f"{label:16s} {name:10s} {tuple(x.shape)}: channels_last_3d {ms[planning.CL]:7.2f} ms, contiguous "
                  f"{ms['contiguous']:7.2f} ms ({row['contiguous_over_channels_last']:.2f}x); rule: {row['rule']}",
                  flush=True)  # fmt: skip
    payload = {
        "benchmark": "plan_train_small_frames",
        "command": "python benchmarks/run_plan_train_layouts.py" + (f" --rounds {args.rounds}" if args.rounds != 20
                                                                     else ""),  # fmt: skip
        "what": "training forward + backward of one LGD block on its own modules, per input layout (median ms)",
        "rule_max_channels_last_in_channels": planning.CPU_TRAIN_CL_MAX_CHANNELS,
        "rounds": args.rounds,
        "blocks": rows,
        "machine": machine_info(torch.device("cpu")),
        "commit": git_commit(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
