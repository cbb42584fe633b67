"""pytest-benchmark suite: p3d_conv (the CPU's onednn backend) vs the eager composite vs torch.compile of it.

LGD-3D R50 res2 shapes (batch 4, 64 channels, 4 x 28 x 28 frames: the 16x112x112 clip after the stem), the
spatial 1x3x3 and temporal 3x1x1 convs, fp32: inference with folded BatchNorm, ReLU and a residual addition
(``affine_residual_relu``), and forward+backward with the BatchNorm statistics (``stats``). Inputs rotate
through random sets; the fast op gets channels_last_3d (the layout the fast model runs res2 in), the
composite contiguous (the reference model's layout) and channels_last_3d.

    python -m pytest benchmarks/bench_p3d_conv.py --benchmark-enable --benchmark-group-by=group

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test. Per-unit and end-to-end
figures, with ratios, JSON and a plot: run_p3d_cpu.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lgd_fast.ops import p3d_conv, p3d_conv_reference

SHAPE = (4, 64, 4, 28, 28)
KINDS = {"spatial": (1, 3, 3), "temporal": (3, 1, 1)}
IMPLS = ("fast", "reference", "reference_cl3d", "compiled")
CL3D = torch.channels_last_3d


def _inputs(kind: str, grad: bool, count: int = 3):
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(count):
        x = torch.randn(SHAPE, generator=gen) + 0.5
        sets.append(
            {
                "x": x.requires_grad_(grad),
                "x_cl": x.detach().contiguous(memory_format=CL3D).requires_grad_(grad),
                "weight": (torch.randn(64, 64, *KINDS[kind], generator=gen) / 24).requires_grad_(grad),
                "scale": 0.5 + torch.rand(64, generator=gen),
                "shift": torch.randn(64, generator=gen),
                "residual": torch.randn(SHAPE, generator=gen),
                "upstream": torch.randn(SHAPE, generator=gen),
            }
        )
    return sets


@pytest.fixture(scope="module")
def compiled_reference():
    torch._dynamo.reset()
    return torch.compile(p3d_conv_reference, backend="inductor", dynamic=False)


def _call(impl, compiled_reference, s, epilogue):
    x = s["x_cl"] if impl in ("fast", "reference_cl3d") else s["x"]
    if epilogue == "stats":
        kwargs = dict(stats=True)
    else:
        residual = s["residual"].contiguous(memory_format=CL3D) if x is s["x_cl"] else s["residual"]
        kwargs = dict(scale=s["scale"], shift=s["shift"], residual=residual, relu=True)
    if impl == "fast":
        return p3d_conv(x, s["weight"], **kwargs)
    fn = compiled_reference if impl == "compiled" else p3d_conv_reference
    return fn(x, s["weight"], **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, kind, impl, compiled_reference):
    sets = _inputs(kind, grad=False)
    rotation = itertools.cycle(sets)
    with torch.inference_mode():
        _call(impl, compiled_reference, sets[0], "affine_residual_relu")
        benchmark.group = f"inference {kind} conv + BN + residual + ReLU"
        benchmark.pedantic(
            lambda: _call(impl, compiled_reference, next(rotation), "affine_residual_relu"),
            rounds=20,
            warmup_rounds=2,
            iterations=1,
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward_with_statistics(benchmark, kind, impl, compiled_reference):
    sets = _inputs(kind, grad=True)
    rotation = itertools.cycle(sets)

    def step():
        s = next(rotation)
        x = s["x_cl"] if impl in ("fast", "reference_cl3d") else s["x"]
        out, stats = _call(impl, compiled_reference, s, "stats")
        loss = (out * s["upstream"]).sum() + stats.sum()
        return torch.autograd.grad(loss, (x, s["weight"]))

    step()
    benchmark.group = f"forward+backward {kind} conv + BN statistics"
    benchmark.pedantic(step, rounds=10, warmup_rounds=1, iterations=1)
