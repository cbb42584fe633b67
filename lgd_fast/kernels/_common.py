"""What every Triton kernel module of lgd_fast shares: the interpreter switch, bfloat16 rounding, launching.

Triton is optional: this module imports without it (``available()`` is then False).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["autotune_limit", "available", "bounded", "interpreting", "launch", "unavailable_reason"]

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors, one block config, no autotuning."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the kernels are defined here (triton imported); says nothing about a GPU."""
    return _HAS_TRITON


def unavailable_reason() -> str | None:
    """None if triton imported, else why not."""
    return None if _HAS_TRITON else "the triton package is not installed (`pip install triton`)"


def autotune_limit() -> int | None:
    """``$LGD_FAST_AUTOTUNE_CONFIGS``: at most this many autotune configs per kernel (and per tile class), the
    first ones listed; unset or empty for all. Autotuning compiles and times every config of every kernel for
    every new shape, minutes for a whole model; a short GPU session bounds that (the quick GPU suite sets 2)."""
    text = os.environ.get("LGD_FAST_AUTOTUNE_CONFIGS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"LGD_FAST_AUTOTUNE_CONFIGS must be a positive integer or unset, got {text!r}")
    return int(text)


def bounded(configs: list) -> list:
    """The first ``autotune_limit()`` of ``configs`` (all when unset): an autotuner's early_config_prune."""
    limit = autotune_limit()
    return list(configs) if limit is None else list(configs)[:limit]


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, visible to torch.compile inside a triton_op.

    wrap_triton lets torch.compile see the launch (and skips it for fake tensors). The interpreter's kernels
    are not JITFunctions: they are launched directly, and not on fake tensors.
    """
    if not interpreting():
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    elif not any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
        kernel[grid](*args, **kwargs)


if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rounded(v, dtype: tl.constexpr):
        """float32 -> dtype, rounding to nearest even.

        Spelled out for bfloat16 (the same bits as cvt.rn on the GPU and as torch) because the interpreter's
        own float32 -> bfloat16 cast truncates.
        """
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(v != v, 0x7FC0, bits)  # NaN stays NaN
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(dtype)

    # The interpreter's dot on bfloat16/float16 operands is wrong (seen here with triton 3.9); there the
    # operands go up to float32 first, which is exact (products of 8- or 11-bit mantissas fit float32) and
    # what the GPU's tensor cores compute with float32 accumulation.
    _UPCAST_DOT = tl.constexpr(interpreting())

    @triton.jit
    def dot(a, b, acc, TF32: tl.constexpr):
        """acc + a @ b with float32 accumulation; float32 operands in full precision unless TF32."""
        if _UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc, input_precision="ieee")
