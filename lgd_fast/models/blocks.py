"""LGD blocks in plain PyTorch: the reference every fast path is checked against.

Every residual block of an LGD network is an :class:`LGDBlock`. It carries a local feature map ``x``
and a global vector ``g`` (one per video) and updates both (SPEC.md section 1)::

    r  = residual(x)                                   # ResNet residual unit, ends in BN (no ReLU)
    s  = x  or  downsample(x)                          # shortcut
    g' = ReLU(fc2(fc1(GAP(x))) + fc4(fc3(g)))          # local -> global diffusion (GAP of the block INPUT)
    x' = ReLU(r + s + broadcast(fc6(fc5(g'))))         # global -> local diffusion (uses the UPDATED g')

Local maps come in two layouts, and every helper here accepts both:

- 3-D networks: ``(N, C, T, H, W)``.
- 2-D networks (LGD-2D): frames folded into the batch, ``(N * T, C, H, W)``; the global vector is still
  one per video, ``(N, C)``, so ``T = x.shape[0] // g.shape[0]``.

Attribute names (conv1/bn1, conv2 + conv2_t/bn2, conv3/bn3, downsample.0/.1, fc1..fc6) are those of
the first author's public module, so its checkpoints load unchanged.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import conv3d

P3D_VARIANTS = ("A", "B", "C")


def p3d_variant(block_index: int) -> str:
    """Pseudo-3D variant of the residual block with global index ``block_index`` (A, B, C cycling)."""
    return P3D_VARIANTS[block_index % 3]


def video_mean(x: torch.Tensor, num_videos: int) -> torch.Tensor:
    """Mean of a local map over time and space, one vector per video.

    x: (N, C, T, H, W) or (N * T, C, H, W) -> (N, C), N = ``num_videos``.
    """
    if x.dim() == 5:
        return x.mean(dim=(2, 3, 4))
    frames, channels, height, width = x.shape
    return x.reshape(num_videos, frames // num_videos, channels, height, width).mean(dim=(1, 3, 4))


def broadcast_to_positions(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-video vector so that it adds to every position of the local map ``x``.

    d: (N, C); x: (N, C, T, H, W) -> (N, C, 1, 1, 1), or x: (N * T, C, H, W) -> (N * T, C, 1, 1).
    """
    if x.dim() == 5:
        return d[:, :, None, None, None]
    return d.repeat_interleave(x.shape[0] // d.shape[0], dim=0)[:, :, None, None]


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (the same parameters, state_dict and forward) for the padded convs, computed by
    :func:`lgd_fast.ops._common.conv3d`: ``F.conv3d`` except where PyTorch's CPU bfloat16 weight gradient is wrong
    (a padded dimension no longer than the kernel: 3x1x1 convs on two or three frames), which it pads first."""

    lgd_padded_workaround = True  # (lgd_fast.convert gives other padded Conv3d classes this _conv_forward)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return nn.Conv3d._conv_forward(self, input, weight, bias)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def conv1x3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    """Spatial part of a P3D pair: 1x3x3, carries the spatial stride."""
    return Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)


def conv3x1x1(in_channels: int, out_channels: int, spatial_stride: int = 1) -> nn.Conv3d:
    """Temporal part of a P3D pair: 3x1x1, temporal stride 1, padding 1 (variant B also strides in space)."""
    return Conv3d(
        in_channels, out_channels, (3, 1, 1), stride=(1, spatial_stride, spatial_stride), padding=(1, 0, 0), bias=False
    )


def conv1x1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    """Pointwise conv with a spatial stride (bottleneck ends, projection shortcut)."""
    return nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class LGDBlock(nn.Module, abc.ABC):
    """Local/global diffusion around a residual unit; subclasses define :meth:`residual`.

    Subclasses must set ``self.downsample`` (``None`` or the projection shortcut) in their constructor.
    The global path has the author's shape: fc1, fc3: C_in -> C_out / r; fc2, fc4: C_out / r -> C_out;
    fc5: C_out -> C_out / r; fc6: C_out / r -> C_out, with r = ``global_reduction`` (16 in the paper).
    fc6 starts at zero (weight and bias), so a fresh block is exactly a plain residual block.
    """

    expansion = 1
    downsample: nn.Module | None

    def __init__(self, in_channels: int, out_channels: int, *, global_reduction: int = 16) -> None:
        super().__init__()
        hidden = out_channels // global_reduction
        if hidden < 1:
            raise ValueError(
                f"global_reduction={global_reduction} leaves no hidden units for {out_channels} output channels"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fc1 = nn.Linear(in_channels, hidden)  # local in
        self.fc2 = nn.Linear(hidden, out_channels)
        self.fc3 = nn.Linear(in_channels, hidden)  # global in
        self.fc4 = nn.Linear(hidden, out_channels)
        self.fc5 = nn.Linear(out_channels, hidden)  # global out
        self.fc6 = nn.Linear(hidden, out_channels)
        # The author zeroes only fc6.weight and leaves a random bias, which shifts every channel of a fresh
        # block by a constant; we zero both so the block starts as the plain residual block SPEC.md promises.
        nn.init.zeros_(self.fc6.weight)
        nn.init.zeros_(self.fc6.bias)

    @abc.abstractmethod
    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        """The residual unit up to (not including) its last BatchNorm, :attr:`last_norm`."""

    @property
    def last_norm(self) -> nn.Module | None:
        """The BatchNorm that ends the residual unit (None where the unit ends in an addition)."""
        return None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual unit r = B(x), ending in BN without ReLU."""
        r = self.residual_body(x)
        return r if self.last_norm is None else self.last_norm(r)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def update_global(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """g' = ReLU(fc2(fc1(GAP(x))) + fc4(fc3(g))); x is the block input, g: (N, C_in) -> (N, C_out)."""
        return F.relu(self.fc2(self.fc1(video_mean(x, g.shape[0]))) + self.fc4(self.fc3(g)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: local map (either layout), g: (N, C_in) -> (x', g') with C_out channels."""
        r = self.residual(x)
        s = self.shortcut(x)
        g = self.update_global(x, g)
        d = self.fc6(self.fc5(g))
        return F.relu(r + s + broadcast_to_positions(d, r)), g


def _projection(conv: nn.Module, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, norm)  # keys downsample.0 (conv), downsample.1 (norm)


class P3DBottleneck(LGDBlock):
    """LGD-3D bottleneck: 1x1x1 -> P3D pair (variant A, B or C) -> 1x1x1, expansion 4.

    Variant orders, with z the output of conv1/bn1/ReLU and S = conv2 (1x3x3), T = conv2_t (3x1x1):
      A (serial):          ReLU(bn2(T(S(z))))
      B (parallel):        ReLU(bn2(S(z) + T(z)))        T also carries the spatial stride
      C (serial + skip):   u = ReLU(bn2(S(z))); ReLU(u + T(u))
    x: (N, in_channels, T, H, W) -> (N, 4 * planes, T, H / stride, W / stride).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        variant: str,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm3d,
        global_reduction: int = 16,
    ) -> None:
        out_channels = planes * self.expansion
        super().__init__(in_channels, out_channels, global_reduction=global_reduction)
        if variant not in P3D_VARIANTS:
            raise ValueError(f"variant must be one of {P3D_VARIANTS}, got {variant!r}")
        self.variant, self.stride = variant, stride
        self.conv1 = conv1x1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv1x3x3(planes, planes, stride)
        self.conv2_t = conv3x1x1(planes, planes, spatial_stride=stride if variant == "B" else 1)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1x1(planes, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _projection(conv1x1x1(in_channels, out_channels, stride), norm_layer(out_channels))

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(x)))
        if self.variant == "A":
            z = F.relu(self.bn2(self.conv2_t(self.conv2(z))))
        elif self.variant == "B":
            z = F.relu(self.bn2(self.conv2(z) + self.conv2_t(z)))
        else:
            u = F.relu(self.bn2(self.conv2(z)))
            z = F.relu(u + self.conv2_t(u))
        return self.conv3(z)  # then bn3


class P3DBasicBlock(LGDBlock):
    """LGD-3D basic block: two P3D pairs, expansion 1.

    With S1 = conv1, T1 = conv1_t, S2 = conv2, T2 = conv2_t (the second pair ends in BN, no ReLU):
      A: z = ReLU(bn1(T1(S1(x))));          bn2(T2(S2(z)))
      B: t = T1(x); z = ReLU(bn1(S1(x) + t)); bn2(S2(z) + T2(t))
         (as in the author's module, the second temporal conv continues from the first one's output t;
         T1 takes the block's input channels and its spatial stride, which fixes the author's channel
         mismatch at stages whose first block is of type B)
      C: u = ReLU(bn1(S1(x))); z = ReLU(u + T1(u)); v = bn2(S2(z)); v + T2(v)
    x: (N, in_channels, T, H, W) -> (N, planes, T, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        variant: str,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm3d,
        global_reduction: int = 16,
    ) -> None:
        super().__init__(in_channels, planes, global_reduction=global_reduction)
        if variant not in P3D_VARIANTS:
            raise ValueError(f"variant must be one of {P3D_VARIANTS}, got {variant!r}")
        self.variant, self.stride = variant, stride
        self.conv1 = conv1x3x3(in_channels, planes, stride)
        if variant == "B":
            self.conv1_t = conv3x1x1(in_channels, planes, spatial_stride=stride)
        else:
            self.conv1_t = conv3x1x1(planes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv1x3x3(planes, planes)
        self.conv2_t = conv3x1x1(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = _projection(conv1x1x1(in_channels, planes, stride), norm_layer(planes))

    @property
    def last_norm(self) -> nn.Module | None:
        return None if self.variant == "C" else self.bn2

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "A":
            z = F.relu(self.bn1(self.conv1_t(self.conv1(x))))
            return self.conv2_t(self.conv2(z))  # then bn2
        if self.variant == "B":
            t = self.conv1_t(x)
            z = F.relu(self.bn1(self.conv1(x) + t))
            return self.conv2(z) + self.conv2_t(t)  # then bn2
        u = F.relu(self.bn1(self.conv1(x)))
        z = F.relu(u + self.conv1_t(u))
        v = self.bn2(self.conv2(z))
        return v + self.conv2_t(v)  # C ends in the skip addition, no norm after it


class Bottleneck2d(LGDBlock):
    """LGD-2D bottleneck (torchvision ResNet layout, stride on the 3x3); frames folded into the batch.

    x: (N * T, in_channels, H, W) -> (N * T, 4 * planes, H / stride, W / stride).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        global_reduction: int = 16,
    ) -> None:
        out_channels = planes * self.expansion
        super().__init__(in_channels, out_channels, global_reduction=global_reduction)
        self.stride = stride
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _projection(conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(x)))
        z = F.relu(self.bn2(self.conv2(z)))
        return self.conv3(z)  # then bn3


class BasicBlock2d(LGDBlock):
    """LGD-2D basic block (torchvision layout). x: (N * T, in_channels, H, W) -> (N * T, planes, H', W')."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        global_reduction: int = 16,
    ) -> None:
        super().__init__(in_channels, planes, global_reduction=global_reduction)
        self.stride = stride
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = _projection(conv1x1(in_channels, planes, stride), norm_layer(planes))

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def residual_body(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(z)  # then bn2
