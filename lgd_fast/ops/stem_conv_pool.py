"""An LGD stem at inference as one op: conv (kt x 7 x 7, stride (st, 2, 2)), bias, ReLU and the 1x3x3 max-pool.

The stem of LGD-3D (and, with kt = 1, LGD-2D's over every frame) is conv1, BatchNorm, ReLU and a 1x3x3 max-pool
of stride (1, 2, 2). At inference the BatchNorm folds into the conv's weight and a bias, and what is left is::

    y = relu(conv3d(x, weight, bias, stride=(st, 2, 2), padding=(0, 3, 3)))
    out = max_pool3d(y, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

``stem_conv_pool_reference`` is that, in plain PyTorch: the specification (in float32 for bfloat16 inputs, rounded
once at the end). The compiled op (``csrc/cpu/stem_conv_pool.cpp``) makes the conv's output two rows at a time in
a register-tiled loop and pools them while they are in L1: the conv output, four times the pooled size, is never
written, and with three input channels its multiply-adds run closer to the FMA peak than oneDNN's conv does
(``benchmarks/run_stem_conv_pool.py``). It reads x in any strides (the contiguous clip needs no conversion) and
writes channels_last_3d.

The op is for inference: its autograd recomputes the reference and differentiates that (each gradient is the
reference's), so training pays for the forward twice. The fast models run it where their plan chooses it
(:mod:`lgd_fast.plan`: eval on the CPU, no autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._common import conv3d, raw_view_reason, register_compiled_op

__all__ = ["kernel_applies", "stem_conv_pool", "stem_conv_pool_reference"]

OP_NAME = "stem_conv_pool"
BACKENDS = ("cpp", "reference")
TAPS = 7  # the stem's 7x7 spatial kernel, stride 2, padding 3
POOL = ((1, 3, 3), (1, 2, 2), (0, 1, 1))  # the max-pool's kernel, stride, padding
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _stride_t(weight: torch.Tensor, stride_t: int | None) -> int:
    return int(weight.shape[2]) if stride_t is None else int(stride_t)


def stem_conv_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             stride_t: int | None = None) -> torch.Tensor:  # fmt: skip
    """``max_pool3d(relu(conv3d(x, weight, bias, (st, 2, 2), (0, 3, 3))), (1, 3, 3), (1, 2, 2), (0, 1, 1))`` in
    plain PyTorch, channels_last_3d.

    Args:
        x: (N, C, T, H, W), any float dtype, device and strides.
        weight: (C_out, C, kt, 7, 7); bias: (C_out,) or None. Any float dtype.
        stride_t: the conv's temporal stride; None: kt (the LGD stem's).

    Returns:
        (N, C_out, (T - kt) // st + 1, H', W') in x's dtype, channels_last_3d, H' = ((H - 1) // 2) // 2 + 1 (W'
        alike). bfloat16/float16 inputs are computed in float32 and rounded once at the end.
    """
    work = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    b = None if bias is None else bias.to(work.dtype)
    y = torch.relu(conv3d(work, weight.to(work.dtype), b, stride=(_stride_t(weight, stride_t), 2, 2),
                          padding=(0, 3, 3)))  # fmt: skip
    out = F.max_pool3d(y, *POOL)
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)


def _shape_problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride_t: int) -> str | None:
    """Why (x, weight, bias, stride_t) is not a stem this op computes (one sentence), or None."""
    if x.dim() != 5:
        return f"x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}"
    if not (x.is_floating_point() and weight.is_floating_point()):
        return f"x and weight must be floating point, got {x.dtype} and {weight.dtype}"
    C = x.shape[1]
    if weight.dim() != 5 or weight.shape[1] != C or tuple(weight.shape[3:]) != (TAPS, TAPS) or 0 in weight.shape:
        return f"weight must be (C_out, {C}, kt, 7, 7) for x with {C} channels, got shape {tuple(weight.shape)}"
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_floating_point()):
        return f"bias must be a floating ({weight.shape[0]},) tensor, got {bias.dtype} of shape {tuple(bias.shape)}"
    if stride_t < 1:
        return f"stride_t must be at least 1, got {stride_t}"
    if x.shape[2] < weight.shape[2]:
        return f"the clip has {x.shape[2]} frames, fewer than the kernel's {weight.shape[2]}"
    if 0 in x.shape[3:]:
        return f"x has empty frames: shape {tuple(x.shape)}"
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        return f"x, weight and bias must be on one device, got {sorted(map(str, devices))}"
    return None


def _cpp_supports(backend: str, x: torch.Tensor) -> str | None:
    if x.dtype not in _CPP_DTYPES:
        return f"dtype {x.dtype} is not float32 or bfloat16"
    return raw_view_reason(x)


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether ``stem_conv_pool(x, ...)`` with ``auto`` runs the compiled op (no warning logged either way):
    lgd_fast._C built, a float32 or bfloat16 CPU tensor it takes."""
    return _backend.extension_available() and x.device.type == "cpu" and _cpp_supports("cpp", x) is None


def stem_conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   stride_t: int | None = None, backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """An LGD stem at inference: the max-pool (1x3x3, stride (1, 2, 2), padding (0, 1, 1)) of ReLU(conv(x)).

    Args:
        x: (N, C, T, H, W) clips, any strides. The cpp backend takes float32 and bfloat16 CPU tensors; ``auto``
            sends anything else to the reference.
        weight: (C_out, C, kt, 7, 7), the conv's weight (an eval BatchNorm folded in); bias: (C_out,) or None.
        stride_t: the temporal stride; None: kt. The spatial stride is 2, the padding (0, 3, 3).
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.

    Returns:
        (N, C_out, (T - kt) // stride_t + 1, H', W'), x's dtype, channels_last_3d (see the reference).
        Differentiable (by recomputing the reference: the op is for inference).

    Raises:
        ValueError: shapes, dtypes or devices that are not such a stem (the message names the problem), or an
            unknown backend name.
        RuntimeError: the backend asked for cannot run here.
    """
    st = _stride_t(weight, stride_t)
    problem = _shape_problem(x, weight, bias, st)
    if problem is not None:
        raise ValueError(f"{OP_NAME}: {problem}")
    choice = _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=_cpp_supports)
    if choice == "cpp":
        return torch.ops.lgd_fast.stem_conv_pool(x, weight, bias, st)
    return stem_conv_pool_reference(x, weight, bias, st)


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------


def _fake(x, weight, bias, stride_t):
    problem = _shape_problem(x, weight, bias, stride_t)
    if problem is None and x.dtype not in _CPP_DTYPES:
        problem = f"x must be float32 or bfloat16, got {x.dtype}"
    if problem is not None:
        raise RuntimeError(f"{OP_NAME}: {problem}")
    N, _, T, H, W = x.shape
    conv_h, conv_w = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    shape = (N, weight.shape[0], (T - weight.shape[2]) // stride_t + 1, (conv_h - 1) // 2 + 1, (conv_w - 1) // 2 + 1)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride_t = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.stride_t = stride_t


def _grad(ctx, grad: torch.Tensor):
    """The reference's gradients, from the reference recomputed on the saved inputs."""
    x, weight, bias = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3], strict=True)]  # fmt: skip
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(())
    if wrt:
        with torch.enable_grad():
            out = stem_conv_pool_reference(*inputs, ctx.stride_t)
            grads = iter(torch.autograd.grad(out, wrt, grad))
    return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None)


_REGISTERED = register_compiled_op(OP_NAME, _fake, _grad, _setup_context)
