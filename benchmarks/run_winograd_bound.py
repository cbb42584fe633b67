"""What a faster 1x3x3 convolution than oneDNN's direct one could give, and what it costs in accuracy: Winograd.

The fast LGD-3D R50 spends most of its CPU inference in oneDNN's convolutions (``lgd-fast bench``: the convs
alone are within ~15% of its time), so beating the frozen inductor graph by 1.2x needs convolutions faster than
the ones both run. The standard way to do fewer multiplications in a 3x3 conv is Winograd's minimal filtering,
F(m x m, 3 x 3): each m x m output tile from an (m+2) x (m+2) input tile, the channel sums as (m+2)^2 independent
GEMMs in the transformed domain, 9 m^2 / (m+2)^2 times fewer multiplications (2.25x for m = 2, 4x for m = 4).

For each stride-1 1x3x3 conv shape of R50 at batch 4, 16x112x112 (the 3x3 part of P3D's spatial convs; frames
(N*T, C, H, W)), this measures:

- the direct conv: oneDNN's primitive with the weight packed once, ReLU post-op, channels-last (as the fast model
  and the frozen graph run it), median time;
- the Winograd-domain GEMMs alone for m = 2 and m = 4 (``torch.bmm`` into a preallocated output, the transforms
  left out: a lower bound on any Winograd implementation's time built on this BLAS), median time;
- accuracy against a float64 reference conv, as relative error (norm) and largest error over the largest output:
  the direct float32 conv's, and Winograd's computed in float32 (transforms, products and sums), on fresh random
  data (weights scaled like a trained conv's, 1 / sqrt(fan-in)).

STYLE.md's parity rule lets a fast kernel have at most 2x plain PyTorch's error at the same dtype. So m = 4 pays
for its 4x with the error measured here, and m = 2 must win its 2.25x back from transforms that move 4x the
input's bytes.

    PYTHONPATH=. python benchmarks/run_winograd_bound.py --out benchmarks/results/winograd_bound_cpu.json
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import machine_info, write_json  # noqa: E402

# (N*T, C, H): R50's stride-1 1x3x3 convs at batch 4, 16x112x112 (4 frames after the stem), C in = C out
SHAPES = ((16, 64, 28), (16, 128, 14), (16, 256, 7), (16, 512, 4))


def _matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T, G, A^T) of F(m, 3) with the usual points (0, +-1, +-2, infinity for m = 4; 0, +-1, infinity for
    m = 2), float64."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]  # fmt: skip
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
             [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]  # fmt: skip
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"F({m}, 3) is not tabulated here")
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (bt, g, at))


def winograd_conv(x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """3x3 conv, stride 1, padding 1, of x (B, C, H, W) by w (K, C, 3, 3) as Winograd F(m, 3), everything in x's
    dtype: input tiles transformed (B^T d B), filters (G g G^T), channel sums per transformed position, output
    tiles back (A^T M A)."""
    bt, g, at = (t.to(x.dtype) for t in _matrices(m))
    a = m + 2
    batch, _, height, width = x.shape
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    padded = F.pad(x, (1, tiles_w * m + 1 - width, 1, tiles_h * m + 1 - height))
    d = padded.unfold(2, a, m).unfold(3, a, m)  # (B, C, tiles_h, tiles_w, a, a)
    v = torch.einsum("ij,bcyxjk,lk->bcyxil", bt, d, bt)
    u = torch.einsum("ij,ocjk,lk->ocil", g, w.to(x.dtype), g)
    prod = torch.einsum("bcyxil,ocil->boyxil", v, u)
    y = torch.einsum("ij,boyxjk,lk->boyxil", at, prod, at)  # (B, K, tiles_h, tiles_w, m, m)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(batch, w.shape[0], tiles_h * m, tiles_w * m)
    return y[:, :, :height, :width]


def _errors(y: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    y = y.double()
    return {
        "relative": ((y - exact).norm() / exact.norm()).item(),
        "max_over_max": ((y - exact).abs().max() / exact.abs().max()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for frames, channels, size in SHAPES:
        x = torch.randn(frames, channels, size, size, generator=gen)
        w = torch.randn(channels, channels, 3, 3, generator=gen) / (3 * channels**0.5)
        bias = 0.1 * torch.randn(channels, generator=gen)
        # accuracy: 4 of the frames (the float64 einsums of the m = 4 transform are the slow part)
        exact = F.conv2d(x[:4].double(), w.double(), padding=1)
        accuracy = {"direct": _errors(F.conv2d(x[:4], w, padding=1), exact)}
        for m in (2, 4):
            accuracy[f"winograd_f{m}"] = _errors(winograd_conv(x[:4], w, m), exact)
        # time: the direct conv as the fast model runs it, against the Winograd GEMMs alone
        xc = x.contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(xc.shape))

        def conv(xc=xc, packed=packed, bias=bias):
            return torch.ops.mkldnn._convolution_pointwise(xc, packed, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")

        direct = h.median_ms(conv, args.calls)
        flops = 2 * frames * size * size * channels * channels * 9
        timing = {"direct_ms": direct, "direct_gflops": flops / direct / 1e6}
        for m in (2, 4):
            a, tiles = m + 2, frames * (-(-size // m)) ** 2
            v = torch.randn(a * a, tiles, channels, generator=gen)
            u = torch.randn(a * a, channels, channels, generator=gen)
            out = torch.empty(a * a, tiles, channels)
            gemm = h.median_ms(lambda v=v, u=u, out=out: torch.bmm(v, u, out=out), args.calls)
            timing[f"winograd_f{m}_gemm_ms"] = gemm
            timing[f"winograd_f{m}_gemm_gflops"] = 2 * a * a * tiles * channels * channels / gemm / 1e6
            timing[f"direct_over_winograd_f{m}_gemm"] = direct / gemm
        row = {"frames": frames, "channels": channels, "size": size, "accuracy": accuracy, "timing": timing}
        rows.append(row)
        ratios = {k: v["relative"] / accuracy["direct"]["relative"] for k, v in accuracy.items() if k != "direct"}
        print(
            f"{frames}x{channels}x{size}x{size}: direct {direct:.2f} ms ({timing['direct_gflops']:.0f} GFLOP/s); "
            f"GEMMs alone F(2,3) {timing['winograd_f2_gemm_ms']:.2f} ms, F(4,3) {timing['winograd_f4_gemm_ms']:.2f}"
            f" ms; error vs direct fp32: F(2,3) {ratios['winograd_f2']:.1f}x, F(4,3) {ratios['winograd_f4']:.1f}x"
        )
    payload = {"benchmark": "winograd_bound", "machine": machine_info(torch.device("cpu")), "seed": args.seed,
               "calls": args.calls, "rows": rows}  # fmt: skip
    if args.out:
        print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
