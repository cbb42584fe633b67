"""Conv3d + BatchNorm3d (+ residual addition, + ReLU) of a model's modules, run as one fused convolution.

The one home for executing a model's convolution with what follows it. Every fast unit
(:mod:`lgd_fast.models.p3d`) and :func:`lgd_fast.convert` call :func:`conv_bn` (and :func:`conv_sum_bn` for P3D
variant B's parallel pair); nothing else calls the ``p3d_conv`` ops. It holds:

- the one fusability rule (:func:`fusable_reason`, :func:`norm_reason`): any zero-padded Conv3d and a
  BatchNorm3d (or a Conv2d and a BatchNorm2d applied to every frame: LGD-2D's units, run as the (1, k, k)
  Conv3d over (N, C, T, H, W), the frames' BatchNorm2d being BatchNorm3d over the same values), so that a
  module either runs fused with the same result or is refused with the reason; the P3D geometry
  (:func:`p3d_geometry_reason`) runs on :func:`~lgd_fast.ops.p3d_conv`, any other as one convolution primitive
  with the same epilogue;
- BatchNorm as a per-channel affine map: folded from running statistics in eval (:func:`batch_norm_affine`),
  and in training from the per-channel sum and sum of squares about the mean the conv returns
  (:func:`batch_mean_var`), normalised by
  :class:`_NormalizeFromStats` with BatchNorm's own forward and backward, running statistics updated as
  ``nn.BatchNorm3d`` updates them;
- BatchNorm synchronised over a process group (``torch.nn.SyncBatchNorm``, or
  :class:`lgd_fast.engine.sync_bn.SyncBatchNorm` on any device) where a process group is initialised: the
  per-process (count, sum, sum of squares about the mean) are merged over the group before folding
  (:func:`sync_stats`: Chan's rule in float64, differentiable), and the normalisation's backward all-reduces its
  two channel sums, as SyncBatchNorm does, so K processes normalise and differentiate as one process with the
  global batch;
- the CPU inference path: one oneDNN primitive per conv, the BatchNorm folded into its weight once and
  cached until a parameter or running statistic changes (their version counters are in the cache key); for
  channels_last_3d input the folded weight is also packed once per input shape into the blocked layout the
  primitive reads (``torch.ops.mkldnn._reorder_convolution_weight``, as inductor's freezing packs it), so no call
  reorders it (R50's res4/res5 convs, large weights on small frames, gained up to 15% each). The cache holds the
  packed copy besides the folded one: about twice the model's conv weights in memory, as a frozen graph holds.
  Under torch.compile without inductor's freezing (no autograd) the same primitive is one opaque op,
  :func:`conv_bn_folded`, with its own cache by the weight tensor, so a compiled graph neither folds per call
  nor runs an unfolded BatchNorm. (Written as aten conv + batch_norm, the compiled R50 was 0.93x its eager speed
  at batch 4 and 0.75x at batch 1, where ATen's conv takes its im2col path.) With freezing on while dynamo
  traces, the convs are the modules' aten ops, which freezing folds and packs (4% faster at batch 4 than the
  opaque op in one interleaved run).

A conv's bias is an epilogue shift: ``conv(x) + b`` before the BatchNorm (its statistics include it, as the
reference's do), and folded into the shift in eval.

``backend`` is what the execution plan (:mod:`lgd_fast.plan`) resolved for the layer: ``"auto"`` or one of
``p3d_conv``'s backends. How a layer runs (fused or its own modules, layout) is the plan's decision, not this
module's.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import batch_norm_train
from ._common import conv3d, traced_for_freezing
from .p3d_conv import (
    _mkldnn_conv,
    _onednn_fake,
    autocast_inputs,
    channel_sums,
    conv_output_shape,
    onednn_takes,
    p3d_conv,
    sums_as_returned,
)

__all__ = [
    "batch_mean_var",
    "batch_moments",
    "batch_norm_affine",
    "conv_bn",
    "conv_bn_folded",
    "conv_sum_bn",
    "fold_norm",
    "folded_norm",
    "fusable_reason",
    "norm_reason",
    "p3d_geometry_reason",
    "sync_group",
    "sync_stats",
    "uses_batch_stats",
]

Stats = torch.Tensor | None


# ---- what can be fused -----------------------------------------------------------------------------------


def fusable_reason(conv: nn.Module) -> str | None:
    """None if :func:`conv_bn` computes ``conv`` exactly, else why not (one sentence).

    A ``Conv2d`` is taken as the (1, kh, kw) Conv3d it is on every frame of an (N, C, T, H, W) input (its
    weight viewed with a unit temporal extent), which is how the fast LGD-2D runs its frames.

    Any ``Conv3d`` with zero padding given as numbers (or ``"valid"``, or ``"same"`` where it is symmetric):
    the convs a P3D network has (odd kernels with "same" padding, temporal stride 1, one spatial stride, no
    groups or dilation: :func:`p3d_geometry_reason`) run on :func:`~lgd_fast.ops.p3d_conv`'s kernels; every
    other geometry (grouped and depthwise convs, temporal strides, dilation, any padding) runs as one
    convolution primitive with the same epilogue (:func:`~lgd_fast.ops.p3d_conv.conv3d_onednn` at eager CPU
    inference, ATen's or cuDNN's convolution otherwise).
    """
    if not isinstance(conv, nn.Conv3d | nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv3d (or a Conv2d over frames)"
    if type(conv).forward not in (nn.Conv3d.forward, nn.Conv2d.forward):  # (weight standardisation, QAT, ...)
        return f"{type(conv).__name__} has a forward of its own (the fused convs read only its weight)"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin):  # (a lazy conv becomes a Conv3d once initialised)
        return f"{type(conv).__name__} is not initialised yet (a lazy module): run it once, then convert"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (the fused convs pad with zeros)"
    if _padding(conv) is None:
        return f"padding 'same' with kernel {tuple(conv.kernel_size)} pads asymmetrically"
    return None


def p3d_geometry_reason(conv: nn.Conv3d) -> str | None:
    """None if ``conv`` runs on :func:`~lgd_fast.ops.p3d_conv`'s kernels (odd kernel extents with "same" padding,
    temporal stride 1, one spatial stride for H and W, no dilation or groups), else why it runs as a plain
    convolution with the fused epilogue."""
    if conv.groups != 1:
        return f"groups {conv.groups}"
    kernel, stride, dilation = _kernel(conv), _strides(conv), _dilation(conv)
    if dilation != (1, 1, 1):
        return f"dilation {dilation}"
    same = tuple(k // 2 for k in kernel)
    if any(k % 2 == 0 for k in kernel) or _padding(conv) != list(same):
        return f"kernel {kernel} with padding {conv.padding} is not an odd kernel with same padding"
    if stride[0] != 1:
        return f"temporal stride {stride[0]}"
    if stride[1] != stride[2]:
        return f"spatial stride {stride[1:]} differs between H and W"
    return None


def _three(values, unit: int) -> tuple[int, ...]:
    """A Conv2d's (h, w) setting as the (t, h, w) of its Conv3d over frames (``unit`` in time)."""
    values = tuple(values)
    return values if len(values) == 3 else (unit, *values)


def _kernel(conv: nn.Module) -> tuple[int, ...]:
    return _three(conv.kernel_size, 1)


def _strides(conv: nn.Module) -> tuple[int, ...]:
    return _three(conv.stride, 1)


def _dilation(conv: nn.Module) -> tuple[int, ...]:
    return _three(conv.dilation, 1)


def _weight(conv: nn.Module) -> torch.Tensor:
    """The (C_out, C_in / groups, kt, kh, kw) weight: a Conv2d's viewed with kt = 1 (a view: gradients reach it)."""
    return conv.weight if conv.weight.dim() == 5 else conv.weight.unsqueeze(2)


def _padding(conv: nn.Module) -> list[int] | None:
    """The conv's zero padding per (t, h, w) as numbers, or None ("same" that pads one side more)."""
    if conv.padding == "valid":
        return [0, 0, 0]
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(_kernel(conv), _dilation(conv), strict=True)]
        return None if any(t % 2 for t in total) else [t // 2 for t in total]
    return list(_three(conv.padding, 0))


def norm_reason(norm: nn.Module | None) -> str | None:
    """None if ``norm`` folds into a fused conv (BatchNorm3d; BatchNorm2d after a Conv2d over frames; or no norm),
    else why not."""
    if norm is None or type(norm) in _NORMS or _synchronised(norm):
        return None
    return f"{type(norm).__name__}, not BatchNorm3d (the fused convs fold BatchNorm3d only)"


_NORMS = (nn.BatchNorm3d, nn.BatchNorm2d)  # BatchNorm2d: over the frames of a Conv2d run as (1, k, k)


# ---- BatchNorm as a per-channel affine map ----------------------------------------------------------------


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with the batch's statistics (training, or no running statistics)."""
    return norm.training or not norm.track_running_stats


def batch_norm_arguments(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """(running_mean, running_var, training, momentum): what nn.BatchNorm's forward passes ``F.batch_norm`` for
    ``norm``, counting the batch as it does (``num_batches_tracked`` in training; ``momentum=None``, the cumulative
    average, as 1 / that count). For code that normalises as ``norm`` would in a call of its own."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep = not norm.training or norm.track_running_stats
    return norm.running_mean if keep else None, norm.running_var if keep else None, batch_stats, momentum


def batch_norm_affine(
    norm: nn.Module | None, r: torch.Tensor, stats: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift), float32 (float64 for float64 ``r``), that ``norm`` applies to ``r``.

    Batch statistics (training) come from ``stats`` ((2, C): sum and sum of squares about the mean over
    (N, T, H, W), as :func:`~lgd_fast.ops.p3d_conv` returns them) where given, else from ``r``
    (:func:`batch_moments`: mean, then the variance of the centred values, as BatchNorm computes them); they
    use the biased variance and update the running statistics with the unbiased one, as ``nn.BatchNorm3d``
    does.
    Eval folds the running statistics. ``None`` (a unit that ends in an addition) is the identity.
    """
    channels = r.shape[1]
    acc = torch.promote_types(r.dtype, torch.float32)
    if norm is None:
        ones = torch.ones(channels, device=r.device, dtype=acc)
        return ones, torch.zeros_like(ones)
    if not isinstance(norm, _NORMS) and not _synchronised(norm):
        raise TypeError(f"the fused path folds BatchNorm3d only, got {type(norm).__name__}")
    if uses_batch_stats(norm) and stats is None and sync_group(norm) is not None:
        stats = channel_sums(r.to(acc))  # this process's part, differentiable, merged by batch_mean_var
    if uses_batch_stats(norm) and stats is not None:
        mean, var = batch_mean_var(norm, stats, r.numel() // channels, acc)
    elif uses_batch_stats(norm):
        mean, var = batch_moments(r)
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean.detach(), var.detach(), r.numel() // channels)
    else:
        mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    return _affine_of(mean, var, norm.eps, norm.weight if norm.affine else None, norm.bias if norm.affine else None)


def _affine_of(mean, var, eps: float, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's per-channel (scale, shift) from a mean and variance (in the accumulation dtype) and its affine
    parameters (None: not affine)."""
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        scale = scale * weight.to(mean.dtype)
        shift = shift * weight.to(mean.dtype) + bias.to(mean.dtype)
    return scale, shift


def batch_mean_var(
    norm: nn.BatchNorm3d, stats: torch.Tensor, count: int, dtype: torch.dtype, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance, in ``dtype``, from (2, C) sums (of the values, and of their squares about
    the mean: :func:`~lgd_fast.ops.p3d_conv`'s statistics) over ``count`` values per channel; in
    training also updates ``norm``'s running statistics (with the unbiased variance), as BatchNorm does.
    ``offset``: a per-channel constant left out of the sums (a conv's bias), added to the running mean only.
    A synchronised ``norm`` in a process group merges the sums of every process first (:func:`sync_stats`)."""
    mean, var, _, _ = _group_mean_var(norm, stats, count, dtype, offset)
    return mean, var


def _group_mean_var(norm, stats, count, dtype, offset=None):
    """:func:`batch_mean_var`, and the count the statistics cover (every process's, where synchronised) and the
    process group (or None)."""
    group = sync_group(norm)
    if group is not None:
        stats, count = sync_stats(stats, count, group)
    if count <= 1:  # as BatchNorm refuses: one value has no variance, and the running variance would go to 0
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} per channel for "
                         f"{type(norm).__name__}({norm.num_features})")  # fmt: skip
    mean = stats[0].to(dtype) / count
    var = stats[1].to(dtype) / count
    if norm.training and norm.track_running_stats:
        running_mean = mean if offset is None else mean + offset.to(dtype)
        _update_running_stats(norm, running_mean.detach(), var.detach(), count)
    return mean, var, count, group


_DIMS = (0, 2, 3, 4)


# ---- synchronised BatchNorm: statistics over a process group ---------------------------------------------


def _synchronised(norm: nn.Module) -> bool:
    """A BatchNorm meant to normalise over a process group: torch's SyncBatchNorm, or one that says so
    (``lgd_sync = True``: :class:`lgd_fast.engine.sync_bn.SyncBatchNorm`)."""
    return isinstance(norm, nn.SyncBatchNorm) or bool(getattr(norm, "lgd_sync", False))


def sync_group(norm: nn.Module | None):
    """The process group ``norm``'s batch statistics cover, or None (not synchronised, or no group initialised)."""
    if norm is None or not _synchronised(norm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if isinstance(norm, nn.SyncBatchNorm) else getattr(norm, "group", None)
    return group if group is not None else dist.group.WORLD


class _SyncStats(torch.autograd.Function):
    """(2, C) local (sum, sum of squares about the local mean) over n values -> the group's, merged by Chan's rule
    in float64: S = sum_k s_k, M2 = sum_k M2_k + sum_k n_k (mu_k - mu)^2. Backward: the gradients of the global
    sums from every process are summed (each process's loss reaches them), then dS/ds_k = 1,
    dM2/ds_k = 2 (mu_k - mu), dM2/dM2_k = 1."""

    @staticmethod
    def forward(ctx, stats, count, group):
        local = torch.cat([stats.detach().double().flatten(), stats.new_tensor([float(count)], dtype=torch.float64)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        channels = stats.shape[1]
        every = torch.stack(gathered)  # (K, 2C + 1)
        counts = every[:, -1:]
        sums, m2s = every[:, :channels], every[:, channels : 2 * channels]
        total = counts.sum()
        mean = sums.sum(0) / total
        m2 = m2s.sum(0) + (counts * (sums / counts - mean).square()).sum(0)
        ctx.group = group
        ctx.dtype = stats.dtype
        ctx.save_for_backward(stats.detach().double()[0] / count - mean)  # mu_k - mu
        ctx.mark_non_differentiable(total)
        return torch.stack([sums.sum(0), m2]), total

    @staticmethod
    def backward(ctx, grad, _grad_count):
        (offset,) = ctx.saved_tensors
        total = grad.double().contiguous()
        dist.all_reduce(total, group=ctx.group)
        grad_sum = total[0] + 2 * offset * total[1]
        return torch.stack([grad_sum, total[1]]).to(ctx.dtype), None, None


def sync_stats(stats: torch.Tensor, count: int, group) -> tuple[torch.Tensor, int]:
    """The group's (2, C) float64 (sum, sum of squares about the mean) and value count from this process's
    ``stats`` over ``count`` values (every process calls it, in the same order); differentiable in ``stats``."""
    merged, total = _SyncStats.apply(stats, count, group)
    return merged, int(round(total.item()))


class _BatchMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of r (N, C, T, H, W) over (N, T, H, W) in two passes: the mean, then
    the mean square of the centred values (no E[r^2] - E[r]^2 cancellation where the mean is many standard
    deviations from zero). Backward: (g_mean + 2 (r - mean) g_var) / count, centred likewise, so the mean's and
    the variance's gradients do not cancel in low precision either; where the kernels apply in one pass, as
    batch_norm_train's normalisation kernel ((r - mean) * invstd * weight + bias with invstd = 2 g_var / count,
    weight 1, bias g_mean / count), instead of three passes and a temporary."""

    @staticmethod
    def forward(ctx, r):
        acc = torch.promote_types(r.dtype, torch.float32)
        count = r.numel() // r.shape[1]
        if batch_norm_train.kernel_applies(r):  # one pass (lgd_fast.ops.batch_norm_train)
            total, m2 = torch.ops.lgd_fast.channel_moments(r)  # float64
            mean, var = (total / count).to(acc), (m2 / count).to(acc)
        else:
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
        if batch_norm_train.kernel_applies(r) and not torch.is_grad_enabled():  # (a double backward: the ops below)
            shift = torch.zeros_like(mean) if g_mean is None else g_mean / count
            return torch.ops.lgd_fast.bn_relu_forward(r, mean, 2 * g_var / count, torch.ones_like(mean), shift, None,
                                                      False)  # fmt: skip
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
    """ReLU?(BatchNorm(y) + shortcut) with the batch's mean and inverse std given (detached): forward and backward
    as BatchNorm's own, in float32 (float64 for float64 y) and rounded once. (Built from separate autograd
    pieces, the affine's gradient arrives rounded to y's dtype while the statistics' arrives in float32, and
    their near-cancellation leaves that rounding behind: seen at 25x PyTorch's bf16 error in single draws.)"""

    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, relu, offset, shortcut, group, count):
        # float32 and bfloat16 on the CPU: one pass of the compiled kernel (lgd_fast.ops.batch_norm_train)
        ctx.kernel = batch_norm_train.kernel_applies(y, shortcut)
        if ctx.kernel:
            out = torch.ops.lgd_fast.bn_relu_forward(y, mean, invstd, weight, bias, shortcut, relu)
        else:
            out = _affine(y, mean, invstd, weight, bias, shortcut)
            out = (torch.relu(out) if relu else out).to(y.dtype)
        ctx.save_for_backward(y, mean, invstd, weight, bias, shortcut)
        ctx.relu, ctx.group, ctx.count = relu, group, count
        ctx.offset = None if offset is None else (offset.shape, offset.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, mean, invstd, weight, bias, shortcut = ctx.saved_tensors
        acc = mean.dtype
        if ctx.kernel:  # the two sums, then grad_y and grad_shortcut: two passes (lgd_fast.ops.batch_norm_train)
            args = (grad, y, mean, invstd, weight, bias, shortcut, ctx.relu)
            totals = torch.ops.lgd_fast.bn_relu_backward_sums(*args)
        else:
            xhat = (y.to(acc) - _channel(mean)) * _channel(invstd)
            g = grad.to(acc)
            if ctx.relu:
                g = g * (_affine(y, mean, invstd, weight, bias, shortcut) > 0)
            totals = torch.stack([g.sum(_DIMS), (g * xhat).sum(_DIMS)])
        g_bias, g_weight = totals[0], totals[1]
        if ctx.group is not None:  # the normalisation's two sums over every process (SyncBatchNorm's backward)
            totals = totals.to(torch.float64, copy=True)  # a copy: g_bias and g_weight stay this process's
            dist.all_reduce(totals, group=ctx.group)
        mean_g, mean_gx = (totals / ctx.count).to(acc)  # ctx.count: the values the statistics cover
        if ctx.kernel:
            g_y, g_shortcut = torch.ops.lgd_fast.bn_relu_backward_apply(*args, mean_g, mean_gx, shortcut is not None)
            g_shortcut = None if shortcut is None else g_shortcut
        else:
            g_y = _channel(weight.to(acc) * invstd) * (g - _channel(mean_g) - xhat * _channel(mean_gx))
            g_shortcut = None if shortcut is None else g.to(shortcut.dtype)
        # a per-channel offset of y (a conv's bias) cancels in the normalisation: its gradient is exactly zero
        g_offset = None if ctx.offset is None else g_bias.new_zeros(ctx.offset[0], dtype=ctx.offset[1])
        # weight and bias: this process's sums; DDP averages them over the processes like every other gradient
        return (g_y.to(y.dtype), None, None, g_weight.to(weight.dtype), g_bias.to(bias.dtype), None, g_offset,
                g_shortcut, None, None)  # fmt: skip


def _affine(y, mean, invstd, weight, bias, shortcut):
    """(y - mean) * invstd * weight + bias (+ shortcut) in mean's dtype (the accumulation dtype)."""
    acc = mean.dtype
    out = (y.to(acc) - _channel(mean)) * _channel(invstd * weight.to(acc)) + _channel(bias.to(acc))
    return out if shortcut is None else out + shortcut.to(acc)


def _normalize_train(
    norm: nn.BatchNorm3d,
    y: torch.Tensor,
    sums: torch.Tensor,
    relu: bool,
    offset: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReLU?(norm(y + offset) + shortcut) with batch statistics from the (sum, sum of squares about the mean) of y
    (:func:`batch_mean_var`; updates the running statistics), normalised in float32 (float64 for float64 y). A
    per-channel ``offset`` (a conv's bias) cancels in the normalisation, so it is kept out of the statistics
    (where it would only move the mean away from zero and cost the variance precision)."""
    # count: what the statistics cover (every process's values where synchronised), for the backward's means
    mean, var, count, group = _group_mean_var(norm, sums.detach(), y.numel() // y.shape[1], torch.float64, offset)
    acc = torch.promote_types(y.dtype, torch.float32)
    invstd = torch.rsqrt(var + norm.eps).to(acc)
    weight = norm.weight if norm.affine else torch.ones_like(invstd)
    bias = norm.bias if norm.affine else torch.zeros_like(invstd)
    return _NormalizeFromStats.apply(y, mean.to(acc), invstd, weight, bias, relu, offset, shortcut, group, count)


# ---- the eager CPU inference path: oneDNN with folded weights ---------------------------------------------


def _stride(conv: nn.Module) -> int:
    return _strides(conv)[1]


def _direct_onednn(backend: str, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """CPU inference (no autograd) on the onednn backend: one oneDNN primitive per conv with cached folded
    weights, eagerly (:func:`_onednn`) or as torch.compile traces it (:func:`_traced_onednn`), except when traced
    for inductor's freezing, which folds and packs the modules' aten ops itself (:func:`_traced_cpu_eval`). (With
    autograd, :func:`~lgd_fast.ops.p3d_conv` runs, which folds per call.)"""
    if backend not in ("auto", "onednn") or torch.is_grad_enabled() or traced_for_freezing():
        return False
    if x.device.type != "cpu" or (residual is not None and residual.device.type != "cpu"):
        return False
    dtypes = {x.dtype} if residual is None else {x.dtype, residual.dtype}
    if torch.is_autocast_enabled("cpu"):
        dtypes = {torch.get_autocast_dtype("cpu")}
    return all(onednn_takes(dtype) for dtype in dtypes)  # bfloat16 only where this CPU's oneDNN runs it


def _fold_key(*tensors: torch.Tensor) -> tuple:
    return tuple((id(t), _version_of(t), t.data_ptr(), t.dtype, t.device) for t in tensors)


# conv module -> (key, weight, bias): the conv's weight with its eval BatchNorm folded in, in one dtype.
_FOLDED: weakref.WeakKeyDictionary[nn.Conv3d, tuple] = weakref.WeakKeyDictionary()


def fold_norm(conv: nn.Module, norm: nn.Module | None, dtype: torch.dtype, extra_bias=(), *, shift: bool = True):
    """(weight * scale, shift + scale * biases, or None) of ``norm`` (eval; None: the identity) folded into
    ``conv``, in ``dtype``; ``extra_bias``: other convs' biases summed into this one's output (variant B). Computed
    on every call, with autograd as the caller has it (traced by torch.compile, the fold is part of the graph);
    :func:`_folded` caches it."""
    biases = [b for b in (conv.bias, *extra_bias) if b is not None] if shift else []
    scale, bias = (None, None) if norm is None else folded_norm(norm, conv.weight)
    return _fold_into(_weight(conv), scale, bias, biases, dtype, shift)


def _folded(conv: nn.Conv3d, norm: nn.BatchNorm3d | None, dtype: torch.dtype, extra_bias=(), *, shift: bool = True):
    """:func:`fold_norm`, cached until a parameter or running statistic of the two changes."""
    biases = [b for b in (conv.bias, *extra_bias) if b is not None] if shift else []
    # num_batches_tracked: nn.BatchNorm's training forward updates the running statistics in place without a new
    # version; only its counter's add_ makes one (folds were stale after training through the modules)
    stats = () if norm is None else (norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                     getattr(norm, "num_batches_tracked", None))  # fmt: skip
    eps = None if norm is None else norm.eps
    key = (_fold_key(conv.weight, *biases, *(t for t in stats if t is not None)), dtype, shift, len(extra_bias), eps)
    cached = _FOLDED.get(conv)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *fold_norm(conv, norm, dtype, extra_bias, shift=shift))
        _FOLDED[conv] = cached
    return cached[1], cached[2]


def _fold_into(weight, scale, bias, biases, dtype, shift: bool):
    """(weight * scale, bias + scale * sum(biases), or None) in ``dtype``: an eval BatchNorm's (scale, shift)
    folded into a conv weight (None, None: no norm) with the convs' biases; no bias without ``shift``, nor
    without a norm and biases."""
    keep_bias = shift and (scale is not None or bool(biases))
    if scale is None:
        scale = torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
        bias = torch.zeros_like(scale)
    else:
        weight = weight * scale[:, None, None, None, None].to(weight.dtype)
    for b in biases:
        bias = bias + scale * b.to(scale.dtype)
    return weight.to(dtype), bias.to(dtype) if keep_bias else None


# conv module -> (folded weight, input shape, packed weight, the folded weight's version): the folded weight
# reordered once into the blocked layout oneDNN's primitive for that input shape reads (what inductor's freezing
# does with torch.compile), so no call reorders it again.
_PACKED: weakref.WeakKeyDictionary[nn.Conv3d, tuple] = weakref.WeakKeyDictionary()


def _packed(conv, weight, x, padding, strides, dilation) -> torch.Tensor:
    # The weight's version is in the key too: with no norm to fold and no cast, the "folded" weight is the conv's
    # own parameter, which an in-place update changes without making a new tensor.
    version = _version_of(weight)
    cached = _PACKED.get(conv)
    if cached is None or cached[0] is not weight or cached[1] != x.shape or cached[3] != version:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, padding, strides, dilation, conv.groups, list(x.shape)
        )
        cached = _PACKED[conv] = (weight, x.shape, packed, version)
    return cached[2]


def _onednn_packed(conv, x, weight, bias, residual, relu) -> torch.Tensor:
    """One oneDNN primitive with the packed weight (x in channels_last_3d: the output is channels_last_3d, as the
    plain weight's is)."""
    padding, strides, dilation = _padding(conv), list(_strides(conv)), list(_dilation(conv))
    packed = _packed(conv, weight, x, padding, strides, dilation)
    return _mkldnn_conv(x, packed, bias, residual, padding, strides, dilation, conv.groups, relu)


def _onednn(conv, norm, x, residual, relu, extra_bias=(), *, shift=True) -> torch.Tensor:
    x, residual = autocast_inputs(x.device.type, x, residual)
    weight, bias = _folded(conv, norm, x.dtype, extra_bias, shift=shift)
    if _strictly_channels_last(x):
        return _onednn_packed(conv, x, weight, bias, residual, relu)
    if p3d_geometry_reason(conv) is None:
        return torch.ops.lgd_fast.p3d_conv_onednn(x, weight, None, bias, residual, _stride(conv), relu)
    return torch.ops.lgd_fast.conv3d_onednn(
        x, weight, bias, residual, list(_strides(conv)), _padding(conv), list(_dilation(conv)), conv.groups, relu
    )


# ---- under torch.compile on the CPU, no autograd: the eager path's primitive, one opaque op per conv -------


# conv weight -> [key, folded weight, bias, input shape, packed weight]: the traced op's own cache, by the weight
# tensor it is given (the module's parameter, or inductor's frozen constant: the same tensor on every call).
_TRACED_FOLDS = torch.utils.weak.WeakTensorKeyDictionary()


@torch.library.custom_op("lgd_fast::conv_bn_folded", mutates_args=())
def conv_bn_folded(
    x: torch.Tensor,
    weight: torch.Tensor,
    biases: list[torch.Tensor],
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    shift: bool,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ReLU?(conv(x) * scale + shift + residual)``, the eval BatchNorm (running statistics; None: none) folded
    into the conv's ``weight`` (its parameter as it is: (C_out, C_in / groups, kt, kh, kw), or a Conv2d's (C_out,
    C_in / groups, kh, kw) run over frames) with the ``biases`` (summed into the output; none without ``shift``), as
    one oneDNN primitive: what :func:`conv_bn` runs eagerly at CPU inference, as the op torch.compile traces there
    (no autograd). The folded weight (and, for channels_last_3d x, its packing into oneDNN's blocked layout for x's
    shape) is made on the first call and kept until one of the tensors given changes (their version counters are in
    the key; inference tensors have none; pass the norm's ``num_batches_tracked``, whose version is the one that
    changes when ``nn.BatchNorm``'s training forward updates the running statistics), so compiled calls do not
    fold. The cache is keyed by ``weight``: pass the module's parameter, not a view made per call. x and residual in
    the dtype the conv computes in (float32, or bfloat16 where this CPU's oneDNN runs it)."""
    if x.device.type != "cpu" or not onednn_takes(x.dtype):
        raise ValueError(f"lgd_fast::conv_bn_folded runs oneDNN on the CPU in float32 or bfloat16 it takes, got "
                         f"{x.dtype} on {x.device}")  # fmt: skip
    norm = (norm_weight, norm_bias, running_mean, running_var, num_batches_tracked)
    tensors = (weight, *biases, *(t for t in norm if t is not None))
    key = (tuple((_version_of(t), t.data_ptr()) for t in tensors), x.dtype, eps, shift, len(biases))
    cached = _TRACED_FOLDS.get(weight)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            scale = bias = None
            if running_mean is not None:
                acc = torch.promote_types(weight.dtype, torch.float32)
                scale, bias = _affine_of(running_mean.to(acc), running_var.to(acc), eps, norm_weight, norm_bias)
            cached = [key, *_fold_into(_as_3d(weight), scale, bias, biases, x.dtype, shift), None, None]
        _TRACED_FOLDS[weight] = cached
    folded, bias = cached[1], cached[2]
    if _strictly_channels_last(x):
        if cached[3] != x.shape:
            packed = torch.ops.mkldnn._reorder_convolution_weight(folded, padding, stride, dilation, groups,
                                                                  list(x.shape))  # fmt: skip
            cached[3:] = [x.shape, packed]
        folded = cached[4]
    return _mkldnn_conv(x, folded, bias, residual, padding, stride, dilation, groups, relu)


def _version_of(t: torch.Tensor) -> int:
    """A tensor's version counter (0 for an inference tensor, which has none: a change made to it inside
    inference mode is not seen, nor a write through ``.data``; :func:`forget_folds` after such changes)."""
    return 0 if t.is_inference() else t._version


def forget_folds(module: nn.Module) -> None:
    """Drops the folded (and oneDNN-packed) weights of every conv in ``module``: its next eager inference call
    folds them again. For changes their key does not see: writes through ``.data``, and parameters made under
    ``torch.inference_mode`` and changed there (such tensors have no version counter)."""
    for m in module.modules():
        _FOLDED.pop(m, None)
        _PACKED.pop(m, None)


def _as_3d(weight: torch.Tensor) -> torch.Tensor:
    """A Conv3d's weight, or a Conv2d's viewed with a unit temporal extent (as :func:`_weight`)."""
    return weight if weight.dim() == 5 else weight.unsqueeze(2)


def _strictly_channels_last(x: torch.Tensor) -> bool:
    """channels_last_3d strides that are not also contiguous ones: oneDNN's packed path."""
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


@conv_bn_folded.register_fake
def _(x, weight, biases, norm_weight, norm_bias, running_mean, running_var, eps, residual, stride, padding,
      dilation, groups, relu, shift, num_batches_tracked=None):  # fmt: skip
    weight = _as_3d(weight)
    if _strictly_channels_last(x):  # the packed weight's primitive writes channels_last_3d
        shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
        return x.new_empty(shape).contiguous(memory_format=torch.channels_last_3d)
    return _onednn_fake(x, weight, stride, padding, dilation)


def _traced_onednn(conv, norm, x, residual, relu, extra_bias=(), *, shift=True) -> torch.Tensor:
    """:func:`_onednn` as torch.compile traces it: the autocast casts, then :func:`conv_bn_folded`."""
    x, residual = autocast_inputs(x.device.type, x, residual)
    biases = [b for b in (conv.bias, *extra_bias) if b is not None] if shift else []
    # a BatchNorm's weight and bias are None when it is not affine
    stats = (None,) * 4 if norm is None else (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    return torch.ops.lgd_fast.conv_bn_folded(
        x, conv.weight, biases, *stats, 0.0 if norm is None else norm.eps, residual, list(_strides(conv)),
        _padding(conv), list(_dilation(conv)), conv.groups, relu, shift,
        None if norm is None else getattr(norm, "num_batches_tracked", None),
    )  # fmt: skip


# ---- under torch.compile on the CPU with autograd: the modules' own ops, for inductor ---------------------


def _traced_cpu_eval(backend: str, x: torch.Tensor, norm: nn.Module | None) -> bool:
    """Traced by torch.compile, on the CPU's oneDNN, eval statistics, where :func:`conv_bn_folded` does not take the
    call (autograd on, inductor's freezing on, or a dtype this CPU's oneDNN does not run): the call is written as
    the modules' own aten ops (conv, batch_norm with running statistics, add, ReLU), which autograd differentiates
    and inductor lowers as it does the reference's (with freezing: the BatchNorm folded into a packed weight, the
    addition and the ReLU as post-ops). That shares an inductor bug of torch 2.13 with the reference: after a
    recompile with automatic dynamic shapes at some sizes (LGD-3D tiny at 2x3x3x96x96, then 2x3x8x32x32) lowering
    the conv fails with ``ValueRangeError: Invalid ranges [0:-1]``; with ``torch.compile(model, dynamic=False)``
    both compile."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu" and backend in ("auto", "onednn")
            and (norm is None or not uses_batch_stats(norm)))  # fmt: skip


def _modules_eval(x, conv, norm, residual, shortcut, relu, second=None) -> torch.Tensor:
    """``ReLU?(norm(conv(x) [+ second(x)] + residual) + shortcut)`` as the modules compute it (eval)."""
    def run(c):
        padding = _padding(c)
        padding = c.padding if padding is None else padding  # "same" that pads one side more: as the module
        return conv3d(x, _weight(c), c.bias, _strides(c), padding, _dilation(c), c.groups)

    y = run(conv) if second is None else run(conv) + run(second)
    if residual is not None:  # in the conv's dtype, as the eager path casts it (a float32 one under autocast)
        y = y + residual.to(y.dtype)
    if norm is not None:
        y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    if shortcut is not None:
        y = y + shortcut
    return torch.relu(y) if relu else y


# ---- the public entry points ------------------------------------------------------------------------------


def _bias(conv: nn.Conv3d, like: torch.Tensor) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.to(torch.promote_types(like.dtype, torch.float32))


def conv_bn(
    x: torch.Tensor,
    conv: nn.Conv3d,
    norm: nn.BatchNorm3d | None = None,
    *,
    residual: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
    backend: str = "auto",
):
    """``ReLU?(norm(conv(x) + residual) + shortcut)`` of a model's own modules as one fused conv.

    Args:
        x: (N, C_in, T, H, W), either layout; conv: a Conv3d :func:`fusable_reason` accepts (its bias included);
            norm: a BatchNorm3d (:func:`norm_reason`) or None. Eval folds its running statistics into the conv;
            training (batch statistics) normalises with the conv output's batch statistics and updates its
            running statistics, gradients as BatchNorm's.
        residual: (N, C_out, T_out, H_out, W_out) added before the norm (a P3D unit's), or None.
        shortcut: the same shape, added after the norm (a residual block's end: ``ReLU(norm(conv(x)) + x)``), or
            None. In a wider dtype than the conv computes in (a float32 shortcut under bfloat16 autocast), the
            sum and the ReLU run after the conv in that dtype, as ``branch + shortcut`` promotes.
        relu: apply ReLU last.
        stats: with ``norm=None`` and no shortcut only (the caller applies the norm, as the LGD block's
            epilogue does): also return the per-channel (sum, sum of squares about the mean) of the output,
            (2, C_out) float32 (float64 where the CPU kernel computes them: ``p3d_conv.channel_sums``).
        backend: the conv backend (``"auto"``, ``"triton"``, ``"onednn"``, ``"reference"``) for the convs that
            run on :func:`~lgd_fast.ops.p3d_conv` (:func:`p3d_geometry_reason`); the others run on the device's
            own convolution (oneDNN on the CPU, cuDNN on CUDA).

    Returns:
        out (x's dtype, or the autocast dtype), and with ``stats`` ``(out, stats)``.
    """
    if stats and (norm is not None or shortcut is not None):
        raise ValueError("conv_bn: stats=True returns the statistics for the caller's norm; pass norm=None and "
                         "no shortcut")  # fmt: skip
    if (reason := fusable_reason(conv)) is not None:
        raise ValueError(f"conv_bn: this conv cannot be fused: {reason}")
    if shortcut is not None and shortcut.dtype != (computed := compute_dtype(x)):
        if torch.promote_types(computed, shortcut.dtype) != computed:  # a wider shortcut: `branch + shortcut`
            out = conv_bn(x, conv, norm, residual=residual, backend=backend)  # promotes, as the modules' sum
            out = out + shortcut
            return torch.relu(out) if relu else out
        shortcut = shortcut.to(computed)  # a narrower one: exact in the conv's dtype
    if norm is None and shortcut is not None:  # without a norm both are additions after the conv
        residual = shortcut if residual is None else (residual + shortcut).to(residual.dtype)
        shortcut = None
    # CPU inference (eager or traced): one oneDNN primitive, the norm folded in, what is added after it as its
    # post-op
    if norm is None or not uses_batch_stats(norm):
        added = residual if norm is None else shortcut
        if not stats and _direct_onednn(backend, x, added if residual is None else residual):
            if norm is not None and residual is not None:  # norm(c + r) + s = c * scale + shift + (r * scale + s)
                x_, residual_ = autocast_inputs(x.device.type, x, residual)
                added = _added_after_norm(residual_, folded_norm(norm, x_)[0], shortcut)
            return (_traced_onednn if torch.compiler.is_compiling() else _onednn)(conv, norm, x, added, relu)
    if not stats and _traced_cpu_eval(backend, x, norm):
        return _modules_eval(x, conv, norm, residual, shortcut, relu)
    if p3d_geometry_reason(conv) is not None:
        return _conv_bn_general(x, conv, norm, residual, shortcut, relu, stats)
    if norm is None:
        return p3d_conv(x, _weight(conv), stride=_stride(conv), shift=_bias(conv, x), residual=residual, relu=relu,
                        stats=stats, backend=backend)  # fmt: skip
    if uses_batch_stats(norm):
        y, sums = p3d_conv(x, _weight(conv), stride=_stride(conv), residual=residual, stats=True, backend=backend)
        return _normalize_train(norm, y, sums, relu, conv.bias, shortcut)  # the bias cancels in the norm
    scale, shift = folded_norm(norm, x)
    if conv.bias is not None:
        shift = shift + scale * _bias(conv, x)
    added = _added_after_norm(residual, scale, shortcut)
    return p3d_conv(x, _weight(conv), stride=_stride(conv), scale=scale, shift=shift, residual=added, relu=relu,
                    backend=backend)  # fmt: skip


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv computes in on x: the autocast dtype for x's device where autocast is on, else x's (the fast
    models' stem kernel and the plan's rule for it read it too)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _added_after_norm(residual, scale, shortcut):
    """What is added after the folded norm's affine map: norm(c + r) + s = c * scale + shift + (r * scale + s)."""
    if residual is None:
        return shortcut
    added = residual * _channel(scale)
    return (added if shortcut is None else added + shortcut).to(residual.dtype)


def _conv_bn_general(x, conv, norm, residual, shortcut, relu, stats) -> torch.Tensor:
    """conv_bn for a conv p3d_conv does not take (with autograd, statistics, or off the CPU's oneDNN path): the
    device's convolution, the same epilogue."""
    x, residual, shortcut = autocast_inputs(x.device.type, x, residual, shortcut)
    # Without a norm the bias goes into the conv (added before the output is rounded to x's dtype, as the module
    # adds it: rounding first and adding after moves a ReLU's zero crossing by the bias's rounding); with one, it
    # cancels in training and folds into the shift in eval.
    bias = conv.bias.to(x.dtype) if norm is None and conv.bias is not None else None
    y = conv3d(x, _weight(conv).to(x.dtype), bias, _strides(conv), _padding(conv), _dilation(conv), conv.groups)
    if residual is not None:
        y = y + residual
    acc = torch.promote_types(y.dtype, torch.float32)
    if norm is not None and uses_batch_stats(norm):
        return _normalize_train(norm, y, channel_sums(y.detach().to(acc)), relu, conv.bias, shortcut)
    scale, shift = (None, None) if norm is None else folded_norm(norm, y)
    if conv.bias is not None and scale is not None:
        shift = shift + scale * _bias(conv, y)
    z = y.to(acc)
    if scale is not None:
        z = z * _channel(scale)
    if shift is not None:
        z = z + _channel(shift)
    if shortcut is not None:
        z = z + shortcut.to(acc)
    out = (torch.relu(z) if relu else z).to(y.dtype)
    if not stats:
        return out
    return out, sums_as_returned(z, out, channel_sums)


def conv_sum_bn(
    x: torch.Tensor, first: nn.Conv3d, second: nn.Conv3d, norm: nn.BatchNorm3d, *, relu: bool, backend: str = "auto"
) -> torch.Tensor:
    """``ReLU?(norm(first(x) + second(x)))`` (P3D variant B's parallel pair) as two fused convs: in eval
    ``first(x) * scale + shift`` then ``second(x) * scale + that``, so no pass rescales the first's output."""
    if uses_batch_stats(norm):
        return conv_bn(x, second, norm, residual=conv_bn(x, first, backend=backend), relu=relu, backend=backend)
    if _direct_onednn(backend, x, None):
        run = _traced_onednn if torch.compiler.is_compiling() else _onednn
        q = run(first, norm, x, None, False, (second.bias,))
        return run(second, norm, x, q, relu, shift=False)
    if _traced_cpu_eval(backend, x, norm):
        return _modules_eval(x, first, norm, None, None, relu, second=second)
    scale, shift = folded_norm(norm, x)
    for conv in (first, second):
        if conv.bias is not None:
            shift = shift + scale * _bias(conv, x)
    q = p3d_conv(x, _weight(first), stride=_stride(first), scale=scale, shift=shift, backend=backend)
    return p3d_conv(x, _weight(second), stride=_stride(second), scale=scale, residual=q, relu=relu, backend=backend)
