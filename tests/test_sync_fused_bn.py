"""Fused conv + BatchNorm synchronised over processes: 2 gloo processes, each with half the batch, equal one
process with the whole batch (outputs, input gradients, the summed parameter gradients, running statistics).

Every place the fused path turns batch statistics into a normalisation is covered: conv_bn with a norm (the
P3D geometry on p3d_conv, and another geometry on ATen's conv), and batch_norm_affine (the LGD block end) from
the conv's own statistics and from the tensor. float64, so the comparison is exact up to summation order.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lgd_fast.engine.sync_bn import SyncBatchNorm
from lgd_fast.ops.conv_bn import batch_norm_affine, conv_bn

CASES = ("p3d_conv", "general_conv", "end_from_conv_stats", "end_from_tensor")


def _modules(seed: int):
    torch.manual_seed(seed)
    convs = {
        "p3d_conv": nn.Conv3d(4, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=True),
        "general_conv": nn.Conv3d(4, 6, (3, 3, 3), stride=(2, 1, 1), padding=1, groups=2),
        "end_from_conv_stats": nn.Conv3d(4, 6, 1, bias=False),
        "end_from_tensor": nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0), bias=False),
    }
    norms = {}
    for name in CASES:
        bn = nn.BatchNorm3d(6)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        norms[name] = bn
    data = torch.randn(4, 4, 5, 9, 9, dtype=torch.float64) + 0.5, None  # x: the whole batch
    return {k: v.double() for k, v in convs.items()}, {k: v.double().train() for k, v in norms.items()}, data


def _run(case: str, x: torch.Tensor, conv, norm, gen_upstream) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's output and loss = sum(output * upstream)."""
    if case in ("p3d_conv", "general_conv"):
        out = conv_bn(x, conv, norm, relu=True)
    elif case == "end_from_conv_stats":
        r, stats = conv_bn(x, conv, stats=True)
        scale, shift = batch_norm_affine(norm, r, stats)
        out = torch.relu(r * scale[:, None, None, None] + shift[:, None, None, None])
    else:
        r = conv_bn(x, conv)
        scale, shift = batch_norm_affine(norm, r)
        out = torch.relu(r * scale[:, None, None, None] + shift[:, None, None, None])
    upstream = gen_upstream(out.shape)
    return out, (out * upstream).sum()


def _upstream_for(rank: int | None):
    def make(shape):
        full = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        return full if rank is None else full.chunk(2)[rank]

    return make


def _worker(rank: int, world: int, store: str, out_dir: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    convs, norms, (x, _) = _modules(seed)
    results = {}
    for case in CASES:
        conv, norm = copy.deepcopy(convs[case]), copy.deepcopy(norms[case])
        sync = SyncBatchNorm(6).double()
        sync.load_state_dict(norm.state_dict())
        part = x.chunk(world)[rank].clone().requires_grad_()
        out, loss = _run(case, part, conv, sync, _upstream_for(rank))
        loss.backward()
        results[case] = {"out": out.detach(), "grad_x": part.grad,
                         "params": _grads(conv, sync),
                         "buffers": dict(sync.named_buffers())}  # fmt: skip
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _grads(conv, norm) -> dict:
    return {f"{kind}.{n}": p.grad for kind, m in (("conv", conv), ("norm", norm)) for n, p in m.named_parameters()}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_two_processes_equal_one(tmp_path):
    seed = int(torch.randint(0, 2**31, (1,)).item())  # from the test's seeded global generator (conftest)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), seed), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    convs, norms, (x, _) = _modules(seed)
    for case in CASES:
        ranks = [r[case] for r in results]
        conv, norm = convs[case], norms[case]
        whole = x.clone().requires_grad_()
        out, loss = _run(case, whole, conv, norm, _upstream_for(None))
        loss.backward()
        where = f"{case} (seed {seed})"
        assert _rel(torch.cat([r["out"] for r in ranks]), out) < 1e-12, where
        assert _rel(torch.cat([r["grad_x"] for r in ranks]), whole.grad) < 1e-12, f"input gradient, {where}"
        for name, grad in _grads(conv, norm).items():
            summed = ranks[0]["params"][name] + ranks[1]["params"][name]  # DDP averages; these losses are sums
            if grad.norm() > 1e-12:
                assert _rel(summed, grad) < 1e-10, f"{name}, {where}"
            else:  # a bias before a batch-statistics norm: exactly no gradient
                assert summed.norm() < 1e-10, f"{name}, {where}"
        for name, b in norm.named_buffers():
            for r in ranks:
                assert torch.allclose(r["buffers"][name].double(), b.double(), rtol=1e-12, atol=1e-14), name
