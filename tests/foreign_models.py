"""Video networks the project did not write, built the way their libraries build them (structure only; written here).

torchvision's video ResNet (``torchvision/models/video/resnet.py``):
- conv builders: ``Conv3DSimple`` (a Conv3d subclass, 3x3x3, stride s in T, H and W), ``Conv3DNoTemporal``
  (1x3x3, stride (1, s, s)) and ``Conv2Plus1D`` (a Sequential: 1x3x3 conv, BatchNorm, ReLU, 3x1x1 conv carrying
  the temporal stride); each says which stride its block's shortcut takes;
- stems (Sequentials): ``BasicStem`` (3x7x7 conv, BatchNorm, ReLU) and ``R2Plus1dStem`` (1x7x7 conv, BatchNorm,
  ReLU, 3x1x1 conv, BatchNorm, ReLU);
- ``BasicBlock`` / ``Bottleneck``: ``conv1`` ... Sequentials of (conv, BatchNorm[, ReLU]), the last without a
  ReLU; ``downsample`` a Sequential (1x1x1 conv at the builder's shortcut stride, BatchNorm) or None; forward
  ``relu(convs(x) + shortcut(x))``.
Builders: ``r3d`` (Conv3DSimple everywhere, BasicStem), ``mc3`` (Conv3DSimple in layer1, Conv3DNoTemporal after),
``r2plus1d`` (Conv2Plus1D, R2Plus1dStem); their defaults are the -18 networks.

pytorchvideo (``models/resnet.py``, ``stem.py``, ``csn.py``, ``x3d.py``, ``layers/convolutions.py``):
- ``ResNetBasicStem`` (conv -> norm -> activation -> pool, any of them None), ``BottleneckBlock`` (conv_a ->
  norm_a -> act_a -> conv_b -> norm_b -> act_b -> conv_c -> norm_c), ``ResBlock`` (branch1_conv / branch1_norm
  shortcut, branch2, activation, branch_fusion), ``Conv2plus1d`` (conv_t -> norm -> activation -> conv_xy);
- ``csn``: a 3x7x7 stem without pooling, bottlenecks with a depthwise 3x3x3 conv_b carrying the strides;
- ``x3d``: a stem whose Conv2plus1d holds the spatial 1x3x3 conv as ``conv_t`` and the depthwise 5x1x1 conv as
  ``conv_xy`` (the names swapped), BatchNorm and ReLU after it; bottlenecks with a depthwise 3x3x3 conv_b whose
  norm slot is ``Sequential(BatchNorm3d, squeeze-excitation)`` on every other block and whose activation is
  Swish; a stride-only shortcut conv without a BatchNorm.
Used by tests/test_convert.py and benchmarks/run_convert.py.
"""

from __future__ import annotations

import torch
from torch import nn

# ---- torchvision-style ---------------------------------------------------------------------------------------


class Conv3DSimple(nn.Conv3d):
    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1,
                 padding: int = 1):  # fmt: skip
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class Conv3DNoTemporal(nn.Conv3d):
    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1,
                 padding: int = 1):  # fmt: skip
        super().__init__(in_planes, out_planes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                         padding=(0, padding, padding), bias=False)  # fmt: skip

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return 1, stride, stride


class Conv2Plus1D(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1, padding: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                      padding=(0, padding, padding), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0),
                      bias=False),
        )  # fmt: skip

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class BasicStem(nn.Sequential):
    def __init__(self, width: int = 64):
        super().__init__(
            nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


class R2Plus1dStem(nn.Sequential):
    def __init__(self, mid: int = 45, width: int = 64):
        super().__init__(
            nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


def _midplanes(inplanes: int, planes: int) -> int:
    return (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder=Conv2Plus1D, stride: int = 1,
                 downsample: nn.Module | None = None):  # fmt: skip
        super().__init__()
        mid = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, mid, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))  # fmt: skip
        self.conv2 = nn.Sequential(conv_builder(planes, planes, mid), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, conv_builder=Conv3DSimple, stride: int = 1,
                 downsample: nn.Module | None = None):  # fmt: skip
        super().__init__()
        mid = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(nn.Conv3d(inplanes, planes, kernel_size=1, bias=False), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))  # fmt: skip
        self.conv2 = nn.Sequential(conv_builder(planes, planes, mid, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))  # fmt: skip
        self.conv3 = nn.Sequential(nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False),
                                   nn.BatchNorm3d(planes * 4))  # fmt: skip
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        out += residual
        return self.relu(out)


class VideoResNet(nn.Module):
    def __init__(self, block, conv_makers, layers, stem: nn.Module, widths, num_classes: int):
        super().__init__()
        self.stem = stem
        self.inplanes = widths[0]
        for i, (builder, count, planes) in enumerate(zip(conv_makers, layers, widths, strict=True)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, builder, planes, count, 1 if i == 0 else 2))
        self.num_layers = len(layers)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, builder, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1,
                          stride=builder.get_downsample_stride(stride), bias=False),
                nn.BatchNorm3d(planes * block.expansion),
            )  # fmt: skip
        blocks = [block(self.inplanes, planes, builder, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, builder) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def r2plus1d(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_mid: int = 45, num_classes: int = 400):
    """R(2+1)D-18 by default."""
    n = len(layers)
    return VideoResNet(BasicBlock, [Conv2Plus1D] * n, layers, R2Plus1dStem(stem_mid, widths[0]), widths, num_classes)


def r3d(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 400, block=BasicBlock):
    """R3D-18 by default (3x3x3 convs throughout)."""
    n = len(layers)
    return VideoResNet(block, [Conv3DSimple] * n, layers, BasicStem(widths[0]), widths, num_classes)


def mc3(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 400):
    """MC3-18 by default (3x3x3 convs in layer1, 1x3x3 after)."""
    makers = [Conv3DSimple] + [Conv3DNoTemporal] * (len(layers) - 1)
    return VideoResNet(BasicBlock, makers, layers, BasicStem(widths[0]), widths, num_classes)


# ---- pytorchvideo-style --------------------------------------------------------------------------------------


class Conv2plus1d(nn.Module):
    def __init__(self, *, conv_t=None, norm=None, activation=None, conv_xy=None, conv_xy_first=False):
        super().__init__()
        self.conv_t, self.norm, self.activation, self.conv_xy = conv_t, norm, activation, conv_xy
        self.conv_xy_first = conv_xy_first

    def forward(self, x):
        x = self.conv_xy(x) if self.conv_xy_first else self.conv_t(x)
        x = self.norm(x) if self.norm is not None else x
        x = self.activation(x) if self.activation is not None else x
        return self.conv_t(x) if self.conv_xy_first else self.conv_xy(x)


class ResNetBasicStem(nn.Module):
    def __init__(self, *, conv, norm=None, activation=None, pool=None):
        super().__init__()
        self.conv, self.norm, self.activation, self.pool = conv, norm, activation, pool

    def forward(self, x):
        x = self.conv(x)
        for module in (self.norm, self.activation, self.pool):
            if module is not None:
                x = module(x)
        return x


class BottleneckBlock(nn.Module):
    def __init__(self, *, conv_a, norm_a=None, act_a=None, conv_b, norm_b=None, act_b=None, conv_c, norm_c=None):
        super().__init__()
        self.conv_a, self.norm_a, self.act_a = conv_a, norm_a, act_a
        self.conv_b, self.norm_b, self.act_b = conv_b, norm_b, act_b
        self.conv_c, self.norm_c = conv_c, norm_c

    def forward(self, x):
        for name in ("conv_a", "norm_a", "act_a", "conv_b", "norm_b", "act_b", "conv_c", "norm_c"):
            module = getattr(self, name)
            if module is not None:
                x = module(x)
        return x


def _sum(x, y):
    return x + y


class ResBlock(nn.Module):
    def __init__(self, *, branch1_conv=None, branch1_norm=None, branch2, activation=None, branch_fusion=_sum):
        super().__init__()
        self.branch1_conv, self.branch1_norm, self.branch2 = branch1_conv, branch1_norm, branch2
        self.activation, self.branch_fusion = activation, branch_fusion

    def forward(self, x):
        shortcut = x
        if self.branch1_conv is not None:
            shortcut = self.branch1_conv(x)
            if self.branch1_norm is not None:
                shortcut = self.branch1_norm(shortcut)
        x = self.branch_fusion(shortcut, self.branch2(x))
        return self.activation(x) if self.activation is not None else x


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv3d(channels, reduced, 1, bias=True), nn.ReLU(),
                                   nn.Conv3d(reduced, channels, 1, bias=True), nn.Sigmoid())  # fmt: skip

    def forward(self, x):
        return x * self.block(x.mean((2, 3, 4), keepdim=True))


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3, 4))


def _bottleneck(dim_in, inner, dim_out, *, kernel_b, stride_b, groups_b, norm_b=None, act_b=None, act=nn.ReLU):
    return BottleneckBlock(
        conv_a=nn.Conv3d(dim_in, inner, 1, bias=False), norm_a=nn.BatchNorm3d(inner), act_a=act(),
        conv_b=nn.Conv3d(inner, inner, kernel_b, stride=stride_b, padding=tuple(k // 2 for k in kernel_b),
                         groups=groups_b, bias=False),
        norm_b=norm_b or nn.BatchNorm3d(inner), act_b=act_b or act(),
        conv_c=nn.Conv3d(inner, dim_out, 1, bias=False), norm_c=nn.BatchNorm3d(dim_out),
    )  # fmt: skip


def csn(widths=(16, 32), blocks=(1, 2), stem_width: int = 8):
    """A small CSN: depthwise 3x3x3 conv_b (strides on it, and on the 1x1x1 shortcut), 3x7x7 stem without pooling."""
    stem = ResNetBasicStem(conv=nn.Conv3d(3, stem_width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                           norm=nn.BatchNorm3d(stem_width), activation=nn.ReLU())  # fmt: skip
    layers, dim_in = [stem], stem_width
    for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(count):
            stride = (2, 2, 2) if i > 0 and j == 0 else (1, 1, 1)
            inner = width // 4
            shortcut = dim_in != width or stride != (1, 1, 1)
            layers.append(ResBlock(
                branch1_conv=nn.Conv3d(dim_in, width, 1, stride=stride, bias=False) if shortcut else None,
                branch1_norm=nn.BatchNorm3d(width) if shortcut else None,
                branch2=_bottleneck(dim_in, inner, width, kernel_b=(3, 3, 3), stride_b=stride, groups_b=inner),
                activation=nn.ReLU(),
            ))  # fmt: skip
            dim_in = width
    return Net(layers)


def x3d(widths=(8, 16), blocks=(2, 1), stem_width: int = 8):
    """A small X3D: the swapped-name stem, depthwise bottlenecks with squeeze-excitation on every other block and
    Swish, a lambda for the fusion, a stride-only shortcut without BatchNorm."""
    conv_xy = nn.Conv3d(3, stem_width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
    conv_t = nn.Conv3d(stem_width, stem_width, (5, 1, 1), padding=(2, 0, 0), groups=stem_width, bias=False)
    stem = ResNetBasicStem(conv=Conv2plus1d(conv_t=conv_xy, conv_xy=conv_t), norm=nn.BatchNorm3d(stem_width),
                           activation=nn.ReLU())  # fmt: skip
    layers, dim_in = [stem], stem_width
    for width, count in zip(widths, blocks, strict=True):
        for j in range(count):
            stride = (1, 2, 2) if j == 0 else (1, 1, 1)
            inner = width * 2
            se = SqueezeExcitation(inner, max(inner // 16, 2)) if j % 2 == 0 else nn.Identity()
            shortcut = dim_in != width or stride != (1, 1, 1)
            layers.append(ResBlock(
                branch1_conv=nn.Conv3d(dim_in, width, 1, stride=stride, bias=False) if shortcut else None,
                branch1_norm=nn.BatchNorm3d(width) if dim_in != width else None,
                branch2=_bottleneck(dim_in, inner, width, kernel_b=(3, 3, 3), stride_b=stride, groups_b=inner,
                                    norm_b=nn.Sequential(nn.BatchNorm3d(inner), se), act_b=Swish()),
                activation=nn.ReLU(),
                branch_fusion=lambda x, y: x + y,
            ))  # fmt: skip
            dim_in = width
    return Net(layers)
