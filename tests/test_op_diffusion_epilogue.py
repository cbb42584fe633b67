"""lgd_fast.ops.diffusion_epilogue: the cpp backend against the plain PyTorch reference, and the op's contract.

Fresh random inputs every run (seed printed on failure; LGD_FAST_TEST_SEED replays one). Parity tests run
poisoned (torch's deterministic mode fills every fresh allocation with NaN), so an output element or
gradient the kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from lgd_fast.ops import _backend, diffusion_epilogue, diffusion_epilogue_reference
from op_testing import SEED, assert_layout, diffusion_inputs, preactivation_terms, random_input, usable_isas

CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}
# (N, C, T, H, W): odd T, H, W and channel counts, batch 1 and 3, then one shape with rows longer than
# the kernel's float32 stretch (1024) and channels_last position chunks (256).
SHAPES = [(1, 3, 1, 7, 7), (3, 65, 7, 9, 9), (1, 65, 1, 9, 9), (3, 3, 7, 7, 7), (2, 17, 5, 15, 15)]
ISAS = usable_isas()  # every SIMD path of the kernel this CPU runs (AVX-512, AVX2, baseline SSE2)


def _inputs(shape, dtype, fmt, gen):
    """r, s, d, scale, shift, no ReLU input within rounding of zero (``op_testing.diffusion_inputs``)."""
    return diffusion_inputs(shape, dtype, FORMATS[fmt], gen)


def _upstream(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape[:2], generator=gen).to(dtype)


def _run(fn, inputs, gout, gmean):
    out, mean = fn(*inputs)
    grads = torch.autograd.grad((out * gout.to(out.dtype)).sum() + (mean * gmean.to(mean.dtype)).sum(), inputs)
    return [out, mean, *grads]


def _composite_eager(r, s, d, scale, shift):
    """What a user writes in plain PyTorch at r's dtype (bf16 throughout for bf16 inputs): the yardstick."""
    dt = r.dtype
    out = torch.relu(
        r * scale.to(dt)[:, None, None, None] + shift.to(dt)[:, None, None, None] + s + d.to(dt)[:, :, None, None, None]
    )
    return out, out.mean(dim=(2, 3, 4))


NAMES = ["out", "mean", "grad_r", "grad_s", "grad_d", "grad_scale", "grad_shift"]


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_reference(shape, fmt, isa, gen, poisoned):
    inputs = _inputs(shape, torch.float32, fmt, gen)
    gout, gmean = _upstream(shape, torch.float32, gen)
    ours = _run(lambda *a: diffusion_epilogue(*a, backend="cpp"), inputs, gout, gmean)
    ref = _run(diffusion_epilogue_reference, [t.detach().double().requires_grad_() for t in inputs], gout, gmean)
    scales = _sum_magnitudes(inputs, gout, gmean)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements (seed {SEED})"
        assert a.shape == b.shape and a.dtype == torch.float32, name
        err = _rel(a, b) if name not in scales else ((a.double() - b).norm() / scales[name].norm()).item()
        assert err < 2e-6, f"{name}: relative error {err:.2e} (seed {SEED})"
    for t in (ours[0], ours[2], ours[3]):
        assert_layout(t, FORMATS[fmt])


def _sum_magnitudes(inputs, gout, gmean) -> dict[str, torch.Tensor]:
    """For the gradients that are sums over positions of terms of both signs (grad_d, grad_shift: of g; grad_scale: of
    g * r, with g the gradient at the ReLU's input), the float64 sums of the terms' magnitudes: their float32 error
    is judged against these, as summation's error bound is, not against the sums themselves, which cancel. (Against
    the sums a 2e-6 threshold failed PyTorch's own float32 too, 4.3e-6 on a grad_shift of 0.39 over 1029 terms of
    size about 1, and the kernel at 2.1e-6 on grad_scale, seed 3939768605.)"""
    z = sum(preactivation_terms(*inputs))
    r = inputs[0].detach().double()
    positions = z[0, 0].numel()
    g = (gout.double() + gmean.double()[:, :, None, None, None] / positions) * (z > 0)
    return {"grad_d": g.abs().sum((2, 3, 4)), "grad_shift": g.abs().sum((0, 2, 3, 4)),
            "grad_scale": (g * r).abs().sum((0, 2, 3, 4))}  # fmt: skip


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_within_twice_pytorch_error(shape, fmt, isa, gen, poisoned):
    """Error against fp64 on the same bf16 values is at most 2x that of the plain bf16 PyTorch composite."""
    inputs = _inputs(shape, torch.bfloat16, fmt, gen)
    gout, gmean = _upstream(shape, torch.bfloat16, gen)
    ours = _run(lambda *a: diffusion_epilogue(*a, backend="cpp"), inputs, gout, gmean)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    torch_bf16 = _run(_composite_eager, fresh, gout, gmean)
    ref = _run(diffusion_epilogue_reference, [t.detach().double().requires_grad_() for t in inputs], gout, gmean)
    for name, a, t, b in zip(NAMES, ours, torch_bf16, ref, strict=True):
        assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements (seed {SEED})"
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype}, PyTorch gives {t.dtype}"
        # Floor: one rounding of the result to its own dtype, which no implementation avoids (2^-9 relative for
        # bf16, 2^-23 for float32). It matters only where the bf16 composite happens to round closer, as for
        # the (N, C) mean of a small shape: 3 values, one rounding each (seen: 1.5e-3 vs PyTorch's 7.1e-4).
        floor = 2.0**-9 if a.dtype == torch.bfloat16 else 2.0**-23
        assert _rel(a, b) <= 2 * _rel(t, b) + floor, (
            f"{name}: error {_rel(a, b):.2e} vs PyTorch bf16 {_rel(t, b):.2e} (seed {SEED})"
        )


@pytest.mark.parametrize("used", ["out", "mean"])
def test_gradients_when_only_one_output_is_used(used, gen, poisoned):
    """Autograd hands the op None for the unused output's gradient; the backward must treat it as zero."""
    inputs = _inputs((2, 5, 3, 7, 7), torch.float32, "contiguous", gen)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    pick = 0 if used == "out" else 1
    grads = torch.autograd.grad(diffusion_epilogue(*inputs, backend="cpp")[pick].sum(), inputs)
    ref_grads = torch.autograd.grad(diffusion_epilogue_reference(*ref_inputs)[pick].sum(), ref_inputs)
    for name, a, b in zip(NAMES[2:], grads, ref_grads, strict=True):
        assert torch.isfinite(a).all() and _rel(a, b) < 2e-6, name


def test_bitwise_reproducible_across_thread_counts(gen):
    threads = torch.get_num_threads()
    for fmt in FORMATS:
        inputs = _inputs((3, 65, 7, 9, 9), torch.float32, fmt, gen)
        gout, gmean = _upstream((3, 65, 7, 9, 9), torch.float32, gen)
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(_run(lambda *a: diffusion_epilogue(*a, backend="cpp"), inputs, gout, gmean))
        torch.set_num_threads(threads)
        for name, a, b in zip(NAMES, *results, strict=True):
            assert torch.equal(a, b), f"{name} differs between 1 and {max(2, threads)} threads"


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(fmt, dtype, gen):
    inputs = _inputs((2, 5, 3, 7, 7), dtype, fmt, gen)
    torch.library.opcheck(torch.ops.lgd_fast.diffusion_epilogue.default, inputs)


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("grad_fmt", FORMATS, ids=[f"grad-{f}" for f in FORMATS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_op_fake_gives_the_real_sizes_strides_and_dtypes(fmt, grad_fmt, dtype, gen):
    """The backward op's fake (what torch.compile plans with) against the real op: every output's size, stride
    and dtype, also with the upstream gradient in the other layout than r (autograd hands over either); and
    torch's opcheck of the registration."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    r, s, d, scale, shift = _inputs((2, 5, 3, 7, 7), dtype, fmt, gen)
    out, _ = diffusion_epilogue(r, s, d, scale, shift, backend="cpp")
    grad_out = random_input(tuple(r.shape), dtype, FORMATS[grad_fmt], gen)
    grad_mean = torch.randn(2, 5, generator=gen).to(dtype)
    args = [grad_out, grad_mean, out.detach(), r.detach(), scale.detach()]
    op = torch.ops.lgd_fast.diffusion_epilogue_backward.default
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) for a in args])
    assert len(real) == len(fake) == 5
    for name, a, b in zip(("grad_r", "grad_s", "grad_d", "grad_scale", "grad_shift"), real, fake, strict=True):
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype), name
    torch.library.opcheck(op, args)


def test_torch_compile_calls_the_op(gen):
    from torch._inductor.utils import run_and_get_code

    inputs = _inputs((2, 5, 3, 7, 7), torch.float32, "channels_last_3d", gen)
    compiled = torch.compile(lambda *a: diffusion_epilogue(*a), backend="inductor", fullgraph=True)
    (out, mean), code = run_and_get_code(compiled, *inputs)
    assert any("lgd_fast.diffusion_epilogue" in c for c in code), "the compiled graph did not call the op"
    ref_out, ref_mean = diffusion_epilogue_reference(*inputs)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(mean, ref_mean)
    (out * out).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: [a[0][0], *a[1:]], ValueError, "r must be 5-D"),
        (lambda a: [a[0], a[1][:, :, :1], *a[2:]], ValueError, "s has shape"),
        (lambda a: [a[0], a[1], a[2][:, :2], *a[3:]], ValueError, r"d must have shape \(N, C\)"),
        (lambda a: [*a[:3], a[3][:2], a[4]], ValueError, r"scale must have shape \(C,\)"),
        (lambda a: [*a[:4], a[4][None]], ValueError, r"shift must have shape \(C,\)"),
        (lambda a: [a[0].int(), *a[1:]], TypeError, "r must be a floating-point tensor"),
        (lambda a: [a[0], a[1].double(), *a[2:]], TypeError, "s has dtype torch.float64 but r has dtype"),
        (lambda a: [a[0], a[1], None, *a[3:]], TypeError, "d must be a tensor"),
        (lambda a: [a[0][:, :, :0], a[1][:, :, :0], *a[2:]], ValueError, r"r has T\*H\*W = 0 positions"),
        (lambda a: [a[0][..., :0], a[1][..., :0], *a[2:]], ValueError, r"r has T\*H\*W = 0 positions"),
    ],
)
def test_bad_inputs_are_named(change, error, match, gen):
    inputs = [t.detach() for t in _inputs((2, 5, 3, 7, 7), torch.float32, "contiguous", gen)]
    with pytest.raises(error, match=match):
        diffusion_epilogue(*change(inputs))


def test_kernel_rejects_what_it_cannot_run(gen):
    r, s, d, scale, shift = [t.detach() for t in _inputs((2, 5, 3, 7, 7), torch.float32, "contiguous", gen)]
    with pytest.raises(RuntimeError, match="s and r must share a memory format"):
        diffusion_epilogue(r, s.contiguous(memory_format=CL), d, scale, shift, backend="cpp")
    with pytest.raises(RuntimeError, match="r must be contiguous or channels_last_3d"):
        diffusion_epilogue(r.transpose(3, 4), s.transpose(3, 4), d, scale, shift, backend="cpp")
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        torch.ops.lgd_fast.diffusion_epilogue(r.double(), s.double(), d, scale, shift)


def test_auto_sends_unsupported_inputs_to_the_reference(gen, monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    r, s, d, scale, shift = [t.detach() for t in _inputs((2, 5, 3, 7, 7), torch.float32, "contiguous", gen)]
    mixed = diffusion_epilogue(r, s.contiguous(memory_format=CL), d, scale, shift)
    ref = diffusion_epilogue_reference(r, s, d, scale, shift)
    torch.testing.assert_close(mixed, ref)
    out64, _ = diffusion_epilogue(r.double(), s.double(), d, scale, shift)  # float64: reference
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("name,dtype", [("d", torch.float64), ("scale", torch.float16), ("scale", torch.float64),
                                        ("shift", torch.float64)])  # fmt: skip
def test_auto_sends_small_arguments_the_kernel_does_not_take_to_the_reference(name, dtype, gen, monkeypatch):
    """d, scale and shift may be any float dtype: auto takes the reference for those the cpp kernel refuses, and
    the cpp backend asked for by name says which."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    inputs = [t.detach() for t in _inputs((2, 5, 3, 7, 7), torch.float32, "contiguous", gen)]
    index = {"d": 2, "scale": 3, "shift": 4}[name]
    inputs[index] = inputs[index].to(dtype)
    out, mean = diffusion_epilogue(*inputs)
    ref_out, ref_mean = diffusion_epilogue_reference(*inputs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"{name} must be float32 or bfloat16"):
        diffusion_epilogue(*inputs, backend="cpp")


def test_env_var_selects_the_reference(gen, monkeypatch):
    calls = []
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    monkeypatch.setattr(
        torch.ops.lgd_fast, "diffusion_epilogue", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError)
    )
    inputs = [t.detach() for t in _inputs((1, 3, 2, 7, 7), torch.float32, "contiguous", gen)]
    diffusion_epilogue(*inputs)
    assert not calls
