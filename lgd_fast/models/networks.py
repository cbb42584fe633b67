"""LGD-3D (pseudo-3D ResNets) and LGD-2D networks in plain PyTorch (SPEC.md section 3).

Both take a video batch ``(N, 3, T, H, W)`` and run: stem -> g0 = GAP(stem output) -> four stages of
LGD blocks carrying (local map, global vector) -> heads.

Heads (``classifier=``):

- ``"two_heads"``: the author's module exactly: local logits = fc(dropout(GAP(x_L))), global logits
  = fc_g(dropout(g_L)). Training mode returns ``(local_logits, global_logits)`` (stage-1 loss is the sum
  of their cross-entropies); eval mode returns the local logits.
- ``"kernel"``: the same two heads plus the combination classifier (:class:`KernelClassifier`) under
  ``kernel_head``. ``model.stage`` selects the optimisation stage: 1 behaves as ``"two_heads"``,
  2 (the default) returns the combination classifier's logits in training and eval.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .blocks import (
    BasicBlock2d,
    Bottleneck2d,
    Conv3d,
    LGDBlock,
    P3DBasicBlock,
    P3DBottleneck,
    p3d_variant,
    video_mean,
)
from .heads import KernelClassifier

CLASSIFIERS = ("kernel", "two_heads")


class LGDNet(nn.Module, abc.ABC):
    """Stages, heads and forward shared by LGD-3D and LGD-2D; subclasses build the stem."""

    blocks_are_3d: bool

    def __init__(
        self,
        *,
        num_classes: int,
        classifier: str,
        dropout: float,
        sketch_dim: int,
        feature_dim: int,
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        num_classes = int(num_classes)  # (a numpy or torch integer as a Python int)
        self.num_classes, self.classifier, self.feature_dim = num_classes, classifier, feature_dim
        self.drop = nn.Dropout(dropout)
        self.drop_g = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)
        self.fc_g = nn.Linear(feature_dim, num_classes)
        self.stage = 1
        if classifier == "kernel":
            self.kernel_head = KernelClassifier(
                feature_dim, feature_dim, num_classes, sketch_dim=sketch_dim, dropout=dropout
            )
            self.stage = 2

    def _make_stages(
        self,
        block: type[LGDBlock],
        layers: Sequence[int],
        widths: Sequence[int],
        in_channels: int,
        **block_options,
    ) -> int:
        """Build layer1..layer4; returns the channel count of the final local map."""
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"expected 4 stages, got layers={list(layers)} widths={list(widths)}")
        index = 0
        for stage, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                if self.blocks_are_3d:
                    block_options["variant"] = p3d_variant(index)
                blocks.append(block(in_channels, planes, stride=stride, **block_options))
                in_channels = planes * block.expansion
                index += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        return in_channels

    def _init_weights(self) -> None:
        """Convs Kaiming-normal (fan_out), norms gamma 1 / beta 0; each block zeroes its own fc6."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error unless ``x`` is a video batch this model can run on."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor video batch, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(
                f"expected a video batch of shape (N, 3, T, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != 3:
            raise ValueError(
                f"expected 3 colour channels in dimension 1 of (N, 3, T, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point video batch, got dtype {x.dtype} (convert and normalise first)")
        if x.shape[0] == 0 or 0 in x.shape[2:]:
            what = "an empty batch (N = 0)" if x.shape[0] == 0 else "no frames or pixels (T, H or W is 0)"
            raise ValueError(f"expected a video batch of shape (N, 3, T, H, W) with every size >= 1, got {what}: "
                             f"shape {tuple(x.shape)}")  # fmt: skip
        param = self.fc.weight
        if x.device != param.device:
            raise ValueError(f"input is on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the model's {param.dtype}: "
                "convert one of them or run under torch.autocast"
            )

    @abc.abstractmethod
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> the first local map, in the layout the network's blocks use."""

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (final local map x_L, final global vector g_L of shape (N, feature_dim))."""
        self.check_input(x)
        num_videos = x.shape[0]
        x = self.stem(x)
        g = video_mean(x, num_videos)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x, g = block(x, g)
        return x, g

    def forward_head(self, local_map: torch.Tensor, g: torch.Tensor, *, local_mean: torch.Tensor | None = None):
        """Logits from the final (local map, global vector); see the module docstring for each mode.

        ``local_mean`` (N, C), if given, is GAP(local_map) already computed (the fast model has it for free).
        """
        if self.classifier == "kernel" and self.stage == 2:
            return self.kernel_head(local_map, g)
        if local_mean is None:
            local_mean = video_mean(local_map, g.shape[0])
        local_logits = self.fc(self.drop(local_mean))
        if not self.training:
            return local_logits
        return local_logits, self.fc_g(self.drop_g(g))

    def forward(self, x: torch.Tensor):
        return self.forward_head(*self.forward_features(x))


class LGD3D(LGDNet):
    """LGD-3D on a pseudo-3D ResNet.

    Stem: conv1 (k_t x 7 x 7, stride (k_t, 2, 2)) with k_t = ``early_stride``, BN, ReLU, 1x3x3 max-pool
    with stride (1, 2, 2); then P3D blocks cycling A, B, C by global block index.
    x: (N, 3, T, H, W) with T >= early_stride.
    """

    blocks_are_3d = True

    def __init__(
        self,
        *,
        block: type[LGDBlock],
        layers: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        early_stride: int = 4,
        classifier: str = "kernel",
        dropout: float = 0.5,
        sketch_dim: int = 4096,
        global_reduction: int = 16,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm3d,
    ) -> None:
        if block not in (P3DBottleneck, P3DBasicBlock):
            raise ValueError(f"LGD3D takes P3DBottleneck or P3DBasicBlock, got {block.__name__}")
        feature_dim = widths[-1] * block.expansion
        super().__init__(
            num_classes=num_classes,
            classifier=classifier,
            dropout=dropout,
            sketch_dim=sketch_dim,
            feature_dim=feature_dim,
        )
        self.early_stride = early_stride
        self.conv1 = Conv3d(
            3, stem_width, (early_stride, 7, 7), stride=(early_stride, 2, 2), padding=(0, 3, 3), bias=False
        )
        self.bn1 = norm_layer(stem_width)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self._make_stages(block, layers, widths, stem_width, norm_layer=norm_layer, global_reduction=global_reduction)
        self._init_weights()

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if x.shape[2] < self.early_stride:
            raise ValueError(
                f"clip has {x.shape[2]} frames but the stem's early temporal stride is {self.early_stride}: "
                f"give at least {self.early_stride} frames"
            )

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> (N, stem_width, T / k_t, H / 4, W / 4)."""
        return self.maxpool(torch.relu(self.bn1(self.conv1(x))))


class LGD2D(LGDNet):
    """LGD-2D: a 2-D ResNet over the T frames of each video (TSN-style sampling), one global vector per video.

    The local path treats frames independently (frames are folded into the batch, (N * T, C, H, W));
    the global vector pools over T, H and W. Stem: 7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2.
    x: (N, 3, T, H, W) with T the number of sampled frames (3 in the paper).
    """

    blocks_are_3d = False

    def __init__(
        self,
        *,
        block: type[LGDBlock],
        layers: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        classifier: str = "kernel",
        dropout: float = 0.5,
        sketch_dim: int = 4096,
        global_reduction: int = 16,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        if block not in (Bottleneck2d, BasicBlock2d):
            raise ValueError(f"LGD2D takes Bottleneck2d or BasicBlock2d, got {block.__name__}")
        feature_dim = widths[-1] * block.expansion
        super().__init__(
            num_classes=num_classes,
            classifier=classifier,
            dropout=dropout,
            sketch_dim=sketch_dim,
            feature_dim=feature_dim,
        )
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._make_stages(block, layers, widths, stem_width, norm_layer=norm_layer, global_reduction=global_reduction)
        self._init_weights()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> frames (N * T, stem_width, H / 4, W / 4)."""
        frames = x.transpose(1, 2).flatten(0, 1)
        return self.maxpool(torch.relu(self.bn1(self.conv1(frames))))
