"""What the op modules share: the memory-layout probe, the registration of a compiled op's Python parts, and the
tag that keys torch.compile's caches to the ops' code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from . import _backend

__all__ = ["compile_cache_tag", "layout", "memory_format", "register_compiled_op"]


def compile_cache_tag() -> str:
    """A tag naming this version of the ops' Python code (fake kernels, registrations), for
    ``torch.compiler.config.cache_key_tag``. Inductor's FX graph cache does not key on a custom op's fake
    kernel: a graph compiled under an older fake is reused with that fake's stride assertions (seen: an
    "incorrect fake kernel" error for p3d_conv_onednn long after its fake was fixed, gone with a fresh cache).
    The test suite and the benchmarks set it; a user who changes an op's fake can do the same."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), *(here.parent / "kernels").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return f"lgd_fast-{digest.hexdigest()[:16]}"


def traced_for_freezing() -> bool:
    """Whether torch.compile is tracing for inductor's freezing: inductor's freezing on while dynamo traces (dynamo
    reads the same setting to treat the parameters as constants: ``torch._dynamo.utils.is_parameter_freezing``),
    without autograd. The ops then write what inductor folds and packs itself as aten ops."""
    if not torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    from torch._inductor import config

    return bool(config.freezing)


def layout(t: torch.Tensor) -> str | None:
    """``"contiguous"``, ``"channels_last_3d"`` or None (neither). A tensor that is both (C == 1, or one
    position) counts as contiguous, as in the C++ kernels."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


CPP_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def cpp_float_input_reason(backend: str, x: torch.Tensor) -> str | None:
    """Why a CPU kernel taking float32 / bfloat16 / float64 tensors, contiguous or channels_last_3d
    (global_avg_pool's, squeeze_excite's), cannot take ``x``; None if it can. A ``supports`` for
    ``_backend.choose_backend``."""
    if x.dtype not in CPP_FLOAT_DTYPES:
        return f"dtype {x.dtype} is not one of float32, bfloat16, float64"
    if layout(x) is None:
        return "x is neither contiguous nor channels_last_3d"
    return None


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The ``torch.memory_format`` that keeps ``t``'s layout: channels_last_3d where t is in it (and not also
    contiguous), else contiguous."""
    return torch.channels_last_3d if layout(t) == "channels_last_3d" else torch.contiguous_format


def register_compiled_op(
    name: str,
    fake: Callable,
    grad: Callable,
    setup_context: Callable,
    *,
    backward_fake: Callable | None = None,
    backward_autograd: tuple[Callable, Callable] | None = None,
) -> bool:
    """Registers the fake kernel and autograd of ``torch.ops.lgd_fast.<name>`` (schema and kernels in
    ``lgd_fast._C``), and of ``<name>_backward`` when given. False (nothing registered) where the extension did
    not import."""
    if not _backend.extension_available():
        return False
    torch.library.register_fake(f"lgd_fast::{name}", fake, _stacklevel=2)
    torch.library.register_autograd(f"lgd_fast::{name}", grad, setup_context=setup_context)
    if backward_fake is not None:
        torch.library.register_fake(f"lgd_fast::{name}_backward", backward_fake, _stacklevel=2)
    if backward_autograd is not None:
        backward_grad, backward_setup = backward_autograd
        torch.library.register_autograd(f"lgd_fast::{name}_backward", backward_grad, setup_context=backward_setup)
    return True
