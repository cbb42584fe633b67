"""Fast P3D units: the residual units of LGD-3D with every conv run as :func:`~lgd_fast.ops.conv_bn`.

Each unit computes what the reference :class:`~lgd_fast.models.blocks.P3DBottleneck` /
:class:`~lgd_fast.models.blocks.P3DBasicBlock` computes, from the very same modules and parameters, with every
BatchNorm, ReLU and addition that follows a convolution moved into that convolution's epilogue (folded from
running statistics in eval, from the conv's own statistics in training: :mod:`lgd_fast.ops.conv_bn`). Variant
B's ``ReLU(BN(S(z) + T(z)))`` is :func:`~lgd_fast.ops.conv_bn.conv_sum_bn`.

This module holds the unit bodies only. Whether a unit runs fused or as its own modules, in which layout and on
which backend, is its execution plan's choice (:mod:`lgd_fast.plan`), passed in as ``fused`` and ``backend``.

LGD-2D's units (:class:`~lgd_fast.models.blocks.Bottleneck2d`, :class:`~lgd_fast.models.blocks.BasicBlock2d`)
have bodies here too (:func:`frame_unit_body`): the fast LGD-2D runs its frames as videos (N, C, T, H, W), each
Conv2d + BatchNorm2d as the (1, k, k) conv over every frame (:func:`~lgd_fast.ops.conv_bn.conv_bn` takes it).

The unit's last BatchNorm is left to the caller (the fast LGD block's diffusion epilogue folds it), so
:func:`residual_body` returns the unit's output before it and, in training, that output's statistics.
:class:`FastP3DBottleneck` and :class:`FastP3DBasicBlock` are the reference blocks with this body; they add no
state, so they load the reference's state_dict, and :func:`to_fast_unit` converts a reference block in place.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import plan as planning
from ..ops.conv_bn import conv_bn, conv_sum_bn, fusable_reason, norm_reason, p3d_geometry_reason, uses_batch_stats
from .blocks import BasicBlock2d, Bottleneck2d, P3DBasicBlock, P3DBottleneck

__all__ = [
    "FastP3DBasicBlock",
    "FastP3DBottleneck",
    "check_fusable",
    "frame_unit_body",
    "frames",
    "videos",
    "reference_class",
    "residual_body",
    "shortcut",
    "to_fast_unit",
]

Stats = torch.Tensor | None


def _last(conv: nn.Conv3d, norm: nn.Module | None, x: torch.Tensor, backend: str, **epilogue):
    """The unit's last conv, whose BatchNorm the caller applies: with its statistics when ``norm`` needs them."""
    if norm is not None and uses_batch_stats(norm):
        return conv_bn(x, conv, stats=True, backend=backend, **epilogue)
    return conv_bn(x, conv, backend=backend, **epilogue), None


def bottleneck_body(block: P3DBottleneck, x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, Stats]:
    """``block.residual_body(x)`` (up to bn3) as fused convs and, when bn3 uses batch statistics, their sums."""
    z = conv_bn(x, block.conv1, block.bn1, relu=True, backend=backend)
    if block.variant == "A":  # ReLU(bn2(T(S(z))))
        z = conv_bn(conv_bn(z, block.conv2, backend=backend), block.conv2_t, block.bn2, relu=True, backend=backend)
    elif block.variant == "B":  # ReLU(bn2(S(z) + T(z)))
        z = conv_sum_bn(z, block.conv2, block.conv2_t, block.bn2, relu=True, backend=backend)
    else:  # u = ReLU(bn2(S(z))); ReLU(u + T(u))
        u = conv_bn(z, block.conv2, block.bn2, relu=True, backend=backend)
        z = conv_bn(u, block.conv2_t, residual=u, relu=True, backend=backend)
    return _last(block.conv3, block.bn3, z, backend)


def basic_body(block: P3DBasicBlock, x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, Stats]:
    """``block.residual_body(x)`` (up to bn2 for A and B; C ends in its addition) and the statistics bn2 needs."""
    if block.variant == "A":  # z = ReLU(bn1(T1(S1(x)))); bn2(T2(S2(z)))
        z = conv_bn(conv_bn(x, block.conv1, backend=backend), block.conv1_t, block.bn1, relu=True, backend=backend)
        return _last(block.conv2_t, block.bn2, conv_bn(z, block.conv2, backend=backend), backend)
    if block.variant == "B":  # t = T1(x); z = ReLU(bn1(S1(x) + t)); bn2(S2(z) + T2(t))
        t = conv_bn(x, block.conv1_t, backend=backend)
        z = conv_bn(x, block.conv1, block.bn1, residual=t, relu=True, backend=backend)
        return _last(block.conv2_t, block.bn2, t, backend, residual=conv_bn(z, block.conv2, backend=backend))
    # u = ReLU(bn1(S1(x))); z = ReLU(u + T1(u)); v = bn2(S2(z)); v + T2(v)
    u = conv_bn(x, block.conv1, block.bn1, relu=True, backend=backend)
    z = conv_bn(u, block.conv1_t, residual=u, relu=True, backend=backend)
    v = conv_bn(z, block.conv2, block.bn2, backend=backend)
    return conv_bn(v, block.conv2_t, residual=v, backend=backend), None


FRAME_UNITS = (Bottleneck2d, BasicBlock2d)


def frames(x: torch.Tensor) -> torch.Tensor:
    """Videos (N, C, T, H, W) as LGD-2D's frames (N * T, C, H, W): a view for channels_last_3d videos (whose
    memory is the frames' channels_last), a copy otherwise."""
    return x.transpose(1, 2).flatten(0, 1)


def videos(y: torch.Tensor, num_videos: int) -> torch.Tensor:
    """Frames (N * T, C, H, W) as videos (N, C, T, H, W): a view (channels_last frames give channels_last_3d)."""
    return y.unflatten(0, (num_videos, -1)).transpose(1, 2)


def _over_frames(module, x: torch.Tensor) -> torch.Tensor:
    """A 2-D module applied to every frame of the videos x."""
    return videos(module(frames(x)), x.shape[0])


def frame_unit_body(block: Bottleneck2d | BasicBlock2d, x: torch.Tensor, backend: str = "auto"):
    """``block.residual_body`` of an LGD-2D unit over the frames of the videos x (N, C, T, H, W), as fused convs
    (each Conv2d the (1, k, k) conv), and the statistics its last BatchNorm needs."""
    z = conv_bn(x, block.conv1, block.bn1, relu=True, backend=backend)
    if isinstance(block, Bottleneck2d):
        z = conv_bn(z, block.conv2, block.bn2, relu=True, backend=backend)
        return _last(block.conv3, block.bn3, z, backend)
    return _last(block.conv2, block.bn2, z, backend)


def reference_class(block: nn.Module) -> type:
    """The reference class a fast unit was made from (P3DBottleneck or P3DBasicBlock)."""
    return P3DBottleneck if isinstance(block, P3DBottleneck) else P3DBasicBlock


def residual_body(
    block: P3DBottleneck | P3DBasicBlock, x: torch.Tensor, *, fused: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, Stats]:
    """The body of a P3D unit: (output before the unit's last BatchNorm, its batch sums or None); fused convs, or
    with ``fused=False`` the reference's own modules (then no sums)."""
    if isinstance(block, FRAME_UNITS):  # LGD-2D: x holds videos, the unit runs on their frames
        if not fused:
            return _over_frames(block.residual_body, x), None
        return frame_unit_body(block, x, backend)
    if not isinstance(block, P3DBottleneck | P3DBasicBlock):
        raise TypeError(f"the fused P3D path takes a P3DBottleneck or P3DBasicBlock, got {type(block).__name__}")
    if not fused:
        return reference_class(block).residual_body(block, x), None
    if isinstance(block, P3DBottleneck):
        return bottleneck_body(block, x, backend)
    return basic_body(block, x, backend)


def shortcut(
    block: P3DBottleneck | P3DBasicBlock, x: torch.Tensor, *, fused: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """``block.shortcut(x)``: the identity, or the projection conv with its BatchNorm fused (``fused``)."""
    if block.downsample is None:
        return x
    if not fused:
        return _over_frames(block.downsample, x) if isinstance(block, FRAME_UNITS) else block.downsample(x)
    conv, norm = block.downsample
    return conv_bn(x, conv, norm, backend=backend)


# ---- modules ----------------------------------------------------------------------------------------


def _run_unit(block: nn.Module, choice: planning.Choice, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's residual body and shortcut under ``choice`` (what the plan times)."""
    x = choice.to(x)
    r, _ = residual_body(block, x, fused=choice.fused, backend=choice.request)
    return r, shortcut(block, x, fused=choice.fused, backend=choice.request)


class _FastUnit:
    """residual_body and shortcut of a fast unit used on its own (outside the fast LGD-3D, whose blocks are run
    by :mod:`lgd_fast.models.fast`): fused or not as the unit's plan chooses. Made directly, a unit plans on first
    use with ``$LGD_FAST_BACKEND`` / ``$LGD_FAST_PLAN`` (:func:`lgd_fast.plan.decide`); :func:`to_fast_unit` takes
    them as arguments."""

    def _choice(self, x: torch.Tensor) -> planning.Choice:
        return planning.decide(self, x, lambda c, t: _run_unit(self, c, t))

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        choice = self._choice(x)
        r, _ = residual_body(self, choice.to(x), fused=choice.fused, backend=choice.request)
        return r

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        choice = self._choice(x)
        return shortcut(self, choice.to(x), fused=choice.fused, backend=choice.request)


class FastP3DBottleneck(_FastUnit, P3DBottleneck):
    """:class:`P3DBottleneck` whose residual unit and shortcut run fused; same modules and state_dict."""


class FastP3DBasicBlock(_FastUnit, P3DBasicBlock):
    """:class:`P3DBasicBlock` whose residual unit and shortcut run fused; same modules and state_dict."""


_FAST_UNITS = {P3DBottleneck: FastP3DBottleneck, P3DBasicBlock: FastP3DBasicBlock}


def check_fusable(block: P3DBottleneck | P3DBasicBlock, name: str = "block") -> None:
    """Raise a TypeError naming the first module the fused P3D path cannot take: a conv off
    :func:`~lgd_fast.ops.p3d_conv`'s geometry (:func:`lgd_fast.ops.conv_bn.p3d_geometry_reason`, or anything
    :func:`~lgd_fast.ops.conv_bn.fusable_reason` refuses), a norm :func:`~lgd_fast.ops.conv_bn.norm_reason`
    refuses."""
    for child_name, module in block.named_modules():
        if not isinstance(module, nn.Conv3d | nn.Conv2d):
            continue
        if (reason := fusable_reason(module) or p3d_geometry_reason(module)) is not None:
            raise TypeError(
                f"{name}.{child_name}: the fused P3D path takes odd kernels with same padding, temporal stride 1, one "
                f"spatial stride, no dilation or groups; got {reason}"
            )
    norms = {"bn1": block.bn1, "bn2": block.bn2, "bn3": getattr(block, "bn3", None)}
    if block.downsample is not None:
        norms["downsample.1"] = block.downsample[1]
    for child_name, module in norms.items():
        if norm_reason(module) is not None:
            kind = type(module).__name__
            raise TypeError(f"{name}.{child_name}: the fused P3D path folds BatchNorm3d only, got {kind}")


def unit_note(block: nn.Module) -> str:
    convs = sum(isinstance(m, nn.Conv3d | nn.Conv2d) for m in block.modules())
    if isinstance(block, FRAME_UNITS):
        return f"{type(block).__name__} over frames: {convs} convs with their BatchNorm, adds and ReLU"
    return f"{reference_class(block).__name__} {block.variant}: {convs} convs with their BatchNorm, adds and ReLU"


def to_fast_unit(
    block: nn.Module, name: str = "block", *, backend: str | None = None, plan: str | None = None
) -> nn.Module:
    """Turn a reference P3D block into its fast class in place (no new state) with its plan (:mod:`lgd_fast.plan`:
    ``backend``, ``plan`` as there); other modules are returned as is."""
    fast = _FAST_UNITS.get(type(block))
    if fast is None:
        return block
    check_fusable(block, name)
    backend, mode = planning.resolve_options(backend, plan)
    block.__class__ = fast
    planning.attach(block, "p3d_unit", unit_note(block), backend=backend, mode=mode)
    return block
