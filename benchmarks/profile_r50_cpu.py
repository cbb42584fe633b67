"""Where LGD-3D R50's time goes on the CPU: torch.profiler over the very calls ``lgd-fast bench`` times.

Batch 4, 16x112x112, fp32; the channels-last reference and the fast model, built as the bench builds them
(``lgd_fast.bench._models``: the same trained-like weights) and called as it calls them (``pass_call``: inference
under ``torch.inference_mode``; a training step of forward, cross-entropy of both heads, backward and SGD with
momentum). Op self times per call, averaged over ``--steps`` profiled calls after three warm-up calls. The share
of time in convolutions (forward ``aten::mkldnn_convolution`` / ``mkldnn::_convolution_pointwise`` /
``lgd_fast::p3d_conv_onednn`` / ``lgd_fast::conv_bn_folded``, backward ``aten::convolution_backward``) bounds what
fusing everything else can gain: with a share c, removing all other work is at most 1 / c faster.

    python benchmarks/profile_r50_cpu.py    # about two minutes; writes benchmarks/results/r50_profile_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import _models, pass_call, write_json  # noqa: E402

CONV_OPS = (
    "aten::mkldnn_convolution",
    "mkldnn::_convolution_pointwise",
    "aten::convolution_backward",
    "lgd_fast::p3d_conv_onednn",
    "lgd_fast::conv_bn_folded",
    "lgd_fast::conv3d_onednn",
)
CANDIDATES = ("reference_channels_last", "fast")
SHAPE = (4, 3, 16, 112, 112)


def profile(call, steps: int) -> dict:
    for _ in range(3):  # warm-up: the fast model's plan, recorded program and arena settle here
        call()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / 1e3 / steps
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "total_ms": total,
        "convolution_ms": conv,
        "outside_convolutions_ms": total - conv,
        "convolution_share": conv / total,
        "bound_if_all_else_were_free": total / conv if conv else None,
        "top_ops": {e.key: {"ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps} for e in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="profiled calls per candidate and pass (default 3)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(SHAPE, generator=gen) for _ in range(2)]  # not zeros
    labels = torch.randint(0, 400, (SHAPE[0],), generator=gen)
    models = _models("lgd3d_r50", 400, torch.device("cpu"), CANDIDATES, None)
    off = torch.autocast("cpu", enabled=False)
    rows = {}
    for name, (module, runner, layout) in models.items():
        inputs = [c.contiguous(memory_format=layout) for c in clips]
        for pass_ in ("inference", "training"):
            r = rows[f"{name} {pass_}"] = profile(pass_call(pass_, module, runner, inputs, labels, off), args.steps)
            print(f"{name:24s} {pass_:9s} {r['total_ms']:7.1f} ms of op time, convolutions {r['convolution_ms']:6.1f}"
                  f" ({r['convolution_share']:.0%}), the rest {r['outside_convolutions_ms']:6.1f}")  # fmt: skip
    payload = {"benchmark": "r50_profile_cpu", "command": "python benchmarks/profile_r50_cpu.py", "machine":
               h.machine_info(), "shape": list(SHAPE), "steps": args.steps, "threads": torch.get_num_threads(),
               "notes": ["op self times per call (ms), torch.profiler; the calls lgd-fast bench times"],
               **rows}  # fmt: skip
    print("wrote", write_json(h.RESULTS_DIR / "r50_profile_cpu.json", payload))


if __name__ == "__main__":
    main()
