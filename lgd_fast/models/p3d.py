"""Fast P3D units: the residual units of LGD-3D run as :func:`~lgd_fast.ops.p3d_conv` calls with fused epilogues.

Each unit computes what the reference :class:`~lgd_fast.models.blocks.P3DBottleneck` /
:class:`~lgd_fast.models.blocks.P3DBasicBlock` computes, from the very same modules and parameters, with every
BatchNorm, ReLU and addition that follows a convolution moved into that convolution's epilogue:

- eval (running statistics): a BatchNorm is folded into the conv before it as ``scale``/``shift``, and the
  ReLU and the variant's addition ride along, so each conv is one pass (on the CPU, one oneDNN primitive).
  Variant B's ``ReLU(BN(S(z) + T(z)))`` is ``S(z) * scale + shift`` then ``T(z) * scale + that``, ReLU.
- training (batch statistics): each conv that feeds a BatchNorm returns the per-channel sum and sum of
  squares of its output from its epilogue; :func:`batch_norm_affine` turns them into ``scale``/``shift``
  (differentiably, so gradients flow as through BatchNorm, and the running statistics are updated as
  BatchNorm updates them), and one pass applies them with the ReLU.

On the CPU the strategy is the one measured fastest there (``benchmarks/run_p3d_cpu.py``,
``benchmarks/results/p3d_cpu.json``): the fused eval path above, in the layout :func:`cpu_memory_format` picks
per block (the fast LGD-3D converts between stages); in training, the block's own modules, because oneDNN's
convolutions cannot emit statistics (a separate pass computes them either way) and ATen's fused BatchNorm
kernels, forward and backward, beat the composite; and blocks whose input frames are smaller than 14x14 pixels
run their own modules in both modes (:func:`cpu_block_is_fused`: fusion lost there, measured per block).
:func:`cpu_fused` forces the fused path on CPU tensors in every case (tests use it, so that path is checked
here, not only on a GPU).

The unit's last BatchNorm is left to the caller (the fast LGD block's diffusion epilogue folds it), so
:func:`residual_body` returns the unit's output before it and, in training, that output's statistics.
:class:`FastP3DBottleneck` and :class:`FastP3DBasicBlock` are the reference blocks with this body; they add no
state, so they load the reference's state_dict, and :func:`to_fast_unit` converts a reference block in place.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..ops import _backend, p3d_conv
from .blocks import P3DBasicBlock, P3DBottleneck

__all__ = [
    "FastP3DBasicBlock",
    "FastP3DBottleneck",
    "batch_norm_affine",
    "check_fusable",
    "cpu_block_is_fused",
    "cpu_fused",
    "cpu_native",
    "cpu_memory_format",
    "residual_body",
    "shortcut",
    "to_fast_unit",
]

Stats = torch.Tensor | None
_CPU_FUSED = {"training": False, "small_frames": False}  # what cpu_fused() forces on CPU tensors
# Measured (benchmarks/results/p3d_cpu.json): channels_last_3d speeds oneDNN's P3D convs up on large frames and
# slows them down on small ones; blocks whose input frames have at least this many pixels run in it on the CPU
# (R50 at 112 px: res2, res3 and res4's strided first block; res4's other blocks and res5 stay contiguous).
CPU_CHANNELS_LAST_MIN_PIXELS = 14 * 14
# Measured per block (eval and a training step, R50 at 16x112x112 and lgd3d_tiny at 16x32x32, 2-core CPU): the
# fused block beat the reference block by 1.07-1.38x on 28x28 and 14x14 frames, tied on 7x7 and lost 3-22% on
# 4x4 and smaller (per-call overhead of the fused ops outweighs the passes they save). Smaller blocks run their
# own modules on the CPU.
CPU_FUSED_MIN_PIXELS = 14 * 14


def cpu_memory_format(height: int, width: int) -> torch.memory_format:
    """The layout a fast block runs in on the CPU, from its input frame size (H, W)."""
    return torch.channels_last_3d if height * width >= CPU_CHANNELS_LAST_MIN_PIXELS else torch.contiguous_format


@contextlib.contextmanager
def cpu_fused(*, training: bool = True, small_frames: bool = True):
    """Within the block, CPU tensors take the fused path where the measured CPU strategy (module docstring) would
    not: in training (statistics from the conv epilogues) if ``training``, and for frames under 14x14 if
    ``small_frames``. Tests use it, so that the fused code is checked on this machine."""
    before = dict(_CPU_FUSED)
    _CPU_FUSED.update(training=training, small_frames=small_frames)
    try:
        yield
    finally:
        _CPU_FUSED.update(before)


def cpu_block_is_fused(x: torch.Tensor) -> bool:
    """Whether a fast block with input ``x`` runs fused: always off the CPU, else when its frames have at least
    ``CPU_FUSED_MIN_PIXELS`` pixels (measured, see there) or :func:`cpu_fused` forces small frames."""
    if x.device.type != "cpu" or _CPU_FUSED["small_frames"]:
        return True
    return x.shape[-2] * x.shape[-1] >= CPU_FUSED_MIN_PIXELS


def cpu_native(x: torch.Tensor, modules) -> bool:
    """Whether ``modules`` (a unit's, or any conv/BatchNorm group's) run as themselves on input ``x`` instead of
    fused: on the CPU, for small frames and in training (both measured faster there), unless :func:`cpu_fused`
    says otherwise."""
    if x.device.type != "cpu":
        return False
    if not cpu_block_is_fused(x):
        return True
    training = any(isinstance(m, nn.BatchNorm3d) and uses_batch_stats(m) for m in modules)
    return training and not _CPU_FUSED["training"]


def _native(block: nn.Module, x: torch.Tensor) -> bool:
    return cpu_native(x, block.modules())


# ---- BatchNorm as a per-channel affine map ----------------------------------------------------------


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with the batch's statistics (training, or no running statistics)."""
    return norm.training or not norm.track_running_stats


def batch_norm_affine(
    norm: nn.Module | None, r: torch.Tensor, stats: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift), float32 (float64 for float64 ``r``), that ``norm`` applies to ``r``.

    Batch statistics (training) come from ``stats`` ((2, C): sum and sum of squares over (N, T, H, W), as
    :func:`~lgd_fast.ops.p3d_conv` returns them) where given, else from ``r`` (:func:`channel_sums`); they use
    the biased variance
    and update the running statistics with the unbiased one, as ``nn.BatchNorm3d`` does. Eval folds the
    running statistics. ``None`` (a unit that ends in an addition) is the identity.
    """
    channels = r.shape[1]
    acc = torch.promote_types(r.dtype, torch.float32)
    if norm is None:
        ones = torch.ones(channels, device=r.device, dtype=acc)
        return ones, torch.zeros_like(ones)
    if not isinstance(norm, nn.BatchNorm3d):
        raise TypeError(f"the fused path folds BatchNorm3d only, got {type(norm).__name__}")
    if uses_batch_stats(norm):
        mean, var = batch_mean_var(norm, channel_sums(r) if stats is None else stats, r.numel() // channels, acc)
    else:
        mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        scale = scale * norm.weight.to(acc)
        shift = shift * norm.weight.to(acc) + norm.bias.to(acc)
    return scale, shift


def batch_mean_var(
    norm: nn.BatchNorm3d, stats: torch.Tensor, count: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance, in ``dtype``, from (2, C) sums over ``count`` values per channel; in
    training also updates ``norm``'s running statistics (with the unbiased variance), as BatchNorm does."""
    mean = stats[0].to(dtype) / count
    var = (stats[1].to(dtype) / count - mean * mean).clamp_min(0)
    if norm.training and norm.track_running_stats:
        _update_running_stats(norm, mean.detach(), var.detach(), count)
    return mean, var


def channel_sums(r: torch.Tensor) -> torch.Tensor:
    """(2, C): the per-channel sum and sum of squares of r (N, C, T, H, W) over (N, T, H, W), float32 (float64 for
    float64 r), differentiable. Two plain reductions: 10-20x faster on the CPU than torch.var_mean's Welford pass
    at R50 shapes (measured, 0.5 vs 9 ms at res2); the variance E[r^2] - E[r]^2 then stays accurate where the
    mean is not many standard deviations from zero, as at a BatchNorm's input."""
    acc = r.to(torch.promote_types(r.dtype, torch.float32))
    return torch.stack([acc.sum((0, 2, 3, 4)), (acc * acc).sum((0, 2, 3, 4))])


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
    def forward(ctx, y, mean, invstd, weight, bias, relu):
        xhat = (y.float() - _channel(mean)) * _channel(invstd)
        out = xhat * _channel(weight.float()) + _channel(bias.float())
        ctx.save_for_backward(y, mean, invstd, weight, bias)
        ctx.relu = relu
        return (torch.relu(out) if relu else out).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, mean, invstd, weight, bias = ctx.saved_tensors
        xhat = (y.float() - _channel(mean)) * _channel(invstd)
        g = grad.float()
        if ctx.relu:
            g = g * (xhat * _channel(weight.float()) + _channel(bias.float()) > 0)
        count = y.numel() // y.shape[1]
        g_bias, g_weight = g.sum((0, 2, 3, 4)), (g * xhat).sum((0, 2, 3, 4))
        g_y = _channel(weight.float() * invstd) * (g - _channel(g_bias / count) - xhat * _channel(g_weight / count))
        return g_y.to(y.dtype), None, None, g_weight.to(weight.dtype), g_bias.to(bias.dtype), None


def _normalize_train(norm: nn.BatchNorm3d, y: torch.Tensor, stats: torch.Tensor, relu: bool) -> torch.Tensor:
    """ReLU?(norm(y)) with batch statistics from the conv's (sum, sum of squares); updates the running stats."""
    mean, var = batch_mean_var(norm, stats.detach(), y.numel() // y.shape[1], torch.float64)
    invstd = torch.rsqrt(var + norm.eps).float()
    weight = norm.weight if norm.affine else torch.ones_like(invstd)
    bias = norm.bias if norm.affine else torch.zeros_like(invstd)
    return _NormalizeFromStats.apply(y, mean.float(), invstd, weight, bias, relu)


# ---- convolutions with their epilogues --------------------------------------------------------------


def _stride(conv: nn.Conv3d) -> int:
    return conv.stride[1]


def conv(conv: nn.Conv3d, x: torch.Tensor, **epilogue) -> torch.Tensor:
    """``conv(x)`` (then ``epilogue``: scale, shift, residual, relu) in one pass."""
    residual = epilogue.get("residual")
    if set(epilogue) <= {"residual", "relu"} and _inference_on_cpu(x, residual):  # the op without its checks
        x, residual = _autocast_bf16(x, residual)
        weight = conv.weight.to(x.dtype)
        return torch.ops.lgd_fast.p3d_conv_onednn(
            x, weight, None, None, residual, _stride(conv), epilogue.get("relu", False)
        )
    return p3d_conv(x, conv.weight, stride=_stride(conv), **epilogue)


def _fold_key(*tensors: torch.Tensor) -> tuple:
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _folded_conv(conv_: nn.Conv3d, norm: nn.BatchNorm3d, dtype: torch.dtype, *, shift: bool):
    """(weight * scale, shift or None) of an eval BatchNorm folded into the conv before it, in ``dtype``, kept on
    the conv until a parameter or running statistic changes (their version counters are in the key)."""
    key = (_fold_key(conv_.weight, *(t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)
                                     if t is not None)), dtype, shift)  # fmt: skip
    cache = conv_.__dict__.get("_lgd_fast_folded")
    if cache is None or cache[0] != key:
        scale, bias = folded_norm(norm, conv_.weight)
        weight = (conv_.weight * scale[:, None, None, None, None].to(conv_.weight.dtype)).to(dtype)
        cache = (key, weight, bias.to(dtype) if shift else None)
        conv_.__dict__["_lgd_fast_folded"] = cache
    return cache[1], cache[2]


def _inference_on_cpu(*tensors: torch.Tensor | None) -> bool:
    """Eager CPU inference (no autograd, not tracing): the folded-weight cache and the oneDNN op directly."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if _backend.requested_backend(None, ("triton", "onednn", "reference")) not in ("auto", "onednn"):
        return False  # $LGD_FAST_BACKEND asks p3d_conv for another backend: the op decides
    return all(t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)) for t in tensors)


def _autocast_bf16(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in bfloat16 when CPU autocast to bfloat16 is on (the direct oneDNN calls below bypass the
    dispatcher's autocast, which would run the reference's convs in bfloat16), else as they are."""
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return tensors
    return tuple(None if t is None else t.to(torch.bfloat16) for t in tensors)


def _folded_onednn(conv_, norm, x, *, shift=True, residual=None, relu=False) -> torch.Tensor:
    x, residual = _autocast_bf16(x, residual)
    weight, bias = _folded_conv(conv_, norm, x.dtype, shift=shift)
    return torch.ops.lgd_fast.p3d_conv_onednn(x, weight, None, bias, residual, _stride(conv_), relu)


def conv_norm(
    conv_: nn.Conv3d, norm: nn.BatchNorm3d, x: torch.Tensor, *, relu: bool, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``ReLU?(norm(conv(x) + residual))``: folded into the conv in eval, from its statistics in training."""
    if not uses_batch_stats(norm) and residual is None and _inference_on_cpu(x):
        return _folded_onednn(conv_, norm, x, relu=relu)
    if uses_batch_stats(norm):
        y, stats = conv(conv_, x, residual=residual, stats=True)
        return _normalize_train(norm, y, stats, relu)
    scale, shift = folded_norm(norm, x)
    if residual is not None:  # norm(c + r) = c * scale + (shift + r * scale)
        residual = (residual * scale[:, None, None, None]).to(residual.dtype)
    return conv(conv_, x, scale=scale, shift=shift, residual=residual, relu=relu)


def _last(conv_: nn.Conv3d, norm: nn.Module | None, x: torch.Tensor, **epilogue) -> tuple[torch.Tensor, Stats]:
    """The unit's last conv, whose BatchNorm the caller applies: with its statistics when ``norm`` needs them."""
    if norm is not None and uses_batch_stats(norm):
        return conv(conv_, x, stats=True, **epilogue)
    return conv(conv_, x, **epilogue), None


# ---- units ------------------------------------------------------------------------------------------


def bottleneck_body(block: P3DBottleneck, x: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """``block.residual_body(x)`` (up to bn3) and, when bn3 uses batch statistics, their sums."""
    if _native(block, x):
        return P3DBottleneck.residual_body(block, x), None
    z = conv_norm(block.conv1, block.bn1, x, relu=True)
    if block.variant == "A":  # ReLU(bn2(T(S(z))))
        z = conv_norm(block.conv2_t, block.bn2, conv(block.conv2, z), relu=True)
    elif block.variant == "B":  # ReLU(bn2(S(z) + T(z)))
        if uses_batch_stats(block.bn2):
            z = conv_norm(block.conv2_t, block.bn2, z, relu=True, residual=conv(block.conv2, z))
        else:
            if _inference_on_cpu(z):
                q = _folded_onednn(block.conv2, block.bn2, z)
                z = _folded_onednn(block.conv2_t, block.bn2, z, shift=False, residual=q, relu=True)
            else:
                scale, shift = folded_norm(block.bn2, z)
                q = conv(block.conv2, z, scale=scale, shift=shift)
                z = conv(block.conv2_t, z, scale=scale, residual=q, relu=True)
    else:  # u = ReLU(bn2(S(z))); ReLU(u + T(u))
        u = conv_norm(block.conv2, block.bn2, z, relu=True)
        z = conv(block.conv2_t, u, residual=u, relu=True)
    return _last(block.conv3, block.bn3, z)


def basic_body(block: P3DBasicBlock, x: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """``block.residual_body(x)`` (up to bn2 for A and B; C ends in its addition) and the statistics bn2 needs."""
    if _native(block, x):
        return P3DBasicBlock.residual_body(block, x), None
    if block.variant == "A":  # z = ReLU(bn1(T1(S1(x)))); bn2(T2(S2(z)))
        z = conv_norm(block.conv1_t, block.bn1, conv(block.conv1, x), relu=True)
        return _last(block.conv2_t, block.bn2, conv(block.conv2, z))
    if block.variant == "B":  # t = T1(x); z = ReLU(bn1(S1(x) + t)); bn2(S2(z) + T2(t))
        t = conv(block.conv1_t, x)
        z = conv_norm(block.conv1, block.bn1, x, relu=True, residual=t)
        return _last(block.conv2_t, block.bn2, t, residual=conv(block.conv2, z))
    # u = ReLU(bn1(S1(x))); z = ReLU(u + T1(u)); v = bn2(S2(z)); v + T2(v)
    u = conv_norm(block.conv1, block.bn1, x, relu=True)
    z = conv(block.conv1_t, u, residual=u, relu=True)
    v = conv_norm(block.conv2, block.bn2, z, relu=False)
    return conv(block.conv2_t, v, residual=v), None


def residual_body(block: P3DBottleneck | P3DBasicBlock, x: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """The fused body of a P3D unit: (output before the unit's last BatchNorm, its batch sums or None)."""
    if isinstance(block, P3DBottleneck):
        return bottleneck_body(block, x)
    if isinstance(block, P3DBasicBlock):
        return basic_body(block, x)
    raise TypeError(f"the fused P3D path takes a P3DBottleneck or P3DBasicBlock, got {type(block).__name__}")


def shortcut(block: P3DBottleneck | P3DBasicBlock, x: torch.Tensor) -> torch.Tensor:
    """``block.shortcut(x)``: the identity, or the projection conv with its BatchNorm fused."""
    if block.downsample is None:
        return x
    if _native(block, x):
        return block.downsample(x)
    conv_, norm = block.downsample
    return conv_norm(conv_, norm, x, relu=False)


# ---- modules ----------------------------------------------------------------------------------------


class FastP3DBottleneck(P3DBottleneck):
    """:class:`P3DBottleneck` whose residual unit and shortcut run fused; same modules and state_dict."""

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        r, _ = bottleneck_body(self, x)
        return r

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return shortcut(self, x)


class FastP3DBasicBlock(P3DBasicBlock):
    """:class:`P3DBasicBlock` whose residual unit and shortcut run fused; same modules and state_dict."""

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        r, _ = basic_body(self, x)
        return r

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return shortcut(self, x)


_FAST_UNITS = {P3DBottleneck: FastP3DBottleneck, P3DBasicBlock: FastP3DBasicBlock}


def check_fusable(block: P3DBottleneck | P3DBasicBlock, name: str = "block") -> None:
    """Raise a TypeError naming what the fused path cannot take: another norm than BatchNorm3d, another padding."""
    for child_name, module in block.named_modules():
        if isinstance(module, nn.Conv3d):
            same = tuple(k // 2 for k in module.kernel_size)
            if module.padding != same or module.stride[0] != 1 or module.dilation != (1, 1, 1) or module.groups != 1:
                raise TypeError(
                    f"{name}.{child_name}: the fused P3D path takes odd kernels with same padding, temporal stride 1, "
                    f"no dilation or groups; got padding {module.padding}, stride {module.stride}"
                )
    norms = {"bn1": block.bn1, "bn2": block.bn2, "bn3": getattr(block, "bn3", None)}
    if block.downsample is not None:
        norms["downsample.1"] = block.downsample[1]
    for child_name, module in norms.items():
        if module is not None and not isinstance(module, nn.BatchNorm3d):
            kind = type(module).__name__
            raise TypeError(f"{name}.{child_name}: the fused P3D path folds BatchNorm3d only, got {kind}")


def to_fast_unit(block: nn.Module, name: str = "block") -> nn.Module:
    """Turn a reference P3D block into its fast class in place (no new state); other modules are returned as is."""
    fast = _FAST_UNITS.get(type(block))
    if fast is None:
        return block
    check_fusable(block, name)
    block.__class__ = fast
    return block
