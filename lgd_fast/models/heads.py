"""The local and global combination classifier (SPEC.md section 4) and its Tensor Sketch.

Our reading of the paper's kernel view (its text was not available to us): two videos with final
local maps {x_i}, {x'_j} (C-vectors at every position) and global vectors g, g' are compared by

    k = mean_{i,j} <x_i, x'_j>^2  +  <g, g'>^2

i.e. a second-order (bilinear) kernel over every pair of positions plus one on the global vectors.
Each second-order term is made finite with a Tensor Sketch phi: R^C -> R^D, a random projection with
E[<phi(a), phi(b)>] = <a, b>^2 (Pham & Pagh 2013; compact bilinear pooling, Gao et al. CVPR 2016).
By linearity of the inner product

    <mean_i phi(x_i), mean_j phi(x'_j)>  ~=  mean_{i,j} <x_i, x'_j>^2,

so the feature ``[mean_i phi_local(x_i), phi_global(g)]`` (2 * D values) realises k, and a linear
classifier on it is a linear classifier in the kernel's feature space.

Before the linear layer each path's sketch is scaled to unit L2 norm (``normalize=True``, the default), so
the features realise each path's normalised kernel k(a, b) / sqrt(k(a, a) k(b, b)) and the logits no
longer grow with the square of the activations: without it, stage 2 of the demo's training started at a
loss of 14.6 and lost the stage-1 accuracy (100% -> 74% held-out). Compact bilinear pooling also takes a
signed square root first; we do not: its derivative near 0 amplifies float32 rounding of the sketch by
orders of magnitude (measured: fp32 gradients 10x further from fp64). ``normalize=False`` gives the raw
features.
"""

from __future__ import annotations

import torch
from torch import nn


class TensorSketch(nn.Module):
    """Tensor Sketch of the second-order polynomial kernel: <phi(a), phi(b)> ~= <a, b>^2.

    phi(a) = IFFT(FFT(CS1(a)) * FFT(CS2(a))), CS_k the count sketch a -> sum_c s_k[c] a_c e_{h_k[c]}
    with independent random hashes h_k: [C] -> [D] and signs s_k in {-1, +1}. The hashes are fixed
    at construction from ``seed`` and saved as buffers, so a checkpoint restores the same sketch.
    The sketch is computed in float32 (the FFT has no bfloat16 kernel on the CPU).

    (..., in_dim) -> (..., sketch_dim)
    """

    def __init__(self, in_dim: int, sketch_dim: int, *, seed: int = 0) -> None:
        super().__init__()
        if in_dim < 1 or sketch_dim < 1:
            raise ValueError(f"TensorSketch needs positive dimensions, got in_dim={in_dim}, sketch_dim={sketch_dim}")
        self.in_dim, self.sketch_dim = in_dim, sketch_dim
        gen = torch.Generator().manual_seed(seed)
        for k in (1, 2):
            self.register_buffer(f"hash{k}", torch.randint(sketch_dim, (in_dim,), generator=gen))
            self.register_buffer(f"sign{k}", torch.randint(2, (in_dim,), generator=gen).float() * 2 - 1)

    def count_sketch(self, x: torch.Tensor, k: int) -> torch.Tensor:
        hash_, sign = getattr(self, f"hash{k}"), getattr(self, f"sign{k}")
        source = x * sign.to(x.dtype)
        return source.new_zeros(*x.shape[:-1], self.sketch_dim).index_add(-1, hash_, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"TensorSketch expects last dimension {self.in_dim}, got shape {tuple(x.shape)}")
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 (float64 stays float64)
        spectrum = torch.fft.rfft(self.count_sketch(x, 1)) * torch.fft.rfft(self.count_sketch(x, 2))
        return torch.fft.irfft(spectrum, n=self.sketch_dim)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, sketch_dim={self.sketch_dim}"


def positions(local_map: torch.Tensor, num_videos: int) -> torch.Tensor:
    """Local feature vectors of every position, grouped per video.

    (N, C, T, H, W) or (N * T, C, H, W) -> (N, P, C) with P = T * H * W.
    """
    channels = local_map.shape[1]
    if local_map.dim() == 5:
        return local_map.flatten(2).transpose(1, 2)
    frames = local_map.reshape(num_videos, -1, channels, *local_map.shape[2:])  # (N, T, C, H, W)
    return frames.transpose(1, 2).flatten(2).transpose(1, 2)


class KernelClassifier(nn.Module):
    """Linear classifier on the sketched local + global kernel features (see the module docstring).

    local_map: (N, C_local, T, H, W) or (N * T, C_local, H, W); g: (N, C_global) -> logits (N, num_classes).
    """

    def __init__(
        self,
        local_dim: int,
        global_dim: int,
        num_classes: int,
        *,
        sketch_dim: int = 4096,
        dropout: float = 0.5,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.sketch_local = TensorSketch(local_dim, sketch_dim, seed=seed)
        self.sketch_global = TensorSketch(global_dim, sketch_dim, seed=seed + 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * sketch_dim, num_classes)

    def features(self, local_map: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The kernel feature [mean_i phi(x_i), phi(g)]: (N, 2 * sketch_dim), float32; each half scaled to unit
        L2 norm when ``normalize``."""
        local = self.sketch_local(positions(local_map, g.shape[0])).mean(dim=1)
        global_ = self.sketch_global(g)
        if self.normalize:
            local, global_ = nn.functional.normalize(local, dim=1), nn.functional.normalize(global_, dim=1)
        return torch.cat([local, global_], dim=1)

    def forward(self, local_map: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(local_map, g)).to(self.fc.weight.dtype))
