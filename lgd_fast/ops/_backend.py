"""Which implementation of an lgd_fast op runs: one place for every op to ask.

Backends, by name:
    "cpp"        the compiled CPU extension ``lgd_fast._C`` (CPU tensors).
    "reference"  the op's plain PyTorch implementation (every device, always there).

Choice, first match wins: the op's ``backend=`` argument, then the ``LGD_FAST_BACKEND`` environment
variable (``cpp``, ``reference`` or ``auto``), then ``auto``. ``auto`` takes the first fast backend the
op implements that works for the tensor and otherwise falls back to the reference, logging a warning
once per op, device and reason. Asking for a backend by name that cannot run raises ``RuntimeError``.
"""

from __future__ import annotations

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
    "extension_available",
    "extension_error",
    "load_extension",
    "requested_backend",
]

logger = logging.getLogger(__name__)

ENV_VAR = "LGD_FAST_BACKEND"
AUTO = "auto"
BACKENDS = ("cpp", "reference")

_extension: ModuleType | None = None
_extension_error: str | None = None
_extension_tried = False
_warned: set[tuple[str, ...]] = set()


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


def backend_unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on ``device_type`` tensors here, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors only, not {device_type}"
        if not extension_available():
            return (
                f"the compiled extension lgd_fast._C did not import ({extension_error()}); "
                "build it with `pip install --no-build-isolation -e .`"
            )
        return None
    raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")


def requested_backend(requested: str | None = None) -> str:
    """The backend asked for: ``requested`` if given, else ``$LGD_FAST_BACKEND``, else ``"auto"``."""
    source = "backend argument"
    if requested is None:
        requested, source = os.environ.get(ENV_VAR, AUTO), f"${ENV_VAR}"
    value = requested.strip().lower() or AUTO
    if value != AUTO and value not in BACKENDS:
        raise ValueError(f"{source} is {requested!r}; expected one of: {', '.join((*BACKENDS, AUTO))}")
    return value


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
) -> str:
    """Picks the backend that runs ``op_name`` on ``tensor``.

    Args:
        op_name: the op, for messages (``"global_avg_pool"``).
        tensor: the op's main input; its device decides what can run.
        requested: a backend name, ``"auto"``, or None to read ``$LGD_FAST_BACKEND``.
        backends: the backends the op implements, fastest first; ``"reference"`` must be among them.
        supports: optional op-specific check ``(backend, tensor) -> reason or None`` for inputs a backend
            does not handle (dtype, layout); ``auto`` then quietly uses the next backend.

    Returns:
        A name from ``backends``.

    Raises:
        RuntimeError: a backend was named that the op lacks or that cannot run here.
        ValueError: the name is not a backend at all.
    """
    choice = requested_backend(requested)
    device_type = tensor.device.type
    if choice != AUTO:
        if choice not in backends:
            raise RuntimeError(
                f"{op_name}: backend {choice!r} was requested but {op_name} has no such implementation "
                f"(it has: {', '.join(backends)})"
            )
        reason = backend_unavailable_reason(choice, device_type)
        if reason is not None:
            raise RuntimeError(f"{op_name}: backend {choice!r} was requested but cannot run: {reason}")
        return choice
    for backend in backends:
        if backend == "reference":
            return backend
        reason = backend_unavailable_reason(backend, device_type)
        if reason is not None:
            message = f"{op_name}: using the reference implementation because {reason}"
            _log(logging.WARNING, message, once_key=(op_name, device_type, message))
            continue
        reason = supports(backend, tensor) if supports is not None else None
        if reason is None:
            return backend
        _log(logging.DEBUG, f"{op_name}: backend {backend!r} skipped: {reason}")
    raise RuntimeError(f"{op_name}: no backend can run on a {device_type} tensor (tried {', '.join(backends)})")
