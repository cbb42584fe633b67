"""An LGD stem at inference as one op: conv (kt x 7 x 7, stride (st, 2, 2)), bias, ReLU and the 1x3x3 max-pool.

The stem of LGD-3D (and, with kt = 1, LGD-2D's over every frame) is conv1, BatchNorm, ReLU and a 1x3x3 max-pool
of stride (1, 2, 2). At inference the BatchNorm folds into the conv's weight and a bias, and what is left is::

    y = relu(conv3d(x, weight, bias, stride=(st, 2, 2), padding=(0, 3, 3)))
    out = max_pool3d(y, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

``stem_conv_pool_reference`` is that, in plain PyTorch: the specification (in float32 for bfloat16 inputs, rounded
once at the end). The weight's dtype sets the products' precision: a bfloat16 weight multiplies x rounded to
bfloat16, as a conv under bf16 autocast does (each product exact in float32, the sums in float32, a bfloat16
output); so ``stem_conv_pool(x, w.bfloat16(), b)`` on a float32 clip is the stem under autocast, with x's rounding
and layout change made inside the op. On a CPU with AVX512_BF16 those products run as its dot products
(``lgd_fast._C.bf16_dot_products()``), at twice the float32 rate; these treat subnormal bfloat16 values and sums as
zero (as the instruction does), where the float32 tiles of other CPUs keep them. The cpp backend takes float32 and
bfloat16 weights only (``auto`` sends others to the reference; before bfloat16 products it converted any weight to
float32). The compiled op (``csrc/cpu/stem_conv_pool.cpp``) makes the conv's output two rows at a time in a
register-tiled loop and pools them while they are in L1: the conv output, four times the pooled size, is never
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
from ._common import check_tensor, conv3d, raw_view_reason, register_compiled_op

__all__ = ["bf16_dot_products", "kernel_applies", "output_dtype", "stem_conv_pool", "stem_conv_pool_reference"]

OP_NAME = "stem_conv_pool"
BACKENDS = ("cpp", "reference")
TAPS = 7  # the stem's 7x7 spatial kernel, stride 2, padding 3
POOL = ((1, 3, 3), (1, 2, 2), (0, 1, 1))  # the max-pool's kernel, stride, padding
_CPP_DTYPES = (torch.float32, torch.bfloat16)
_LOW = (torch.bfloat16, torch.float16)


def _stride_t(weight: torch.Tensor, stride_t: int | None) -> int:
    return int(weight.shape[2]) if stride_t is None else int(stride_t)


def stem_conv_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             stride_t: int | None = None) -> torch.Tensor:  # fmt: skip
    """``max_pool3d(relu(conv3d(x, weight, bias, (st, 2, 2), (0, 3, 3))), (1, 3, 3), (1, 2, 2), (0, 1, 1))`` in
    plain PyTorch, channels_last_3d.

    Args:
        x: (N, C, T, H, W), any float dtype, device and strides.
        weight: (C_out, C, kt, 7, 7); bias: (C_out,) or None. Any float dtype; a bfloat16 or float16 weight rounds
            x to its dtype first (the products of a conv under autocast).
        stride_t: the conv's temporal stride; None: kt (the LGD stem's).

    Returns:
        (N, C_out, (T - kt) // st + 1, H', W'), channels_last_3d, H' = ((H - 1) // 2) // 2 + 1 (W' alike), in
        :func:`output_dtype`. bfloat16/float16 inputs are computed in float32 and rounded once at the end.
    """
    if weight.dtype in _LOW:
        x = x.to(weight.dtype)
    work = x.float() if x.dtype in _LOW else x
    b = None if bias is None else bias.to(work.dtype)
    y = torch.relu(conv3d(work, weight.to(work.dtype), b, stride=(_stride_t(weight, stride_t), 2, 2),
                          padding=(0, 3, 3)))  # fmt: skip
    out = F.max_pool3d(y, *POOL)
    return out.to(output_dtype(x, weight)).contiguous(memory_format=torch.channels_last_3d)


def output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The op's output dtype: the weight's where it is bfloat16 or float16 (autocast's conv), else x's."""
    return weight.dtype if weight.dtype in _LOW else x.dtype


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


def _weight_reason(weight: torch.Tensor) -> str | None:
    return None if weight.dtype in _CPP_DTYPES else f"weight dtype {weight.dtype} is not float32 or bfloat16"


def _cpp_supports(backend: str, x: torch.Tensor) -> str | None:
    if x.dtype not in _CPP_DTYPES:
        return f"dtype {x.dtype} is not float32 or bfloat16"
    return raw_view_reason(x)


def kernel_applies(x: torch.Tensor, weight_dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``stem_conv_pool(x, weight, ...)`` with ``auto`` and a weight of ``weight_dtype`` runs the compiled
    op (no warning logged either way): lgd_fast._C built, a float32 or bfloat16 CPU tensor it takes, a float32 or
    bfloat16 weight."""
    return (_backend.extension_available() and x.device.type == "cpu" and weight_dtype in _CPP_DTYPES
            and _cpp_supports("cpp", x) is None)  # fmt: skip


# torch.compile traces the plan's default rule: a constant of the trace. A graph compiled before the SIMD path was
# forced another way keeps its choice (the op itself reads the path on every call, so only the speed is stale).
@torch.compiler.assume_constant_result
def bf16_dot_products() -> bool:
    """Whether a bfloat16 weight runs on AVX512_BF16's dot products here (the AVX-512 path of a CPU that has
    them); elsewhere the op multiplies the rounded values in float32, about half as fast."""
    if not _backend.extension_available():
        return False
    from lgd_fast import _C

    return bool(_C.bf16_dot_products())


def stem_conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   stride_t: int | None = None, backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """An LGD stem at inference: the max-pool (1x3x3, stride (1, 2, 2), padding (0, 1, 1)) of ReLU(conv(x)).

    Args:
        x: (N, C, T, H, W) clips, any strides. The cpp backend takes float32 and bfloat16 CPU tensors; ``auto``
            sends anything else to the reference.
        weight: (C_out, C, kt, 7, 7), the conv's weight (an eval BatchNorm folded in); bias: (C_out,) or None. The
            cpp backend takes float32 and bfloat16 weights; a bfloat16 one multiplies x rounded to bfloat16.
        stride_t: the temporal stride; None: kt. The spatial stride is 2, the padding (0, 3, 3).
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.

    Returns:
        (N, C_out, (T - kt) // stride_t + 1, H', W'), channels_last_3d, in :func:`output_dtype` (bfloat16 if the
        weight or x is; the reference's float16 for a float16 weight).
        Differentiable (by recomputing the reference: the op is for inference).

    Raises:
        TypeError: x, weight or bias (when given) is not a tensor, or stride_t not an int.
        ValueError: shapes, dtypes or devices that are not such a stem (the message names the problem), or an
            unknown backend name.
        RuntimeError: the backend asked for cannot run here.
    """
    check_tensor(OP_NAME, "x", x)
    check_tensor(OP_NAME, "weight", weight)
    if bias is not None:
        check_tensor(OP_NAME, "bias", bias)
    if stride_t is not None and (not isinstance(stride_t, int) or isinstance(stride_t, bool)):
        raise TypeError(f"{OP_NAME}: stride_t must be an int (or None: kt), got {type(stride_t).__name__} "
                        f"{stride_t!r}")  # fmt: skip
    st = _stride_t(weight, stride_t)
    problem = _shape_problem(x, weight, bias, st)
    if problem is not None:
        raise ValueError(f"{OP_NAME}: {problem}")

    def supports(name: str, t: torch.Tensor) -> str | None:
        return _weight_reason(weight) or _cpp_supports(name, t)

    choice = _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=supports)
    if choice == "cpp":
        return torch.ops.lgd_fast.stem_conv_pool(x, weight, bias, st)
    return stem_conv_pool_reference(x, weight, bias, st)


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------


def _fake(x, weight, bias, stride_t):
    problem = _shape_problem(x, weight, bias, stride_t)
    if problem is None and x.dtype not in _CPP_DTYPES:
        problem = f"x must be float32 or bfloat16, got {x.dtype}"
    if problem is None and weight.dtype not in _CPP_DTYPES:
        problem = f"weight must be float32 or bfloat16, got {weight.dtype}"
    if problem is not None:
        raise RuntimeError(f"{OP_NAME}: {problem}")
    N, _, T, H, W = x.shape
    conv_h, conv_w = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    shape = (N, weight.shape[0], (T - weight.shape[2]) // stride_t + 1, (conv_h - 1) // 2 + 1, (conv_w - 1) // 2 + 1)
    return torch.empty(shape, dtype=output_dtype(x, weight), device=x.device, memory_format=torch.channels_last_3d)


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
