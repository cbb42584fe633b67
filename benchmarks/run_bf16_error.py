"""The fast LGD-3D's bfloat16 inference error against PyTorch's, on a fresh model and on a trained-like one.

Under bf16 autocast, the fast model and the reference (contiguous, eager) each run on the same clip, and both are
compared with the float64 reference by relative error (norm) of the logits and of their input, the video mean of
the last local map. STYLE.md's rule: at most 2x plain PyTorch's error at the same dtype.

Two initialisations per seed: the model as ``create_model`` makes it ("fresh": every BatchNorm in eval the
identity up to 1 / sqrt(1 + eps), the diffusion fc6 zero) and :func:`lgd_fast.bench.trained_like` ("trained-like":
BatchNorm statistics and affine as a trained model has them, fc6 non-zero; the conv weights as initialised).

Why the two differ, measured at one block end (layer1.1, identity shortcut; the fast model's own call of its fused
epilogue): the epilogue computes ``v = r * scale + shift + s + d`` in float32 from bfloat16 ``r`` (the last conv)
and ``s`` (the shortcut) and rounds once to nearest even. With a fresh model's scale 0.999995, shift 0 and d 0,
``v`` sits a hair below or above ``r + s``, and ``r + s`` of two bfloat16 values is often an exact tie between two
bfloat16 values; the hair decides every such tie by the sign of ``r``, where an unfused ``bn(r) + s`` in bfloat16
rounds ``bn(r)`` back to ``r`` and the tie to even. Reported: the share of outputs whose ``v`` is within 1% of a
bfloat16 unit of a tie, and the signed bias of the epilogue's outputs against ``v`` in float64 (the mean error over
the mean magnitude), and the share of outputs equal to float64's value rounded to nearest even. Written to
benchmarks/results/bf16_error_cpu.json.

    PYTHONPATH=. python benchmarks/run_bf16_error.py --seeds 0,1,2
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
sys.path.insert(0, HERE)
import _harness as h  # noqa: E402

import lgd_fast.models.fast as fast_models  # noqa: E402
from lgd_fast import create_model  # noqa: E402
from lgd_fast.bench import trained_like  # noqa: E402
from lgd_fast.models.blocks import video_mean  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def epilogue_calls(model, x) -> list[tuple[torch.Tensor, ...]]:
    """The fast model's fused block-end calls in one bf16 autocast forward: (r, s, d, scale, shift, out)."""
    calls, real = [], fast_models.diffusion_epilogue

    def recording(r, s, d, scale, shift, **kwargs):
        out, mean = real(r, s, d, scale, shift, **kwargs)
        calls.append(tuple(t.detach().clone() for t in (r, s, d, scale, shift, out)))
        return out, mean

    fast_models.diffusion_epilogue = recording
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            model(x)
    finally:
        fast_models.diffusion_epilogue = real
    return calls


def tie_statistics(r, s, d, scale, shift, out) -> dict[str, float]:
    """Of one epilogue call: the share of outputs (positive ones: the ReLU keeps them) within 1% of a bfloat16
    unit of a tie, and the signed bias of the outputs against the float64 value they round."""
    per_channel = lambda t: t.double()[None, :, None, None, None]  # noqa: E731
    v = r.double() * per_channel(scale) + per_channel(shift) + s.double() + d.double()[:, :, None, None, None]
    kept = v > 0
    ulp = torch.exp2(torch.floor(torch.log2(v[kept])) - 7)  # bfloat16 keeps 8 significant bits
    fraction = torch.frac(v[kept] / ulp)
    near_tie = ((fraction - 0.5).abs() < 0.01).double().mean().item()
    want = torch.relu(v)
    bias = ((out.double() - want).mean() / want.abs().mean()).item()
    rounded = (out == want.float().to(torch.bfloat16)).double().mean().item()  # float64 -> float32 -> bf16, both RNE
    return {"outputs_near_a_tie": near_tie, "output_bias": bias, "relative_error": rel(out, want),
            "outputs_equal_to_round_to_nearest_even": rounded}  # fmt: skip


def run(arch: str, seed: int, init: str, shape) -> dict:
    torch.manual_seed(seed)
    reference = create_model(arch, 400, classifier="two_heads").eval()
    if init == "trained-like":
        trained_like(reference, seed)
    fast = create_model(arch, 400, classifier="two_heads", fast=True, plan="default").eval()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    exact_model = copy.deepcopy(reference).double()
    with torch.no_grad():
        local64, g64 = exact_model.forward_features(x.double())
        mean64, logits64 = video_mean(local64, shape[0]), exact_model.forward_head(local64, g64)
        with torch.autocast("cpu", torch.bfloat16):
            local, g = reference.forward_features(x)
            ref_mean, ref_logits = video_mean(local, shape[0]), reference.forward_head(local, g)
            _, _, fast_mean = fast.forward_features_and_mean(x)
            fast_logits = fast(x)
    row = {"arch": arch, "seed": seed, "init": init, "input": list(shape),
           "logits": {"reference": rel(ref_logits, logits64), "fast": rel(fast_logits, logits64)},
           "local_mean": {"reference": rel(ref_mean, mean64), "fast": rel(fast_mean, mean64)}}  # fmt: skip
    for k in ("logits", "local_mean"):
        row[k]["fast_over_reference"] = row[k]["fast"] / row[k]["reference"]
    row["block_end_layer1.1"] = tie_statistics(*epilogue_calls(fast, x)[1])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lgd3d_r50")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shape", default="2,3,16,112,112", help="N,C,T,H,W of the clip")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bf16_error_cpu.json"))
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    rows, start = [], time.perf_counter()
    for seed in map(int, args.seeds.split(",")):
        for init in ("fresh", "trained-like"):
            row = run(args.arch, seed, init, shape)
            rows.append(row)
            tie = row["block_end_layer1.1"]
            print(f"{args.arch} seed {seed} {init:12s}: logits error ref {row['logits']['reference']:.2e} "
                  f"fast {row['logits']['fast']:.2e} ({row['logits']['fast_over_reference']:.2f}x); local mean "
                  f"{row['local_mean']['fast_over_reference']:.2f}x; layer1.1 end: "
                  f"{100 * tie['outputs_near_a_tie']:.1f}% near a tie, bias {tie['output_bias']:+.1e}",
                  flush=True)  # fmt: skip
    record = {"benchmark": "bf16_error", "command": " ".join(["python"] + sys.argv), "machine": h.machine_info(),
              "seconds": time.perf_counter() - start, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
