"""pytest-benchmark suite: diffusion_epilogue's cpp op vs the eager composite vs torch.compile of it.

The brief's shape (8, 256, 8, 28, 28) (LGD-3D R50 res2), fp32 and bf16, contiguous and channels_last_3d,
forward and forward+backward; inputs rotate through enough random sets to exceed the last-level cache.

    python -m pytest benchmarks/bench_diffusion_epilogue.py --benchmark-enable --benchmark-group-by=group

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test. For one run with
ratios, the copy-bandwidth roofline, target checks, JSON and a plot, use run_diffusion_epilogue.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _harness import input_set_count
from run_diffusion_epilogue import SHAPES, bytes_moved, make_inputs

from lgd_fast.ops import diffusion_epilogue, diffusion_epilogue_reference, extension_available, extension_error

SHAPE = SHAPES["res2"]
CASES = {
    f"{dt}-{fmt}": (dtype, memory_format)
    for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    for fmt, memory_format in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d))
}
IMPLS = ("cpp", "reference", "compiled")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, forward input sets, forward+backward input sets)."""
    dtype, memory_format = CASES[request.param]
    count = input_set_count(2 * bytes_moved(SHAPE, dtype, "forward") // 3)
    forward = make_inputs(SHAPE, dtype, memory_format, "forward", count)
    backward = make_inputs(SHAPE, dtype, memory_format, "forward+backward", count)
    return request.param, forward, backward


@pytest.fixture(scope="module")
def compiled_reference():
    torch._dynamo.reset()
    return torch.compile(diffusion_epilogue_reference, backend="inductor", dynamic=False)


def _impl(name: str, compiled_reference):
    if name == "cpp":
        if not extension_available():
            pytest.fail(f"lgd_fast._C not built: {extension_error()}")
        return lambda *a: diffusion_epilogue(*a, backend="cpp")
    return diffusion_epilogue_reference if name == "reference" else compiled_reference


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, case, impl, compiled_reference):
    name, sets, _ = case
    fn = _impl(impl, compiled_reference)
    rotation = itertools.cycle(sets)
    fn(*sets[0])  # compile / warm up outside the timing
    benchmark.group = f"forward {name}"
    benchmark.pedantic(lambda: fn(*next(rotation)), rounds=30, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, case, impl, compiled_reference):
    name, _, sets = case
    fn = _impl(impl, compiled_reference)
    rotation = itertools.cycle(sets)

    def step():
        args, upstream = next(rotation)
        return torch.autograd.grad(fn(*args), args, upstream)

    step()
    benchmark.group = f"forward+backward {name}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=3, iterations=1)
