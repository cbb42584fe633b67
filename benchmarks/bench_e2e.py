"""pytest-benchmark suite, end to end: LGD-3D R50 (batch 4, 16x112x112, fp32) inference and a training step, for the
reference (eager, channels-last, torch.compile, torch.compile with freezing), the fast model (eager and compiled), and
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
from lgd_fast import bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from foreign_models import r2plus1d  # noqa: E402

SHAPE = (4, 3, 16, 112, 112)
# lgd_fast.bench's candidates (the reference eager, channels-last, compiled, compiled with freezing; the fast model
# eager and compiled); freezing is for inference only.
CANDIDATES = ("reference", "reference_channels_last", "reference_compiled", "reference_compiled_freezing", "fast",
              "fast_compiled")  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {name: (module, runner, layout) for name, (module, runner, layout)
            in bench._models("lgd3d_r50", 400, torch.device("cpu"), CANDIDATES, None).items()}  # fmt: skip


@pytest.fixture(scope="module")
def clips():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=gen), torch.randint(0, 400, (SHAPE[0],), generator=gen)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_r50_inference(benchmark, models, clips, candidate):
    benchmark.group = "LGD-3D R50 inference, 4x16x112x112 fp32"
    module, runner, layout = models[candidate]
    module.eval()
    x = clips[0].contiguous(memory_format=layout)

    def run():
        with torch.inference_mode():
            return runner(x)

    run()  # compile outside the timing
    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.parametrize("candidate", [c for c in CANDIDATES if c not in bench.FREEZING])
def test_r50_training_step(benchmark, models, clips, candidate):
    benchmark.group = "LGD-3D R50 training step, 4x16x112x112 fp32"
    module, runner, layout = models[candidate]
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)
    x = clips[0].contiguous(memory_format=layout)

    def step():
        local, global_ = runner(x)
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
