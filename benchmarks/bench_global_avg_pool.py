"""pytest-benchmark suite: global_avg_pool's cpp op vs the eager reference vs torch.compile of the reference.

LGD-3D R50 res2 shape (8, 256, 8, 28, 28), fp32 and bf16, contiguous and channels_last_3d, forward and
forward+backward; inputs rotate through enough random sets to exceed the last-level cache.

    python -m pytest benchmarks/bench_global_avg_pool.py --benchmark-enable --benchmark-group-by=group

pyproject's addopts pass --benchmark-disable, so without --benchmark-enable every case runs once (a smoke
test). For one run with ratios, the copy-bandwidth roofline, JSON and a plot, use run_global_avg_pool.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _harness import input_set_count

from lgd_fast.ops import extension_available, extension_error, global_avg_pool, global_avg_pool_reference

SHAPE = (8, 256, 8, 28, 28)
CASES = {
    "fp32-contiguous": (torch.float32, torch.contiguous_format),
    "fp32-channels_last_3d": (torch.float32, torch.channels_last_3d),
    "bf16-contiguous": (torch.bfloat16, torch.contiguous_format),
    "bf16-channels_last_3d": (torch.bfloat16, torch.channels_last_3d),
}
IMPLS = ("cpp", "reference", "compiled")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, input sets): x alone for the forward, (x requiring grad, upstream grad) for forward+backward."""
    dtype, memory_format = CASES[request.param]
    nbytes = torch.Size(SHAPE).numel() * torch.empty((), dtype=dtype).element_size()
    xs = [torch.randn(SHAPE).to(dtype=dtype, memory_format=memory_format) for _ in range(input_set_count(nbytes))]
    grads = [(x.detach().clone().requires_grad_(True), torch.randn(SHAPE[:2]).to(dtype)) for x in xs]
    return request.param, xs, grads


@pytest.fixture(scope="module")
def compiled_reference():
    torch._dynamo.reset()
    return torch.compile(global_avg_pool_reference, backend="inductor", dynamic=False)


def _impl(name: str, compiled_reference):
    if name == "cpp":
        if not extension_available():
            pytest.fail(f"lgd_fast._C not built: {extension_error()}")
        return lambda x: global_avg_pool(x, backend="cpp")
    return global_avg_pool_reference if name == "reference" else compiled_reference


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, case, impl, compiled_reference):
    name, xs, _ = case
    fn = _impl(impl, compiled_reference)
    rotation = itertools.cycle(xs)
    fn(xs[0])  # compile / warm up outside the timing
    benchmark.group = f"forward {name}"
    benchmark.pedantic(lambda: fn(next(rotation)), rounds=40, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, case, impl, compiled_reference):
    name, _, grads = case
    fn = _impl(impl, compiled_reference)
    rotation = itertools.cycle(grads)

    def step():
        x, g = next(rotation)
        return torch.autograd.grad(fn(x), x, g)

    step()
    benchmark.group = f"forward+backward {name}"
    benchmark.pedantic(step, rounds=40, warmup_rounds=3, iterations=1)
