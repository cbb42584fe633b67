"""lgd_fast.ops.stem_conv_pool: the cpp backend against plain PyTorch, its contract and its bad inputs.

Inputs are fresh random numbers every run (seed printed on failure; LGD_FAST_TEST_SEED replays one). The parity
tests run poisoned (every uninitialised ``at::empty`` is NaN) on every SIMD path the CPU has, with x in three
layouts (contiguous, channels_last_3d, and a strided view neither is). Errors are judged against float64 by
STYLE.md's rule: at most twice plain PyTorch's own error in the same dtype (norms of the differences), plus a
floor of one unit roundoff times the norm of the sums of term magnitudes (the conv of |x| with |w|, plus |b|).

The op's gradients are the reference's by construction (its autograd recomputes the reference): the tests check
that they are exactly those, and that they reach every input.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lgd_fast.ops import stem_conv_pool, stem_conv_pool_reference
from lgd_fast.ops.stem_conv_pool import kernel_applies
from op_testing import SEED, assert_layout, usable_isas

CL = torch.channels_last_3d
ISAS = usable_isas()
LAYOUTS = ("contiguous", "channels_last_3d", "strided")

# (N, C, T, H, W, C_out, kt, stride_t): lgd3d_tiny's stem (16 channels, kt = stride 2) and R50's (64, kt = stride
# 4) at small frames, LGD-2D's (64, kt 1); C_out off every vector width (5, 24, 40) and over one register tile
# (80); odd and even H and W, 1x1 and 2x3 frames (windows past every edge), kt 3 with stride 1, a stride over kt
# (frames skipped), C = 1, 2, 4.
SHAPES = [
    (2, 3, 4, 32, 32, 16, 2, 2),
    (1, 3, 8, 23, 17, 64, 4, 4),
    (1, 3, 2, 15, 16, 64, 1, 1),
    (2, 3, 5, 9, 11, 24, 3, 1),
    (1, 2, 3, 1, 1, 5, 1, 1),
    (3, 1, 4, 2, 3, 40, 2, 3),
    (1, 4, 2, 13, 30, 80, 2, 2),
    (1, 3, 2, 40, 36, 16, 2, 2),  # one output frame: its pooled rows split into chunks (tasks) of their own
]


def _id(shape):
    return "x".join(map(str, shape))


def _clip(shape, dtype, layout, gen) -> torch.Tensor:
    """A clip in ``layout``; "strided": a view with W's stride 2 and H before T in memory."""
    N, C, T, H, W = shape
    x = torch.randn((N, C, T, H, W), generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=CL)
    if layout == "strided":
        wide = torch.empty((N, C, H, T, 2 * W), dtype=dtype).transpose(2, 3)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    return x


def _params(cout, C, kt, dtype, gen):
    """A folded stem conv: weights scaled as a trained conv's (outputs of unit size), a bias that moves about half
    of the ReLU's inputs below zero."""
    fan_in = C * kt * 49
    w = (torch.randn((cout, C, kt, 7, 7), generator=gen, dtype=torch.float64) / fan_in**0.5).to(dtype)
    b = (0.3 * torch.randn(cout, generator=gen, dtype=torch.float64)).to(dtype)
    return w, b


def _plain(x, w, b, st):
    """The modules' arithmetic in x's dtype (under autocast, autocast's): what a user's eager stem computes at
    inference."""
    if not torch.is_autocast_enabled("cpu"):
        w, b = w.to(x.dtype), b.to(x.dtype)
    y = torch.relu(F.conv3d(x, w, b, stride=(st, 2, 2), padding=(0, 3, 3)))
    return F.max_pool3d(y, (1, 3, 3), (1, 2, 2), (0, 1, 1))


def _magnitudes(x, w, b, st):
    """The float64 sums of term magnitudes of each output: the conv of |x| with |w|, plus |b|, pooled."""
    y = F.conv3d(x.double().abs(), w.double().abs(), b.double().abs(), stride=(st, 2, 2), padding=(0, 3, 3))
    return F.max_pool3d(y, (1, 3, 3), (1, 2, 2), (0, 1, 1))


def _err(a, ref) -> float:
    return (a.double() - ref).norm().item()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"], ids=["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_output_within_twice_pytorch_error(shape, dtype, layout, isa, gen, poisoned):
    """fp32 and bf16: x in that dtype, a float32 weight; autocast: a float32 x and a bfloat16 weight, the stem under
    bf16 autocast (x rounded in the op: bfloat16 products, on AVX512_BF16's dot products on the avx512 path of a
    CPU that has them), against PyTorch's conv under autocast."""
    N, C, T, H, W, cout, kt, st = shape
    amp = dtype == "autocast"
    dtype = torch.bfloat16 if amp else dtype
    x = _clip((N, C, T, H, W), torch.float32 if amp else dtype, layout, gen)
    w, b = _params(cout, C, kt, torch.float32, gen)
    if amp:
        w = w.bfloat16()
    got = stem_conv_pool(x, w, b, stride_t=st, backend="cpp")
    exact = _plain(x.double(), w.double(), b.double(), st)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        plain = _plain(x, w, b, st).to(dtype)  # (autocast's max-pool returns float32: the bfloat16 conv's values)

    assert got.shape == plain.shape and got.dtype == dtype
    assert_layout(got, CL)
    assert torch.isfinite(got).all(), f"unwritten or non-finite elements (seed {SEED})"
    floor = torch.finfo(dtype).eps / 2 * _magnitudes(x, w, b, st).norm().item()
    err, err_torch = _err(got, exact), _err(plain, exact)
    assert err <= 2 * err_torch + floor, f"error {err:.3g} vs PyTorch {err_torch:.3g}, floor {floor:.3g} (seed {SEED})"


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gradient_is_the_references(layout, dtype, wdtype, gen):
    x = _clip((2, 3, 4, 11, 10), dtype, layout, gen).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(24, 3, 2, wdtype, gen))
    g = torch.randn((2, 24, 2, 3, 3), generator=gen).to(torch.bfloat16 if wdtype == torch.bfloat16 else dtype)
    got = torch.autograd.grad(stem_conv_pool(x, w, b, backend="cpp"), (x, w, b), g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(stem_conv_pool_reference(*leaves), leaves, g)
    for name, ours, theirs in zip(("x", "weight", "bias"), got, want, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), f"{name}: not the reference's gradient (seed {SEED})"
        assert ours.abs().sum() > 0, name
    # only the inputs that need one get a gradient
    x2 = x.detach()
    (gw,) = torch.autograd.grad(stem_conv_pool(x2, w, None, backend="cpp"), (w,), g)
    assert torch.equal(gw, torch.autograd.grad(stem_conv_pool_reference(x2, w, None), (w,), g)[0])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("shape", [(3, 3, 4, 30, 26), (1, 3, 2, 64, 60)], ids=["many-frames", "one-frame"])
def test_bitwise_reproducible_across_thread_counts(shape, wdtype, gen):
    """The same values whatever the threads, also where one output frame's rows are split into more chunks for
    more threads (one-frame: 4 chunks for 3 threads, 2 for 1); with a float32 weight and with a bfloat16 one."""
    x = _clip(shape, torch.float32, "contiguous", gen)
    w, b = _params(32, 3, 2, wdtype, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # (over this machine's cores: the split differs from one thread's all the same)
        several = stem_conv_pool(x, w, b, backend="cpp")
        torch.set_num_threads(1)
        single = stem_conv_pool(x, w, b, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(several, single)
    want = stem_conv_pool_reference(x, w, b).float()
    assert ((single.float() - want).norm() / want.norm()).item() < (1e-6 if wdtype == torch.float32 else 1e-2)


def test_bfloat16_weights_and_no_bias(gen):
    x = _clip((2, 3, 2, 12, 14), torch.bfloat16, "channels_last_3d", gen)
    w, _ = _params(16, 3, 1, torch.bfloat16, gen)
    got = stem_conv_pool(x, w, None, backend="cpp")
    exact = stem_conv_pool_reference(x.double(), w.double(), None)
    plain = F.max_pool3d(torch.relu(F.conv3d(x, w, stride=(1, 2, 2), padding=(0, 3, 3))), (1, 3, 3), (1, 2, 2),
                         (0, 1, 1))  # fmt: skip
    assert _err(got, exact) <= 2 * _err(plain, exact), (_err(got, exact), _err(plain, exact))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_nan_and_infinity_as_pytorch(isa, wdtype, gen):
    """A NaN in the clip makes every conv output that reads it NaN, and the max-pool lets NaN through, as
    ATen's does; an infinity gives infinities and, past the ReLU, zeros as in PyTorch (a bfloat16 weight: through
    the dot products too, whose pairs of planes and padded channels hold zeros, never a value of another tap)."""
    x = _clip((1, 3, 2, 15, 15), torch.float32, "contiguous", gen)
    w, b = _params(16, 3, 1, wdtype, gen)
    x[0, 1, 0, 7, 7] = float("nan")
    x[0, 2, 1, 3, 11] = float("inf")
    got = stem_conv_pool(x, w, b, backend="cpp")
    want = stem_conv_pool_reference(x, w, b)
    assert want.isnan().any() and want.isinf().any()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    tol = 1e-5 if wdtype == torch.float32 else 1e-2  # (the bfloat16 output's rounding)
    torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_a_bfloat16_weight_rounds_the_clip_and_other_weight_dtypes_take_the_reference(isa, gen):
    """The weight's dtype sets the products' precision (the reference: x rounded to it first); the cpp backend
    takes float32 and bfloat16 weights, ``auto`` sends a float64 one to the reference."""
    x = _clip((1, 3, 2, 11, 12), torch.float32, "contiguous", gen)
    w, b = _params(16, 3, 1, torch.float32, gen)
    wb = w.bfloat16()
    assert torch.equal(stem_conv_pool_reference(x, wb, b), stem_conv_pool_reference(x.bfloat16(), wb, b))
    assert stem_conv_pool(x, wb, b, backend="cpp").dtype == torch.bfloat16
    assert torch.equal(stem_conv_pool(x, wb, b, backend="cpp"), stem_conv_pool(x.bfloat16(), wb, b, backend="cpp"))
    assert not kernel_applies(x, torch.float64) and kernel_applies(x, torch.bfloat16)
    torch.testing.assert_close(stem_conv_pool(x, w.double(), b, backend="auto"),
                               stem_conv_pool_reference(x, w.double(), b), rtol=0, atol=0)  # fmt: skip
    with pytest.raises(RuntimeError, match="weight must be a float32 or bfloat16 tensor on cpu, got Double"):
        torch.ops.lgd_fast.stem_conv_pool(x, w.double(), b, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_bf16_weights_without_dot_products_are_the_float32_tiles_on_the_rounded_clip(shape, layout, gen, poisoned):
    """Where the AVX-512 path runs without AVX512_BF16's dot products (forbidden here, as a CPU without them runs),
    a bfloat16 weight multiplies the rounded clip in the float32 tiles: the same values as the AVX2 tiles (each lane
    adds its products in the same order whatever the vector width) and as the op on the clip rounded beforehand; the
    dot products (where this CPU has them) within twice PyTorch's autocast error of float64 too."""
    from lgd_fast import _C

    if "avx512" not in ISAS or "avx2" not in ISAS:
        pytest.skip("needs the AVX-512 and AVX2 paths")
    N, C, T, H, W, cout, kt, st = shape
    x = _clip((N, C, T, H, W), torch.float32, layout, gen)
    w, b = _params(cout, C, kt, torch.bfloat16, gen)
    try:
        _C._set_cpu_isa("avx512")
        _C._set_bf16_dot_products(False)
        tiles = stem_conv_pool(x, w, b, stride_t=st, backend="cpp")
        rounded = stem_conv_pool(x.bfloat16(), w, b, stride_t=st, backend="cpp")
        _C._set_cpu_isa("avx2")
        avx2 = stem_conv_pool(x, w, b, stride_t=st, backend="cpp")
    finally:
        _C._set_bf16_dot_products(True)
        _C._set_cpu_isa("auto")
    assert tiles.dtype == torch.bfloat16 and torch.equal(tiles, avx2) and torch.equal(tiles, rounded)


def test_bf16_dot_products_follow_the_cpu_and_the_path():
    """The dot products are used exactly where the AVX-512 path runs on a CPU with AVX512_BF16."""
    from lgd_fast import _C
    from lgd_fast.ops.stem_conv_pool import bf16_dot_products

    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    for name in ISAS:
        _C._set_cpu_isa(name)
        try:
            assert _C.bf16_dot_products() == (name == "avx512" and "avx512_bf16" in flags), name
            _C._set_bf16_dot_products(False)
            assert not _C.bf16_dot_products()
        finally:
            _C._set_bf16_dot_products(True)
            _C._set_cpu_isa("auto")
    assert bf16_dot_products() == _C.bf16_dot_products()


def test_auto_takes_the_reference_where_the_kernel_does_not_apply(gen):
    x = _clip((1, 3, 2, 9, 9), torch.float64, "contiguous", gen)
    w, b = _params(8, 3, 1, torch.float64, gen)
    assert not kernel_applies(x) and kernel_applies(x.float())
    torch.testing.assert_close(stem_conv_pool(x, w, b, backend="auto"), stem_conv_pool_reference(x, w, b),
                               rtol=0, atol=0)  # fmt: skip
    with pytest.raises(RuntimeError, match="stem_conv_pool: x must be float32 or bfloat16, got Double"):
        stem_conv_pool(x, w, b, backend="cpp")


# ---- torch.library contract and torch.compile ----------------------------------------------------------


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, dtype, wdtype, gen):
    x = _clip((2, 3, 4, 9, 8), dtype, layout, gen).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(16, 3, 2, wdtype, gen))
    torch.library.opcheck(torch.ops.lgd_fast.stem_conv_pool.default, (x, w, b, 2))
    torch.library.opcheck(torch.ops.lgd_fast.stem_conv_pool.default, (x, w, None, 1))


@pytest.mark.parametrize("shape", [(2, 3, 4, 9, 8, 16, 2, 2), (1, 1, 3, 1, 2, 5, 1, 2)], ids=_id)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_kernel_matches_the_real_sizes_and_strides(layout, dtype, wdtype, shape, gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    N, C, T, H, W, cout, kt, st = shape
    x = _clip((N, C, T, H, W), dtype, layout, gen)
    w, b = _params(cout, C, kt, wdtype, gen)
    real = torch.ops.lgd_fast.stem_conv_pool(x, w, b, st)
    with FakeTensorMode() as mode:
        fake = torch.ops.lgd_fast.stem_conv_pool(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), st)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


def test_torch_compile_calls_the_op(gen):
    from torch._inductor.utils import run_and_get_code

    def fn(x, w, b):
        return stem_conv_pool(x, w, b).square() + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    x = _clip((2, 3, 4, 10, 9), torch.float32, "contiguous", gen)
    w, b = _params(16, 3, 2, torch.float32, gen)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, x, w, b)
        want = stem_conv_pool_reference(x, w, b).square() + 1.0
    assert "lgd_fast.stem_conv_pool" in "\n".join(code), "the compiled graph does not call the custom op"
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# ---- bad inputs --------------------------------------------------------------------------------------


def test_rejects_what_is_not_such_a_stem(gen):
    x = _clip((2, 3, 4, 9, 9), torch.float32, "contiguous", gen)
    w, b = _params(16, 3, 2, torch.float32, gen)
    cases = {
        r"5-D tensor \(N, C, T, H, W\)": (x[:, :, 0], w, b, None),
        r"weight must be \(C_out, 3, kt, 7, 7\)": (x, w[:, :, :, :5, :5], b, None),
        r"weight must be \(C_out, 3, kt, 7, 7\) for x with 3 channels": (x, w[:, :2], b, None),
        r"bias must be a floating \(16,\) tensor": (x, w, b[:5], None),
        "stride_t must be at least 1": (x, w, b, 0),
        "the clip has 4 frames, fewer than the kernel's 5": (x, torch.randn(16, 3, 5, 7, 7), b, 1),
        "floating point": (x.to(torch.int32), w, b, None),
        "empty frames": (x[..., :0], w, b, None),
    }
    for message, (xx, ww, bb, st) in cases.items():
        with pytest.raises(ValueError, match=message):
            stem_conv_pool(xx, ww, bb, stride_t=st)
    # the compiled op checks the same itself
    with pytest.raises(RuntimeError, match=r"lgd_fast::stem_conv_pool: weight must be \(C_out, 3, kt, 7, 7\)"):
        torch.ops.lgd_fast.stem_conv_pool(x, w[:, :, :, :5, :5], b, 2)
    with pytest.raises(RuntimeError, match="lgd_fast::stem_conv_pool: x must be float32 or bfloat16"):
        torch.ops.lgd_fast.stem_conv_pool(x.double(), w, b, 2)
    with pytest.raises(RuntimeError, match="lgd_fast::stem_conv_pool: bias must be a floating"):
        torch.ops.lgd_fast.stem_conv_pool(x, w, b[:3], 2)
    with pytest.raises(ValueError, match="backend argument is .winograd.; expected one of: cpp, reference, auto"):
        stem_conv_pool(x, w, b, backend="winograd")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(stride_t=1.5), "stride_t must be an int .*, got float 1.5"),  # (was run with stride 1)
        (dict(stride_t="2"), "stride_t must be an int .*, got str '2'"),
        (dict(stride_t=True), "stride_t must be an int .*, got bool True"),
        (dict(x=[[1.0]]), "stem_conv_pool: x must be a tensor, got list"),
        (dict(weight=1.0), "stem_conv_pool: weight must be a tensor, got float"),
        (dict(bias=0.5), "stem_conv_pool: bias must be a tensor, got float"),
    ],
    ids=["stride-float", "stride-str", "stride-bool", "x-list", "weight-float", "bias-float"],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_rejects_arguments_of_the_wrong_type(change, match, backend, gen):
    w, b = _params(16, 3, 2, torch.float32, gen)
    args = dict(x=_clip((1, 3, 4, 9, 9), torch.float32, "contiguous", gen), weight=w, bias=b, stride_t=2) | change
    with pytest.raises(TypeError, match=match):
        stem_conv_pool(args["x"], args["weight"], args["bias"], stride_t=args["stride_t"], backend=backend)


def test_empty_batch():
    x = torch.randn(0, 3, 2, 8, 8)
    got = stem_conv_pool(x, torch.randn(16, 3, 2, 7, 7), None, backend="cpp")
    assert got.shape == (0, 16, 1, 2, 2)
    assert_layout(got, CL)
