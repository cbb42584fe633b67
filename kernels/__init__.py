"""Triton kernels of lgd_fast, installed as ``lgd_fast.kernels`` (one module per fused op).

Triton is optional: CPU-only installs run the C++ kernels (``lgd_fast._C``) or the PyTorch references.
Kernels run on CUDA tensors, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (it does not say a GPU is present)."""
    return importlib.util.find_spec("triton") is not None
