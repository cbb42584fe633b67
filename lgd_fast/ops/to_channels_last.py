"""A contiguous (N, C, T, H, W) tensor in channels_last_3d: the clip's conversion at a fast LGD model's stem.

The specification is ``x.contiguous(memory_format=torch.channels_last_3d)`` (``to_channels_last_3d_reference``).
ATen's copy into those strides runs element by element with the output's stride of C; for a clip (C = 3) it ran
at about 3 GB/s here: 0.27 ms for lgd3d_tiny's batch-16 clip, 4% of the fast model's inference. The compiled
``torch.ops.lgd_fast.to_channels_last_3d`` (``csrc/cpu/to_channels_last.cpp``) reads each channel plane as a
sequential stream and writes the interleaved positions once (``benchmarks/run_to_channels_last.py``). It moves
values without computing anything: the result equals the reference bit for bit, in every dtype, and its gradient
is the gradient made contiguous.
"""

from __future__ import annotations

import torch

from . import _backend
from ._common import check_tensor, raw_view_reason, register_compiled_op

__all__ = ["kernel_applies", "to_channels_last_3d", "to_channels_last_3d_reference"]

OP_NAME = "to_channels_last_3d"
BACKENDS = ("cpp", "reference")


def to_channels_last_3d_reference(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous(memory_format=torch.channels_last_3d)`` (x itself where it already is)."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def _cpp_supports(backend: str, x: torch.Tensor) -> str | None:
    if not x.is_contiguous():
        return "x is not contiguous"
    if x.is_complex() or x.is_quantized or x.element_size() not in (2, 4, 8):
        return f"dtype {x.dtype} is not a 2, 4 or 8-byte real type"
    return raw_view_reason(x)


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether ``to_channels_last_3d(x)`` with ``auto`` runs the compiled op (no warning logged either way):
    lgd_fast._C built, a CPU tensor it takes."""
    return _backend.extension_available() and x.device.type == "cpu" and _cpp_supports("cpp", x) is None


def to_channels_last_3d(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x (N, C, T, H, W) in channels_last_3d, differentiable; x itself where it already is (as
    ``Tensor.contiguous`` returns it).

    Args:
        x: 5-D. The cpp backend takes contiguous CPU tensors of a 2, 4 or 8-byte real dtype; ``auto`` sends
            anything else to the reference.
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.

    Raises:
        TypeError: x is not a tensor.
        ValueError: x is not 5-D, or the backend name is unknown.
        RuntimeError: the backend asked for cannot run here.
    """
    check_tensor(OP_NAME, "x", x)
    if x.dim() != 5:
        raise ValueError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    choice = _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=_cpp_supports)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    if choice == "cpp":
        return torch.ops.lgd_fast.to_channels_last_3d(x)
    return to_channels_last_3d_reference(x)


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------


def _fake(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 5:
        raise RuntimeError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise RuntimeError(f"{OP_NAME}: x must be contiguous, got strides {x.stride()}")
    if x.is_complex() or x.element_size() not in (2, 4, 8):
        raise RuntimeError(f"{OP_NAME}: x must have a 2, 4 or 8-byte real dtype, got {x.dtype}")
    return torch.empty_like(x, memory_format=torch.channels_last_3d)


def _setup_context(ctx, inputs, output) -> None:
    pass


def _grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()  # x was contiguous: its gradient, in its layout


_REGISTERED = register_compiled_op(OP_NAME, _fake, _grad, _setup_context)
