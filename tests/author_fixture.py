"""Deterministic weights, inputs and gradient probes shared by the author-parity test and its recorder.

``tests/data/author_<arch>_float64.pt`` holds what the first author's public module
(ZhaofanQiu/Optimization-Planning-for-3D-ConvNets, model/lgd_p3d_resnet.py, PoolingAverage head) computed
in float64 with the weights from :func:`deterministic_weights` on the input from :func:`deterministic_input`:
its state_dict key names and shapes, eval-mode logits, training-mode logits, and random projections of every
parameter gradient and of the input gradient. ``python tests/record_author_fixture.py <checkout>`` records it
from a checkout of that repository (its code is not part of lgd_fast). float64, because float32 values are
not a property of the module but of the CPU: the author's own module in float32 on an AVX2 machine moved
layer1.2.fc1's gradient norm by 1.1e-3 from its float32 recording made on an AVX-512 one (a ReLU input within
float32 rounding of zero fell the other way). ``author_basic_blocks.pt`` (the author's basic blocks, float32)
was recorded once outside this repository. Weights and inputs are generated from
fixed seeds per key, so they do not depend on module construction order; the fixture stores checksums of
both so that a change in torch's random streams shows up as such, not as a model mismatch.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

NUM_CLASSES = 7
INPUT_SHAPE = (2, 3, 8, 48, 48)


def _gen(key: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()) + salt)


def deterministic_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state_dict for ``model`` with every tensor drawn from a seed derived from its key.

    BatchNorm: gamma in [0.3, 0.7], beta ~ N(0, 0.1), running mean ~ N(0, 0.1), running var in [0.5, 1.5];
    convs and linears ~ N(0, 1 / fan_in) (so activations stay O(1) through a deep random network);
    linear biases ~ N(0, 0.1). fc6 is non-zero, so the global->local diffusion is exercised.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in tensors:
            key = prefix + name
            g = _gen(key)
            if name == "num_batches_tracked":
                value = torch.zeros_like(t)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if name == "weight":
                    value = 0.3 + 0.4 * torch.rand(t.shape, generator=g)
                elif name == "running_var":
                    value = 0.5 + torch.rand(t.shape, generator=g)
                else:  # bias, running_mean
                    value = 0.1 * torch.randn(t.shape, generator=g)
            elif name == "weight":
                fan_in = t[0].numel()
                value = torch.randn(t.shape, generator=g) / fan_in**0.5
            elif name == "bias":
                value = 0.1 * torch.randn(t.shape, generator=g)
            else:
                raise KeyError(f"no rule for {key}")
            out[key] = value.to(t.dtype)
    return out


def deterministic_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=_gen("input")).to(dtype)


def head_weights(
    num_classes: int = NUM_CLASSES, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random upstream gradients for the local and global logits (the training loss is their dot product)."""
    return (
        torch.randn(INPUT_SHAPE[0], num_classes, generator=_gen("dlocal")).to(dtype),
        torch.randn(INPUT_SHAPE[0], num_classes, generator=_gen("dglobal")).to(dtype),
    )


def probe(key: str, grad: torch.Tensor) -> torch.Tensor:
    """(projection onto a fixed random direction, norm of the direction, norm of grad), float64."""
    direction = torch.randn(grad.shape, generator=_gen(key, salt=1), dtype=torch.float64)
    g = grad.double()
    return torch.stack([(g * direction).sum(), direction.norm(), g.norm()])


def run_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict:
    """Eval logits, train logits and gradient probes of ``model`` (loaded with deterministic weights, float32
    values, then computed in ``dtype``)."""
    model.to(torch.float32).load_state_dict(deterministic_weights(model))
    model.to(dtype)
    x = deterministic_input(dtype)
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    torch.manual_seed(0)  # dropout draws the same masks in both modules (same call order: local, then global)
    x.requires_grad_(True)
    local, global_ = model(x)
    dlocal, dglobal = head_weights(local.shape[1], dtype)
    ((local * dlocal).sum() + (global_ * dglobal).sum()).backward()
    probes = {k: probe(k, p.grad) for k, p in model.named_parameters()}
    probes["<input>"] = probe("<input>", x.grad)
    return {
        "eval_logits": eval_logits.detach(),
        "train_local": local.detach(),
        "train_global": global_.detach(),
        "grad_probes": probes,
    }


def checksums(model: nn.Module) -> dict[str, float]:
    weights = deterministic_weights(model)
    return {
        "weights": float(sum(weights[k].double().sum() for k in sorted(weights))),
        "input": float(deterministic_input().double().sum()),
    }


# Block-level fixtures: the author's basic blocks (A, B, C) where its file works (input channels == planes
# for B), with odd shapes. Each case: (variant, in_channels, planes, stride).
BLOCK_CASES = (("A", 16, 16, 1), ("B", 16, 16, 1), ("C", 16, 16, 1), ("A", 16, 32, 2), ("C", 16, 32, 2))
BLOCK_INPUT = (2, 5, 9, 9)  # N, T, H, W


def run_block(block: nn.Module, in_channels: int) -> dict:
    """Train-mode outputs (x', g') and gradient probes of one LGD block given (x, g) from fixed seeds."""
    block.load_state_dict(deterministic_weights(block))
    block.train()
    n, t, h, w = BLOCK_INPUT
    x = torch.randn(n, in_channels, t, h, w, generator=_gen("block-x")).requires_grad_(True)
    g = torch.randn(n, in_channels, generator=_gen("block-g")).requires_grad_(True)
    out, g_out = block((x, g)) if getattr(block, "takes_tuple", False) else block(x, g)
    dx = torch.randn(out.shape, generator=_gen("block-dx"))
    dg = torch.randn(g_out.shape, generator=_gen("block-dg"))
    ((out * dx).sum() + (g_out * dg).sum()).backward()
    probes = {k: probe(k, p.grad) for k, p in block.named_parameters()}
    probes["<x>"], probes["<g>"] = probe("<x>", x.grad), probe("<g>", g.grad)
    return {"out": out.detach(), "g": g_out.detach(), "grad_probes": probes}
