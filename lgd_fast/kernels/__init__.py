"""Triton kernels of lgd_fast, one module per fused op (``lgd_fast/kernels/<op>.py``).

Triton is optional: CPU-only installs run the C++ kernels (``lgd_fast._C``) or the PyTorch references.
Kernels run on CUDA tensors, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

