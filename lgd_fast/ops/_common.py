"""What the op modules share: the argument checks, the memory-layout probe, the registration of a compiled op's
Python parts, and the tag that keys torch.compile's caches to the ops' code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.modules.utils import _triple

from . import _backend

__all__ = [
    "check_flag",
    "check_tensor",
    "compile_cache_tag",
    "conv3d",
    "layout",
    "memory_format",
    "register_compiled_op",
]


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


def check_tensor(op: str, name: str, t, *, floating: bool = False) -> None:
    """Raises TypeError naming ``op`` and ``name`` unless ``t`` is a tensor (a floating-point one if ``floating``):
    a public op's first check of each tensor argument (an optional one only when it is not None)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def check_flag(op: str, name: str, value) -> None:
    """Raises TypeError naming ``op`` and ``name`` unless ``value`` is a bool (a string such as "no" is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")


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


def raw_view_reason(x: torch.Tensor) -> str | None:
    """Why a compiled kernel that reads ``x``'s memory as it is cannot take it: a negated view (its memory holds
    -x) or a tensor wrapped by a torch.func transform; None if it can, and while dynamo traces (which sees neither:
    fakes have no neg bit). Part of a ``supports`` for ``_backend.choose_backend``."""
    if torch.compiler.is_compiling():
        return None
    if x.is_neg():
        return "x is a negated view (resolve_neg() first)"
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return "x is wrapped by a torch.func transform"
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


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> torch.Tensor:  # fmt: skip
    """``F.conv3d``, padding explicitly where ATen's own padding gives a wrong bfloat16 weight gradient on the CPU.

    In PyTorch 2.13's CPU build, the bfloat16 weight gradient of a 3-D convolution (oneDNN's backward-weights,
    either layout, autocast or bfloat16 tensors) is garbage (values near 1e36, NaN) where a dimension is padded and
    the kernel's (dilated) extent there reaches the input's size: a P3D unit's 3x1x1 temporal conv on clips of two
    or three frames (LGD-3D R50 on 8-frame clips: two frames from layer1 on), a 3x3 conv over 1x1 frames. float32
    and float16 are right, so are the output and the input's gradient; zero-padding the input first and
    convolving without padding gives the right weight gradient in every case measured
    (``tests/test_aten_workarounds.py`` checks both the bug and this). Only those calls pad (a copy of x): on the
    CPU, in bfloat16 (x's dtype or CPU autocast's), when the weight needs a gradient."""
    same_strided = padding == "same" and _triple(stride) != (1, 1, 1)  # (F.conv3d raises for it: let it)
    if _bf16_weight_grad_needs_padding(x, weight, padding, dilation) and not same_strided:
        pads = _explicit_padding(weight.shape[2:], padding, dilation)
        x, padding = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair]), 0
    return torch.nn.functional.conv3d(x, weight, bias, stride, padding, dilation, groups)


def _explicit_padding(kernel, padding, dilation) -> list[tuple[int, int]]:
    """(before, after) per dimension for ``padding`` (ints, or "same" / "valid" as F.conv3d takes them)."""
    dilation = _triple(dilation)
    if padding == "valid":
        return [(0, 0)] * 3
    if padding == "same":  # (stride 1: F.conv3d's rule, the extra one after)
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation, strict=True)]
    return [(p, p) for p in _triple(padding)]


def _bf16_weight_grad_needs_padding(x: torch.Tensor, weight: torch.Tensor, padding, dilation) -> bool:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):  # (torch.fx symbolic tracing)
        return False
    if x.device.type != "cpu" or x.dim() != 5 or not (torch.is_grad_enabled() and weight.requires_grad):
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if x.dtype != torch.bfloat16 and not (autocast and x.dtype in (torch.float32, torch.float16)):
        return False
    kernel, dilation = weight.shape[2:], _triple(dilation)
    pads = _explicit_padding(kernel, padding, dilation)
    return any(
        max(p) > 0 and d * (k - 1) + 1 >= n for p, k, d, n in zip(pads, kernel, dilation, x.shape[2:], strict=True)
    )
