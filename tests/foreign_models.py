"""A video network the project did not write: R(2+1)D written the way torchvision's video ResNet writes it.

A ``Conv2Plus1D`` is a Sequential of a spatial 1x3x3 conv, BatchNorm, ReLU and a temporal 3x1x1 conv that
carries the block's temporal stride; the stem (``R2Plus1dStem``) is a Sequential of a 1x7x7 conv, BatchNorm,
ReLU, a 3x1x1 conv, BatchNorm, ReLU; a basic block's ``conv1`` / ``conv2`` are Sequentials around a
``Conv2Plus1D`` with a BatchNorm (and ReLU), and strided blocks project the shortcut with a 1x1x1 conv.
Used by tests/test_convert.py and benchmarks/run_convert.py (``r2plus1d()`` defaults are R(2+1)D-18).
"""

from __future__ import annotations

from torch import nn


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


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        self.conv1 = nn.Sequential(Conv2Plus1D(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))  # fmt: skip
        self.conv2 = nn.Sequential(Conv2Plus1D(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class VideoResNet(nn.Module):
    def __init__(self, layers, widths, stem_mid: int, num_classes: int):
        super().__init__()
        self.stem = R2Plus1dStem(stem_mid, widths[0])
        inplanes = widths[0]
        for i, (count, planes) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv3d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                     nn.BatchNorm3d(planes))  # fmt: skip
            blocks = [BasicBlock(inplanes, planes, stride, down)]
            blocks += [BasicBlock(planes, planes) for _ in range(count - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.num_layers = len(layers)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def r2plus1d(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_mid: int = 45, num_classes: int = 400):
    """R(2+1)D-18 by default."""
    return VideoResNet(layers, widths, stem_mid, num_classes)
