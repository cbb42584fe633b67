"""pytest-benchmark suite, end to end: LGD-3D R50 (batch 4, 16x112x112, fp32) inference and a training step, for the
reference, the reference under torch.compile, the fast model and the fast model under torch.compile, and
lgd_fast.convert on a torchvision-style R(2+1)D-18 (inference).

    python -m pytest benchmarks/bench_e2e.py --benchmark-enable --benchmark-group-by=group

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test (minutes on 2 cores: R50).
Latency percentiles, peak memory, target checks, JSON and a PNG: ``lgd-fast bench``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lgd_fast
from lgd_fast import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from foreign_models import r2plus1d  # noqa: E402

SHAPE = (4, 3, 16, 112, 112)
CANDIDATES = ("reference", "reference_compiled", "fast", "fast_compiled")


@pytest.fixture(scope="module")
def models():
    reference = create_model("lgd3d_r50", 400, classifier="two_heads")
    out = {}
    for name in CANDIDATES:
        model = create_model("lgd3d_r50", 400, classifier="two_heads", fast=name.startswith("fast"))
        model.load_state_dict(reference.state_dict())
        out[name] = (model, torch.compile(model) if name.endswith("_compiled") else model)
    return out


@pytest.fixture(scope="module")
def clips():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=gen), torch.randint(0, 400, (SHAPE[0],), generator=gen)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_r50_inference(benchmark, models, clips, candidate):
    benchmark.group = "LGD-3D R50 inference, 4x16x112x112 fp32"
    module, runner = models[candidate]
    module.eval()

    def run():
        with torch.inference_mode():
            return runner(clips[0])

    run()  # compile outside the timing
    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_r50_training_step(benchmark, models, clips, candidate):
    benchmark.group = "LGD-3D R50 training step, 4x16x112x112 fp32"
    module, runner = models[candidate]
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step():
        local, global_ = runner(clips[0])
        loss = F.cross_entropy(local, clips[1]) + F.cross_entropy(global_, clips[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("converted", [False, True], ids=["original", "converted"])
def test_r2plus1d_convert_inference(benchmark, converted):
    benchmark.group = "R(2+1)D-18 (torchvision-style) inference, 2x16x112x112 fp32"
    model = r2plus1d().eval()
    x = torch.randn(2, 3, 16, 112, 112, generator=torch.Generator().manual_seed(0))
    if converted:
        model = lgd_fast.convert(copy.deepcopy(model), inference=True)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def run():
        with torch.inference_mode():
            return model(x)

    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
