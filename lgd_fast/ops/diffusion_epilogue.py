"""The fused end of an LGD block: BN affine + shortcut + global->local diffusion + ReLU, and its mean.

    out  = ReLU(r * scale[c] + shift[c] + s + d[n, c])      r, s, out: (N, C, T, H, W)
    mean = mean of out over (T, H, W)                      (N, C): the next block's GAP, for free

The eager composite makes five passes over the block's largest tensors (BN, add, add, ReLU, and the next
block's pooling); the fused kernel makes one forward and one backward (SPEC.md section 1, the note).
``scale``/``shift`` are the BatchNorm of the residual branch folded to an affine map: from batch
statistics in training (gradients flow through them as through BatchNorm), from running statistics in
eval. One home for the op: ``diffusion_epilogue_reference`` (plain PyTorch), the public
``diffusion_epilogue`` (backend choice, see ``lgd_fast.ops._backend``), and the ``torch.library``
registrations of ``torch.ops.lgd_fast.diffusion_epilogue`` (schema in ``csrc/ext.cpp``, CPU kernel in
``csrc/cpu/diffusion_epilogue.cpp``, CUDA kernel in ``csrc/cuda/diffusion_epilogue.cu``): a fake kernel for
``torch.compile`` and autograd.

The Triton kernels (``lgd_fast.kernels.diffusion_epilogue``) are a separate op,
``torch.ops.lgd_fast.diffusion_epilogue_triton`` (and ``..._triton_backward``), registered with
``torch.library.triton_op`` so that ``torch.compile`` sees the kernel launches (``wrap_triton``), with the
same autograd. It is a separate op because the CUDA dispatch key of ``lgd_fast::diffusion_epilogue``
belongs to the compiled CUDA kernel; the two GPU backends can then be chosen and compared side by side.
"""

from __future__ import annotations

import torch

from . import _backend
from ._common import check_tensor, layout, register_compiled_op

__all__ = ["diffusion_epilogue", "diffusion_epilogue_reference"]

OP_NAME = "diffusion_epilogue"
BACKENDS = ("cuda", "cpp", "triton", "reference")
_DTYPES = {
    "cpp": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}
# The dtypes of d, scale and shift each kernel takes (it computes in float32); the others take any float dtype.
_SMALL_DTYPES = {"cpp": (torch.float32, torch.bfloat16)}


def diffusion_epilogue_reference(
    r: torch.Tensor, s: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in plain PyTorch.

    Args:
        r: residual branch before its last BatchNorm, (N, C, T, H, W).
        s: shortcut, same shape as r.
        d: global->local diffusion vector W6 W5 g', (N, C).
        scale, shift: per-channel affine map, (C,).

    Returns:
        out (r's shape and dtype) and mean (N, C) of out over (T, H, W). Computed in float32, or float64 for
        float64 inputs: bfloat16 inputs are computed in float32 and out is rounded once; mean is the mean of
        the rounded out, cast to r's dtype.
    """
    acc = torch.promote_types(r.dtype, torch.float32)
    z = r.to(acc) * scale.to(acc)[:, None, None, None] + shift.to(acc)[:, None, None, None]
    out = torch.relu(z + s.to(acc) + d.to(acc)[:, :, None, None, None]).to(r.dtype)
    return out, out.to(acc).mean(dim=(2, 3, 4)).to(r.dtype)


def _check(r, s, d, scale, shift) -> None:
    for name, t in (("r", r), ("s", s), ("d", d), ("scale", scale), ("shift", shift)):
        check_tensor(OP_NAME, name, t, floating=True)
        if t.device != r.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but r is on {r.device}")
    if r.dim() != 5:
        raise ValueError(f"{OP_NAME}: r must be 5-D (N, C, T, H, W), got shape {tuple(r.shape)}")
    if 0 in r.shape[2:]:
        raise ValueError(f"{OP_NAME}: r has T*H*W = 0 positions to average over, got shape {tuple(r.shape)}")
    if s.shape != r.shape:
        raise ValueError(f"{OP_NAME}: s has shape {tuple(s.shape)} but r has shape {tuple(r.shape)}")
    if s.dtype != r.dtype:
        raise TypeError(f"{OP_NAME}: s has dtype {s.dtype} but r has dtype {r.dtype}")
    n, c = r.shape[:2]
    if d.shape != (n, c):
        raise ValueError(f"{OP_NAME}: d must have shape (N, C) = {(n, c)}, got {tuple(d.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (c,):
            raise ValueError(f"{OP_NAME}: {name} must have shape (C,) = ({c},), got {tuple(t.shape)}")


def _kernel_supports(backend: str, r, s, d, scale, shift) -> str | None:
    if r.dtype not in _DTYPES[backend]:
        return f"dtype {r.dtype} is not one of {', '.join(map(str, _DTYPES[backend]))}"
    if layout(r) is None or layout(r) != layout(s):
        return "r and s are not both contiguous or both channels_last_3d"
    small = _SMALL_DTYPES.get(backend)
    if small is not None:
        for name, t in (("d", d), ("scale", scale), ("shift", shift)):
            if t.dtype not in small:
                return f"{name} has dtype {t.dtype}, not one of {', '.join(map(str, small))}"
    return None


def diffusion_epilogue(
    r: torch.Tensor,
    s: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = ReLU(r * scale + shift + s + d) and its mean over (T, H, W), differentiable in all five inputs.

    Args:
        r, s: (N, C, T, H, W), T*H*W > 0, same dtype, both contiguous or both channels_last_3d for the kernels (float32
            or bfloat16 on CPU, also float16 on CUDA); ``auto`` sends anything else to the reference.
        d: (N, C); scale, shift: (C,); any float dtype (computed in float32; the cpp kernel takes float32 or
            bfloat16, ``auto`` sends others to the reference).
        backend: ``"cuda"``, ``"cpp"``, ``"triton"``, ``"reference"``, ``"auto"``, or None to read
            ``$LGD_FAST_BACKEND``.

    Returns:
        out in r's dtype and memory format, and mean (N, C) in r's dtype.

    Raises:
        ValueError / TypeError: a shape, dtype or device that does not fit, naming the argument.
        RuntimeError: the backend asked for cannot run here.
    """
    _check(r, s, d, scale, shift)
    choice = _backend.choose_backend(
        OP_NAME, r, backend, backends=BACKENDS, supports=lambda b, t: _kernel_supports(b, t, s, d, scale, shift)
    )
    if choice in ("cpp", "cuda"):
        return torch.ops.lgd_fast.diffusion_epilogue(r, s, d, scale, shift)
    if choice == "triton":
        if not _TRITON_REGISTERED:
            raise RuntimeError(f"{OP_NAME}: the triton op is not registered ({_backend.triton_error()})")
        return torch.ops.lgd_fast.diffusion_epilogue_triton(r, s, d, scale, shift)
    return diffusion_epilogue_reference(r, s, d, scale, shift)


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------


def _fake(r, s, d, scale, shift):
    fmt = torch.channels_last_3d if layout(r) == "channels_last_3d" else torch.contiguous_format
    return torch.empty_like(r, memory_format=fmt), r.new_empty((r.shape[0], r.shape[1]))


def _backward_fake(grad_out, grad_mean, out, r, scale):
    fmt = torch.channels_last_3d if layout(r) == "channels_last_3d" else torch.contiguous_format
    n, c = r.shape[:2]
    small = dict(dtype=torch.float32, device=r.device)
    return (
        torch.empty_like(r, memory_format=fmt),
        torch.empty_like(r, memory_format=fmt),
        torch.empty((n, c), **small),
        torch.empty((c,), **small),
        torch.empty((c,), **small),
    )


def _setup_context(ctx, inputs, output) -> None:
    r, s, d, scale, shift = inputs
    out, _ = output
    ctx.save_for_backward(out, r, scale)
    ctx.dtypes = (s.dtype, d.dtype, scale.dtype, shift.dtype)


def _grad(ctx, grad_out, grad_mean, backward=None):
    out, r, scale = ctx.saved_tensors
    n, c = r.shape[:2]
    if grad_out is None:
        grad_out = torch.zeros_like(r)
    if grad_mean is None:
        grad_mean = r.new_zeros((n, c))
    backward = backward or torch.ops.lgd_fast.diffusion_epilogue_backward
    grad_r, grad_s, grad_d, grad_scale, grad_shift = backward(grad_out, grad_mean, out, r, scale)
    s_dtype, d_dtype, scale_dtype, shift_dtype = ctx.dtypes
    return grad_r, grad_s.to(s_dtype), grad_d.to(d_dtype), grad_scale.to(scale_dtype), grad_shift.to(shift_dtype)


_REGISTERED = register_compiled_op(OP_NAME, _fake, _grad, _setup_context, backward_fake=_backward_fake)


# ---- the Triton op (only where triton imports) ------------------------------------------------------


def _register_triton() -> bool:
    if _backend.triton_error() is not None:
        return False
    from lgd_fast.kernels import diffusion_epilogue as kernels

    @torch.library.triton_op(f"lgd_fast::{OP_NAME}_triton", mutates_args=())
    def _triton_forward(
        r: torch.Tensor, s: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.forward(r, s, d, scale, shift)

    @torch.library.triton_op(f"lgd_fast::{OP_NAME}_triton_backward", mutates_args=())
    def _triton_backward(
        grad_out: torch.Tensor, grad_mean: torch.Tensor, out: torch.Tensor, r: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return kernels.backward(grad_out, grad_mean, out, r, scale)

    def grad(ctx, grad_out, grad_mean):
        return _grad(ctx, grad_out, grad_mean, torch.ops.lgd_fast.diffusion_epilogue_triton_backward)

    _triton_forward.register_autograd(grad, setup_context=_setup_context)
    return True


_TRITON_REGISTERED = _register_triton()
