"""Which implementation of an lgd_fast op runs: one place for every op to ask.

Backends, by name:
    "cuda"       the compiled CUDA extension ``lgd_fast._C_cuda`` (CUDA tensors; needs ``lgd_fast._C``).
    "cpp"        the compiled CPU extension ``lgd_fast._C`` (CPU tensors).
    "onednn"     ATen's oneDNN primitives with fused post-ops (CPU tensors; where torch was built with oneDNN).
    "triton"     the Triton kernels in ``lgd_fast.kernels`` (CUDA tensors; CPU tensors only under
                 ``TRITON_INTERPRET=1``, and only when asked for by name).
    "reference"  the op's plain PyTorch implementation (every device, always there).

Choice, first match wins: the op's ``backend=`` argument, then the ``LGD_FAST_BACKEND`` environment
variable (a backend name or ``auto``), then ``auto``. ``auto`` takes the first fast backend the op
implements that runs on the tensor's device and handles the input (on CUDA tensors: cuda, then triton;
on CPU tensors: cpp, then onednn), and otherwise falls back to the reference, logging a warning once per op, device
and reason. Asking by argument for a backend that cannot run raises ``RuntimeError``, and for one the op
does not implement ``ValueError``; the environment variable naming a backend an op does not implement
leaves that op on ``auto`` (so ``LGD_FAST_BACKEND=triton`` forces the ops that have Triton kernels).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

__all__ = [
    "AUTO",
    "BACKENDS",
    "ENV_VAR",
    "backend_unavailable_reason",
    "choose_backend",
    "cuda_extension_available",
    "cuda_extension_error",
    "extension_available",
    "extension_error",
    "load_cuda_extension",
    "load_extension",
    "triton_error",
    "requested_backend",
]

logger = logging.getLogger(__name__)

ENV_VAR = "LGD_FAST_BACKEND"
AUTO = "auto"
BACKENDS = ("cuda", "cpp", "onednn", "triton", "reference")
# Devices on which ``auto`` considers each backend (a backend asked for by name is checked on its own).
_AUTO_DEVICES = {"cuda": ("cuda",), "cpp": ("cpu",), "onednn": ("cpu",), "triton": ("cuda",)}

_extension: ModuleType | None = None
_extension_error: str | None = None
_extension_tried = False
_cuda_extension: ModuleType | None = None
_cuda_extension_error: str | None = None
_cuda_extension_tried = False
_warned: set[tuple[str, ...]] = set()
# Facts of the torch build and the CPU, read once (torch.compile does not trace torch.backends.mkldnn.is_available,
# and every conv call asks the second): oneDNN at all, and oneDNN's bfloat16 kernels (AVX-512 BW/VL/DQ or
# AVX-NE-CONVERT; an AVX2-only CPU has none).
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
_HAS_ONEDNN_BF16 = _HAS_ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_extension() -> ModuleType | None:
    """Imports ``lgd_fast._C`` once (which registers the ``torch.ops.lgd_fast`` kernels); None if it fails."""
    global _extension, _extension_error, _extension_tried
    if not _extension_tried:
        _extension_tried = True
        try:
            from lgd_fast import _C

            _extension = _C
        except (ImportError, OSError, RuntimeError) as exc:  # not built, built for another torch, ...
            _extension_error = f"{type(exc).__name__}: {exc}"
    return _extension


def extension_available() -> bool:
    """True if the compiled extension ``lgd_fast._C`` imported."""
    return load_extension() is not None


def extension_error() -> str | None:
    """Why ``lgd_fast._C`` did not import (the ImportError text), or None if it did."""
    load_extension()
    return _extension_error


def load_cuda_extension() -> ModuleType | None:
    """Imports ``lgd_fast._C_cuda`` once, after ``lgd_fast._C`` (which defines the schemas it implements)."""
    global _cuda_extension, _cuda_extension_error, _cuda_extension_tried
    if not _cuda_extension_tried:
        _cuda_extension_tried = True
        if torch.version.cuda is None:
            _cuda_extension_error = (
                "not built: this torch is a CPU-only build (setup.py builds lgd_fast._C_cuda only where a CUDA "
                "build of torch and nvcc are both present)"
            )
        elif load_extension() is None:
            _cuda_extension_error = f"lgd_fast._C, which defines the op schemas, did not import ({extension_error()})"
        else:
            try:
                from lgd_fast import _C_cuda

                _cuda_extension = _C_cuda
            except (ImportError, OSError, RuntimeError) as exc:  # not built (no CUDA toolkit/torch), ...
                _cuda_extension_error = f"{type(exc).__name__}: {exc}"
    return _cuda_extension


def cuda_extension_available() -> bool:
    """True if the compiled CUDA extension ``lgd_fast._C_cuda`` imported."""
    return load_cuda_extension() is not None


def cuda_extension_error() -> str | None:
    """Why ``lgd_fast._C_cuda`` did not import, or None if it did."""
    load_cuda_extension()
    return _cuda_extension_error


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_error() -> str | None:
    """Why the Triton kernels cannot be used at all (triton not installed), or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (`pip install triton`)"
    return None


def backend_unavailable_reason(backend: str, device_type: str, *, anywhere: Sequence[str] = ()) -> str | None:
    """None if ``backend`` can run on ``device_type`` tensors here, else a sentence saying why not. Backends in
    ``anywhere`` run on every device (an op whose cpp kernel is ATen calls, as global_update's)."""
    if backend == "reference":
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, not {device_type}"
        if not cuda_extension_available():
            return (
                f"the compiled CUDA extension lgd_fast._C_cuda did not import ({cuda_extension_error()}); "
                "build it where CUDA torch and nvcc exist with `pip install --no-build-isolation -e .`"
            )
        return None
    if backend == "triton":
        if device_type != "cuda" and not (device_type == "cpu" and _interpreting_triton()):
            return (
                f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), not {device_type}"
            )
        return triton_error()
    if backend == "onednn":
        if device_type != "cpu":
            return f"the onednn backend runs on CPU tensors only, not {device_type}"
        if not _HAS_ONEDNN:
            return "this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
        return None
    if backend == "cpp":
        if device_type != "cpu" and backend not in anywhere:
            return f"the cpp backend runs on CPU tensors only, not {device_type}"
        if not extension_available():
            return (
                f"the compiled extension lgd_fast._C did not import ({extension_error()}); "
                "build it with `pip install --no-build-isolation -e .`"
            )
        return None
    raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")


def requested_backend(requested: str | None = None, backends: Sequence[str] = BACKENDS) -> str:
    """The backend asked for: ``requested`` if given, else ``$LGD_FAST_BACKEND``, else ``"auto"``.

    A ``requested`` name outside ``backends`` (the op's own) raises ``ValueError``; so does an environment
    value that is no backend at all, while one naming a backend the op lacks gives ``"auto"``. A ``requested``
    that is not a string raises ``TypeError``.
    """
    source = "backend argument"
    if requested is not None and not isinstance(requested, str):
        raise TypeError(
            f"{source} must be a str, one of: {', '.join((*backends, AUTO))}; got {type(requested).__name__} "
            f"{requested!r}"
        )
    if requested is None:
        requested, source = os.environ.get(ENV_VAR, AUTO), f"${ENV_VAR}"
    value = requested.strip().lower() or AUTO
    if value == AUTO or value in backends:
        return value
    if source != "backend argument" and value in BACKENDS:
        return AUTO
    known = backends if source == "backend argument" else BACKENDS
    raise ValueError(f"{source} is {requested!r}; expected one of: {', '.join((*known, AUTO))}")


def _log(level: int, message: str, once_key: tuple[str, ...] | None = None) -> None:
    # Nothing is logged while torch.compile traces (a logging call would break the graph); the choice
    # itself is the same, and the first eager call logs it.
    if torch.compiler.is_compiling():
        return
    if once_key is not None:
        if once_key in _warned:
            return
        _warned.add(once_key)
    logger.log(level, message)


def choose_backend(
    op_name: str,
    tensor: torch.Tensor,
    requested: str | None = None,
    *,
    backends: Sequence[str] = BACKENDS,
    supports: Callable[[str, torch.Tensor], str | None] | None = None,
    anywhere: Sequence[str] = (),
) -> str:
    """Picks the backend that runs ``op_name`` on ``tensor``.

    Args:
        op_name: the op, for messages (``"global_avg_pool"``).
        tensor: the op's main input; its device decides what can run.
        requested: a backend name, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.
        backends: the backends the op implements, fastest first; ``"reference"`` must be among them.
        supports: optional op-specific check ``(backend, tensor) -> reason or None`` for inputs a backend
            does not handle (dtype, layout); ``auto`` then quietly uses the next backend.
        anywhere: backends of this op that run on every device (``auto`` considers them on any device).

    Returns:
        A name from ``backends``.

    Raises:
        RuntimeError: a backend was named that cannot run here.
        ValueError: the name is not one of the op's backends (or, from the environment, no backend at all).
        TypeError: ``requested`` is neither a string nor None.
    """
    choice = requested_backend(requested, backends)
    device_type = tensor.device.type
    if choice != AUTO:
        reason = backend_unavailable_reason(choice, device_type, anywhere=anywhere)
        if reason is not None:
            raise RuntimeError(f"{op_name}: backend {choice!r} was requested but cannot run: {reason}")
        return choice
    missing, elsewhere = [], []  # why backends for this device cannot run; the other devices' backends
    for backend in backends:
        if backend == "reference":
            missing = missing or elsewhere  # no backend for this device at all: say where they do run
            if missing:
                message = f"{op_name}: using the reference implementation because {'; '.join(missing)}"
                _log(logging.WARNING, message, once_key=(op_name, device_type, message))
            return backend
        if device_type not in _AUTO_DEVICES.get(backend, ()) and backend not in anywhere:
            elsewhere.append(backend_unavailable_reason(backend, device_type) or f"{backend} is not automatic here")
            continue
        reason = backend_unavailable_reason(backend, device_type, anywhere=anywhere)
        if reason is not None:
            missing.append(reason)
            continue
        reason = supports(backend, tensor) if supports is not None else None
        if reason is None:
            return backend
        missing.append(f"the {backend} backend does not handle this input ({reason})")
    raise RuntimeError(f"{op_name}: no backend can run on a {device_type} tensor (tried {', '.join(backends)})")
