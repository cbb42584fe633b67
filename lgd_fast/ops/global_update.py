"""The global path of an LGD block as one op (SPEC.md section 1, steps 2 and 3's vector).

    g' = ReLU(fc2(fc1(m)) + fc4(fc3(g)))      m = GAP(block input), g = incoming global vector, (N, C_in)
    d  = fc6(fc5(g'))                          (N, C_out), added at every position of the local map

The reference is six ``nn.Linear`` calls, an add and a ReLU; the op is one call into
``torch.ops.lgd_fast.global_update`` (ATen GEMMs in C++, any device: ``csrc/global_update.cpp``), with a
fake kernel for ``torch.compile`` and autograd registered here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend

__all__ = ["global_update", "global_update_reference"]

OP_NAME = "global_update"
logger = logging.getLogger(__name__)
_warned: list[str] = []


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
        m, g: (N, C_in); weights: w1, b1, ..., w6, b6 (see :func:`block_weights`), m's dtype and device.
        backend: ``"cpp"`` (the one-call op), ``"reference"``, ``"auto"`` or None (``$LGD_FAST_BACKEND``).
    """
    if len(weights) != 12:
        raise ValueError(f"{OP_NAME}: expected 12 weight tensors (w1, b1, ..., w6, b6), got {len(weights)}")
    if _choose(backend) == "cpp":
        return torch.ops.lgd_fast.global_update(m, g, *weights)
    return global_update_reference(m, g, *weights)


def _choose(requested: str | None) -> str:
    """cpp or reference. The op is ATen GEMMs, so unlike the kernels it runs on every device."""
    choice = _backend.requested_backend(requested)
    if choice not in (_backend.AUTO, "cpp", "reference"):
        raise RuntimeError(f"{OP_NAME}: backend {choice!r} was requested but {OP_NAME} has only cpp and reference")
    if choice == "reference":
        return choice
    if _backend.extension_available():
        return "cpp"
    reason = f"the compiled extension lgd_fast._C did not import ({_backend.extension_error()})"
    if choice == "cpp":
        raise RuntimeError(f"{OP_NAME}: backend 'cpp' was requested but cannot run: {reason}")
    if not _warned:
        _warned.append(reason)
        logger.warning("%s: using the reference implementation because %s", OP_NAME, reason)
    return "reference"


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


def _register() -> bool:
    if not _backend.extension_available():
        return False
    torch.library.register_fake(f"lgd_fast::{OP_NAME}")(_fake)
    torch.library.register_autograd(f"lgd_fast::{OP_NAME}", _grad, setup_context=_setup_context)
    return True


_REGISTERED = _register()
