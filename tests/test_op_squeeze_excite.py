"""lgd_fast.ops.squeeze_excite: the cpp backend against plain PyTorch, its contract, and the module recognition.

Inputs are fresh random numbers every run (seed printed on failure; LGD_FAST_TEST_SEED replays one). The parity
tests run poisoned (every uninitialised ``at::empty`` is NaN) on every SIMD path the CPU has. Errors are judged
against float64 by STYLE.md's rule: at most twice plain PyTorch's own error in the same dtype (norms of the
differences), plus a floor of one unit roundoff of the dtype times the norm of each result's sums of term
magnitudes (:func:`_magnitudes`, float64). The floor is the scale of rounding error such sums carry: a small
gradient that is a cancelling sum (a bias's, two elements wide) can land near zero in one draw, where PyTorch's
and our errors are both a few ulps of its terms and their ratio is chance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lgd_fast.ops import squeeze_excite, squeeze_excite_reference
from lgd_fast.ops.squeeze_excite import squeeze_excite_convs
from op_testing import SEED, assert_layout, random_input, usable_isas

CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}
ISAS = usable_isas()

# (N, C, T, H, W, R): channel counts off every vector width (tails), one position, many positions per task,
# C = 1 (both layouts at once), more than 8 clips (the gate through ATen's addmm instead of small_linear), and
# the benchmarked X3D's res2 shape.
SHAPES = [(1, 5, 1, 1, 1, 2), (2, 17, 3, 5, 7, 3), (3, 48, 2, 9, 11, 4), (1, 1, 3, 4, 5, 2), (2, 33, 4, 23, 19, 5),
          (11, 20, 2, 3, 5, 3), (1, 48, 8, 28, 28, 3)]  # fmt: skip


def _id(shape):
    return "x".join(map(str, shape))


def _params(C, R, dtype, gen, *, bias=True):
    """SE weights as a model holds them after training (gates neither saturated nor all open)."""
    w1 = (torch.randn(R, C, generator=gen, dtype=torch.float64) / C**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(C, R, generator=gen, dtype=torch.float64) / R**0.5).to(dtype).requires_grad_()
    b1 = (0.1 * torch.randn(R, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    b2 = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    return w1, b1, w2, b2


def _plain(x, w1, b1, w2, b2, silu):
    """The modules' arithmetic in x's dtype, no upcast: what a user's eager model computes."""
    s = torch.sigmoid(F.linear(F.relu(F.linear(x.mean(dim=(2, 3, 4)), w1, b1)), w2, b2))
    return (F.silu if silu else torch.nn.Identity())(x * s[:, :, None, None, None])


def _magnitudes(x, w1, b1, w2, b2, g, silu):
    """Per result (output, then the gradients of x, w1, b1, w2, b2), the float64 sums of the magnitudes of the
    terms it sums: the backward's formulas at the real point (the gate, the ReLU mask and SiLU's slope as they are)
    with every factor and every summand taken by absolute value; a difference such as the sigmoid slope's 1 - s is
    a sum of two terms, 1 + s, which is what cancels where the gate saturates. The output and the gradients also
    carry the gate's own sums (means, both layers) through the sigmoid's slope."""
    x, w1, w2, g = (t.detach().double() for t in (x, w1, w2, g))
    b1, b2 = (None if b is None else b.detach().double() for b in (b1, b2))
    m = x.mean(dim=(2, 3, 4))
    z1 = F.linear(m, w1, b1)
    h = F.relu(z1)
    s = torch.sigmoid(F.linear(h, w2, b2))
    v = x * s[:, :, None, None, None]
    out = F.silu(v) if silu else v
    sig = torch.sigmoid(v)
    slope = sig * (1 + v.abs() * (1 + sig)) if silu else torch.ones_like(v)
    gv = g.abs() * slope
    z1_terms = F.linear(x.abs().mean(dim=(2, 3, 4)), w1.abs(), None if b1 is None else b1.abs())
    gate_terms = (s * (1 - s) * F.linear(z1_terms * (z1 > 0), w2.abs(), None if b2 is None else b2.abs()))
    gate_terms = gate_terms[:, :, None, None, None]
    grad_z2 = (gv * x.abs()).sum(dim=(2, 3, 4)) * (s * (1 + s) + gate_terms[:, :, 0, 0, 0])
    grad_z1 = (grad_z2 @ w2.abs()) * (z1 > 0)
    grad_m = grad_z1 @ w1.abs()
    grad_x = gv * (s[:, :, None, None, None] + gate_terms) + (grad_m / x[0, 0].numel())[:, :, None, None, None]
    out_terms = out.abs() + slope * x.abs() * gate_terms
    return [out_terms, grad_x, grad_z1.t() @ m.abs(), grad_z1.sum(0), grad_z2.t() @ h, grad_z2.sum(0)]


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).norm().item()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _outputs_and_grads(fn, inputs, g):
    leaves = [t for t in inputs if t is not None]
    y = fn(*inputs)
    return [y, *torch.autograd.grad(y, leaves, g)]


def _fresh(inputs, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "gate-only"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_output_and_every_gradient_within_twice_pytorch_error(shape, dtype, fmt, silu, isa, gen, poisoned):
    N, C, T, H, W, R = shape
    x = random_input((N, C, T, H, W), dtype, FORMATS[fmt], gen, requires_grad=True)
    params = _params(C, R, dtype, gen)
    g = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=FORMATS[fmt])
    inputs = [x, *params]

    got = _outputs_and_grads(lambda *a: squeeze_excite(*a, silu=silu, backend="cpp"), inputs, g)
    exact = _outputs_and_grads(lambda *a: _plain(*a, silu), _fresh(inputs, torch.float64), g.double())
    plain = _outputs_and_grads(lambda *a: _plain(*a, silu), _fresh(inputs), g)
    magnitudes = _magnitudes(*inputs, g, silu)

    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert_layout(got[0], FORMATS[fmt])
    assert_layout(got[1], FORMATS[fmt])
    unit = torch.finfo(dtype).eps / 2
    names = ("out", "x", "w1", "b1", "w2", "b2")
    for name, ours, want, theirs, scale in zip(names, got, exact, plain, magnitudes, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert torch.isfinite(ours).all(), f"{name}: unwritten or non-finite elements (seed {SEED})"
        err, err_torch, floor = _err(ours, want), _err(theirs, want), unit * scale.norm().item()
        assert err <= 2 * err_torch + floor, (f"{name}: error {err:.3g} vs PyTorch {err_torch:.3g}, floor {floor:.3g}"
                                              f" (seed {SEED})")  # fmt: skip


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_fp64_gradcheck_and_gradgradcheck(fmt, bias, gen):
    x = random_input((2, 5, 3, 4, 3), torch.float64, FORMATS[fmt], gen, requires_grad=True)
    w1, b1, w2, b2 = _params(5, 3, torch.float64, gen, bias=bias)
    for silu in (True, False):
        got = squeeze_excite(x, w1, b1, w2, b2, silu=silu, backend="cpp")
        torch.testing.assert_close(got, squeeze_excite_reference(x, w1, b1, w2, b2, silu=silu), rtol=1e-13, atol=0)
        inputs = tuple(t for t in (x, w1, b1, w2, b2) if t is not None)

        def fn(*args, silu=silu):
            x_, w1_, *rest = args
            b1_, w2_, b2_ = (rest[0], rest[1], rest[2]) if bias else (None, rest[0], None)
            return squeeze_excite(x_, w1_, b1_, w2_, b2_, silu=silu, backend="cpp")

        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_bitwise_reproducible_across_thread_counts(fmt, gen):
    x = random_input((3, 40, 5, 21, 21), torch.float32, FORMATS[fmt], gen)
    params = [p.detach() for p in _params(40, 4, torch.float32, gen)]
    threads = torch.get_num_threads()
    first = squeeze_excite(x, *params, backend="cpp")
    try:
        torch.set_num_threads(1)
        single = squeeze_excite(x, *params, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_without_biases(fmt, gen):
    x = random_input((3, 21, 2, 5, 6), torch.float32, FORMATS[fmt], gen)
    w1, _, w2, _ = (None if p is None else p.detach() for p in _params(21, 4, torch.float32, gen))
    got = squeeze_excite(x, w1, None, w2, None, backend="cpp")
    exact = squeeze_excite_reference(x.double(), w1.double(), None, w2.double(), None)
    plain = _plain(x, w1, None, w2, None, True)
    assert _rel(got, exact) <= 2 * _rel(plain, exact) + 2**-24, (_rel(got, exact), _rel(plain, exact))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_extreme_values_as_pytorch(isa):
    """Past the exponential's clamp (|v| > 88) SiLU is PyTorch's v * sigmoid(v); an infinity or NaN in a channel
    makes its gate (a mean) NaN, as in PyTorch."""
    # (the largest well below float32's 3.4e38: the means' float32 partial sums must not overflow)
    values = torch.tensor([-1e36, -1e30, -1e3, -88.5, -88.0, -87.5, -20.0, 0.0, 20.0, 88.5, 1e30, 1e36])
    index = torch.arange(12).reshape(12, 1, 1) + torch.arange(5).reshape(5, 1) * 4 + torch.arange(4)  # C, H, W
    x = values[index % 12][None, :, None].expand(2, 12, 3, 5, 4).contiguous()
    w1, w2 = torch.zeros(2, 12), torch.zeros(12, 2)
    b2 = torch.full((12,), 30.0)  # a gate of exactly 1 in float32: the SiLU sees x itself
    for t in (x, x.contiguous(memory_format=CL)):
        torch.testing.assert_close(squeeze_excite(t, w1, None, w2, b2, backend="cpp"), t * torch.sigmoid(t),
                                   rtol=1.3e-6, atol=1e-36)  # fmt: skip
    x[0, 3, 1, 2, 2], x[1, 5, 0, 0, 1] = float("inf"), float("nan")
    want = squeeze_excite_reference(x, w1, None, w2, b2)
    assert want[0, 3].isnan().all() and want[1, 5].isnan().all()
    torch.testing.assert_close(squeeze_excite(x, w1, None, w2, b2, backend="cpp"), want, equal_nan=True)


def test_float32_weights_with_bfloat16_input_as_under_autocast(gen):
    x = random_input((2, 24, 3, 6, 6), torch.bfloat16, CL, gen)
    params = [p.detach() for p in _params(24, 3, torch.float32, gen)]
    got = squeeze_excite(x, *params, backend="cpp")
    want = squeeze_excite_reference(x.double(), *[p.double() for p in params])
    plain = _plain(x, *[p.bfloat16() for p in params], True)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) <= 2 * _rel(plain, want) + 2**-9, (_rel(got, want), _rel(plain, want))


# ---- torch.library contract and torch.compile ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_opcheck(fmt, dtype, gen):
    x = random_input((2, 7, 3, 5, 4), dtype, FORMATS[fmt], gen, requires_grad=True)
    w1, b1, w2, b2 = _params(7, 3, dtype, gen)
    torch.library.opcheck(torch.ops.lgd_fast.squeeze_excite.default, (x, w1, b1, w2, b2, True))
    torch.library.opcheck(torch.ops.lgd_fast.squeeze_excite.default, (x, w1, None, w2, None, False))


@pytest.mark.parametrize("channels", [9, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_fake_kernel_matches_the_real_sizes_and_strides(fmt, dtype, channels, gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = random_input((2, channels, 3, 5, 4), dtype, FORMATS[fmt], gen)
    params = [p.detach() for p in _params(channels, 2, torch.float32, gen)]
    real = torch.ops.lgd_fast.squeeze_excite(x, *params, True)
    with FakeTensorMode() as mode:
        fake = torch.ops.lgd_fast.squeeze_excite(mode.from_tensor(x), *[mode.from_tensor(p) for p in params], True)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_torch_compile_calls_the_op(fmt, gen):
    from torch._inductor.utils import run_and_get_code

    def fn(x, w1, b1, w2, b2):
        return squeeze_excite(x, w1, b1, w2, b2).square() + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    x = random_input((2, 6, 3, 5, 4), torch.float32, FORMATS[fmt], gen, requires_grad=True)
    params = _params(6, 2, torch.float32, gen)
    g = torch.randn(x.shape, generator=gen)
    (y, code) = run_and_get_code(compiled, x, *params)
    grads = torch.autograd.grad(y, [x, *params], g)
    ref_inputs = _fresh([x, *params])
    y_ref = squeeze_excite_reference(*ref_inputs).square() + 1.0
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, g)

    assert "lgd_fast.squeeze_excite" in "\n".join(code), "the compiled graph does not call the custom op"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_layout(grads[0], FORMATS[fmt])


# ---- bad inputs --------------------------------------------------------------------------------------


def test_rejects_bad_shapes_dtypes_and_layouts(gen):
    x = random_input((2, 6, 3, 4, 5), torch.float32, CL, gen)
    w1, b1, w2, b2 = [p.detach() for p in _params(6, 2, torch.float32, gen)]
    with pytest.raises(ValueError, match="5-D tensor"):
        squeeze_excite(x[:, :, 0], w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="5-D tensor"):
        torch.ops.lgd_fast.squeeze_excite(x[:, :, 0], w1, b1, w2, b2, True)
    with pytest.raises(ValueError, match=r"w1 must have shape \(R, C\) with C = x.size\(1\) = 6"):
        squeeze_excite(x, w1.t(), b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2 must have shape \(6, 2\)"):
        squeeze_excite(x, w1, b1, w2[:5], b2)
    with pytest.raises(RuntimeError, match=r"b2 must have shape \[6\]"):
        torch.ops.lgd_fast.squeeze_excite(x, w1, b1, w2, b2[:4], True)
    with pytest.raises(ValueError, match="w1 must be on x's device .* with x's dtype"):
        squeeze_excite(x, w1.double(), b1, w2, b2)
    with pytest.raises(RuntimeError, match="dtype float32, bfloat16 or float64"):
        torch.ops.lgd_fast.squeeze_excite(x.half(), w1.half(), b1.half(), w2.half(), b2.half(), True)
    strided = x.transpose(2, 4)
    with pytest.raises(RuntimeError, match="contiguous or channels_last_3d"):
        squeeze_excite(strided, w1, b1, w2, b2, backend="cpp")
    # auto hands such a view to the reference instead
    torch.testing.assert_close(squeeze_excite(strided, w1, b1, w2, b2, backend="auto"),
                               squeeze_excite_reference(strided, w1, b1, w2, b2))  # fmt: skip


@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "x": a["x"].tolist()}, "squeeze_excite: x must be a tensor, got list"),
        (lambda a: {**a, "x": (a["x"] * 4).int()}, "squeeze_excite: x must be a floating-point tensor, got dtype "
         "torch.int32"),
        (lambda a: {**a, "w1": 1.0}, "squeeze_excite: w1 must be a tensor, got float"),
        (lambda a: {**a, "b1": 0.5}, "squeeze_excite: b1 must be a tensor, got float"),
        (lambda a: {**a, "w2": None}, "squeeze_excite: w2 must be a tensor, got NoneType"),
        (lambda a: {**a, "silu": "no"}, "squeeze_excite: silu must be a bool, got str 'no'"),
    ],
    ids=["x-list", "x-int32", "w1-float", "b1-float", "w2-None", "silu-str"],
)  # fmt: skip
def test_rejects_arguments_of_the_wrong_type(change, match, backend, gen):
    """Named TypeErrors on every backend: not AttributeErrors, the C++ "tensor does not have a device", a fallback
    warning and then torch's "could not infer output dtype", or "no" taken as True."""
    x = random_input((2, 6, 3, 4, 5), torch.float32, torch.contiguous_format, gen)
    w1, b1, w2, b2 = [p.detach() for p in _params(6, 2, torch.float32, gen)]
    args = change(dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, silu=True))
    with pytest.raises(TypeError, match=match):
        squeeze_excite(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], silu=args["silu"], backend=backend)


@pytest.mark.parametrize("shape", [(0, 4, 2, 3, 3), (2, 4, 0, 3, 3)], ids=_id)
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_empty_input(shape, fmt):
    x = torch.randn(shape).contiguous(memory_format=FORMATS[fmt])
    w1, w2 = torch.randn(2, 4), torch.randn(4, 2)
    got = squeeze_excite(x, w1, None, w2, None, backend="cpp")
    assert got.shape == x.shape and got.stride() == x.stride()


# ---- recognising squeeze-excitation modules ---------------------------------------------------------------


class _PoolSE(nn.Module):
    """A squeeze-excitation written as fvcore and pytorchvideo write theirs: a pooling module, then the
    excitation Sequential, the product last."""

    def __init__(self, channels: int, reduced: int, gate: nn.Module | None = None):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.excitation = nn.Sequential(nn.Conv3d(channels, reduced, 1, bias=True), nn.ReLU(),
                                        nn.Conv3d(reduced, channels, 1, bias=True), gate or nn.Sigmoid())  # fmt: skip

    def forward(self, x):
        return x * self.excitation(self.avg_pool(x))


class _MaxSE(_PoolSE):
    def __init__(self, channels, reduced):
        super().__init__(channels, reduced)
        self.avg_pool = nn.AdaptiveMaxPool3d((1, 1, 1))


class _ResidualSE(_PoolSE):
    def forward(self, x):
        return x + super().forward(x)


def test_recognises_squeeze_excitation_by_what_it_computes():
    import foreign_models

    assert squeeze_excite_convs(foreign_models.SqueezeExcitation(12, 3), 12) == ("block.0", "block.2")
    assert squeeze_excite_convs(_PoolSE(12, 3), 12) == ("excitation.0", "excitation.2")
    refused = {
        "hard-sigmoid gate": (_PoolSE(12, 3, nn.Hardsigmoid()), 12),
        "max pooling": (_MaxSE(12, 3), 12),
        "residual": (_ResidualSE(12, 3), 12),
        "other channel count": (_PoolSE(12, 3), 10),
        "no convs": (nn.Identity(), 12),
        "a BatchNorm inside": (nn.Sequential(_PoolSE(12, 3), nn.BatchNorm3d(12)), 12),
    }
    for name, (module, channels) in refused.items():
        assert squeeze_excite_convs(module, channels) is None, name


def test_recognition_leaves_the_module_untouched(gen):
    module = _PoolSE(8, 2)
    state = copy.deepcopy(module.state_dict())
    assert squeeze_excite_convs(module, 8) is not None
    assert all(torch.equal(state[k], v) and v.dtype == torch.float32 for k, v in module.state_dict().items())
