"""Named model variants: ``create_model("lgd3d_r50", num_classes=400)``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .blocks import BasicBlock2d, Bottleneck2d, P3DBasicBlock, P3DBottleneck
from .fast import to_fast
from .networks import LGD2D, LGD3D, LGDNet


class FastPathUnavailableError(RuntimeError):
    """Raised by ``create_model(..., fast=True)`` for a model the fused path does not cover yet."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., LGDNet]
    input_size: tuple[int, int, int, int]  # default (C, T, H, W) of one video, as the paper feeds it
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_size: tuple[int, int, int, int], description: str):
    def wrap(builder: Callable[..., LGDNet]) -> Callable[..., LGDNet]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, input_size, description)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise a ValueError suggesting close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}") from None


def create_model(
    name: str,
    num_classes: int,
    *,
    classifier: str = "kernel",
    fast: bool = False,
    backend: str | None = None,
    plan: str | None = None,
    **options,
) -> nn.Module:
    """Build a registered LGD model.

    Args:
        name: one of :func:`list_models` (``lgd3d_r18/34/50/101/152``, ``lgd3d_tiny``, ``lgd2d_r18/50/101``).
        num_classes: size of the label set.
        classifier: ``"kernel"`` (local + global combination classifier, the paper's) or ``"two_heads"``
            (the author's module: local and global linear heads).
        fast: return the fast model (:class:`FastLGD3D` or :class:`FastLGD2D`: fused units, every block ending
            in the fused diffusion epilogue; same modules and state_dict).
        backend, plan: the fast model's execution plan (:mod:`lgd_fast.plan`): the conv and block-end backend
            (else ``$LGD_FAST_BACKEND``, else auto) and ``"measure"``, ``"default"`` or ``"fused"`` (else
            ``$LGD_FAST_PLAN``, else measure). ``model.execution_plan`` prints it.
        **options: forwarded to the network (``early_stride``, ``dropout``, ``sketch_dim``, ``widths``,
            ``global_reduction``, ``norm_layer``, ...).
    """
    entry = model_entry(name)
    model = entry.builder(num_classes=num_classes, classifier=classifier, **options)
    if not fast:
        if backend is not None or plan is not None:
            raise ValueError("create_model: backend= and plan= are options of the fast model (fast=True)")
        return model
    if not isinstance(model, LGD3D | LGD2D):
        raise FastPathUnavailableError(
            f"fast=True is not available for {name!r}: the fused path covers LGD-3D and LGD-2D models. "
            "Use fast=False for the reference model (it loads the same state_dict)."
        )
    return to_fast(model, backend=backend, plan=plan)


_CLIP = (3, 16, 112, 112)  # LGD-3D: 16-frame clips at 112 x 112 (SPEC.md section 5)
_FRAMES = (3, 3, 224, 224)  # LGD-2D: 3 TSN frames at 224 x 224


@register_model("lgd3d_r18", _CLIP, "LGD-3D on P3D-ResNet-18 (basic blocks)")
def lgd3d_r18(**kw) -> LGD3D:
    return LGD3D(block=P3DBasicBlock, layers=(2, 2, 2, 2), **kw)


@register_model("lgd3d_r34", _CLIP, "LGD-3D on P3D-ResNet-34 (basic blocks)")
def lgd3d_r34(**kw) -> LGD3D:
    return LGD3D(block=P3DBasicBlock, layers=(3, 4, 6, 3), **kw)


@register_model("lgd3d_r50", _CLIP, "LGD-3D on P3D-ResNet-50")
def lgd3d_r50(**kw) -> LGD3D:
    return LGD3D(block=P3DBottleneck, layers=(3, 4, 6, 3), **kw)


@register_model("lgd3d_r101", _CLIP, "LGD-3D on P3D-ResNet-101 (the paper's headline model)")
def lgd3d_r101(**kw) -> LGD3D:
    return LGD3D(block=P3DBottleneck, layers=(3, 4, 23, 3), **kw)


@register_model("lgd3d_r152", _CLIP, "LGD-3D on P3D-ResNet-152")
def lgd3d_r152(**kw) -> LGD3D:
    return LGD3D(block=P3DBottleneck, layers=(3, 8, 36, 3), **kw)


@register_model("lgd3d_tiny", (3, 16, 32, 32), "narrow 4-block LGD-3D (A, B, C, A) for CPU demos and tests")
def lgd3d_tiny(**kw) -> LGD3D:
    kw = {
        "widths": (16, 32, 64, 128),
        "stem_width": 16,
        "early_stride": 2,
        "global_reduction": 4,
        "sketch_dim": 512,
    } | kw
    return LGD3D(block=P3DBasicBlock, layers=(1, 1, 1, 1), **kw)


@register_model("lgd2d_r18", _FRAMES, "LGD-2D on ResNet-18 (basic blocks)")
def lgd2d_r18(**kw) -> LGD2D:
    return LGD2D(block=BasicBlock2d, layers=(2, 2, 2, 2), **kw)


@register_model("lgd2d_r50", _FRAMES, "LGD-2D on ResNet-50")
def lgd2d_r50(**kw) -> LGD2D:
    return LGD2D(block=Bottleneck2d, layers=(3, 4, 6, 3), **kw)


@register_model("lgd2d_r101", _FRAMES, "LGD-2D on ResNet-101")
def lgd2d_r101(**kw) -> LGD2D:
    return LGD2D(block=Bottleneck2d, layers=(3, 4, 23, 3), **kw)
