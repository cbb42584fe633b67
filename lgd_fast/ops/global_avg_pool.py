"""Global average pooling over (T, H, W): the "GAP" that feeds the global path of every LGD block.

One home for the op: ``global_avg_pool_reference`` (plain PyTorch), the public ``global_avg_pool``
(which picks a backend, see ``lgd_fast.ops._backend``), and the ``torch.library`` registrations of
the compiled ``torch.ops.lgd_fast.global_avg_pool`` (schema and CPU kernel in ``csrc/``): fake
(shape-only) kernels for ``torch.compile``, and autograd through ``global_avg_pool_backward``.
"""

from __future__ import annotations

import torch

from . import _backend
from ._common import CPP_FLOAT_DTYPES, check_tensor, cpp_float_input_reason, layout, register_compiled_op

__all__ = ["global_avg_pool", "global_avg_pool_reference"]

OP_NAME = "global_avg_pool"
BACKENDS = ("cpp", "reference")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def global_avg_pool_reference(x: torch.Tensor) -> torch.Tensor:
    """Mean over (T, H, W) in plain PyTorch.

    Args:
        x: (N, C, T, H, W), any float dtype, device and memory format.

    Returns:
        (N, C), x's dtype. bfloat16/float16 inputs are averaged in float32 and the result cast back,
        so the only rounding to low precision is the final one.
    """
    if x.dtype in _LOW_PRECISION:
        return x.to(torch.promote_types(x.dtype, torch.float32)).mean(dim=(2, 3, 4)).to(x.dtype)
    return x.mean(dim=(2, 3, 4))


def global_avg_pool(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean of x over (T, H, W), differentiable.

    Args:
        x: (N, C, T, H, W), floating point, T*H*W > 0. The cpp backend takes float32, bfloat16 or float64 CPU
            tensors that are contiguous or channels_last_3d; ``auto`` sends anything else to the reference.
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``
            (default ``auto``: the compiled kernel where it can run, else the reference).

    Returns:
        (N, C), x's dtype, contiguous.

    Raises:
        TypeError: x is not a floating-point tensor.
        ValueError: x is not 5-D or has no positions (T*H*W = 0), or the backend name is unknown.
        RuntimeError: the backend asked for cannot run here.
    """
    check_tensor(OP_NAME, "x", x, floating=True)
    if x.dim() != 5:
        raise ValueError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    if 0 in x.shape[2:]:
        raise ValueError(f"{OP_NAME}: x has T*H*W = 0 positions to average over, got shape {tuple(x.shape)}")
    choice = _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=cpp_float_input_reason)
    if choice == "cpp":
        return torch.ops.lgd_fast.global_avg_pool(x)
    return global_avg_pool_reference(x)


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------


def _fake(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 5:
        raise RuntimeError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in CPP_FLOAT_DTYPES:
        raise RuntimeError(f"{OP_NAME}: x must have dtype float32, bfloat16 or float64, got {x.dtype}")
    return x.new_empty((x.shape[0], x.shape[1]))


def _backward_fake(grad: torch.Tensor, sizes: list[int], channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(sizes, dtype=grad.dtype, device=grad.device, memory_format=memory_format)


def _setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.sizes = list(x.shape)
    ctx.channels_last = layout(x) == "channels_last_3d"


def _grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    # grad: (N, C) -> grad_x: (N, C, T, H, W) in x's memory format.
    return torch.ops.lgd_fast.global_avg_pool_backward(grad, ctx.sizes, ctx.channels_last)


def _backward_setup_context(ctx, inputs, output) -> None:
    pass


def _backward_grad(ctx, grad_grad_x: torch.Tensor):
    # The backward is linear in grad with adjoint global_avg_pool: double backward is one more pooling.
    if layout(grad_grad_x) is None:
        grad_grad_x = grad_grad_x.contiguous()
    return torch.ops.lgd_fast.global_avg_pool(grad_grad_x), None, None


_REGISTERED = register_compiled_op(
    OP_NAME, _fake, _grad, _setup_context, backward_fake=_backward_fake,
    backward_autograd=(_backward_grad, _backward_setup_context),
)  # fmt: skip
