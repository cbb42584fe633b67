"""Helpers shared by the op parity tests (fixtures ``gen`` and ``poisoned`` live in conftest.py)."""

from __future__ import annotations

import os

import torch

# Fresh random inputs every run; the seed is printed on failure, and LGD_FAST_TEST_SEED replays one.
SEED = int(os.environ.get("LGD_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def random_input(shape, dtype, memory_format, gen, *, requires_grad=False) -> torch.Tensor:
    """Normal values around 1 (sums grow with T*H*W, cancellations stay possible), never zeros or constants."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + 1.0
    x = x.to(dtype=dtype).contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def usable_isas() -> list[str]:
    """The SIMD paths of the CPU kernels this CPU runs ("avx512", "avx2", "baseline"), widest first."""
    from lgd_fast import _C

    usable = []
    for name in ("avx512", "avx2", "baseline"):
        try:
            _C._set_cpu_isa(name)
            usable.append(name)
        except RuntimeError:  # the CPU lacks it
            pass
    _C._set_cpu_isa("auto")
    return usable


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def assert_layout(t: torch.Tensor, memory_format) -> None:
    assert t.is_contiguous(memory_format=memory_format), f"stride {t.stride()} is not {memory_format}"
