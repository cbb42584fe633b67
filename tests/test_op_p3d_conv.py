"""p3d_conv on the CPU (the onednn backend): parity with the float64 reference, inference fusion, errors, compile.

The Triton backend runs the same cases under the interpreter in tests/test_p3d_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from p3d_cases import EPILOGUES, KINDS, LAYOUTS, check_rows, conv_case_id, rel, run_conv_case

from lgd_fast.ops import p3d_conv, p3d_conv_reference
from lgd_fast.ops.p3d_conv import onednn_takes
from op_testing import random_input

# (kind, stride, (N, C_in, T, H, W), C_out): every conv kind at strides 1 and 2, T = 1, 5, 7, H = W = 7, 15,
# batch 1 and 3, odd channel counts.
GEOMETRIES = [
    ("spatial", 1, (3, 5, 5, 7, 7), 7),
    ("spatial", 2, (1, 3, 7, 15, 15), 5),
    ("temporal", 1, (1, 7, 7, 7, 7), 3),
    ("temporal", 2, (3, 5, 5, 15, 15), 9),
    ("temporal", 1, (2, 3, 1, 7, 7), 5),
    ("pointwise", 1, (3, 65, 5, 7, 7), 33),
    ("pointwise", 2, (1, 9, 7, 15, 15), 65),
]
CASES = [
    (*geo, epilogue, dtype, layout)
    for geo in GEOMETRIES
    for epilogue in EPILOGUES
    for dtype in ("float32", "bfloat16")
    for layout in LAYOUTS
    if dtype == "float32" or layout == "channels_last_3d"
]


def _refused_without_onednn_bf16(dtype: torch.dtype, call) -> bool:
    """On a CPU whose oneDNN has no bfloat16 (AVX2 only), asking the onednn backend for bf16 is refused with a
    clear error (True: checked, nothing more to run); else False."""
    if dtype != torch.bfloat16 or onednn_takes(dtype):
        return False
    with pytest.raises(TypeError, match="this CPU has no oneDNN torch.bfloat16 convolution"):
        call()
    return True


@pytest.mark.parametrize("case", CASES, ids=[conv_case_id(*c) for c in CASES])
def test_onednn_matches_reference_forward_and_every_gradient(case, gen, poisoned):
    if _refused_without_onednn_bf16(getattr(torch, case[5]), lambda: run_conv_case(*case, backend="onednn", gen=gen)):
        return
    rows = run_conv_case(*case, backend="onednn", gen=gen)
    assert {r["name"] for r in rows} >= {"out", "grad_x", "grad_weight"}
    check_rows(rows, case[5], conv_case_id(*case), fp32_tol=5e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,stride", [("spatial", 2), ("temporal", 1), ("pointwise", 1)])
@pytest.mark.parametrize("epilogue", ["none", "affine_relu", "affine_residual_relu"])
def test_inference_runs_one_fused_onednn_primitive(kind, stride, epilogue, dtype, layout, gen, monkeypatch):
    """Without autograd the epilogue folds into one oneDNN call (scale into the weight, shift as bias, residual
    and ReLU as post-ops) in x's layout, and equals the reference within 2x PyTorch's error at that dtype."""
    opts = EPILOGUES[epilogue]
    x = random_input((2, 5, 5, 9, 9), dtype, LAYOUTS[layout], gen) - 1.0
    weight = (torch.randn(7, 5, *KINDS[kind], generator=gen) / 4).to(dtype)
    out_shape = (2, 7, 5, (9 - 1) // stride + 1, (9 - 1) // stride + 1)
    kwargs = dict(stride=stride, relu=bool(opts.get("relu")))
    if opts.get("scale"):
        kwargs.update(scale=0.5 + torch.rand(7, generator=gen), shift=0.2 * torch.randn(7, generator=gen))
    if opts.get("residual"):
        kwargs["residual"] = random_input(out_shape, dtype, LAYOUTS[layout], gen) - 1.0
    calls = []
    for name in ("default", "binary"):
        overload = getattr(torch.ops.mkldnn._convolution_pointwise, name)
        monkeypatch.setattr(
            torch.ops.mkldnn._convolution_pointwise,
            name,
            lambda *a, _o=overload, _n=name: calls.append(_n) or _o(*a),
        )
    with torch.inference_mode():
        if _refused_without_onednn_bf16(dtype, lambda: p3d_conv(x, weight, backend="onednn", **kwargs)):
            return
        out = p3d_conv(x, weight, backend="onednn", **kwargs)
    assert calls == ["binary" if opts.get("residual") else "default"]
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    ref = p3d_conv_reference(x.double(), weight.double(), **{k: _double(v) for k, v in kwargs.items()})
    plain = p3d_conv_reference(x, weight, **kwargs)
    limit = 5e-6 if dtype == torch.float32 else 2 * rel(plain, ref) + 2.0**-23
    assert rel(out, ref) <= limit


def _double(v):
    return v.double() if isinstance(v, torch.Tensor) else v


def test_statistics_are_those_before_the_relu_and_feed_batch_norm(gen):
    """stats = (sum z, sum (z - mean z)^2) of z = conv * scale + shift + residual: BatchNorm's mean and var."""
    x = random_input((2, 6, 3, 7, 7), torch.float32, torch.channels_last_3d, gen)
    weight = torch.randn(4, 6, 1, 3, 3, generator=gen)
    res = torch.randn(2, 4, 3, 7, 7, generator=gen)
    out, stats = p3d_conv(x, weight, residual=res, stats=True)
    z = F.conv3d(x.double(), weight.double(), padding=(0, 1, 1)) + res.double()
    count = z.numel() // 4
    var, mean = torch.var_mean(z, dim=(0, 2, 3, 4), unbiased=False)
    assert rel(stats[0] / count, mean) < 1e-6
    assert rel(stats[1] / count, var) < 1e-5
    assert rel(out, z) < 1e-6


@pytest.mark.parametrize("backend", ["onednn", "reference"])
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])
def test_statistics_keep_their_precision_far_from_zero(backend, offset, gen):
    """A mean ``offset`` standard deviations from zero costs the variance nothing (as E[z^2] - E[z]^2 in float32
    would: at 1e2 it keeps about 3 digits, at 1e4 none) and the gradient through it nothing either."""
    x = random_input((2, 6, 3, 7, 7), torch.float32, torch.channels_last_3d, gen)
    weight = torch.randn(4, 6, 1, 3, 3, generator=gen, requires_grad=True)
    shift = torch.full((4,), offset)
    out, stats = p3d_conv(x, weight, shift=shift, stats=True, backend=backend)
    z = F.conv3d(x.double(), weight.detach().double(), padding=(0, 1, 1))  # the offset cancels in the variance
    var = torch.var(z, dim=(0, 2, 3, 4), unbiased=False)
    count = z.numel() // 4
    assert rel(stats[1] / count, var) < 1e-5 * max(1.0, offset / 1e2)  # out itself is rounded at |offset|
    (g,) = torch.autograd.grad(stats[1].sum(), weight)
    w = weight.detach().double().requires_grad_()
    z = F.conv3d(x.double(), w, padding=(0, 1, 1))
    (want,) = torch.autograd.grad(torch.var(z, dim=(0, 2, 3, 4), unbiased=False).sum() * count, w)
    assert rel(g, want) < 1e-4 * max(1.0, offset / 1e2)


def _bad(**changes):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 4, 3, 7, 7, generator=gen), weight=torch.randn(5, 4, 1, 3, 3, generator=gen))
    args.update(changes)
    x, weight = args.pop("x"), args.pop("weight")
    return lambda: p3d_conv(x, weight, **args)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (_bad(x=torch.randn(2, 4, 7, 7)), ValueError, "x must be 5-D"),
        (_bad(weight=torch.randn(5, 4, 3, 3)), ValueError, "weight must be 5-D"),
        (_bad(weight=torch.randn(5, 3, 1, 3, 3)), ValueError, "takes 3 input channels but x has 4"),
        (_bad(weight=torch.randn(5, 4, 1, 2, 2)), ValueError, "kernel extents must be odd"),
        (_bad(x=torch.randint(0, 5, (2, 4, 3, 7, 7))), TypeError, "x must be a floating-point tensor"),
        (_bad(stride=0), ValueError, "stride must be a positive int"),
        (_bad(scale=torch.ones(4)), ValueError, r"scale must have shape \(C_out,\) = \(5,\)"),
        (_bad(residual=torch.randn(2, 5, 3, 4, 4)), ValueError, r"residual must have the output's shape"),
        (_bad(residual=torch.randn(2, 5, 3, 7, 7, dtype=torch.float64)), TypeError, "residual has dtype"),
        (_bad(shift=torch.ones(5, device="meta")), ValueError, "shift is on meta but x is on cpu"),
        (_bad(stats=True, relu=True), ValueError, "stats=True with relu=True is not supported"),
        (_bad(backend="cpp"), ValueError, "expected one of: triton, onednn, reference, auto"),
        (_bad(backend="triton"), RuntimeError, "backend 'triton' was requested but cannot run"),
        (_bad(x=torch.randn(2, 4, 3, 7, 7, dtype=torch.float64), weight=torch.randn(5, 4, 1, 3, 3, dtype=torch.float64),
              backend="onednn"), TypeError, "backend 'onednn' does not take this input: dtype torch.float64"),
        (_bad(backend=3), TypeError, "backend argument must be a str, one of: triton, onednn, reference, auto"),
        # flags: a truthy string is no bool (the reference took "no" as True, the oneDNN op failed to cast it)
        (_bad(relu="no", backend="reference"), TypeError, "p3d_conv: relu must be a bool, got str 'no'"),
        (_bad(relu="no", backend="onednn"), TypeError, "p3d_conv: relu must be a bool, got str 'no'"),
        (_bad(stats=1), TypeError, "p3d_conv: stats must be a bool, got int 1"),
        (_bad(allow_tf32="yes"), TypeError, "p3d_conv: allow_tf32 must be a bool, got str 'yes'"),
        # empty extents, named before ATen's or oneDNN's own messages (an empty batch is an empty output)
        (_bad(x=torch.randn(2, 4, 0, 7, 7)), ValueError, r"x must have C_in, T, H and W > 0, got shape \(2, 4, 0, 7"),
        (_bad(x=torch.randn(2, 4, 3, 0, 7)), ValueError, r"x must have C_in, T, H and W > 0"),
        (_bad(x=torch.randn(2, 0, 3, 7, 7), weight=torch.randn(5, 0, 1, 3, 3)), ValueError,
         r"x must have C_in, T, H and W > 0, got shape \(2, 0, 3, 7, 7\)"),
        (_bad(weight=torch.randn(0, 4, 1, 3, 3)), ValueError, r"weight must have C_out > 0, got shape \(0, 4, 1, 3"),
        (_bad(x=None), TypeError, "p3d_conv: x must be a tensor, got NoneType"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(call, error, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["onednn", "reference"])
def test_empty_batch_is_an_empty_output(backend, gen):
    out = p3d_conv(torch.randn(0, 4, 3, 7, 7, generator=gen), torch.randn(5, 4, 1, 3, 3, generator=gen), stride=2,
                   backend=backend)  # fmt: skip
    assert out.shape == (0, 5, 3, 4, 4)


def test_auto_picks_onednn_on_cpu_and_the_reference_for_float64(gen, caplog):
    from lgd_fast.ops import _backend

    x = torch.randn(1, 3, 2, 5, 5, generator=gen)
    assert _backend.choose_backend("p3d_conv", x, backends=("triton", "onednn", "reference")) == "onednn"
    x64, w64 = x.double(), torch.randn(4, 3, 1, 3, 3, generator=gen, dtype=torch.float64)
    with caplog.at_level("WARNING"):
        out = p3d_conv(x64, w64)
    assert out.dtype == torch.float64
    assert rel(out, F.conv3d(x64, w64, padding=(0, 1, 1))) < 1e-15


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_torch_compile_matches_eager(grad, gen):
    x = random_input((2, 8, 3, 9, 9), torch.float32, torch.channels_last_3d, gen)
    weight = torch.randn(8, 8, 3, 1, 1, generator=gen).requires_grad_(grad)
    scale, shift = 0.5 + torch.rand(8, generator=gen), torch.randn(8, generator=gen)

    def unit(x):
        y = p3d_conv(x, weight, scale=scale, shift=shift, residual=x, relu=True)
        return p3d_conv(y, weight, stats=True)

    compiled = torch.compile(unit, fullgraph=True)
    with torch.set_grad_enabled(grad):
        (out, stats), (out_c, stats_c) = unit(x), compiled(x)
    assert rel(out_c, out) < 1e-6 and rel(stats_c, stats) < 1e-6
    if grad:
        (g,) = torch.autograd.grad(out.sum() + stats.sum(), weight)
        (g_c,) = torch.autograd.grad(out_c.sum() + stats_c.sum(), weight)
        assert rel(g_c, g) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_onednn_inference_op(residual, gen):
    x = random_input((2, 6, 3, 7, 7), torch.float32, torch.channels_last_3d, gen)
    weight = torch.randn(4, 6, 1, 3, 3, generator=gen)
    res = torch.randn(2, 4, 3, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    args = (x, weight, 0.5 + torch.rand(4, generator=gen), torch.randn(4, generator=gen), res if residual else None, 2)
    torch.library.opcheck(torch.ops.lgd_fast.p3d_conv_onednn.default, (*args, True))


@pytest.mark.parametrize("kernel", [(1, 1, 1), (3, 1, 1), (1, 3, 3)])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("epilogue", ["none", "scale+residual+relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_onednn_fake_gives_the_real_sizes_and_strides(kernel, x_layout, w_layout, epilogue, dtype, gen):
    """torch.compile trusts the fake kernel's strides: it must give the real op's for every layout of input and
    weight (oneDNN writes channels_last_3d when either suggests it), in float32 and bfloat16."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not onednn_takes(dtype):
        pytest.skip(f"oneDNN does not run {dtype} convolutions on this CPU")
    formats = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    x = torch.randn(2, 6, 3, 9, 9, generator=gen).to(dtype).contiguous(memory_format=formats[x_layout])
    w = torch.randn(5, 6, *kernel, generator=gen).to(dtype).contiguous(memory_format=formats[w_layout])
    scale = torch.rand(5, generator=gen) + 0.5 if epilogue != "none" else None
    residual = torch.randn(2, 5, 3, 5, 5, generator=gen).to(dtype) if epilogue != "none" else None
    args = (x, w, scale, None, residual, 2, epilogue != "none")
    real = torch.ops.lgd_fast.p3d_conv_onednn(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.lgd_fast.p3d_conv_onednn(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                    for a in args))  # fmt: skip
    assert (tuple(fake.shape), fake.stride(), fake.dtype) == (tuple(real.shape), real.stride(), real.dtype)


# conv3d_onednn: (C_in, C_out, kernel, Conv3d arguments); the geometries p3d_conv does not take
GENERAL = [
    (6, 6, (3, 3, 3), {"padding": 1, "groups": 6}),  # depthwise (CSN, X3D)
    (6, 4, (3, 3, 3), {"stride": 2, "padding": 1}),  # r3d's strided 3x3x3
    (6, 5, (1, 1, 1), {"stride": (2, 2, 2)}),  # r3d's shortcut
    (4, 4, (5, 1, 1), {"padding": (2, 0, 0), "groups": 2}),
    (6, 5, (2, 2, 2), {}),
    (6, 5, (3, 3, 3), {"padding": 2, "dilation": 2}),
]


def _general_args(case, x_layout, w_layout, residual, dtype, gen):
    ci, co, kernel, kwargs = case
    formats = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    conv = torch.nn.Conv3d(ci, co, kernel, bias=True, **kwargs)
    x = torch.randn(2, ci, 5, 9, 9, generator=gen).to(dtype).contiguous(memory_format=formats[x_layout])
    w = torch.randn(conv.weight.shape, generator=gen).to(dtype).contiguous(memory_format=formats[w_layout])
    bias = torch.randn(co, generator=gen).to(dtype)
    out_shape = F.conv3d(x[:1].float(), w.float(), None, conv.stride, conv.padding, conv.dilation, conv.groups).shape
    res = torch.randn((2, *out_shape[1:]), generator=gen).to(dtype) if residual else None
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return (x, w, bias, res, *geometry, residual), conv


@pytest.mark.parametrize("case", GENERAL, ids=lambda c: f"{'x'.join(map(str, c[2]))}-{c[3]}".replace(" ", ""))
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("residual", [False, True])
def test_conv3d_onednn_equals_the_conv_and_its_fake_the_strides(case, x_layout, w_layout, residual, gen):
    """Any Conv3d geometry as one oneDNN primitive with bias, residual addition and ReLU: equal to ATen's conv and
    epilogue (fp32; bf16 within its rounding), and the fake gives the real op's sizes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        args, conv = _general_args(case, x_layout, w_layout, residual, dtype, gen)
        x, w, bias, res = args[:4]
        if not onednn_takes(dtype):  # an AVX2-only CPU: oneDNN itself refuses (conv_bn never calls it there)
            with pytest.raises(RuntimeError, match="bf16 path needs the cpu support"):
                torch.ops.lgd_fast.conv3d_onednn(*args)
            continue
        real = torch.ops.lgd_fast.conv3d_onednn(*args)
        want = F.conv3d(x.double(), w.double(), bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups)
        want = torch.relu(want + res.double()) if residual else want
        assert rel(real, want) < tol, (dtype, rel(real, want))
        with FakeTensorMode() as mode:
            fake = torch.ops.lgd_fast.conv3d_onednn(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                      for a in args))  # fmt: skip
        assert (tuple(fake.shape), fake.stride(), fake.dtype) == (tuple(real.shape), real.stride(), real.dtype)


def test_opcheck_conv3d_onednn(gen):
    args, _ = _general_args(GENERAL[0], "channels_last_3d", "contiguous", True, torch.float32, gen)
    torch.library.opcheck(torch.ops.lgd_fast.conv3d_onednn.default, args)


def _fake_cuda(mode, *shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    """A fake tensor on a CUDA device (this torch need not have CUDA): sizes, strides, dtype and device only."""
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    return FakeTensor(mode, meta, torch.device("cuda"))


@pytest.mark.skipif(not hasattr(torch.ops.lgd_fast, "p3d_conv_triton"), reason="triton is not installed")
def test_triton_tf32_follows_the_cudnn_switch(monkeypatch):
    """float32 on CUDA: the Triton kernels get tf32 exactly when ``torch.backends.cudnn.allow_tf32`` is on (the
    switch cuDNN's own convs follow), unless the call says otherwise; never for 16-bit operands or on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lgd_fast.ops.p3d_conv import uses_tf32

    mode = FakeTensorMode()
    x = _fake_cuda(mode, 1, 8, 2, 5, 5, memory_format=torch.channels_last_3d)
    w = _fake_cuda(mode, 8, 8, 1, 3, 3)
    asked = []

    def triton_op(x, weight, scale, shift, residual, stride, relu, stats, allow_tf32):  # records, runs nothing
        asked.append(allow_tf32)
        return x, None

    monkeypatch.setattr(torch.ops.lgd_fast, "p3d_conv_triton", triton_op)
    with mode:
        for switch in (True, False):
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", switch)
            p3d_conv(x, w, backend="triton")
            p3d_conv(x, w, backend="triton", allow_tf32=not switch)
            assert uses_tf32(x) is switch
            assert not uses_tf32(_fake_cuda(mode, 2, dtype=torch.bfloat16))
            assert not uses_tf32(torch.ones(2), allow_tf32=True)  # the CPU has no tf32
    assert asked == [True, False, False, True]
