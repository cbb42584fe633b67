"""Squeeze-excitation over (T, H, W), with the SiLU that follows it in X3D, as one op.

A squeeze-excitation module (X3D's, fvcore's and pytorchvideo's, torchvision's ``SqueezeExcitation``) scales each
channel of x by a gate computed from x's own channel means::

    s = sigmoid(w2 relu(w1 mean(x) + b1) + b2)        # (N, C): two 1x1x1 convs on the (N, C, 1, 1, 1) means
    out = x * s                                        # then, in X3D's bottleneck, SiLU(out)

In PyTorch that is seven calls (mean, conv, ReLU, conv, sigmoid, product, SiLU) and three passes over x after
the mean. The compiled op (``csrc/cpu/squeeze_excite.cpp``) reads x once for the means and once more to write
``silu(x * s)``. One home for it: ``squeeze_excite_reference`` (plain PyTorch, the specification), the public
``squeeze_excite`` (which picks a backend, ``lgd_fast.ops._backend``), and the ``torch.library`` registrations
of ``torch.ops.lgd_fast.squeeze_excite``: its fake kernel for ``torch.compile``, and autograd, whose backward is
written in plain PyTorch below (it recomputes the gate from x; the op exists for inference speed, training runs
at PyTorch's speed).

``lgd_fast.convert`` calls it where a converted block's norm slot ends in a module it proves to be a
squeeze-excitation (:func:`squeeze_excite_convs`) followed by SiLU, without autograd.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from ._common import CPP_FLOAT_DTYPES, check_flag, check_tensor, cpp_float_input_reason, layout, register_compiled_op

__all__ = ["squeeze_excite", "squeeze_excite_convs", "squeeze_excite_reference"]

OP_NAME = "squeeze_excite"
BACKENDS = ("cpp", "reference")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _working(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the arithmetic runs in: float32 for bfloat16/float16, else x's own."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _gate(work, w1, b1, w2, b2):
    """(means, pre-ReLU z1, hidden h, gate s) of the excitation, in ``work``'s dtype."""
    dtype = work.dtype
    m = work.mean(dim=(2, 3, 4))
    z1 = F.linear(m, w1.to(dtype), None if b1 is None else b1.to(dtype))
    h = F.relu(z1)
    s = torch.sigmoid(F.linear(h, w2.to(dtype), None if b2 is None else b2.to(dtype)))
    return m, z1, h, s


def squeeze_excite_reference(x, w1, b1, w2, b2, *, silu: bool = True) -> torch.Tensor:
    """Squeeze-excitation in plain PyTorch: ``x * s`` per channel, then SiLU when ``silu``.

    Args:
        x: (N, C, T, H, W), any float dtype, device and memory format.
        w1: (R, C) and b1: (R,) or None, the first 1x1x1 conv's weight and bias (a Conv3d's (R, C, 1, 1, 1)
            weight flattened); w2: (C, R) and b2: (C,) or None, the second's. x's dtype or float32.
        silu: apply SiLU (``v * sigmoid(v)``) to the product.

    Returns:
        x's shape, dtype and memory format. bfloat16/float16 inputs are computed in float32 and rounded once at
        the end.
    """
    work = _working(x)
    s = _gate(work, w1, b1, w2, b2)[3]
    out = work * s[:, :, None, None, None]
    if silu:
        out = out * torch.sigmoid(out)
    return out.to(x.dtype)


def _check(x, w1, b1, w2, b2, silu) -> None:
    check_tensor(OP_NAME, "x", x, floating=True)
    check_tensor(OP_NAME, "w1", w1)
    check_tensor(OP_NAME, "w2", w2)
    for name, t in (("b1", b1), ("b2", b2)):  # (None: no bias)
        if t is not None:
            check_tensor(OP_NAME, name, t)
    check_flag(OP_NAME, "silu", silu)
    if x.dim() != 5:
        raise ValueError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] == 0:
        raise ValueError(f"{OP_NAME}: w1 must have shape (R, C) with C = x.size(1) = {C} and R > 0, got "
                         f"{tuple(w1.shape)}")  # fmt: skip
    R = w1.shape[0]
    for name, t, shape in (("w2", w2, (C, R)), ("b1", b1, (R,)), ("b2", b2, (C,))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{OP_NAME}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{OP_NAME}: {name} must be on x's device ({x.device}), got {t.device}")
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{OP_NAME}: {name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if w1.device != x.device or w1.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{OP_NAME}: w1 must be on x's device ({x.device}) with x's dtype ({x.dtype}) or "
                         f"float32, got {w1.dtype} on {w1.device}")  # fmt: skip


def squeeze_excite(x, w1, b1, w2, b2, *, silu: bool = True, backend: str | None = None) -> torch.Tensor:
    """Squeeze-excitation of x (then SiLU when ``silu``), differentiable: :func:`squeeze_excite_reference`'s
    result, the compiled kernel's arithmetic (means from float64 sums, the gate in float32, one rounding of the
    output).

    Args:
        x, w1, b1, w2, b2, silu: as :func:`squeeze_excite_reference`. The cpp backend takes float32, bfloat16
            or float64 CPU tensors that are contiguous or channels_last_3d; ``auto`` sends anything else to the
            reference.
        backend: ``"cpp"``, ``"reference"``, ``"auto"``, or None to read ``$LGD_FAST_BACKEND`` (default
            ``auto``: the compiled kernel where it can run, else the reference).

    Returns:
        x's shape, dtype and memory format.

    Raises:
        TypeError: x, w1 or w2 (or b1, b2 when given) is not a tensor, x not floating point, or silu not a bool.
        ValueError: a shape, device or dtype does not fit (named in the message), or the backend name is
            unknown.
        RuntimeError: the backend asked for cannot run here.
    """
    _check(x, w1, b1, w2, b2, silu)
    choice = _backend.choose_backend(OP_NAME, x, backend, backends=BACKENDS, supports=cpp_float_input_reason)
    if choice == "cpp":
        return torch.ops.lgd_fast.squeeze_excite(x, w1, b1, w2, b2, silu)
    return squeeze_excite_reference(x, w1, b1, w2, b2, silu=silu)


# ---- recognising a squeeze-excitation module (lgd_fast.convert) ------------------------------------------


def _pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv3d and conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1)
            and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")  # fmt: skip


def squeeze_excite_convs(module: nn.Module, channels: int) -> tuple[str, str] | None:
    """The paths (within ``module``) of its two 1x1x1 convs if ``module`` computes :func:`squeeze_excite_reference`
    (``silu=False``) with them on ``channels``-channel input, else None.

    Proved, not guessed from names: exactly two Conv3d with parameters (1x1x1, stride 1, no padding, one group,
    ``channels`` -> R -> ``channels``), no other parameters or buffers, and on two float64 probes (a copy of the
    module in float64, random inputs of odd sizes) its output is the reference's to 1e-12. Forward hooks, a
    different gate (hard-sigmoid), a residual, a spatial pooling other than the mean: the probe differs, and the
    module keeps running itself."""
    convs = [(name, m) for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None]
    if len(convs) != 2 or not all(_pointwise(m) for _, m in convs):
        return None
    (p1, c1), (p2, c2) = convs
    if c1.in_channels != channels or c2.out_channels != channels or c1.out_channels != c2.in_channels:
        return None
    if next(module.buffers(), None) is not None:  # (no other parameters: the two are the only modules with any)
        return None
    probe_module = copy.deepcopy(module).double().eval()
    q1, q2 = probe_module.get_submodule(p1), probe_module.get_submodule(p2)
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, channels, 3, 5, 4), (1, channels, 1, 2, 3)):
        probe = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
        try:
            with torch.no_grad():
                got = probe_module(probe.clone())
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            return None
        want = squeeze_excite_reference(probe, q1.weight.flatten(1), q1.bias, q2.weight.flatten(1), q2.bias,
                                        silu=False)  # fmt: skip
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                and torch.allclose(got, want, rtol=1e-12, atol=1e-15)):  # fmt: skip
            return None
    return p1, p2


# ---- torch.library registrations of the compiled op (only where lgd_fast._C imported) -----------------


def _fake(x, w1, b1, w2, b2, silu):
    if x.dim() != 5:
        raise RuntimeError(f"{OP_NAME}: x must be a 5-D tensor (N, C, T, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in CPP_FLOAT_DTYPES:
        raise RuntimeError(f"{OP_NAME}: x must have dtype float32, bfloat16 or float64, got {x.dtype}")
    if layout(x) is None:
        raise RuntimeError(f"{OP_NAME}: x must be contiguous or channels_last_3d, got strides {x.stride()}")
    C = x.shape[1]
    R = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] != C or R == 0 or tuple(w2.shape) != (C, R):
        raise RuntimeError(f"{OP_NAME}: w1 must be (R, C) and w2 (C, R) with C = {C}, got {tuple(w1.shape)} and "
                           f"{tuple(w2.shape)}")  # fmt: skip
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, silu = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.silu = silu


def _grad(ctx, grad: torch.Tensor):
    """Every input's gradient in plain PyTorch (float32 for bfloat16), the gate recomputed from x."""
    x, w1, b1, w2, b2 = ctx.saved_tensors
    work = _working(x)
    m, z1, h, s = _gate(work, w1, b1, w2, b2)
    v = work * s[:, :, None, None, None]
    g = grad.to(work.dtype)
    if ctx.silu:
        sig = torch.sigmoid(v)
        g = g * sig * (1 + v * (1 - sig))
    grad_s = (g * work).sum(dim=(2, 3, 4))
    grad_z2 = grad_s * s * (1 - s)
    grad_h = grad_z2 @ w2.to(work.dtype)
    grad_z1 = grad_h * (z1 > 0)
    grad_m = grad_z1 @ w1.to(work.dtype)
    positions = x.shape[2] * x.shape[3] * x.shape[4]
    grad_x = g * s[:, :, None, None, None] + (grad_m / positions)[:, :, None, None, None]
    grad_w1 = (grad_z1.t() @ m).to(w1.dtype)
    grad_w2 = (grad_z2.t() @ h).to(w2.dtype)
    grad_b1 = None if b1 is None else grad_z1.sum(0).to(b1.dtype)
    grad_b2 = None if b2 is None else grad_z2.sum(0).to(b2.dtype)
    return grad_x.to(x.dtype), grad_w1, grad_b1, grad_w2, grad_b2, None


_REGISTERED = register_compiled_op(OP_NAME, _fake, _grad, _setup_context)
