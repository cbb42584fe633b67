"""lgd_fast.ops.batch_norm_train: the compiled training BatchNorm kernels against their plain PyTorch reference.

Fresh random inputs every run (seed printed on failure; LGD_FAST_TEST_SEED replays one), every SIMD path, both
layouts, odd shapes, float32 and bfloat16, poisoned (every fresh allocation NaN, so an unwritten element shows).
STYLE.md's rule: each output's error against float64 at most 2x that of the reference computed at the same dtype
(float32 statistics and arithmetic, as the kernels). The fused units that run these kernels are checked against
the modules in tests/test_p3d_units.py and tests/test_fused_training_numerics.py.
"""

from __future__ import annotations

import pytest
import torch

from lgd_fast.ops import batch_norm_train as bnt
from lgd_fast.ops.conv_bn import _normalize_train
from op_testing import assert_layout, near_zero, on_thread_counts, random_input, usable_isas

CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}
# odd channel counts and frames; one with rows longer than the contiguous stretch (256) and more positions than a
# channels_last statistics block; one with more channels than a vector register holds many times over
SHAPES = [(1, 3, 1, 7, 7), (3, 65, 7, 9, 9), (2, 17, 5, 15, 15), (2, 1031, 1, 3, 5)]
ISAS = usable_isas()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _case(shape, dtype, fmt, gen, shortcut: bool):
    """y around 2 (a mean well off zero), the float32 batch statistics of y as the model computes them, the
    affine, a shortcut (or None) and an upstream gradient. No pre-activation lies within rounding of zero (there
    the ReLU's side is decided by rounding, and the gradient differs from float64's by the upstream value: a
    kink, not an error): such elements of y are moved up, away from it."""
    c = shape[1]
    y = random_input(shape, torch.float64, FORMATS[fmt], gen) + 1.0
    s = random_input(shape, torch.float64, FORMATS[fmt], gen) - 1.0 if shortcut else None
    weight = 0.5 + torch.rand(c, generator=gen)
    bias = 0.2 * torch.randn(c, generator=gen)
    count = y.numel() // c
    mean = y.mean((0, 2, 3, 4))
    invstd = torch.rsqrt(y.var((0, 2, 3, 4), correction=0) + 1e-5)
    scale = (invstd * weight.double())[:, None, None, None]
    terms = [(y - mean[:, None, None, None]) * scale, bias.double()[:, None, None, None]] + ([s] if shortcut else [])
    near, margin = near_zero(terms, dtype, floor=1e-6)
    y = torch.where(near, y + 64 * margin / scale, y)
    y, s = (None if t is None else t.to(dtype).contiguous(memory_format=FORMATS[fmt]) for t in (y, s))
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=FORMATS[fmt])
    stats = bnt.channel_moments_reference(y.double())
    mean, var = (stats / count).float()
    return y, s, grad, mean, torch.rsqrt(var + 1e-5), weight, bias, count


def _outputs(ops, case, relu):
    """forward, the two backward sums, grad_y and grad_shortcut by ``ops`` (forward, sums, apply)."""
    y, s, grad, mean, invstd, weight, bias, count = case
    forward, sums, apply = ops
    out = forward(y, mean, invstd, weight, bias, s, relu)
    totals = sums(grad, y, mean, invstd, weight, bias, s, relu)
    mean_g, mean_gx = (totals / count).float()
    grad_y, grad_s = apply(grad, y, mean, invstd, weight, bias, s, relu, mean_g, mean_gx, s is not None)
    return {"out": out, "sums": totals, "grad_y": grad_y, "grad_shortcut": grad_s if s is not None else None}


KERNELS = (torch.ops.lgd_fast.bn_relu_forward, torch.ops.lgd_fast.bn_relu_backward_sums,
           torch.ops.lgd_fast.bn_relu_backward_apply)  # fmt: skip
REFERENCE = (bnt.bn_relu_forward_reference, bnt.bn_relu_backward_sums_reference, bnt.bn_relu_backward_apply_reference)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_within_twice_the_reference(shape, fmt, dtype, isa, gen, poisoned):
    for relu in (True, False):
        for shortcut in (True, False):
            case = _case(shape, dtype, fmt, gen, shortcut)
            ours = _outputs(KERNELS, case, relu)
            ref = _outputs(REFERENCE, case, relu)
            y, s, grad, mean, invstd, weight, bias, count = case
            exact = _outputs(REFERENCE, (y.double(), None if s is None else s.double(), grad.double(), mean.double(),
                                         invstd.double(), weight.double(), bias.double(), count), relu)  # fmt: skip
            for name, value in ours.items():
                if value is None:
                    continue
                assert value.dtype == ref[name].dtype and value.shape == ref[name].shape, name
                if name != "sums":
                    assert_layout(value, FORMATS[fmt])
                err, ref_err = _rel(value, exact[name]), _rel(ref[name], exact[name])
                limit = 2 * ref_err + (1e-6 if dtype == torch.float32 else 1e-3)
                assert err <= limit, (name, relu, shortcut, err, ref_err)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_moments_match_float64_and_differentiate_as_the_reference(shape, fmt, dtype, isa, gen, poisoned):
    z = (random_input(shape, torch.float64, FORMATS[fmt], gen) * 3 + 100.0).to(dtype)  # mean 33 spreads off zero
    exact = bnt.channel_moments_reference(z.double())
    ours, ref = torch.ops.lgd_fast.channel_moments(z), bnt.channel_moments_reference(z)
    assert ours.dtype == torch.float64 and ours.shape == (2, shape[1])
    for row in (0, 1):  # the sum, and M2 (which E[z^2] - E[z]^2 would lose to cancellation here)
        assert _rel(ours[row], exact[row]) <= 2 * _rel(ref[row], exact[row]) + 1e-6, row
    upstream = torch.randn(2, shape[1], generator=gen)
    zf = z.float().detach().requires_grad_()
    z64 = z.double().detach().requires_grad_()
    (got,) = torch.autograd.grad((bnt.channel_moments(zf) * upstream).sum(), zf)
    (plain,) = torch.autograd.grad((bnt.channel_moments_reference(zf) * upstream).sum(), zf)
    (want,) = torch.autograd.grad((bnt.channel_moments_reference(z64) * upstream.double()).sum(), z64)
    assert bnt.kernel_applies(zf) and _rel(got, want) <= 2 * _rel(plain, want) + 1e-7


def test_statistics_do_not_depend_on_the_thread_count(gen):
    """The stretches merge in an order fixed by the shape: one thread and two give the same bits."""
    for fmt in FORMATS.values():
        z = random_input((3, 70, 5, 11, 13), torch.float32, fmt, gen)
        one, two = on_thread_counts(lambda z=z: torch.ops.lgd_fast.channel_moments(z))
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_fake_kernels_give_the_real_sizes_and_strides(fmt, dtype, gen):
    y, s, grad, mean, invstd, weight, bias, count = _case((2, 9, 3, 5, 7), dtype, fmt, gen, True)
    mean_g, mean_gx = torch.randn(2, 9, generator=gen)
    calls = [
        (torch.ops.lgd_fast.channel_moments.default, (y,)),
        (torch.ops.lgd_fast.bn_relu_forward.default, (y, mean, invstd, weight, bias, s, True)),
        (torch.ops.lgd_fast.bn_relu_backward_sums.default, (grad, y, mean, invstd, weight, bias, s, True)),
        (torch.ops.lgd_fast.bn_relu_backward_apply.default,
         (grad, y, mean, invstd, weight, bias, s, True, mean_g, mean_gx, True)),
        (torch.ops.lgd_fast.bn_relu_backward_apply.default,
         (grad, y, mean, invstd, weight, bias, None, False, mean_g, mean_gx, False)),
    ]  # fmt: skip
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_are_errors_that_name_them(gen):
    y, s, grad, mean, invstd, weight, bias, count = _case((2, 5, 3, 4, 4), torch.float32, "channels_last_3d", gen, True)
    forward = torch.ops.lgd_fast.bn_relu_forward
    with pytest.raises(RuntimeError, match="y must be float32 or bfloat16, got Double"):
        forward(y.double(), mean, invstd, weight, bias, None, True)
    with pytest.raises(RuntimeError, match=r"mean must have shape \(5\)"):
        forward(y, mean[:4], invstd, weight, bias, None, True)
    with pytest.raises(RuntimeError, match="shortcut and y must share a memory format"):
        forward(y, mean, invstd, weight, bias, s.contiguous(), True)
    with pytest.raises(RuntimeError, match="shortcut has dtype BFloat16 but y has dtype Float"):
        forward(y, mean, invstd, weight, bias, s.bfloat16(), True)
    with pytest.raises(RuntimeError, match="must be 5-D"):
        torch.ops.lgd_fast.channel_moments(y[0])
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.lgd_fast.bn_relu_backward_sums(grad[:1], y, mean, invstd, weight, bias, s, True)


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_normalize_train_on_the_kernels_is_batchnorm_relu_plus_shortcut(fmt, gen):
    """conv_bn's training normalisation (statistics in, BatchNorm's forward and backward out) on the kernels
    against nn.BatchNorm3d + shortcut + ReLU in float64, forward and every gradient, and the running statistics."""
    shape = (2, 13, 3, 7, 9)
    y = random_input(shape, torch.float32, FORMATS[fmt], gen, requires_grad=True)
    s = random_input(shape, torch.float32, FORMATS[fmt], gen, requires_grad=True)
    norm = torch.nn.BatchNorm3d(13).train()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.normal_(0.0, 0.2, generator=gen)
        # No ReLU input within rounding of zero (as _case): there its side is rounding's choice, and the
        # gradient through it differs from float64's by the whole upstream value. Such positions' shortcut
        # moves up (the batch statistics of y stay as drawn).
        y64 = y.double()
        dims = (0, 2, 3, 4)
        scale = (torch.rsqrt(y64.var(dims, correction=0) + 1e-5) * norm.weight.double())[:, None, None, None]
        terms = [(y64 - y64.mean(dims, keepdim=True)) * scale, norm.bias.double()[:, None, None, None], s.double()]
        near, margin = near_zero(terms, torch.float32, floor=1e-6)
        s.add_(torch.where(near, 64 * margin, 0.0).float())
    twin = torch.nn.BatchNorm3d(13).double().train()
    twin.load_state_dict(norm.state_dict())
    upstream = torch.randn(shape, generator=gen)
    assert bnt.kernel_applies(y.detach(), s.detach())
    out = _normalize_train(norm, y, bnt.channel_moments(y.detach()), True, shortcut=s)
    y64, s64 = (t.detach().double().requires_grad_() for t in (y, s))
    want = torch.relu(twin(y64) + s64)
    assert_layout(out, FORMATS[fmt])
    assert _rel(out, want) <= 1e-6
    got = torch.autograd.grad((out * upstream).sum(), (y, s, norm.weight, norm.bias))
    exact = torch.autograd.grad((want * upstream.double()).sum(), (y64, s64, twin.weight, twin.bias))
    for name, a, b in zip(("y", "shortcut", "weight", "bias"), got, exact, strict=True):
        assert _rel(a, b) <= 1e-5, name
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(norm.state_dict()[key].double(), twin.state_dict()[key].double(), rtol=1e-5), key
