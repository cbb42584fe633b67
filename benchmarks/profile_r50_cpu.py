"""Where LGD-3D R50's time goes on the CPU: torch.profiler over inference and a training step, ops grouped.

Batch 4, 16x112x112, fp32, for the reference and the fast model. The share of time in convolutions (forward
``aten::mkldnn_convolution`` / ``mkldnn::_convolution_pointwise``, backward ``aten::convolution_backward``)
bounds what fusing everything else can gain: with a share c, removing all other work is at most 1 / c faster.

    python benchmarks/profile_r50_cpu.py    # about a minute; writes benchmarks/results/r50_profile_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import create_model  # noqa: E402
from lgd_fast.bench import write_json  # noqa: E402

CONV_OPS = ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "aten::convolution_backward")


def profile(model, x, train: bool) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def run():
        if not train:
            with torch.inference_mode():
                return model(x)
        opt.zero_grad(set_to_none=True)
        local, global_ = model(x)
        (local.logsumexp(1).mean() + global_.logsumexp(1).mean()).backward()
        opt.step()

    model.train(train)
    run(), run()
    with torch.profiler.profile() as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "total_ms": total / 1e3,
        "convolution_ms": conv / 1e3,
        "convolution_share": conv / total,
        "bound_if_all_else_were_free": total / conv,
        "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 for e in top},
    }


def main() -> None:
    x = torch.randn(4, 3, 16, 112, 112, generator=torch.Generator().manual_seed(0))
    ref = create_model("lgd3d_r50", 400, classifier="two_heads")
    fast = create_model("lgd3d_r50", 400, classifier="two_heads", fast=True)
    fast.load_state_dict(ref.state_dict())
    rows = {}
    for name, model in (("reference", ref), ("fast", fast)):
        for train in (False, True):
            key = f"{name} {'training step' if train else 'inference'}"
            rows[key] = profile(model, x, train)
            r = rows[key]
            print(f"{key:28s} {r['total_ms']:7.1f} ms, convolutions {r['convolution_share']:.0%} "
                  f"(all else free: at most x{r['bound_if_all_else_were_free']:.2f})")  # fmt: skip
    payload = {"benchmark": "r50_profile_cpu", "machine": h.machine_info(), "shape": [4, 3, 16, 112, 112], **rows}
    print("wrote", write_json(h.RESULTS_DIR / "r50_profile_cpu.json", payload))


if __name__ == "__main__":
    main()
