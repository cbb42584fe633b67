"""One convolution of a P3D unit with its BatchNorm, residual addition and ReLU fused into the same pass.

    z     = conv(x, weight) * scale[c] + shift[c] + residual        stride (1, S, S), "same" padding
    out   = ReLU(z) if relu else z
    stats = (sum of z, sum of (z - mean z)^2) over (N, T, H, W),    float32, (2, C_out), when asked
            per channel
                                                                  (of z as stored in x's dtype: what a
                                                                  BatchNorm after the conv takes)

``weight`` is (C_out, C_in, KT, KH, KW) with odd extents: the spatial 1xkxk conv, the temporal kx1x1 conv
(variant B's takes the spatial stride too) and the pointwise 1x1x1 conv of a P3D ResNet. Folded eval
BatchNorm is ``scale``/``shift``; in training, ``stats`` gives BatchNorm its batch statistics without a
separate pass over ``out`` (``batch_norm_affine`` in ``lgd_fast.ops.conv_bn``). Statistics are of
the value before the ReLU, as BatchNorm needs, so ``stats`` with ``relu`` is refused.

Backends (``lgd_fast.ops._backend``): ``triton`` (CUDA tensors; implicit-GEMM kernels in
``lgd_fast.kernels.p3d_conv``, registered with ``torch.library.triton_op``, forward, input and weight
gradients), ``onednn`` (CPU tensors: at inference one oneDNN convolution primitive with the scale folded into
the weight, the shift as its bias and the residual addition and ReLU as post-ops; with autograd or
statistics, ATen's convolution and the epilogue as tensor ops, which autograd differentiates), and
``reference`` (plain PyTorch, below). The choice of layout is the model's execution plan
(``lgd_fast.plan``), not the op's: ``onednn`` keeps ``x``'s layout, ``triton`` writes channels_last_3d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._prims_common import suggest_memory_format

from . import _backend, batch_norm_train
from ._common import check_flag, check_tensor, conv3d

__all__ = ["autocast_inputs", "p3d_conv", "p3d_conv_reference", "resolve_backend", "uses_tf32"]

OP_NAME = "p3d_conv"
BACKENDS = ("triton", "onednn", "reference")
_DTYPES = {"triton": (torch.float32, torch.bfloat16, torch.float16), "onednn": (torch.float32, torch.bfloat16)}
_REDUCE = (0, 2, 3, 4)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _geometry(weight: torch.Tensor, stride: int) -> tuple[list[int], list[int]]:
    kt, kh, kw = weight.shape[2:]
    return [kt // 2, kh // 2, kw // 2], [1, stride, stride]


def p3d_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int = 1,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
):
    """The op in plain PyTorch: ``F.conv3d``, then the epilogue in float32 (float64 for float64 inputs).

    Args:
        x: (N, C_in, T, H, W).
        weight: (C_out, C_in, KT, KH, KW), odd extents; padding (KT // 2, KH // 2, KW // 2).
        stride: spatial stride S (the conv's stride is (1, S, S)).
        scale, shift: (C_out,) per-channel affine map of the conv's output, or None.
        residual: (N, C_out, T, H_out, W_out) added after the affine map, or None.
        relu: apply ReLU last.
        stats: also return the per-channel sum of z as returned and its sum of squares about the mean (relu must
            be False): BatchNorm's statistics, mean = sum / count and biased variance = second / count.

    Returns:
        out, in x's dtype and (for the reference) x's layout; with ``stats``, ``(out, stats)`` where stats is
        (2, C_out) float32 (float64 for float64 inputs; :func:`p3d_conv` on the CPU's oneDNN backend computes them
        with :func:`channel_sums`, in float64).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    padding, strides = _geometry(weight, stride)
    z = conv3d(x, weight.to(x.dtype), stride=strides, padding=padding).to(acc)
    if scale is not None:
        z = z * _per_channel(scale.to(acc))
    if shift is not None:
        z = z + _per_channel(shift.to(acc))
    if residual is not None:
        z = z + residual.to(acc)
    out = (torch.relu(z) if relu else z).to(x.dtype)
    if not stats:
        return out
    return out, sums_as_returned(z, out)


def sums_as_returned(z: torch.Tensor, out: torch.Tensor, sums=None) -> torch.Tensor:
    """``sums`` (:func:`sums_about_mean`, the reference's, by default; the fast paths pass :func:`channel_sums`) of
    z as returned (``out``, z rounded to its dtype: what a BatchNorm after the conv takes), with the gradient taken
    at z (float32 or float64): there the statistics' gradient and the output's, large and nearly cancelling in
    BatchNorm's backward, meet in z's dtype and round once."""
    return (sums or sums_about_mean)(out if out.dtype == z.dtype else z + (out.to(z.dtype) - z).detach())


def channel_sums(z: torch.Tensor) -> torch.Tensor:
    """:func:`sums_about_mean` as the fast paths compute it: one pass of the compiled kernel where it applies
    (:mod:`lgd_fast.ops.batch_norm_train`: a float32 or bfloat16 CPU z; then in float64), else the same two passes.
    Differentiable either way."""
    if batch_norm_train.kernel_applies(z):
        return batch_norm_train.channel_moments(z)
    return sums_about_mean(z)


def sums_about_mean(z: torch.Tensor) -> torch.Tensor:
    """(2, C): per channel, the sum of z (N, C, T, H, W) and the sum of squares about its mean, over (N, T, H, W),
    in z's dtype; two passes (no E[z^2] - E[z]^2 cancellation). Differentiable: d/dz of the second is
    2 (z - mean) (the mean's own derivative sums to zero), as autograd gets it with the mean held fixed."""
    total = z.sum(_REDUCE)
    mean = (total / (z.numel() // z.shape[1])).detach()
    centred = z - _per_channel(mean)
    return torch.stack([total, (centred * centred).sum(_REDUCE)])


def _check(x, weight, stride, scale, shift, residual, relu, stats) -> None:
    for name, t in (("x", x), ("weight", weight), ("scale", scale), ("shift", shift), ("residual", residual)):
        if t is None:  # (an optional argument not given; x and weight never are)
            continue
        check_tensor(OP_NAME, name, t, floating=True)
        if t.device != x.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but x is on {x.device}")
    check_flag(OP_NAME, "relu", relu)
    check_flag(OP_NAME, "stats", stats)
    if x.dim() != 5:
        raise ValueError(f"{OP_NAME}: x must be 5-D (N, C, T, H, W), got shape {tuple(x.shape)}")
    if 0 in x.shape[1:]:  # (an empty batch is an empty output)
        raise ValueError(f"{OP_NAME}: x must have C_in, T, H and W > 0, got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"{OP_NAME}: weight must be 5-D (C_out, C_in, KT, KH, KW), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{OP_NAME}: weight must have C_out > 0, got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{OP_NAME}: weight takes {weight.shape[1]} input channels but x has {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"{OP_NAME}: kernel extents must be odd (same padding), got {tuple(weight.shape[2:])}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"{OP_NAME}: stride must be a positive int, got {stride!r}")
    c = weight.shape[0]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{OP_NAME}: {name} must have shape (C_out,) = ({c},), got {tuple(t.shape)}")
    if residual is not None:
        n, _, t_, h, w = x.shape
        want = (n, c, t_, (h - 1) // stride + 1, (w - 1) // stride + 1)  # odd kernel, same padding
        if tuple(residual.shape) != want:
            raise ValueError(f"{OP_NAME}: residual must have the output's shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{OP_NAME}: residual has dtype {residual.dtype} but x has dtype {x.dtype}")
    if stats and relu:
        raise ValueError(
            f"{OP_NAME}: stats=True with relu=True is not supported: the statistics are those of the value before "
            "the ReLU (what BatchNorm needs); apply the ReLU after normalising"
        )


def _check_backward(grad_out, grad_stats, out, x, weight, scale, stride, stats, needs) -> None:
    """The backward op's inputs fit one another (its kernels index by these extents: a mismatch would read past
    a tensor on the GPU rather than fail)."""
    _check(x, weight, stride, scale, None, None, False, False)
    n, _, t, h, w = x.shape
    want = (n, weight.shape[0], t, (h - 1) // stride + 1, (w - 1) // stride + 1)
    for name, tensor in (("out", out), ("grad_out", grad_out)):
        if tuple(tensor.shape) != want:
            raise ValueError(f"{OP_NAME} backward: {name} must have the output's shape {want}, got "
                             f"{tuple(tensor.shape)}")  # fmt: skip
        if tensor.device != x.device:
            raise ValueError(f"{OP_NAME} backward: {name} is on {tensor.device} but x is on {x.device}")
    if stats and grad_stats.numel() and tuple(grad_stats.shape) != (2, want[1]):
        raise ValueError(f"{OP_NAME} backward: grad_stats must be (2, C_out) = (2, {want[1]}), got "
                         f"{tuple(grad_stats.shape)}")  # fmt: skip
    if len(needs) != 5:
        raise ValueError(f"{OP_NAME} backward: needs holds 5 flags (x, weight, scale, shift, residual), got {needs}")


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The conv's tensors (input, weight, residual) in the autocast dtype when ``torch.autocast`` is on for
    ``device_type``, as autocast casts a conv's; else as they are. (The direct oneDNN calls of
    :mod:`lgd_fast.ops.conv_bn` bypass the dispatcher's autocast, so both paths cast here.)"""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether this CPU runs oneDNN's convolutions in ``dtype``: float32 everywhere, bfloat16 only with AVX-512
    (BW, VL, DQ) or AVX-NE-CONVERT. On other CPUs (AVX2 only) oneDNN refuses bfloat16 and ATen's own, slower
    convolution runs it, as it does the reference's."""
    if dtype == torch.bfloat16:
        return _backend._HAS_ONEDNN_BF16
    return dtype == torch.float32


def _supports(backend: str, x: torch.Tensor) -> str | None:
    if x.dtype not in _DTYPES[backend]:
        return f"dtype {x.dtype} is not one of {', '.join(map(str, _DTYPES[backend]))}"
    if backend == "onednn" and not onednn_takes(x.dtype):
        return f"this CPU has no oneDNN {x.dtype} convolution (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
    return None


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend :func:`p3d_conv` runs for input ``x`` when asked for ``backend`` (as it would choose it)."""
    return _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=_supports)


def uses_tf32(x: torch.Tensor, allow_tf32: bool | None = None) -> bool:
    """Whether p3d_conv's Triton kernels multiply ``x``'s float32 operands as tf32 (10-bit mantissas).

    Only float32 operands on a CUDA device can: 16-bit operands go to the tensor cores as they are, and the CPU
    (oneDNN, or the Triton interpreter) has no tf32. ``allow_tf32=None`` reads
    ``torch.backends.cudnn.allow_tf32`` (True unless the user turned it off), so a fast model's float32 convs
    are as precise as the cuDNN convs of the model it replaces; True or False overrides it for this call.
    """
    if not (x.device.type == "cuda" and x.dtype == torch.float32):
        return False
    return bool(torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32)


def p3d_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int = 1,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
    allow_tf32: bool | None = None,
    backend: str | None = None,
):
    """``ReLU?(conv(x, weight) * scale + shift + residual)`` in one pass, differentiable in every tensor.

    Arguments and returns as :func:`p3d_conv_reference`; ``allow_tf32`` lets the Triton kernels multiply
    float32 operands on tf32 tensor cores; None (the default) follows ``torch.backends.cudnn.allow_tf32``, the
    setting cuDNN's own convolutions follow (see :func:`uses_tf32`). ``backend``: ``"triton"``, ``"onednn"``,
    ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``. ``auto`` picks triton on CUDA tensors,
    onednn on CPU tensors (float32, and bfloat16 where the CPU's oneDNN runs it: :func:`onednn_takes`), else the
    reference with one warning. Under ``torch.autocast`` for x's device, x, weight and residual are cast to the
    autocast dtype first, as autocast casts a conv's.

    Raises:
        ValueError / TypeError: a shape, dtype, device or option that does not fit, naming the argument.
        RuntimeError: the backend asked for cannot run here.
    """
    check_tensor(OP_NAME, "x", x)
    check_tensor(OP_NAME, "weight", weight)
    if residual is not None:
        check_tensor(OP_NAME, "residual", residual)
    # autocast first, as for a conv: x, weight and residual in its dtype
    x, weight, residual = autocast_inputs(x.device.type, x, weight, residual)
    _check(x, weight, stride, scale, shift, residual, relu, stats)
    if allow_tf32 is not None:
        check_flag(OP_NAME, "allow_tf32", allow_tf32)
    choice = resolve_backend(x, backend)
    if choice != "reference" and (reason := _supports(choice, x)) is not None:
        raise TypeError(f"{OP_NAME}: backend {choice!r} does not take this input: {reason}")
    if choice == "triton":
        if not _TRITON_REGISTERED:
            raise RuntimeError(f"{OP_NAME}: the triton op is not registered ({_backend.triton_error()})")
        tf32 = uses_tf32(x, allow_tf32)
        out, st = torch.ops.lgd_fast.p3d_conv_triton(x, weight, scale, shift, residual, stride, relu, stats, tf32)
        return (out, st) if stats else out
    if choice == "onednn":
        return _onednn(x, weight, stride, scale, shift, residual, relu, stats)
    return p3d_conv_reference(
        x, weight, stride=stride, scale=scale, shift=shift, residual=residual, relu=relu, stats=stats
    )


# ---- CPU: oneDNN ------------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn(x, weight, stride, scale, shift, residual, relu, stats):
    if not stats and not _needs_grad(x, weight, scale, shift, residual):
        return torch.ops.lgd_fast.p3d_conv_onednn(x, weight, scale, shift, residual, stride, relu)
    padding, strides = _geometry(weight, stride)
    # With autograd or statistics: ATen's conv, then the epilogue in float32 (rounded once), as the reference.
    y = conv3d(x, weight.to(x.dtype), stride=strides, padding=padding)
    z = y.float() if y.dtype != torch.float32 and (stats or scale is not None or shift is not None) else y
    if scale is not None:
        z = z * _per_channel(scale.to(z.dtype))
    if shift is not None:
        z = z + _per_channel(shift.to(z.dtype))
    if residual is not None:
        z = z + residual.to(z.dtype)
    out = (torch.relu(z) if relu else z).to(x.dtype)
    if not stats:
        return out
    return out, sums_as_returned(z, out, channel_sums)  # stats refuse relu: out is z rounded


def _mkldnn_conv(x, w, bias, residual, padding, strides, dilation, groups, relu) -> torch.Tensor:
    """One oneDNN convolution primitive: ``ReLU?(conv(x, w) + bias + residual)``, the addition and the ReLU as
    post-ops. Output in oneDNN's layout (:func:`onednn_output_format`; channels_last_3d for a weight packed by
    ``torch.ops.mkldnn._reorder_convolution_weight``, in x's dtype already)."""
    packed = w.is_mkldnn
    w, bias = w if packed else w.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise.default(
            x, w, bias, padding, strides, dilation, groups, "relu" if relu else "none", [], ""
        )
    layout = torch.channels_last_3d if packed else onednn_output_format(x, w)
    # In bfloat16 oneDNN hands add+ReLU to an ATen kernel without bfloat16 unless the conv is ungrouped and
    # writes channels_last_3d: there, the ReLU after it.
    fused_relu = relu and (x.dtype == torch.float32 or (groups == 1 and layout == torch.channels_last_3d))
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual.contiguous(memory_format=layout), w, bias, padding, strides, dilation, groups, "add", None,
        "relu" if fused_relu else None, [], "",
    )  # fmt: skip
    return out.relu_() if relu and not fused_relu else out


@torch.library.custom_op("lgd_fast::p3d_conv_onednn", mutates_args=())
def _onednn_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    """Inference: one oneDNN primitive. conv(x, w) * scale = conv(x, w * scale); shift is its bias; the residual
    addition and the ReLU are its post-ops. No autograd (the caller checks)."""
    padding, strides = _geometry(weight, stride)
    w = weight if scale is None else weight * _per_channel(scale.to(weight.dtype))[..., None]
    return _mkldnn_conv(x, w, shift, residual, padding, strides, [1, 1, 1], 1, relu)


def onednn_output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout oneDNN's convolution writes: channels_last_3d when the input or the weight suggests it (ATen's
    rule, by exact strides: a 1x1x1 weight moved to channels_last_3d keeps contiguous strides and counts as
    contiguous), else contiguous."""
    cl = torch.channels_last_3d
    return cl if cl in (suggest_memory_format(x), suggest_memory_format(weight)) else torch.contiguous_format


def _onednn_fake(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """The output of a oneDNN convolution as a fake: the conv's size, oneDNN's layout."""
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=onednn_output_format(x, weight))


@_onednn_inference.register_fake
def _(x, weight, scale, shift, residual, stride, relu):
    padding, strides = _geometry(weight, stride)
    return _onednn_fake(x, weight, strides, padding, [1, 1, 1])


@torch.library.custom_op("lgd_fast::conv3d_onednn", mutates_args=())
def conv3d_onednn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    """``ReLU?(conv3d(x, weight, bias, stride, padding, dilation, groups) + residual)`` as one oneDNN primitive,
    for any Conv3d geometry (the convs ``p3d_conv`` does not take: groups, dilation, temporal strides, any
    zero padding). Inference only (no autograd): :mod:`lgd_fast.ops.conv_bn` calls it with a BatchNorm folded
    into ``weight`` and ``bias``."""
    return _mkldnn_conv(x, weight, bias, residual, list(padding), list(stride), list(dilation), groups, relu)


def conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, ...]:
    """(N, C_out, T, H, W) of a Conv3d's output."""
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation, strict=True)
    ]
    return (x_shape[0], weight_shape[0], *spatial)


@conv3d_onednn.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    return _onednn_fake(x, weight, stride, padding, dilation)


# ---- the Triton op (only where triton imports) ------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, scale, shift, residual, stride, relu, stats, allow_tf32 = inputs
    out, _ = output
    ctx.save_for_backward(out, x, weight, scale)
    ctx.options = (stride, relu, stats, allow_tf32)
    ctx.has = (scale is not None, shift is not None, residual is not None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (scale, shift, residual))


def _grad(ctx, grad_out, grad_stats):
    out, x, weight, scale = ctx.saved_tensors
    stride, relu, stats, allow_tf32 = ctx.options
    has_scale, has_shift, has_res = ctx.has
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    needs[2:5] = [needs[2] and has_scale, needs[3] and has_shift, needs[4] and has_res]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_stats is None:
        grad_stats = out.new_zeros((2, 0), dtype=torch.float32)
    grads = torch.ops.lgd_fast.p3d_conv_triton_backward(
        grad_out, grad_stats, out, x, weight, scale, stride, relu, stats, allow_tf32, needs
    )
    result = [g if need else None for g, need in zip(grads, needs, strict=True)]
    for i, dtype in zip((2, 3, 4), ctx.dtypes, strict=True):
        if result[i] is not None:
            result[i] = result[i].to(dtype)
    result[1] = result[1].to(weight.dtype) if result[1] is not None else None
    return (*result, None, None, None, None)


def _register_triton() -> bool:
    if _backend.triton_error() is not None:
        return False
    from lgd_fast.kernels import p3d_conv as kernels

    @torch.library.triton_op(f"lgd_fast::{OP_NAME}_triton", mutates_args=())
    def _triton_forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
        residual: torch.Tensor | None,
        stride: int,
        relu: bool,
        stats: bool,
        allow_tf32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(x, weight, stride, scale, shift, residual, relu, stats)  # (called directly, not through p3d_conv)
        return kernels.forward(x, weight, scale, shift, residual, stride, relu, stats, allow_tf32)

    @torch.library.triton_op(f"lgd_fast::{OP_NAME}_triton_backward", mutates_args=())
    def _triton_backward(
        grad_out: torch.Tensor,
        grad_stats: torch.Tensor,
        out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        stride: int,
        relu: bool,
        stats: bool,
        allow_tf32: bool,
        needs: Sequence[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_backward(grad_out, grad_stats, out, x, weight, scale, stride, stats, needs)
        # dL/dz through the ReLU and the statistics (d sum / dz = 1, d sum (z - mean)^2 / dz = 2 (z - mean): the
        # mean's own derivative sums to zero there; z = out, which has no ReLU with stats)
        gz = grad_out.float()
        if relu:
            gz = gz * (out > 0)
        if stats and grad_stats.numel():
            z = out.float()
            centred = z - _per_channel(z.mean(_REDUCE))
            gz = gz + _per_channel(grad_stats[0]) + 2 * centred * _per_channel(grad_stats[1])
        g_acc = gz if scale is None else gz * _per_channel(scale.float())
        g_acc = g_acc.to(x.dtype)
        gx = kernels.dgrad(g_acc, weight, tuple(x.shape), stride, allow_tf32) if needs[0] else gz.new_empty(0)
        gw = kernels.wgrad(x, g_acc, tuple(weight.shape), stride, allow_tf32) if needs[1] else gz.new_empty(0)
        if needs[2]:  # the conv's own output, recomputed: one forward GEMM rather than a saved tensor
            acc, _ = kernels.forward(x, weight, None, None, None, stride, False, False, allow_tf32, torch.float32)
            g_scale = (gz * acc).sum(_REDUCE)
        else:
            g_scale = gz.new_empty(0)
        g_shift = gz.sum(_REDUCE) if needs[3] else gz.new_empty(0)
        # outputs may alias neither inputs nor each other (grad_out.float() is grad_out itself when float32)
        g_res = (gz.clone() if gz is grad_out else gz) if needs[4] else gz.new_empty(0)
        return gx, gw, g_scale, g_shift, g_res

    _triton_forward.register_autograd(_grad, setup_context=_setup_context)
    return True


_TRITON_REGISTERED = _register_triton()
