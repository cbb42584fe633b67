"""lgd_fast.ops.conv_bn (a model's Conv3d + BatchNorm3d + residual + ReLU as one fused conv) against its modules.

Every case: the fused call and the modules at the case's dtype, both against the modules in float64, eval
(folded running statistics) and train (batch statistics from the conv), with and without a conv bias, forward,
every gradient (input, residual, conv weight and bias, BatchNorm weight and bias) and the running statistics.
fp32 within 1e-5 (outputs) / 1e-4 (gradients) in every draw but the single worst; bf16 under the 2x-PyTorch
rule pooled over fresh draws (p3d_cases.check_pooled_ratio says why single draws are noise).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from p3d_cases import check_fp32_draws, check_pooled_ratio, rel
from torch import nn

from lgd_fast.ops import _backend as backend_module
from lgd_fast.ops import conv_bn as conv_bn_module
from lgd_fast.ops.conv_bn import conv_bn, conv_sum_bn, fusable_reason, norm_reason, p3d_geometry_reason
from lgd_fast.ops.p3d_conv import onednn_takes
from op_testing import SEED

# (kernel, stride, (N, C_in, T, H, W), C_out, bias, norm, residual, relu[, extra]); odd sizes, both strides.
# extra: {"conv": Conv3d arguments replacing stride (1, S, S) and same padding (the convs p3d_conv does not take:
# groups, depthwise, temporal strides, dilation, no padding, even kernels), "shortcut": a tensor added after the
# norm (a residual block's end)}. Every case with a ReLU has over 1400 output positions: in bfloat16 a few of them
# fall on the other side of zero than in float64, in ours and in PyTorch's at different positions, and each moves
# grad_x by its share (seen on a 375-position case: 3 flips in ours, none in PyTorch's, 39x PyTorch's error in that
# draw while the output's error was lower than PyTorch's in every draw).
CASES = [
    ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, True, True, False, True),
    ((3, 1, 1), 2, (1, 7, 5, 9, 9), 5, True, True, True, True),
    ((1, 1, 1), 1, (3, 4, 1, 5, 5), 7, True, False, True, False),
    ((3, 3, 3), 1, (2, 3, 5, 7, 7), 4, True, True, False, False),
    ((1, 3, 3), 2, (1, 6, 3, 15, 15), 5, False, True, True, True),
    ((3, 3, 3), 1, (2, 6, 5, 7, 7), 6, False, True, False, True, {"shortcut": True}),
    ((3, 3, 3), 2, (2, 5, 5, 11, 11), 7, False, True, False, True, {"conv": {"stride": 2, "padding": 1}}),
    ((3, 3, 3), 1, (2, 6, 5, 7, 7), 6, False, True, False, True, {"conv": {"padding": 1, "groups": 6}, "shortcut": 1}),
    ((5, 1, 1), 1, (1, 4, 7, 5, 5), 4, True, True, False, False, {"conv": {"padding": (2, 0, 0), "groups": 2}}),
    ((1, 1, 1), 2, (2, 5, 3, 7, 7), 6, False, True, False, False, {"conv": {"stride": (2, 2, 2)}}),  # r3d shortcut
    ((2, 2, 2), 1, (2, 3, 4, 8, 8), 5, True, True, True, True, {"conv": {"padding": 0}}),
    ((3, 3, 3), 1, (1, 4, 5, 9, 9), 5, True, False, False, True, {"conv": {"padding": 2, "dilation": 2}}),
]
MODES = ("eval", "train")
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "channels_last_3d")
FP32_DRAWS, BF16_DRAWS = 3, 12


def _extra(case) -> dict:
    return case[8] if len(case) > 8 else {}


def _case_id(case, mode, dtype, layout) -> str:
    kernel, stride, shape, co, bias, norm, residual, relu = case[:8]
    parts = ["x".join(map(str, kernel)), f"s{stride}", "x".join(map(str, shape)), f"co{co}"]
    parts += [f"{k}{v}".replace(" ", "") for k, v in _extra(case).get("conv", {}).items()]
    flags = (("bias", bias), ("bn", norm), ("res", residual), ("short", _extra(case).get("shortcut")), ("relu", relu))
    parts += [name for name, on in flags if on]
    return "-".join([*parts, mode, dtype, layout])


def _modules(case, gen):
    kernel, stride, shape, co, bias, norm, _, _ = case[:8]
    geometry = {"stride": (1, stride, stride), "padding": tuple(k // 2 for k in kernel)} | _extra(case).get("conv", {})
    conv = nn.Conv3d(shape[1], co, kernel, bias=bias, **geometry)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / conv.weight[0].numel() ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(co, generator=gen))
    bn = None
    if norm:
        bn = nn.BatchNorm3d(co)
        with torch.no_grad():
            bn.weight.copy_(0.5 + torch.rand(co, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(co, generator=gen))
            bn.running_mean.copy_(0.3 * torch.randn(co, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(co, generator=gen))
    return conv, bn


def _run(conv, bn, x, residual, relu, upstream, fused, shortcut=None):
    """Output, gradients of every input and parameter, running statistics: the fused call or the modules."""
    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    shortcut = None if shortcut is None else shortcut.clone().requires_grad_()
    if fused:
        out = conv_bn(x, conv, bn, residual=residual, shortcut=shortcut, relu=relu)
    else:
        out = conv(x) + (0 if residual is None else residual)
        out = bn(out) if bn is not None else out
        out = out + (0 if shortcut is None else shortcut)
        out = torch.relu(out) if relu else out
    params = {f"conv.{n}": p for n, p in conv.named_parameters()}
    params |= {} if bn is None else {f"bn.{n}": p for n, p in bn.named_parameters()}
    wrt = {"x": x, **({} if residual is None else {"residual": residual}), **params}
    wrt |= {} if shortcut is None else {"shortcut": shortcut}
    grads = torch.autograd.grad(out, list(wrt.values()), upstream.to(out.dtype), allow_unused=True)
    result = {"out": out.detach(), **{f"grad_{k}": g for k, g in zip(wrt, grads, strict=True)}}
    if bn is not None:
        result |= {"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}
    return result


def _draw(case, mode, dtype, layout, gen) -> list[dict]:
    kernel, stride, shape, co, bias, norm, with_residual, relu = case[:8]
    conv, bn = _modules(case, gen)
    memory_format = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out_shape = conv(x[:1]).shape[1:]
    out_shape = (shape[0], *out_shape)
    residual = torch.randn(out_shape, generator=gen) if with_residual else None
    shortcut = torch.randn(out_shape, generator=gen) if _extra(case).get("shortcut") else None
    upstream = torch.randn(out_shape, generator=gen)
    at = getattr(torch, dtype)

    def setup(target_dtype):
        c, b = copy.deepcopy(conv).to(target_dtype), copy.deepcopy(bn)
        if b is not None:
            b = b.to(target_dtype if target_dtype == torch.float64 else torch.float32).train(mode == "train")
        return c, b

    def cast(t, target_dtype):
        return None if t is None else t.to(target_dtype)

    f64 = torch.float64
    ref = _run(*setup(f64), cast(x, f64), cast(residual, f64), relu, upstream, False, cast(shortcut, f64))
    # PyTorch's own at the dtype (the conv in it, BatchNorm's parameters float32 as autocast keeps them), and ours
    plain = _run(*setup(at), cast(x, at), cast(residual, at), relu, upstream, False, cast(shortcut, at))
    ours = _run(*setup(at), cast(x, at), cast(residual, at), relu, upstream, True, cast(shortcut, at))
    rows = []
    for name, want in ref.items():
        got, yardstick = ours[name], plain[name]
        err, torch_err = rel(got, want), rel(yardstick, want)
        if name == "grad_conv.bias" and norm and mode == "train":
            # BatchNorm with batch statistics cancels a bias before it: its gradient is 0 (float64 gives ~1e-17),
            # so the error is measured against the scale of the gradient that does reach the channel (bn.bias)
            scale = ref["grad_bn.bias"].double().norm()
            err, torch_err = (got.double().norm() / scale).item(), (yardstick.double().norm() / scale).item()
        rows.append({
            "name": name, "err": err, "torch_err": torch_err,
            "finite": bool(torch.isfinite(got).all()), "shape_ok": got.shape == want.shape,
        })  # fmt: skip
    return rows


@pytest.mark.parametrize(
    "case,mode,dtype,layout",
    [(c, m, d, lay) for c in CASES for m in MODES for d in DTYPES for lay in LAYOUTS],
    ids=[_case_id(c, m, d, lay) for c in CASES for m in MODES for d in DTYPES for lay in LAYOUTS],
)
def test_conv_bn_matches_its_modules(case, mode, dtype, layout, gen):
    case_id = _case_id(case, mode, dtype, layout)
    draws = [_draw(case, mode, dtype, layout, gen) for _ in range(FP32_DRAWS if dtype == "float32" else BF16_DRAWS)]
    names = {row["name"] for row in draws[0]}
    assert {"out", "grad_x", "grad_conv.weight"} <= names
    assert case[4] is ("grad_conv.bias" in names)
    if dtype == "float32":
        out_rows = [[r for r in rows if r["name"] == "out"] for rows in draws]
        check_fp32_draws(out_rows, case_id, tol=1e-5)
        check_fp32_draws([[r for r in rows if r["name"] != "out"] for rows in draws], case_id, tol=1e-4)
    else:
        check_pooled_ratio(draws, case_id)


def _inference_draw(case, dtype, layout, gen, traced=False) -> list[dict]:
    """Eval, no autograd (the eager CPU path: one oneDNN primitive, the weight folded and, for channels_last_3d
    input, packed once): the fused call and the modules at the dtype against the modules in float64. ``traced``:
    the call as torch.compile traces it (:func:`_as_traced`: ``lgd_fast::conv_bn_folded``)."""
    conv, bn = _modules(case, gen)
    bn = None if bn is None else bn.eval()
    memory_format = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.randn(case[2], generator=gen).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out_shape = (x.shape[0], *conv(x[:1]).shape[1:])
    residual = torch.randn(out_shape, generator=gen) if case[6] else None
    shortcut = torch.randn(out_shape, generator=gen) if _extra(case).get("shortcut") else None
    at, relu = getattr(torch, dtype), case[7]

    def cast(t, target):
        return None if t is None else t.to(target)

    def modules(c, b, target):
        out = c(cast(x, target)) + (0 if residual is None else cast(residual, target))
        out = (b(out) if b is not None else out) + (0 if shortcut is None else cast(shortcut, target))
        return torch.relu(out) if relu else out

    with torch.no_grad():
        want = modules(copy.deepcopy(conv).double(), None if bn is None else copy.deepcopy(bn).double(), torch.float64)
        plain = modules(copy.deepcopy(conv).to(at), bn, at)
        fused_conv = copy.deepcopy(conv).to(at)
        with _as_traced() if traced else contextlib.nullcontext() as calls:
            got = conv_bn(cast(x, at), fused_conv, bn, residual=cast(residual, at), shortcut=cast(shortcut, at),
                          relu=relu)  # fmt: skip
    if traced:  # one op call, where this CPU's oneDNN runs the dtype (else the traced aten ops)
        assert len(calls) == (1 if onednn_takes(at) else 0), calls
    packed = conv_bn_module._PACKED.get(fused_conv)
    if traced:
        assert packed is None  # the traced op keeps its own cache, by the weight tensor
        packed = conv_bn_module._TRACED_FOLDS.get(fused_conv.weight)
        packed = None if packed is None or packed[4] is None else (None, packed[3], packed[4])
    if layout == "channels_last_3d" and onednn_takes(at):  # packed for this input; the output is channels-last
        assert packed is not None and packed[1] == x.shape and got.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert packed is None
    finite = bool(torch.isfinite(got).all())
    return [{"name": "out", "err": rel(got, want), "torch_err": rel(plain, want), "finite": finite,
             "shape_ok": got.shape == want.shape}]  # fmt: skip


@pytest.mark.parametrize(
    "case,dtype,layout",
    [(c, d, lay) for c in CASES for d in DTYPES for lay in LAYOUTS],
    ids=[_case_id(c, "inference", d, lay) for c in CASES for d in DTYPES for lay in LAYOUTS],
)
def test_inference_with_packed_weights_matches_its_modules(case, dtype, layout, gen):
    case_id = _case_id(case, "inference", dtype, layout)
    draws = [_inference_draw(case, dtype, layout, gen) for _ in range(FP32_DRAWS if dtype == "float32" else BF16_DRAWS)]
    if dtype == "float32":
        check_fp32_draws(draws, case_id, tol=1e-5)
    else:
        check_pooled_ratio(draws, case_id)


@contextlib.contextmanager
def _as_traced():
    """Within the block conv_bn takes the branch it takes under torch.compile's tracing, run eagerly: the same
    op calls the compiled graph makes. Every ``lgd_fast::conv_bn_folded`` call's fake (under FakeTensorMode, as
    inductor sees it) must give the real output's sizes, strides and dtype; the calls' arguments are yielded."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Checked(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.lgd_fast.conv_bn_folded.default:
                with FakeTensorMode() as mode:
                    fakes = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs or {}))
                    fake = func(*fakes[0], **fakes[1])
                assert (tuple(fake.shape), fake.stride(), fake.dtype) == (tuple(out.shape), out.stride(), out.dtype)
                calls.append(args)
            return out

    with pytest.MonkeyPatch.context() as patch, Checked():
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        yield calls


@pytest.mark.parametrize(
    "case,dtype,layout",
    [(c, d, lay) for c in CASES for d in DTYPES for lay in LAYOUTS],
    ids=[_case_id(c, "traced", d, lay) for c in CASES for d in DTYPES for lay in LAYOUTS],
)
def test_traced_inference_op_matches_its_modules_and_its_fake_the_strides(case, dtype, layout, gen):
    """Under torch.compile, CPU inference traces each conv as ``lgd_fast::conv_bn_folded`` (the eager path's
    primitive with its own cache of the folded and packed weight): equal to the modules, its fake the real op's
    sizes and strides, for every case, dtype and layout."""
    case_id = _case_id(case, "traced", dtype, layout)
    draws = [_inference_draw(case, dtype, layout, gen, traced=True)
             for _ in range(FP32_DRAWS if dtype == "float32" else BF16_DRAWS)]  # fmt: skip
    if dtype == "float32":
        check_fp32_draws(draws, case_id, tol=1e-5)
    else:
        check_pooled_ratio(draws, case_id)


def test_traced_op_folds_once_and_follows_the_weights(gen):
    """``lgd_fast::conv_bn_folded`` folds (and packs) on its first call and reuses that until a tensor it was
    given changes in place (version counters) or the input shape does; it refuses what oneDNN cannot run."""
    case = ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, True, True, False, True)
    conv, bn = _modules(case, gen)
    bn.eval()
    x = torch.randn(2, 5, 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    weight = conv.weight
    with torch.no_grad(), _as_traced() as calls:
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        first = conv_bn_module._TRACED_FOLDS[weight]
        folded, packed = first[1], first[4]
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        assert conv_bn_module._TRACED_FOLDS[weight][1] is folded and conv_bn_module._TRACED_FOLDS[weight][4] is packed
        for change in (lambda: conv.weight.mul_(1.5), lambda: bn.running_var.mul_(2.0), lambda: bn.bias.add_(0.5),
                       lambda: conv.bias.add_(1.0)):  # fmt: skip
            change()
            assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        wider = torch.randn(3, 5, 3, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        assert rel(conv_bn(wider, conv, bn, relu=True), torch.relu(bn(conv(wider)))) < 1e-6
        assert conv_bn_module._TRACED_FOLDS[weight][3] == wider.shape
    assert len(calls) == 7
    # inference only (no autograd formula: with autograd conv_bn traces the modules' aten ops), so detached
    args = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, calls[0])
    torch.library.opcheck(torch.ops.lgd_fast.conv_bn_folded.default, args)
    with pytest.raises(ValueError, match="conv_bn_folded runs oneDNN on the CPU in float32 or bfloat16"):
        torch.ops.lgd_fast.conv_bn_folded(x.double(), weight.double(), [], None, None, None, None, 0.0, None,
                                          [1, 1, 1], [0, 1, 1], [1, 1, 1], 1, False, True)  # fmt: skip


@pytest.mark.parametrize("freezing", [False, True], ids=["compiled", "compiled_freezing"])
def test_compiled_conv_bn_matches_eager_folded_or_frozen(freezing, gen):
    """torch.compile (inductor) of conv_bn at CPU inference equals the eager call. Without freezing the graph
    calls ``lgd_fast::conv_bn_folded`` (no aten conv) and a second call reuses its folded weight; with freezing
    on while dynamo traces, the modules' aten conv and batch_norm, which inductor folds and packs itself."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    case = ((1, 3, 3), 2, (2, 5, 3, 9, 9), 6, True, True, True, True)
    conv, bn = _modules(case, gen)
    bn.eval()

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x, residual):
            return conv_bn(x, self.conv, self.bn, residual=residual, relu=True)

    unit, graphs = Unit().eval(), []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(2, 5, 3, 9, 9, generator=gen).contiguous(memory_format=memory_format)
        residual = torch.randn(2, 6, 3, 5, 5, generator=gen)
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad(), inductor_config.patch(freezing=freezing):
            want = unit(x, residual)
            compiled = torch.compile(unit, backend=inductor, dynamic=False)
            got = compiled(x, residual)
            cached = conv_bn_module._TRACED_FOLDS.get(conv.weight)
            again = compiled(x, residual)
        targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
        folded_op = any("conv_bn_folded" in t for t in targets)
        assert folded_op != freezing and any("conv3d" in t for t in targets) == freezing, targets
        assert rel(got, want) < 1e-6 and torch.equal(got, again), (memory_format, rel(got, want))
        if not freezing:
            assert conv_bn_module._TRACED_FOLDS[conv.weight][1] is cached[1]
        if onednn_takes(torch.bfloat16):  # under autocast: the casts traced, the op (or aten ops) in bfloat16
            with torch.no_grad(), inductor_config.patch(freezing=freezing), torch.autocast("cpu", torch.bfloat16):
                want = unit(x, residual)
                torch._dynamo.reset()
                got = torch.compile(unit, backend=inductor, dynamic=False)(x, residual)
            assert got.dtype == want.dtype == torch.bfloat16 and rel(got, want) < 1e-2, rel(got, want)


def test_bf16_inference_without_onednn_bf16_runs_atens_conv(gen, monkeypatch):
    """A CPU whose oneDNN has no bfloat16 (AVX2 only: oneDNN raises "bf16 path needs the cpu support ..."): bf16
    inference, autocast or bf16 weights, runs ATen's convolution and the same epilogue, nothing packed."""
    monkeypatch.setattr(backend_module, "_HAS_ONEDNN_BF16", False)

    class Refuse:  # stands for an op and its overloads (.default, .binary)
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            raise AssertionError("a oneDNN primitive of lgd_fast ran")

    for name in ("_reorder_convolution_weight", "_convolution_pointwise"):
        monkeypatch.setattr(torch.ops.mkldnn, name, Refuse())
    case = ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, True, True, False, True)
    conv, bn = _modules(case, gen)
    bn.eval()
    x = torch.randn(2, 5, 3, 7, 7, generator=gen)
    with torch.no_grad():
        want = torch.relu(copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double())))
        for memory_format in (torch.contiguous_format, torch.channels_last_3d):
            xm = x.contiguous(memory_format=memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, plain = conv_bn(xm, conv, bn, relu=True), torch.relu(bn(conv(xm)))
            assert got.dtype == torch.bfloat16 and rel(got, want) <= 2 * rel(plain, want) + 1e-3
            conv16 = copy.deepcopy(conv).bfloat16()
            got = conv_bn(xm.bfloat16(), conv16, bn, relu=True)
            assert got.dtype == torch.bfloat16 and rel(got, want) <= 2 * rel(plain, want) + 1e-3
            assert conv16 not in conv_bn_module._PACKED and conv not in conv_bn_module._PACKED


def test_packed_weights_follow_the_weights_and_the_input_shape(gen):
    """The packed weight is remade when a parameter or running statistic changes or the input shape does."""
    case = ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, True, True, False, True)
    conv, bn = _modules(case, gen)
    bn.eval()
    x = torch.randn(2, 5, 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        first = conv_bn_module._PACKED[conv][2]
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        assert conv_bn_module._PACKED[conv][2] is first  # cached: not packed again
        for change in (lambda: conv.weight.mul_(1.5), lambda: bn.running_var.mul_(2.0), lambda: bn.bias.add_(0.5)):
            change()
            assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6
        wider = torch.randn(3, 5, 3, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        assert rel(conv_bn(wider, conv, bn, relu=True), torch.relu(bn(conv(wider)))) < 1e-6
        assert conv_bn_module._PACKED[conv][1] == wider.shape


def test_a_conv_without_norm_or_bias_sees_its_weight_change_in_place(gen):
    """With nothing to fold, the folded weight is the parameter itself: an in-place update must still repack it (it
    did not: the packed copy was keyed by the tensor alone, and later calls ran the old weight)."""
    case = ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, False, False, False, True)
    conv, _ = _modules(case, gen)
    x = torch.randn(2, 5, 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for change in (lambda: None, lambda: conv.weight.mul_(1.5), lambda: conv.weight.add_(0.1)):
            change()
            assert rel(conv_bn(x, conv, relu=True), torch.relu(conv(x))) < 1e-6


def test_eval_inference_folds_the_bias_into_one_onednn_call(gen, monkeypatch):
    """Eager CPU inference: one oneDNN call per conv, BN and the conv's bias folded in (cached until changed)."""
    case = ((1, 3, 3), 1, (2, 5, 3, 7, 7), 6, True, True, False, True)
    conv, bn = _modules(case, gen)
    bn.eval()
    calls = []
    real = torch.ops.lgd_fast.p3d_conv_onednn
    monkeypatch.setattr(torch.ops.lgd_fast, "p3d_conv_onednn", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 5, 3, 7, 7, generator=gen)
    with torch.no_grad():
        want = torch.relu(bn(conv(x)))
        assert rel(conv_bn(x, conv, bn, relu=True), want) < 1e-6
        assert len(calls) == 1 and calls[0][3] is not None  # the folded shift carries the bias
        conv.bias.add_(1.0)  # a changed bias must refold
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-6


def test_a_large_bias_costs_no_precision_in_training(gen):
    """The bias cancels in a training BatchNorm: the statistics are taken without it (with it, E[z^2] - E[z]^2 lost
    1.5e-3 of the output at bias 10 and 9e-2 at bias 100), and it moves only the running mean."""
    conv = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
    with torch.no_grad():
        conv.bias.fill_(100.0)
    bn = nn.BatchNorm3d(8)
    x = torch.randn(2, 8, 4, 28, 28, generator=gen)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    with torch.no_grad():
        want = torch.relu(ref_bn(ref_conv(x.double())))
        got = conv_bn(x, conv, bn, relu=True)
    assert rel(got, want) < 1e-5
    assert rel(bn.running_mean, ref_bn.running_mean) < 1e-6 and rel(bn.running_var, ref_bn.running_var) < 1e-5


def test_conv_sum_bn_with_biases(gen):
    """norm(first(x) + second(x)) (P3D variant B's pair), both convs with a bias, eval and train."""
    first = nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1))
    second = nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0))
    _, bn = _modules(((1, 1, 1), 1, (1, 4, 1, 1, 1), 6, False, True, False, False), gen)
    x = torch.randn(2, 4, 3, 9, 9, generator=gen)
    for training in (False, True):
        reference_bn = copy.deepcopy(bn).train(training)
        ours_bn = copy.deepcopy(bn).train(training)
        with torch.no_grad():
            want = torch.relu(reference_bn(first(x) + second(x)))
            got = conv_sum_bn(x, first, second, ours_bn, relu=True)
        assert rel(got, want) < 1e-5
        assert rel(ours_bn.running_mean, reference_bn.running_mean) < 1e-6


@pytest.mark.parametrize(
    "conv,reason,p3d",
    [
        (nn.Conv3d(4, 4, 3, padding=1, bias=True), None, None),
        (nn.Conv3d(4, 4, (1, 3, 5), padding=(0, 1, 2)), None, None),  # non-square odd kernels are fine
        (nn.Conv3d(4, 4, (3, 1, 3), padding="same"), None, None),
        (nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), groups=2), None, "groups 2"),
        (nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), dilation=2), None, "dilation"),
        (nn.Conv3d(4, 4, (1, 2, 2)), None, "not an odd kernel"),
        (nn.Conv3d(4, 4, (1, 3, 3), padding=0), None, "not an odd kernel with same padding"),
        (nn.Conv3d(4, 4, (1, 3, 3), padding="valid"), None, "not an odd kernel with same padding"),
        (nn.Conv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)), None, "temporal stride 2"),
        (nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 1, 2), padding=(0, 1, 1)), None, "differs between H and W"),
        (nn.Conv3d(4, 4, (1, 2, 2), padding="same"), "pads asymmetrically", None),
        (nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), padding_mode="reflect"), "padding_mode 'reflect'", None),
        (nn.Conv1d(4, 4, 3, padding=1), "not a Conv3d", None),
    ],
)
def test_one_fusability_rule(conv, reason, p3d, gen):
    """What fusable_reason accepts, conv_bn computes exactly (eval, with a norm and without); p3d_geometry_reason
    says which of those run on p3d_conv's kernels."""
    got = fusable_reason(conv)
    assert (got is None) if reason is None else (reason in got), got
    if reason is not None:
        if isinstance(conv, nn.Conv3d):
            with pytest.raises(ValueError, match="cannot be fused"):
                conv_bn(torch.randn(1, 4, 3, 7, 7, generator=gen), conv)
        return
    where = p3d_geometry_reason(conv)
    assert (where is None) if p3d is None else (p3d in where), where
    x = torch.randn(2, 4, 3, 7, 7, generator=gen)
    bn = nn.BatchNorm3d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=gen)
        assert rel(conv_bn(x, conv), conv(x)) < 1e-5
        assert rel(conv_bn(x, conv, bn, relu=True), torch.relu(bn(conv(x)))) < 1e-5


def _frames(x):
    """(N, C, T, H, W) -> (N * T, C, H, W), LGD-2D's layout."""
    return x.transpose(1, 2).flatten(0, 1)


def _videos(y, n):
    return y.unflatten(0, (n, -1)).transpose(1, 2)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["contiguous", "cl"])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 10, 3, stride=2, padding=1),
        nn.Conv2d(6, 10, 1, bias=False),
        nn.Conv2d(6, 10, (3, 5), padding=(1, 2)),
    ],
    ids=["3x3-stride2-bias", "1x1", "3x5"],
)
def test_conv2d_and_batchnorm2d_run_over_every_frame(conv, memory_format, train, gen):
    """LGD-2D's units: a Conv2d + BatchNorm2d (+ shortcut, ReLU) applied to each frame is conv_bn over the video
    (N, C, T, H, W) as the (1, k, k) conv; forward, every gradient and the running statistics, float64 exact."""
    conv = copy.deepcopy(conv).double()
    bn = nn.BatchNorm2d(10).double().train(train)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    n, t = 2, 3
    x = torch.randn(n, 6, t, 9, 11, generator=gen, dtype=torch.float64).contiguous(memory_format=memory_format)
    out_shape = _videos(conv(_frames(x)), n).shape
    shortcut = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    up = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = conv_bn(xa, conv, bn, shortcut=shortcut, relu=True)
    ref = _videos(torch.relu(twin_bn(twin_conv(_frames(xb))) + _frames(shortcut)), n)
    assert rel(ours, ref) < 1e-12
    (ours * up).sum().backward()
    (ref * up).sum().backward()
    assert rel(xa.grad, xb.grad) < 1e-12
    for a, b in [(conv.weight, twin_conv.weight), (bn.weight, twin_bn.weight), (bn.bias, twin_bn.bias)]:
        assert a.grad.shape == b.grad.shape and rel(a.grad, b.grad) < 1e-12
    if conv.bias is not None:
        assert rel(conv.bias.grad, twin_conv.bias.grad) < 1e-10 or twin_conv.bias.grad.norm() < 1e-10
    for a, b in zip(bn.buffers(), twin_bn.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    if not train:  # fp32 inference: the direct oneDNN primitive with the BatchNorm folded into the viewed weight
        conv32, bn32, x32 = conv.float(), bn.float(), x.float()
        with torch.no_grad():
            ours32 = conv_bn(x32, conv32, bn32, relu=True)
            ref32 = _videos(torch.relu(bn32(conv32(_frames(x32)))), n)
        assert rel(ours32, ref32) < 1e-5
        # as torch.compile traces it, under inference mode (LGD-2D's benchmark): the op's cache is keyed by the
        # Conv2d's own parameter, so the second call reuses the fold (keyed by the per-call 5D view, every call
        # folded again; and an inference-mode view has no version counter)
        with torch.inference_mode(), _as_traced() as calls:
            first = conv_bn(x32, conv32, bn32, relu=True)
            folded = conv_bn_module._TRACED_FOLDS[conv32.weight][1]
            second = conv_bn(x32, conv32, bn32, relu=True)
        assert len(calls) == 2 and conv_bn_module._TRACED_FOLDS[conv32.weight][1] is folded
        assert rel(first, ref32) < 1e-5 and torch.equal(first, second)


def test_norm_rule_and_bad_calls():
    assert norm_reason(nn.BatchNorm3d(4)) is None and norm_reason(None) is None
    assert "GroupNorm, not BatchNorm3d" in norm_reason(nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="pass norm=None"):
        conv_bn(torch.randn(1, 4, 1, 3, 3), nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4), stats=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["contiguous", "cl"])
def test_batch_moments_backward_in_one_pass(dtype, memory_format, gen):
    """conv_bn.batch_moments' backward, (g_mean + 2 (r - mean) g_var) / count, runs as batch_norm_train's one-pass
    kernel on CPU float32/bfloat16 in either layout (the op is called; r's dtype and layout come back): against
    float64, within 2x the error of the three PyTorch ops it replaced in r's own dtype, pooled over 4 draws (odd
    sizes, the mean 4 standard deviations from zero, where centring matters). Double backward and float64 keep the
    ops: gradcheck."""
    shape = (3, 5, 3, 7, 6)
    count = shape[0] * shape[2] * shape[3] * shape[4]
    ours_err = plain_err = 0.0
    for _ in range(4):
        r = (torch.randn(shape, generator=gen) + 4.0).to(dtype).contiguous(memory_format=memory_format)
        g_mean, g_var = torch.randn(2, shape[1], generator=gen)
        x = r.clone().requires_grad_()
        mean, var = conv_bn_module.batch_moments(x)
        with torch.profiler.profile() as prof:
            (grad,) = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x, retain_graph=True)
        assert any(e.name == "lgd_fast::bn_relu_forward" for e in prof.events())
        assert grad.dtype == dtype and grad.is_contiguous(memory_format=memory_format)
        g_mean_, g_var_, m = (t.detach()[:, None, None, None] for t in (g_mean, g_var, mean))
        exact = (g_mean_.double() + 2 * (r.double() - r.double().mean((0, 2, 3, 4), keepdim=True)) * g_var_) / count
        plain = (r.float() - m).mul_(2 * g_var_ / count) + g_mean_ / count  # the three ops it replaced, r's dtype
        (twice,) = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x, create_graph=True)
        assert rel(twice.detach(), exact) <= 2 * rel(plain.to(dtype), exact) + 1e-7  # (create_graph: the ops)
        ours_err += rel(grad, exact) ** 2
        plain_err += rel(plain.to(dtype), exact) ** 2
    assert ours_err**0.5 <= 2 * plain_err**0.5, f"{ours_err**0.5:.2e} vs {plain_err**0.5:.2e} (seed {SEED})"
    r64 = (torch.randn((2, 3, 2, 3, 2), generator=gen, dtype=torch.float64) + 4.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: conv_bn_module.batch_moments(t), (r64,))
    assert torch.autograd.gradgradcheck(lambda t: conv_bn_module.batch_moments(t), (r64,))
