"""The global path of an LGD block as one op (SPEC.md section 1, steps 2 and 3's vector).

    g' = ReLU(fc2(fc1(m)) + fc4(fc3(g)))      m = GAP(block input), g = incoming global vector, (N, C_in)
    d  = fc6(fc5(g'))                          (N, C_out), added at every position of the local map

The reference is six ``nn.Linear`` calls, an add and a ReLU. The op is one call: on CUDA tensors one Triton
kernel launch (``lgd_fast/kernels/global_update.py``, registered as ``lgd_fast::global_update_triton``), on
CPU tensors one call into ``torch.ops.lgd_fast.global_update`` (C++, any device: ``csrc/global_update.cpp``;
float32 with at most 8 clips on the CPU's few-row kernels, ``csrc/cpu/small_linear``, else ATen's GEMMs). Both
have fake kernels for ``torch.compile`` and the same autograd formula, registered here (``_grad``); on CPU
tensors the backward is one call too, ``torch.ops.lgd_fast.global_update_backward`` (the same formula in C++,
on the few-row kernels where the forward takes them), except in a double backward, which differentiates the
formula in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from ._common import check_tensor, register_compiled_op, traced_for_freezing

__all__ = ["global_update", "global_update_reference"]

OP_NAME = "global_update"


def global_update_reference(m: torch.Tensor, g: torch.Tensor, *weights: torch.Tensor):
    """(g', d) in plain PyTorch; ``weights`` = w1, b1, ..., w6, b6 as ``nn.Linear`` stores them."""
    w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6 = weights
    g_new = F.relu(F.linear(F.linear(m, w1, b1), w2, b2) + F.linear(F.linear(g, w3, b3), w4, b4))
    return g_new, F.linear(F.linear(g_new, w5, b5), w6, b6)


def block_weights(block: nn.Module) -> list[torch.Tensor]:
    """fc1..fc6 of an LGD block as (w1, b1, ..., w6, b6)."""
    return [t for i in range(1, 7) for t in (getattr(block, f"fc{i}").weight, getattr(block, f"fc{i}").bias)]


def global_update(m: torch.Tensor, g: torch.Tensor, *weights: torch.Tensor, backend: str | None = None):
    """(g', d) of an LGD block's global path, differentiable in every input.

    Args:
        m, g: (N, C_in), floating point; weights: w1, b1, ..., w6, b6 (see :func:`block_weights`), m's dtype
            and device, checked (shapes, dtypes, devices) whichever backend runs.
        backend: ``"triton"`` (one kernel launch; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``),
            ``"cpp"`` (one call of ATen GEMMs, any device), ``"reference"``, ``"auto"`` or None
            (``$LGD_FAST_BACKEND``). ``auto``: triton on CUDA tensors where triton imports, else cpp where
            ``lgd_fast._C`` imported, else the reference with one warning.

    Raises:
        TypeError: an argument that is not a tensor, or m not floating point.
        ValueError: a shape, dtype or device that does not fit, naming the argument; an unknown backend name.
        RuntimeError: the backend asked for cannot run here.
    """
    if len(weights) != 12:
        raise ValueError(f"{OP_NAME}: expected 12 weight tensors (w1, b1, ..., w6, b6), got {len(weights)}")
    _check(m, g, weights)
    if m.device.type == "cpu" and traced_for_freezing() and _backend.requested_backend(backend, BACKENDS) == "auto":
        # traced for inductor's freezing: six linears, whose weights freezing packs. Two interleaved A/B runs on
        # R50 compiled with freezing: batch 4 145.4 / 155.6 ms against 154.3 / 161.0 with the op; batch 1 51.8 /
        # 46.8 against 53.3 / 44.2 (noise either way there)
        return global_update_reference(m, g, *weights)
    choice = _choose(backend, m)
    if choice == "triton":  # (the op checks the Triton kernel's dtypes itself, as when called directly)
        return torch.ops.lgd_fast.global_update_triton(m, g, *weights)
    if choice == "cpp":
        return torch.ops.lgd_fast.global_update(m, g, *weights)
    return global_update_reference(m, g, *weights)


def _supports(backend: str, m: torch.Tensor) -> str | None:
    if backend == "triton" and not _TRITON_REGISTERED:
        return f"the triton op is not registered ({_backend.triton_error()})"
    if backend == "triton" and m.dtype not in _TRITON_DTYPES:
        return f"dtype {m.dtype} is not one of {', '.join(map(str, _TRITON_DTYPES))}"
    return None


def _choose(requested: str | None, m: torch.Tensor) -> str:
    """triton, cpp or reference, by the one backend policy (:func:`lgd_fast.ops._backend.choose_backend`); the cpp
    op is ATen GEMMs, so unlike the kernels it runs on every device."""
    return _backend.choose_backend(
        OP_NAME, m, requested, backends=BACKENDS, supports=_supports, anywhere=("cpp",)
    )


BACKENDS = ("triton", "cpp", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_for_triton(m: torch.Tensor, g: torch.Tensor, weights) -> None:
    """:func:`_check`, and the Triton kernel's dtypes."""
    _check(m, g, weights)
    if m.dtype not in _TRITON_DTYPES:
        raise ValueError(f"{OP_NAME} (triton): m must be float32, bfloat16 or float16, got {m.dtype}")


def _check(m: torch.Tensor, g: torch.Tensor, weights) -> None:
    """The shape, dtype and device checks the C++ op makes, for every backend (the reference would broadcast a
    (1, C_in) g or a (1,) bias, and the Triton path has no C++ of its own): one exception type and message
    whichever runs. About 14 us a call, eager only (recorded programs and compiled graphs call the op)."""
    check_tensor(OP_NAME, "m", m, floating=True)
    check_tensor(OP_NAME, "g", g)
    for i, t in enumerate(weights):
        if not isinstance(t, torch.Tensor):
            check_tensor(OP_NAME, f"{'wb'[i % 2]}{i // 2 + 1}", t)
    if m.dim() != 2:
        raise ValueError(f"{OP_NAME}: m must be (N, C_in), got shape {tuple(m.shape)}")
    if g.shape != m.shape:
        raise ValueError(f"{OP_NAME}: g must have m's shape {tuple(m.shape)}, got {tuple(g.shape)}")
    c_in = m.shape[1]
    hidden, c_out = (w.shape[0] if w.dim() else -1 for w in (weights[0], weights[2]))
    expected = ((hidden, c_in), (c_out, hidden), (hidden, c_in), (c_out, hidden), (hidden, c_out), (c_out, hidden))
    for i, want in enumerate(expected):
        w, b = weights[2 * i], weights[2 * i + 1]
        if w.shape != want or b.shape != want[:1]:
            raise ValueError(
                f"{OP_NAME}: fc{i + 1} weight must have shape {want} and bias ({want[0]},), "
                f"got {tuple(w.shape)} and {tuple(b.shape)}"
            )
    dtype, device = m.dtype, m.device
    for i, t in enumerate((g, *weights)):
        if t.dtype != dtype or t.device != device:
            name = f"fc{(i - 1) // 2 + 1}" if i else "g"
            raise ValueError(f"{OP_NAME}: {name} is {t.dtype} on {t.device} but m is {dtype} on {device}")


def _fake(m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6):
    n, c_out = m.shape[0], w2.shape[0]
    return m.new_empty((n, c_out)), m.new_empty((n, c_out))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output[0])


def _grad(ctx, grad_g, grad_d):
    m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6, g_new = ctx.saved_tensors
    if grad_g is None:
        grad_g = torch.zeros_like(g_new)
    if grad_d is None:
        grad_d = torch.zeros_like(g_new)
    if g_new.device.type == "cpu" and not torch.is_grad_enabled():  # one C++ call (small-row kernels in float32)
        return tuple(torch.ops.lgd_fast.global_update_backward(grad_g, grad_d, *ctx.saved_tensors))
    # The same formula in PyTorch: off the CPU, and differentiable again (a double backward: create_graph=True)
    h5 = F.linear(g_new, w5, b5)
    grad_w6, grad_b6 = grad_d.t() @ h5, grad_d.sum(0)
    grad_h5 = grad_d @ w6
    grad_w5, grad_b5 = grad_h5.t() @ g_new, grad_h5.sum(0)
    grad_a = (grad_g + grad_h5 @ w5) * (g_new > 0)  # through the ReLU
    h1, h3 = F.linear(m, w1, b1), F.linear(g, w3, b3)
    grad_w2, grad_b2, grad_h1 = grad_a.t() @ h1, grad_a.sum(0), grad_a @ w2
    grad_w4, grad_b4, grad_h3 = grad_a.t() @ h3, grad_a.sum(0), grad_a @ w4
    grad_w1, grad_b1, grad_m = grad_h1.t() @ m, grad_h1.sum(0), grad_h1 @ w1
    grad_w3, grad_b3, grad_g_in = grad_h3.t() @ g, grad_h3.sum(0), grad_h3 @ w3
    return (
        grad_m, grad_g_in,
        grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3, grad_w4, grad_b4, grad_w5, grad_b5, grad_w6, grad_b6,
    )  # fmt: skip


def _backward_fake(grad_g, grad_d, m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6, g_new):
    """The C++ backward's outputs: each gradient a fresh contiguous tensor of its input's shape."""
    inputs = (m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6)
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs]


_REGISTERED = register_compiled_op(OP_NAME, _fake, _grad, _setup_context, backward_fake=_backward_fake)


# ---- the Triton op (only where triton imports) ------------------------------------------------------


def _register_triton() -> bool:
    if _backend.triton_error() is not None:
        return False
    from lgd_fast.kernels import global_update as kernels

    @torch.library.triton_op(f"lgd_fast::{OP_NAME}_triton", mutates_args=())
    def _triton_forward(
        m: torch.Tensor, g: torch.Tensor,
        w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
        w4: torch.Tensor, b4: torch.Tensor, w5: torch.Tensor, b5: torch.Tensor, w6: torch.Tensor, b6: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        _check_for_triton(m, g, (w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6))  # (also when called directly)
        return kernels.forward(m, g, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, w6, b6)

    _triton_forward.register_autograd(_grad, setup_context=_setup_context)
    return True


_TRITON_REGISTERED = _register_triton()
