"""BatchNorm with batch statistics over every process of a distributed run, on any device (gloo on CPUs too).

PyTorch's ``nn.SyncBatchNorm`` runs on CUDA tensors only. :class:`SyncBatchNorm` here does the same job with
two small all-reduces of per-channel sums (forward: sum and sum of squares and count; backward: the sums of
the upstream gradient and of it times the normalised input), so K processes training with batch B / K each
normalise exactly as one process with batch B does, and their gradients, once DDP has averaged them, are
that process's gradients. :func:`convert_sync_batchnorm` swaps it in for every ``nn.BatchNorm{1,2,3}d`` of a
model, keeping the parameters and buffers (the state_dict is unchanged).

Outside a process group, or in eval mode, it is plain ``F.batch_norm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..ops.conv_bn import batch_norm_arguments, uses_batch_stats

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0, *range(2, x.dim())]
        acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for a float64 model
        x32 = x.to(acc)
        # float64 sums: the variance is E[x^2] - E[x]^2, whose cancellation float32 sums would not survive
        sums = [x32.sum(dims, dtype=torch.float64), (x32 * x32).sum(dims, dtype=torch.float64)]
        local = torch.cat([*sums, sums[0].new_tensor([x.numel() / x.shape[1]])])
        dist.all_reduce(local, group=group)
        channels = x.shape[1]
        count = local[-1]
        mean = local[:channels] / count
        var = (local[channels : 2 * channels] / count - mean * mean).clamp_min(0)  # biased: what normalises
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                unbiased = var * (count / (count - 1).clamp_min(1))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps).to(acc)
        xhat = (x32 - mean.to(acc).view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.group, ctx.dims = count.to(acc), group, dims
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        dims, channels = ctx.dims, xhat.shape[1]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        g = grad_out.to(xhat.dtype)
        local = torch.cat([g.sum(dims), (g * xhat).sum(dims)])  # this process's part of the two channel sums
        grad_weight = local[channels:].to(weight.dtype) if weight is not None else None
        grad_bias = local[:channels].clone().to(weight.dtype) if weight is not None else None
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        mean_g = (total[:channels] / ctx.count).view(shape)
        mean_gx = (total[channels:] / ctx.count).view(shape)
        scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
        grad_x = (g - mean_g - xhat * mean_gx) * scale.view(shape)
        # weight/bias: this process's sums; DDP averages them over the processes like every other gradient.
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm*d`` whose training-mode statistics cover the whole process group (any device).

    The fused convs (:mod:`lgd_fast.ops.conv_bn`) that fold it synchronise their statistics over ``group`` too."""

    lgd_sync = True  # what lgd_fast.ops.conv_bn looks for (it does not import the engine)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not uses_batch_stats(self) or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        momentum = batch_norm_arguments(self)[3]  # (counting the batch as nn.BatchNorm does)
        track = self.training and self.track_running_stats
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, self.group,
        )  # fmt: skip


def convert_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replaces every ``nn.BatchNorm{1,2,3}d`` under ``module`` by :class:`SyncBatchNorm` with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group)  # fmt: skip
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        new.to(device=next(iter(module.state_dict().values())).device)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        replacement = convert_sync_batchnorm(child, group)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
