"""The fused units' training BatchNorm on the CPU: batch statistics, and the normalisation with its shortcut and ReLU,
forward and backward, each one pass over the large tensors (``csrc/cpu/batch_norm_train.cpp``).

:mod:`lgd_fast.ops.conv_bn` normalises a fused conv's output in training as BatchNorm does, from the batch's
per-channel (sum, sum of squares about the mean) and with BatchNorm's own backward. In plain PyTorch that is a
dozen passes over the conv's output and as many temporaries (``*_reference`` below: the specification); the ops
here do it in one pass each:

- ``channel_moments(z)``: (2, C) float64, the sum and the sum of squares about the mean over (N, T, H, W)
  (float64 keeps the mean of values far from zero exact enough for the backward's z - mean); differentiable
  (:func:`channel_moments`), as ``p3d_conv``'s statistics are.
- ``bn_relu_forward``: ``act((y - mean) * invstd * weight + bias + shortcut)``.
- ``bn_relu_backward_sums`` and ``bn_relu_backward_apply``: BatchNorm's training backward through that, split at
  the two per-channel sums (which a synchronised BatchNorm all-reduces in between).

They take float32 and bfloat16 tensors, contiguous or channels_last_3d (statistics and arithmetic in float32, each
output rounded once); float64 runs the reference (exact checks). :func:`kernel_applies` says whether a call runs
them; where the extension did not build, the reference runs with a warning (logged once).
"""

from __future__ import annotations

import torch

from . import _backend
from ._common import layout

__all__ = [
    "bn_relu_backward_apply_reference",
    "bn_relu_backward_sums_reference",
    "bn_relu_forward_reference",
    "channel_moments",
    "channel_moments_reference",
    "kernel_applies",
]

OP_NAME = "batch_norm_train"
BACKENDS = ("cpp", "reference")
_DIMS = (0, 2, 3, 4)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


# ---- the specification, in plain PyTorch -------------------------------------------------------------------


def channel_moments_reference(z: torch.Tensor) -> torch.Tensor:
    """(2, C): per channel the sum of z (N, C, T, H, W) over (N, T, H, W) and the sum of squares about its mean, in
    float32 (float64 for float64 z); two passes (no E[z^2] - E[z]^2 cancellation)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    z = z.to(acc)
    total = z.sum(_DIMS)
    centred = z - _channel(total / (z.numel() // z.shape[1]))
    return torch.stack([total, (centred * centred).sum(_DIMS)])


def _pre_activation(y, mean, invstd, weight, bias, shortcut):
    acc = mean.dtype
    out = (y.to(acc) - _channel(mean)) * _channel(invstd * weight.to(acc)) + _channel(bias.to(acc))
    return out if shortcut is None else out + shortcut.to(acc)


def bn_relu_forward_reference(y, mean, invstd, weight, bias, shortcut, relu: bool) -> torch.Tensor:
    """``act((y - mean) * invstd * weight + bias + shortcut)`` in mean's dtype (float32, float64 for float64 y),
    rounded once to y's dtype; y, shortcut: (N, C, T, H, W); mean, invstd, weight, bias: (C,)."""
    out = _pre_activation(y, mean, invstd, weight, bias, shortcut)
    return (torch.relu(out) if relu else out).to(y.dtype)


def _masked_grad(grad, y, mean, invstd, weight, bias, shortcut, relu):
    g = grad.to(mean.dtype)
    return g * (_pre_activation(y, mean, invstd, weight, bias, shortcut) > 0) if relu else g


def bn_relu_backward_sums_reference(grad, y, mean, invstd, weight, bias, shortcut, relu: bool) -> torch.Tensor:
    """(2, C) in mean's dtype: sum g' and sum g' * xhat over (N, T, H, W), where g' is ``grad`` through the ReLU
    (zero where the forward's value before it is <= 0) and xhat = (y - mean) * invstd."""
    g = _masked_grad(grad, y, mean, invstd, weight, bias, shortcut, relu)
    xhat = (y.to(mean.dtype) - _channel(mean)) * _channel(invstd)
    return torch.stack([g.sum(_DIMS), (g * xhat).sum(_DIMS)])


def bn_relu_backward_apply_reference(
    grad, y, mean, invstd, weight, bias, shortcut, relu: bool, mean_g, mean_gx, shortcut_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y, grad_shortcut): ``weight * invstd * (g' - mean_g - xhat * mean_gx)`` in y's dtype, and g' in
    shortcut's dtype (an empty tensor unless ``shortcut_grad``). With mean_g and mean_gx the two sums of
    :func:`bn_relu_backward_sums_reference` over the values the statistics cover, this is BatchNorm's training
    backward."""
    acc = mean.dtype
    g = _masked_grad(grad, y, mean, invstd, weight, bias, shortcut, relu)
    xhat = (y.to(acc) - _channel(mean)) * _channel(invstd)
    g_y = _channel(weight.to(acc) * invstd) * (g - _channel(mean_g.to(acc)) - xhat * _channel(mean_gx.to(acc)))
    g_s = g.to(shortcut.dtype if shortcut is not None else y.dtype) if shortcut_grad else y.new_empty(0)
    return g_y.to(y.dtype), g_s


# ---- which calls run the kernels -------------------------------------------------------------------------------


def _cpp_supports(backend: str, y: torch.Tensor) -> str | None:
    if y.dtype not in _KERNEL_DTYPES:
        return f"dtype {y.dtype} is not float32 or bfloat16"
    if y.dim() != 5 or layout(y) is None:
        return "y is neither contiguous nor channels_last_3d (N, C, T, H, W)"
    return None


def kernel_applies(y: torch.Tensor, shortcut: torch.Tensor | None = None) -> bool:
    """Whether the compiled kernels run this normalisation: a CPU float32 or bfloat16 y, contiguous or
    channels_last_3d, and a shortcut (if any) of y's dtype and layout. float64 (exact checks) and other devices run
    the reference by design; where the extension is missing, the reference runs with a warning (once)."""
    if y.device.type != "cpu" or y.dtype == torch.float64:
        return False
    if shortcut is not None and (shortcut.dtype != y.dtype or layout(shortcut) != layout(y)):
        return False
    return _backend.choose_backend(OP_NAME, y, "auto", backends=BACKENDS, supports=_cpp_supports) == "cpp"


# ---- the statistics, differentiable ----------------------------------------------------------------------------


class _ChannelMoments(torch.autograd.Function):
    """channel_moments with the gradient of (sum, M2): g_sum + 2 (z - mean) g_m2 (the mean's own derivative sums
    to zero). z - mean in float32 as (z - hi) - lo, the float64 mean split into two float32 parts: z - hi is exact
    for z within a factor 2 of the mean, so a mean far from zero loses nothing to its rounding (the reference's
    autograd gets the same through the mean's own derivative, whose float32 sum of z - mean corrects it)."""

    @staticmethod
    def forward(ctx, z):
        sums = torch.ops.lgd_fast.channel_moments(z)
        ctx.save_for_backward(z, sums)
        return sums

    @staticmethod
    def backward(ctx, grad):
        z, sums = ctx.saved_tensors
        mean = sums[0] / (z.numel() // z.shape[1])
        hi = mean.float()
        lo = (mean - hi.double()).float()
        centred = (z.float() - _channel(hi)).sub_(_channel(lo))
        g = centred.mul_(_channel(2 * grad[1].float())).add_(_channel(grad[0].float()))
        return g.to(z.dtype)


def channel_moments(z: torch.Tensor) -> torch.Tensor:
    """:func:`channel_moments_reference` of z, one pass where :func:`kernel_applies` (then in float64);
    differentiable either way."""
    return _ChannelMoments.apply(z) if kernel_applies(z) else channel_moments_reference(z)


# ---- fake kernels (torch.compile) --------------------------------------------------------------------------------


def _sums_fake(y: torch.Tensor) -> torch.Tensor:
    return y.new_empty((2, y.shape[1]), dtype=torch.float32)


def _moments_fake(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty((2, z.shape[1]), dtype=torch.float64)


def _like(y: torch.Tensor) -> torch.Tensor:
    memory_format = torch.channels_last_3d if layout(y) == "channels_last_3d" else torch.contiguous_format
    return torch.empty_like(y, memory_format=memory_format)


if _backend.extension_available():
    torch.library.register_fake("lgd_fast::channel_moments", _moments_fake)
    torch.library.register_fake("lgd_fast::bn_relu_forward", lambda y, *args: _like(y))
    torch.library.register_fake("lgd_fast::bn_relu_backward_sums", lambda grad, y, *args: _sums_fake(y))
    torch.library.register_fake(
        "lgd_fast::bn_relu_backward_apply",
        lambda grad, y, *args: (_like(y), _like(y) if args[-1] else y.new_empty(0)),
    )
