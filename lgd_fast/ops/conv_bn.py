"""Conv3d + BatchNorm3d (+ residual addition, + ReLU) of a model's modules, run as one fused convolution.

The one home for executing a model's convolution with what follows it. Every fast unit
(:mod:`lgd_fast.models.p3d`) and :func:`lgd_fast.convert` call :func:`conv_bn` (and :func:`conv_sum_bn` for P3D
variant B's parallel pair); nothing else calls the ``p3d_conv`` ops. It holds:

- the one fusability rule (:func:`fusable_reason`, :func:`norm_reason`): what :func:`~lgd_fast.ops.p3d_conv`
  computes exactly, so that a module either runs fused with the same result or is refused with the reason;
- BatchNorm as a per-channel affine map: folded from running statistics in eval (:func:`batch_norm_affine`),
  and in training from the per-channel sums the conv returns (:func:`batch_mean_var`), normalised by
  :class:`_NormalizeFromStats` with BatchNorm's own forward and backward, running statistics updated as
  ``nn.BatchNorm3d`` updates them;
- the eager CPU inference path: one oneDNN primitive per conv, the BatchNorm folded into its weight once and
  cached until a parameter or running statistic changes (their version counters are in the cache key).

A conv's bias is an epilogue shift: ``conv(x) + b`` before the BatchNorm (its statistics include it, as the
reference's do), and folded into the shift in eval.

``backend`` is what the execution plan (:mod:`lgd_fast.plan`) resolved for the layer: ``"auto"`` or one of
``p3d_conv``'s backends. How a layer runs (fused or its own modules, layout) is the plan's decision, not this
module's.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .p3d_conv import autocast_inputs, p3d_conv

__all__ = [
    "batch_mean_var",
    "batch_moments",
    "batch_norm_affine",
    "conv_bn",
    "conv_sum_bn",
    "folded_norm",
    "fusable_reason",
    "norm_reason",
    "uses_batch_stats",
]

Stats = torch.Tensor | None


# ---- what can be fused -----------------------------------------------------------------------------------


def fusable_reason(conv: nn.Module) -> str | None:
    """None if :func:`conv_bn` computes ``conv`` exactly, else why not (one sentence).

    The fused conv (:func:`~lgd_fast.ops.p3d_conv`) takes a Conv3d with odd kernel extents and "same" padding,
    temporal stride 1 and one spatial stride for H and W, no dilation or groups, zero padding; a bias is
    added in its epilogue.
    """
    if not isinstance(conv, nn.Conv3d):
        return f"{type(conv).__name__} is not a Conv3d"
    if conv.groups != 1 or conv.dilation != (1, 1, 1):
        return f"groups {conv.groups}, dilation {conv.dilation} (the fused convs take neither)"
    same = tuple(k // 2 for k in conv.kernel_size)
    if any(k % 2 == 0 for k in conv.kernel_size) or conv.padding not in (same, "same"):
        return f"kernel {tuple(conv.kernel_size)} with padding {conv.padding} is not an odd kernel with same padding"
    if conv.stride[0] != 1:
        return f"temporal stride {conv.stride[0]} (the fused convs stride space only)"
    if conv.stride[1] != conv.stride[2]:
        return f"spatial stride {conv.stride[1:]} differs between H and W"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    return None


def norm_reason(norm: nn.Module | None) -> str | None:
    """None if ``norm`` folds into a fused conv (BatchNorm3d, or no norm), else why not."""
    if norm is None or type(norm) is nn.BatchNorm3d:
        return None
    return f"{type(norm).__name__}, not BatchNorm3d (the fused convs fold BatchNorm3d only)"


# ---- BatchNorm as a per-channel affine map ----------------------------------------------------------------


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with the batch's statistics (training, or no running statistics)."""
    return norm.training or not norm.track_running_stats


def batch_norm_affine(
    norm: nn.Module | None, r: torch.Tensor, stats: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift), float32 (float64 for float64 ``r``), that ``norm`` applies to ``r``.

    Batch statistics (training) come from ``stats`` ((2, C): sum and sum of squares over (N, T, H, W), as
    :func:`~lgd_fast.ops.p3d_conv` returns them) where given, else from ``r`` (:func:`batch_moments`: mean,
    then the variance of the centred values, as BatchNorm computes them); they use the biased variance and
    update the running statistics with the unbiased one, as ``nn.BatchNorm3d`` does.
    Eval folds the running statistics. ``None`` (a unit that ends in an addition) is the identity.
    """
    channels = r.shape[1]
    acc = torch.promote_types(r.dtype, torch.float32)
    if norm is None:
        ones = torch.ones(channels, device=r.device, dtype=acc)
        return ones, torch.zeros_like(ones)
    if not isinstance(norm, nn.BatchNorm3d):
        raise TypeError(f"the fused path folds BatchNorm3d only, got {type(norm).__name__}")
    if uses_batch_stats(norm) and stats is not None:
        mean, var = batch_mean_var(norm, stats, r.numel() // channels, acc)
    elif uses_batch_stats(norm):
        mean, var = batch_moments(r)
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean.detach(), var.detach(), r.numel() // channels)
    else:
        mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        scale = scale * norm.weight.to(acc)
        shift = shift * norm.weight.to(acc) + norm.bias.to(acc)
    return scale, shift


def batch_mean_var(
    norm: nn.BatchNorm3d, stats: torch.Tensor, count: int, dtype: torch.dtype, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance, in ``dtype``, from (2, C) sums over ``count`` values per channel; in
    training also updates ``norm``'s running statistics (with the unbiased variance), as BatchNorm does.
    ``offset``: a per-channel constant left out of the sums (a conv's bias), added to the running mean only."""
    mean = stats[0].to(dtype) / count
    var = (stats[1].to(dtype) / count - mean * mean).clamp_min(0)
    if norm.training and norm.track_running_stats:
        running_mean = mean if offset is None else mean + offset.to(dtype)
        _update_running_stats(norm, running_mean.detach(), var.detach(), count)
    return mean, var


_DIMS = (0, 2, 3, 4)


class _BatchMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of r (N, C, T, H, W) over (N, T, H, W) in two passes: the mean, then
    the mean square of the centred values (no E[r^2] - E[r]^2 cancellation where the mean is many standard
    deviations from zero). Backward: (g_mean + 2 (r - mean) g_var) / count, centred likewise, so the mean's and
    the variance's gradients do not cancel in low precision either."""

    @staticmethod
    def forward(ctx, r):
        acc = torch.promote_types(r.dtype, torch.float32)
        count = r.numel() // r.shape[1]
        mean = r.to(acc).sum(_DIMS) / count
        centred = r.to(acc) - _channel(mean)  # one temporary, squared in place
        var = centred.mul_(centred).sum(_DIMS) / count
        ctx.save_for_backward(r, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        r, mean = ctx.saved_tensors
        count = r.numel() // r.shape[1]
        if g_var is None:
            return _channel(g_mean / count).expand(r.shape).to(r.dtype)
        grad = (r.to(mean.dtype) - _channel(mean)).mul_(_channel(2 * g_var / count))  # one temporary
        if g_mean is not None:
            grad.add_(_channel(g_mean / count))
        return grad.to(r.dtype)


def batch_moments(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance), (C,) each, of r (N, C, T, H, W) over (N, T, H, W), float32 (float64 for float64
    r), differentiable; two passes over r, as BatchNorm's own statistics (accurate where the mean is far from
    zero relative to the spread, unlike E[r^2] - E[r]^2)."""
    return _BatchMoments.apply(r)


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm3d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
    norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), momentum)


def folded_norm(norm: nn.BatchNorm3d, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval BatchNorm (running statistics), in ``like``'s accumulation dtype."""
    return batch_norm_affine(norm, like.new_empty((0, norm.num_features)))


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


class _NormalizeFromStats(torch.autograd.Function):
    """ReLU?(BatchNorm(y)) with the batch's mean and inverse std given (detached): forward and backward as
    BatchNorm's own, in float32 and rounded once. (Built from separate autograd pieces, the affine's gradient
    arrives rounded to y's dtype while the statistics' arrives in float32, and their near-cancellation leaves
    that rounding behind: seen at 25x PyTorch's bf16 error in single draws.)"""

    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, relu, offset=None):
        xhat = (y.float() - _channel(mean)) * _channel(invstd)
        out = xhat * _channel(weight.float()) + _channel(bias.float())
        ctx.save_for_backward(y, mean, invstd, weight, bias)
        ctx.relu = relu
        ctx.offset = None if offset is None else (offset.shape, offset.dtype)
        return (torch.relu(out) if relu else out).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, mean, invstd, weight, bias = ctx.saved_tensors
        xhat = (y.float() - _channel(mean)) * _channel(invstd)
        g = grad.float()
        if ctx.relu:
            g = g * (xhat * _channel(weight.float()) + _channel(bias.float()) > 0)
        count = y.numel() // y.shape[1]
        g_bias, g_weight = g.sum(_DIMS), (g * xhat).sum(_DIMS)
        g_y = _channel(weight.float() * invstd) * (g - _channel(g_bias / count) - xhat * _channel(g_weight / count))
        # a per-channel offset of y (a conv's bias) cancels in the normalisation: its gradient is exactly zero
        g_offset = None if ctx.offset is None else g_bias.new_zeros(ctx.offset[0], dtype=ctx.offset[1])
        return g_y.to(y.dtype), None, None, g_weight.to(weight.dtype), g_bias.to(bias.dtype), None, g_offset


def _normalize_train(
    norm: nn.BatchNorm3d, y: torch.Tensor, stats: torch.Tensor, relu: bool, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """ReLU?(norm(y + offset)) with batch statistics from the conv's (sum, sum of squares) of y; updates the
    running stats. A per-channel ``offset`` (a conv's bias) cancels in the normalisation, so it is kept out of
    the sums (where it would only move the mean away from zero and cost the variance precision)."""
    mean, var = batch_mean_var(norm, stats.detach(), y.numel() // y.shape[1], torch.float64, offset)
    invstd = torch.rsqrt(var + norm.eps).float()
    weight = norm.weight if norm.affine else torch.ones_like(invstd)
    bias = norm.bias if norm.affine else torch.zeros_like(invstd)
    return _NormalizeFromStats.apply(y, mean.float(), invstd, weight, bias, relu, offset)


# ---- the eager CPU inference path: oneDNN with folded weights ---------------------------------------------


def _stride(conv: nn.Conv3d) -> int:
    return conv.stride[1]


def _direct_onednn(backend: str, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Eager CPU inference (no autograd, not tracing) on the onednn backend: one oneDNN primitive per conv with
    cached folded weights. (Traced or with autograd, :func:`~lgd_fast.ops.p3d_conv` runs, which folds per call.)"""
    if backend not in ("auto", "onednn") or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or (residual is not None and residual.device.type != "cpu"):
        return False
    dtypes = {x.dtype} if residual is None else {x.dtype, residual.dtype}
    if torch.is_autocast_enabled("cpu"):
        dtypes = {torch.get_autocast_dtype("cpu")}
    return dtypes <= {torch.float32, torch.bfloat16}


def _fold_key(*tensors: torch.Tensor) -> tuple:
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


# conv module -> (key, weight, bias): the conv's weight with its eval BatchNorm folded in, in one dtype.
_FOLDED: weakref.WeakKeyDictionary[nn.Conv3d, tuple] = weakref.WeakKeyDictionary()


def _folded(conv: nn.Conv3d, norm: nn.BatchNorm3d | None, dtype: torch.dtype, extra_bias=(), *, shift: bool = True):
    """(weight * scale, shift + scale * biases, or None) of ``norm`` (eval; None: the identity) folded into
    ``conv``, in ``dtype``; ``extra_bias``: other convs' biases summed into this one's output (variant B)."""
    biases = [b for b in (conv.bias, *extra_bias) if b is not None] if shift else []
    stats = () if norm is None else (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    eps = None if norm is None else norm.eps
    key = (_fold_key(conv.weight, *biases, *(t for t in stats if t is not None)), dtype, shift, len(extra_bias), eps)
    cached = _FOLDED.get(conv)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            if norm is None:
                scale = torch.ones(conv.out_channels, dtype=torch.float32, device=conv.weight.device)
                bias = torch.zeros_like(scale)
            else:
                scale, bias = folded_norm(norm, conv.weight)
            for b in biases:
                bias = bias + scale * b.to(scale.dtype)
            weight = conv.weight
            if norm is not None:
                weight = weight * scale[:, None, None, None, None].to(weight.dtype)
            cached = (key, weight.to(dtype), bias.to(dtype) if shift and (norm is not None or biases) else None)
        _FOLDED[conv] = cached
    return cached[1], cached[2]


def _onednn(conv, norm, x, residual, relu, extra_bias=(), *, shift=True) -> torch.Tensor:
    x, residual = autocast_inputs(x.device.type, x, residual)
    weight, bias = _folded(conv, norm, x.dtype, extra_bias, shift=shift)
    return torch.ops.lgd_fast.p3d_conv_onednn(x, weight, None, bias, residual, _stride(conv), relu)


# ---- the public entry points ------------------------------------------------------------------------------


def _bias(conv: nn.Conv3d, like: torch.Tensor) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.to(torch.promote_types(like.dtype, torch.float32))


def conv_bn(
    x: torch.Tensor,
    conv: nn.Conv3d,
    norm: nn.BatchNorm3d | None = None,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
    backend: str = "auto",
):
    """``ReLU?(norm(conv(x) + residual))`` of a model's own modules as one fused conv.

    Args:
        x: (N, C_in, T, H, W), either layout; conv: a Conv3d :func:`fusable_reason` accepts (its bias included);
            norm: a BatchNorm3d (:func:`norm_reason`) or None. Eval folds its running statistics into the conv;
            training (batch statistics) normalises with the sums the conv returns and updates its running
            statistics, gradients as BatchNorm's.
        residual: (N, C_out, T, H_out, W_out) added before the norm, or None.
        relu: apply ReLU last.
        stats: with ``norm=None`` only (the caller applies the norm, as the LGD block's epilogue does): also
            return the per-channel (sum, sum of squares) of the output, (2, C_out) float32.
        backend: the conv backend (``"auto"``, ``"triton"``, ``"onednn"``, ``"reference"``).

    Returns:
        out (x's dtype, or the autocast dtype), and with ``stats`` ``(out, stats)``.
    """
    if stats and norm is not None:
        raise ValueError("conv_bn: stats=True returns the statistics for the caller's norm; pass norm=None")
    if norm is None:
        if not stats and _direct_onednn(backend, x, residual):
            return _onednn(conv, None, x, residual, relu)
        return p3d_conv(x, conv.weight, stride=_stride(conv), shift=_bias(conv, x), residual=residual, relu=relu,
                        stats=stats, backend=backend)  # fmt: skip
    if uses_batch_stats(norm):
        y, sums = p3d_conv(x, conv.weight, stride=_stride(conv), residual=residual, stats=True, backend=backend)
        return _normalize_train(norm, y, sums, relu, conv.bias)  # the bias cancels in the norm
    if residual is None and _direct_onednn(backend, x, None):
        return _onednn(conv, norm, x, None, relu)
    scale, shift = folded_norm(norm, x)
    if conv.bias is not None:
        shift = shift + scale * _bias(conv, x)
    if residual is not None:  # norm(c + r) = c * scale + (shift + r * scale)
        residual = (residual * _channel(scale)).to(residual.dtype)
    return p3d_conv(x, conv.weight, stride=_stride(conv), scale=scale, shift=shift, residual=residual, relu=relu,
                    backend=backend)  # fmt: skip


def conv_sum_bn(
    x: torch.Tensor, first: nn.Conv3d, second: nn.Conv3d, norm: nn.BatchNorm3d, *, relu: bool, backend: str = "auto"
) -> torch.Tensor:
    """``ReLU?(norm(first(x) + second(x)))`` (P3D variant B's parallel pair) as two fused convs: in eval
    ``first(x) * scale + shift`` then ``second(x) * scale + that``, so no pass rescales the first's output."""
    if uses_batch_stats(norm):
        return conv_bn(x, second, norm, residual=conv_bn(x, first, backend=backend), relu=relu, backend=backend)
    if _direct_onednn(backend, x, None):
        q = _onednn(first, norm, x, None, False, (second.bias,))
        return _onednn(second, norm, x, q, relu, shift=False)
    scale, shift = folded_norm(norm, x)
    for conv in (first, second):
        if conv.bias is not None:
            shift = shift + scale * _bias(conv, x)
    q = p3d_conv(x, first.weight, stride=_stride(first), scale=scale, shift=shift, backend=backend)
    return p3d_conv(x, second.weight, stride=_stride(second), scale=scale, residual=q, relu=relu, backend=backend)
