"""An LGD stem's BatchNorm, ReLU and 1x3x3 max-pool after conv1, for training: one op, forward and backward.

The stem of LGD-3D is conv1, BatchNorm, ReLU and a max-pool of (1, 3, 3), stride (1, 2, 2), padding (0, 1, 1).
At inference the BatchNorm folds into the conv (:func:`~lgd_fast.ops.stem_conv_pool` runs the whole stem); in
training it normalises with the batch's statistics, and what follows the conv is::

    out = max_pool3d(relu(batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)),
                     (1, 3, 3), (1, 2, 2), (0, 1, 1))

``bn_relu_max_pool_reference`` is that, in plain PyTorch: the specification. ATen runs it as BatchNorm (two passes
over y: statistics, then the normalised tensor written), ReLU and the pool forward, and backward the pool's
gradient scattered into a y-sized tensor, ReLU's mask, then BatchNorm's two passes: six passes over y-sized
tensors each way, and three y-sized temporaries kept for the backward.

The cpp backend (``csrc/cpu/bn_relu_max_pool.cpp``) reads y once for the statistics
(:func:`lgd_fast.ops.batch_norm_train` 's ``channel_moments``: per channel sum and sum of squares about the mean, in
float64), once to write the pooled output, and keeps one byte per pooled value: the window's tap that took the
maximum, or none where that maximum is not above zero (then the ReLU stops the gradient). The backward sums the
pooled gradient and its products with y at those taps (BatchNorm's two per-channel sums, over a quarter of the
positions), then writes dx in one pass over y, each value gathering the gradient of the windows that picked it.
Nothing y-sized is kept but y itself, which the conv's backward keeps anyway.

Statistics and running statistics as ``F.batch_norm``: the biased variance normalises, the unbiased one updates
``running_var``; ``momentum`` weighs the new values (nn.BatchNorm's ``momentum=None`` cumulative average is its
module's business: pass the factor it computes, as nn.BatchNorm passes it to ``F.batch_norm``). ``training=False``
normalises with the running statistics (the eval forward; the backward is then the pool's and the ReLU's through a
per-channel scale).

float32 and bfloat16 (statistics and arithmetic in float32, each output rounded once), channels_last_3d, where its
loops run a vector of channels at a time, or contiguous (one value at a time: slower than ATen, so only when the
cpp backend is named); the output in y's layout. ``auto`` sends anything else (contiguous y, float64, other devices,
other strides) to the reference.

Ties in a window go to the first of the largest values, as ATen's max-pool: the op compares the normalised values in
float32, before any bfloat16 rounding, so in bfloat16 a window whose largest values round to one value may route its
gradient to another tap than ATen's (the values are equal to bfloat16's precision).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import _backend
from ._common import check_flag, check_tensor, layout

__all__ = ["bn_relu_max_pool", "bn_relu_max_pool_reference", "kernel_applies", "pooled_size"]

OP_NAME = "bn_relu_max_pool"
BACKENDS = ("cpp", "reference")
POOL = ((1, 3, 3), (1, 2, 2), (0, 1, 1))  # the max-pool's kernel, stride, padding
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def bn_relu_max_pool_reference(
    y: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``max_pool3d(relu(batch_norm(y, ...)), (1, 3, 3), (1, 2, 2), (0, 1, 1))`` in plain PyTorch, with
    ``F.batch_norm``'s arguments (and its update of the running statistics in training)."""
    z = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.max_pool3d(torch.relu(z), *POOL)


def pooled_size(height: int, width: int) -> tuple[int, int]:
    """(H', W') of the pool's output for (H, W) frames."""
    return (height - 1) // 2 + 1, (width - 1) // 2 + 1


def _per_channel(name: str, t: torch.Tensor | None, y: torch.Tensor) -> None:
    if t is None:
        return
    check_tensor(OP_NAME, name, t, floating=True)
    if tuple(t.shape) != (y.shape[1],):
        raise ValueError(f"{OP_NAME}: {name} must have shape ({y.shape[1]},) for y with {y.shape[1]} channels, "
                         f"got {tuple(t.shape)}")  # fmt: skip
    if t.device != y.device:
        raise ValueError(f"{OP_NAME}: {name} is on {t.device}, y on {y.device}")


def _check(y, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    check_tensor(OP_NAME, "y", y, floating=True)
    if y.dim() != 5:
        raise ValueError(f"{OP_NAME}: y must be a 5-D tensor (N, C, T, H, W), got shape {tuple(y.shape)}")
    if 0 in y.shape:
        raise ValueError(f"{OP_NAME}: y is empty: shape {tuple(y.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):  # fmt: skip
        _per_channel(name, t, y)
    check_flag(OP_NAME, "training", training)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP_NAME}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{OP_NAME}: training=False normalises with the running statistics, and none were given")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{OP_NAME}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if eps <= 0:
        raise ValueError(f"{OP_NAME}: eps must be positive, got {eps}")
    count = y.numel() // y.shape[1]
    if training and count <= 1:  # as BatchNorm refuses: one value has no variance
        raise ValueError(f"{OP_NAME}: expected more than 1 value per channel when training, got {count}")


def _cpp_takes(y: torch.Tensor) -> str | None:
    """Why the cpp backend cannot take y (None if it can)."""
    if y.dtype not in _CPP_DTYPES:
        return f"dtype {y.dtype} is not float32 or bfloat16"
    if layout(y) is None:
        return "y is neither contiguous nor channels_last_3d"
    return None


def _cpp_supports(backend: str, y: torch.Tensor) -> str | None:
    """Why ``auto`` does not run the cpp backend on y: what it cannot take, and contiguous y, whose loops go one value
    at a time (0.54-1.00x ATen's modules in benchmarks/run_bn_relu_max_pool.py, against 1.33-2.44x in
    channels_last_3d)."""
    reason = _cpp_takes(y)
    if reason is None and layout(y) != "channels_last_3d":
        return "contiguous y (the kernel is fast in channels_last_3d)"
    return reason


def kernel_applies(y: torch.Tensor) -> bool:
    """Whether ``bn_relu_max_pool(y, ...)`` with ``auto`` runs the compiled op: lgd_fast._C built, a float32 or
    bfloat16 CPU tensor in channels_last_3d (``backend="cpp"`` takes contiguous ones too, slower than ATen)."""
    return _backend.extension_available() and y.device.type == "cpu" and _cpp_supports("cpp", y) is None


class _BNReLUMaxPool(torch.autograd.Function):
    """The compiled forward and backward, given the per-channel mean and 1 / std (batch or running statistics,
    no gradient of their own: the backward forms BatchNorm's full training gradient itself)."""

    @staticmethod
    def forward(ctx, y, weight, bias, mean, invstd, training):
        w = weight.float() if weight is not None else torch.ones_like(mean)
        b = bias.float() if bias is not None else torch.zeros_like(mean)
        scale = w * invstd
        out, arg = torch.ops.lgd_fast.bn_relu_max_pool(y, scale, b - mean * scale)
        ctx.save_for_backward(y, arg, mean, invstd, w)
        ctx.training = training
        ctx.affine = (weight is not None, bias is not None)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(arg)
        return out, arg

    @staticmethod
    @torch.autograd.function.once_differentiable  # (no double backward: create_graph=True through it is an error)
    def backward(ctx, grad, _):
        y, arg, mean, invstd, w = ctx.saved_tensors
        needs_y, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_w = grad_b = dx = None
        inv, w64 = invstd.double(), w.double()
        sums = None
        if needs_w or needs_b or (needs_y and ctx.training):
            sums = torch.ops.lgd_fast.bn_relu_max_pool_backward_sums(grad, arg, y, mean)
            if needs_w:
                grad_w = (sums[1] * inv).to(ctx.dtypes[0])
            if needs_b:
                grad_b = sums[0].to(ctx.dtypes[1])
        if needs_y:
            k = w64 * inv
            if ctx.training:  # BatchNorm's training backward: the gradient through the batch's mean and variance
                count = y.numel() // y.shape[1]
                p, q = -k * inv * (sums[1] * inv / count), -k * (sums[0] / count)
            else:
                p = q = torch.zeros_like(k)
            dx = torch.ops.lgd_fast.bn_relu_max_pool_backward_apply(grad, arg, y, mean, k.float(), p.float(),
                                                                    q.float())  # fmt: skip
        return dx, grad_w, grad_b, None, None, None


def _statistics(y, running_mean, running_var, training, momentum, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) in float32 that normalise y; in training from the batch (one pass), updating the running
    statistics as ``F.batch_norm`` does."""
    if not training:
        return running_mean.float(), torch.rsqrt(running_var.float() + eps)
    count = y.numel() // y.shape[1]
    moments = torch.ops.lgd_fast.channel_moments(y.detach())  # (2, C) float64: sum, and sum of squares about the mean
    mean, var = moments[0] / count, moments[1] / count
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.double())
            running_var.copy_(momentum * var * (count / (count - 1)) + (1 - momentum) * running_var.double())
    return mean.float(), torch.rsqrt(var + eps).float()


def bn_relu_max_pool(
    y: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """BatchNorm, ReLU and the stem's 1x3x3 max-pool (stride (1, 2, 2), padding (0, 1, 1)) as one op.

    Args:
        y: (N, C, T, H, W), conv1's output. The cpp backend takes float32 and bfloat16 CPU tensors, contiguous or
            channels_last_3d; ``auto`` runs it on channels_last_3d ones and sends anything else to the reference.
        running_mean, running_var, weight, bias, training, momentum, eps: as ``F.batch_norm`` takes them (C,)
            tensors or None; in training the running statistics (where given) are updated in place.
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.

    Returns:
        (N, C, T, H', W') in y's dtype and layout, H' = (H - 1) // 2 + 1 (W' alike); differentiable in y, weight
        and bias (BatchNorm's training gradient, through the batch statistics).

    Raises:
        TypeError: y, or a given per-channel tensor, is not a floating tensor; training not a bool; momentum or
            eps not a number.
        ValueError: shapes or devices that do not match (the message names the problem), an empty y, one value
            per channel in training, no running statistics in eval, or an unknown backend name.
        RuntimeError: the backend asked for cannot run here, or cannot take y (its message says why).
    """
    _check(y, running_mean, running_var, weight, bias, training, momentum, eps)
    choice = _backend.choose_backend(OP_NAME, y, backend, backends=BACKENDS, supports=_cpp_supports)
    if choice == "reference":
        return bn_relu_max_pool_reference(y, running_mean, running_var, weight, bias, training, momentum, eps)
    reason = _cpp_takes(y)
    if reason is not None:  # the cpp backend asked for by name
        raise RuntimeError(f"{OP_NAME}: backend 'cpp' cannot take y: {reason}")
    mean, invstd = _statistics(y, running_mean, running_var, training, float(momentum), float(eps))
    out, _ = _BNReLUMaxPool.apply(y, weight, bias, mean, invstd, training)
    return out


# ---- fake kernels (torch.compile): sizes and strides as the CPU kernels make them ---------------------------------


def _format(y: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if layout(y) == "channels_last_3d" else torch.contiguous_format


def _pooled_fake(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, C, T, H, W = y.shape
    return torch.empty((N, C, T, *pooled_size(H, W)), dtype=dtype, device=y.device, memory_format=_format(y))


if _backend.extension_available():
    torch.library.register_fake(
        "lgd_fast::bn_relu_max_pool", lambda y, scale, shift: (_pooled_fake(y, y.dtype), _pooled_fake(y, torch.uint8))
    )
    torch.library.register_fake(
        "lgd_fast::bn_relu_max_pool_backward_sums",
        lambda grad, arg, y, mean: y.new_empty((2, y.shape[1]), dtype=torch.float64),
    )
    torch.library.register_fake(
        "lgd_fast::bn_relu_max_pool_backward_apply",
        lambda grad, arg, y, mean, k, p, q: torch.empty_like(y, memory_format=_format(y)),
    )
