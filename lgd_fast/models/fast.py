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
the layout :func:`~lgd_fast.models.p3d.cpu_memory_format` picks for its frame size (measured).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import diffusion_epilogue, global_avg_pool, global_update
from ..ops.global_update import block_weights
from .blocks import LGDBlock
from .networks import LGD3D
from .p3d import batch_norm_affine, check_fusable, cpu_memory_format, residual_body, shortcut, to_fast_unit


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


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class FastLGD3D(LGD3D):
    """LGD-3D whose blocks end in the fused diffusion epilogue; same modules and state_dict as LGD3D."""

    def forward_features_and_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (x_L, g_L, GAP(x_L)); the mean comes out of the last block's epilogue."""
        self.check_input(x)
        if x.device.type == "cpu":  # the stem in the first block's layout (channels-last: max-pool ~14x faster at R50)
            x = x.contiguous(memory_format=cpu_memory_format(*self._stem_output_size(*x.shape[3:])))
        x = self.stem(x)
        x_mean = global_avg_pool(x)
        g = x_mean
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                if x.device.type == "cpu":  # the layout measured fastest for this block's frame size
                    x = x.contiguous(memory_format=cpu_memory_format(*x.shape[3:]))
                x, g, x_mean = fused_block_forward(block, x, g, x_mean)
        return x, g, x_mean

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
