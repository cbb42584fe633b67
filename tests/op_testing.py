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


def near_zero(terms: list[torch.Tensor], dtype: torch.dtype, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(where, margin): the positions whose ReLU input, the float64 sum of ``terms``, lies within ``margin`` of zero,
    16 roundings of ``dtype`` of the terms' magnitude (plus ``floor``). There rounding decides the side of zero,
    and the gradient through the position differs from float64's by its whole upstream value: the tests move such
    inputs away by a few margins."""
    margin = 16 * torch.finfo(dtype).eps * sum(t.abs() for t in terms) + floor
    return sum(terms).abs() <= margin, margin


def diffusion_inputs(shape, dtype, memory_format, gen) -> list[torch.Tensor]:
    """diffusion_epilogue's inputs r, s, d, scale, shift (leaves): r, s around 0 so that ReLU cuts about half of
    the elements; d, scale, shift in float32.

    No ReLU input lies within rounding of zero: where the float64 pre-activation is within 16 roundings of ``dtype``
    of its terms' size, s moves it well away (upwards). Such an element's side of zero is decided by rounding, in
    PyTorch's float32 as in the kernel (seen: 1.06e-8 in float64, 0.0 in both), and its gradient then differs
    from float64's by the whole upstream value: a kink the comparison with float64 cannot judge, not an error
    (1 element of 5265 gave grad_r a 6.4e-3 relative error, seed 2103389020)."""
    n, c = shape[:2]
    r = random_input(shape, dtype, memory_format, gen) - 1.0
    s = random_input(shape, dtype, memory_format, gen) - 1.0
    d = 0.5 * torch.randn(n, c, generator=gen)
    scale = 0.5 + torch.rand(c, generator=gen)
    shift = 0.2 * torch.randn(c, generator=gen)
    near, margin = near_zero(preactivation_terms(r, s, d, scale, shift), dtype)
    s = torch.where(near, s.double() + 64 * margin, s.double()).to(dtype)
    s = s.contiguous(memory_format=memory_format)
    return [t.detach().requires_grad_(True) for t in (r, s, d, scale, shift)]


def preactivation_terms(r, s, d, scale, shift) -> list[torch.Tensor]:
    """The ReLU input's four terms in float64, broadcast: r * scale, shift, s, d."""
    r, s, d, scale, shift = (t.detach().double() for t in (r, s, d, scale, shift))
    return [r * scale[:, None, None, None], shift[:, None, None, None], s, d[:, :, None, None, None]]


def on_thread_counts(fn, counts=(1, 2)) -> list:
    """``fn()`` run under each of ``counts`` torch threads (the thread count restored after): for the tests that a
    kernel's result does not depend on how its work is split."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)
