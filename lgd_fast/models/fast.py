"""The fast LGD-3D: the reference network with every block's end fused into one pass.

In the reference, each block ends with BN (of the residual), + shortcut, + broadcast diffusion vector,
ReLU, and the next block then pools the result again (five passes over the block's largest tensor).
Here each block ends with one :func:`~lgd_fast.ops.diffusion_epilogue`, whose second output is the
channel mean of the block's output: the next block's GAP, so no pooling pass runs anywhere after the
stem (SPEC.md section 1, the note). The block's global path (six linears, an add, a ReLU) is one
:func:`~lgd_fast.ops.global_update` call.

Each block's residual unit and projection shortcut are the fast P3D units of :mod:`.p3d` (every conv with its
BatchNorm, ReLU and addition in one :func:`~lgd_fast.ops.p3d_conv` pass). The unit's last BatchNorm becomes
the epilogue's ``scale``/``shift``: from the last conv's batch statistics in training (gradients flow through
them as through BatchNorm, and the running statistics are updated as BatchNorm updates them), from running
statistics in eval. Modules, parameters and buffers are the reference's own: the fast model loads the very
same state_dict, and :func:`to_fast` converts a reference model in place. On CPU tensors each block runs in
the layout :func:`~lgd_fast.models.p3d.cpu_memory_format` picks for its frame size, and blocks with small
frames run their own modules (:func:`~lgd_fast.models.p3d.cpu_block_is_fused`; both measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import diffusion_epilogue, global_avg_pool, global_update
from ..ops.global_update import block_weights
from .blocks import LGDBlock
from .networks import LGD3D
from .p3d import (
    batch_norm_affine,
    check_fusable,
    cpu_block_is_fused,
    cpu_memory_format,
    residual_body,
    shortcut,
    to_fast_unit,
)


def fused_block_forward(
    block: LGDBlock, x: torch.Tensor, g: torch.Tensor, x_mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LGD block with a fused end: (x, g, GAP(x)) -> (x', g', GAP(x'))."""
    r, stats = residual_body(block, x)
    scale, shift = batch_norm_affine(block.last_norm, r, stats)
    s = shortcut(block, x)
    if s.dtype != r.dtype:  # under autocast the shortcut may stay float32 while convs give bfloat16
        s = s.to(r.dtype)
    # The global path in one call, in the weights' dtype (float32 under autocast too: it is (N, C) small).
    weights = block_weights(block)
    g, d = global_update(x_mean.to(weights[0].dtype), g.to(weights[0].dtype), *weights)
    s = s.contiguous(memory_format=_memory_format(r))
    out, mean = diffusion_epilogue(r, s, d, scale, shift)
    return out, g, mean


# nn.MaxPool3d's settings in the LGD-3D stem, which max_pool_1x3x3 computes.
_STEM_POOL = ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1, False)


def max_pool_1x3x3(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))`` as a max over three strided views along W, then
    three along H (-inf padding). The same values (max is exact); for inference (under autograd, ties would
    share the gradient where max-pool gives it to one element)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    h_out, w_out = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    rows = padded[..., 0 : 2 * w_out - 1 : 2].maximum(padded[..., 1 : 2 * w_out : 2])
    rows = rows.maximum(padded[..., 2 : 2 * w_out + 1 : 2])
    out = rows[..., 0 : 2 * h_out - 1 : 2, :].maximum(rows[..., 1 : 2 * h_out : 2, :])
    return out.maximum(rows[..., 2 : 2 * h_out + 1 : 2, :])


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class FastLGD3D(LGD3D):
    """LGD-3D whose blocks end in the fused diffusion epilogue; same modules and state_dict as LGD3D."""

    def forward_features_and_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (x_L, g_L, GAP(x_L)); the mean comes out of the last block's epilogue."""
        self.check_input(x)
        x = self._cpu_stem(x) if x.device.type == "cpu" else self.stem(x)
        x_mean = global_avg_pool(x)
        g = x_mean
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                if x.device.type == "cpu":  # the layout measured fastest for this block's frame size
                    x = x.contiguous(memory_format=cpu_memory_format(*x.shape[3:]))
                if cpu_block_is_fused(x):
                    if x_mean is None:
                        x_mean = global_avg_pool(x)
                    x, g, x_mean = fused_block_forward(block, x, g, x_mean)
                else:  # small frames on the CPU: the block's own modules (measured faster, see cpu_block_is_fused)
                    x, g = block(x, g)
                    x_mean = None
        return x, g, (global_avg_pool(x) if x_mean is None else x_mean)

    def _cpu_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The reference stem (conv1, bn1, ReLU, max-pool) in the layouts measured fastest on the CPU.

        ATen's 1x3x3 max-pool is about 10x slower on contiguous tensors than on channels_last_3d ones. In
        training the whole stem runs channels-last (fastest at every clip size measured). At inference conv1
        runs in the first block's layout, and before contiguous blocks the pool is :func:`max_pool_1x3x3` (a
        separable max over strided views, exactly equal): on (16, 16, 8, 16, 16) (lgd3d_tiny's stem at
        16x32x32, batch 16) it took 0.45 ms, ATen's contiguous pool 2.08 ms, the round trip through
        channels-last 0.52 ms; on channels-last input ATen's pool is the fastest (0.20 ms there, 2.06 ms vs
        7.7 ms on R50's (4, 64, 8, 56, 56)).
        """
        first_block = cpu_memory_format(*self._stem_output_size(*x.shape[3:]))
        if self.training:
            x = self.conv1(x.contiguous(memory_format=torch.channels_last_3d))
            return self.maxpool(torch.relu(self.bn1(x)))
        x = torch.relu(self.bn1(self.conv1(x.contiguous(memory_format=first_block))))
        pool = self.maxpool
        settings = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        if first_block == torch.contiguous_format and settings == _STEM_POOL:
            return max_pool_1x3x3(x)
        return pool(x)

    def _stem_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the stem's output (conv1 then max-pool) for an (H, W) clip: the first block's frames."""
        size = [height, width]
        for op in (self.conv1, self.maxpool):
            k, st, p = (v if isinstance(v, tuple) else (v,) * 3 for v in (op.kernel_size, op.stride, op.padding))
            size = [(d + 2 * p[i + 1] - k[i + 1]) // st[i + 1] + 1 for i, d in enumerate(size)]
        return size[0], size[1]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local_map, g, _ = self.forward_features_and_mean(x)
        return local_map, g

    def forward(self, x: torch.Tensor):
        local_map, g, local_mean = self.forward_features_and_mean(x)
        return self.forward_head(local_map, g, local_mean=local_mean)


def to_fast(model: nn.Module) -> FastLGD3D:
    """Turn a reference LGD-3D into the fast model in place (same modules, parameters and buffers).

    Raises a TypeError for models the fused path does not cover yet (LGD-2D, or a network whose
    blocks end in another normalisation than BatchNorm3d).
    """
    if not isinstance(model, LGD3D):
        raise TypeError(
            f"the fast path covers LGD-3D models; got {type(model).__name__} (LGD-2D has no fused path yet)"
        )
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, LGDBlock)]
    for name, module in blocks:
        if not isinstance(module.last_norm, nn.BatchNorm3d | None):
            raise TypeError(f"{name}: the fused block end folds BatchNorm3d only, got {type(module.last_norm)}")
        check_fusable(module, name)
    for name, module in blocks:
        to_fast_unit(module, name)
    model.__class__ = FastLGD3D  # adds no state: only forward_features/forward differ
    return model
