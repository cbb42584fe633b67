"""Triton kernel of lgd_fast::global_update: an LGD block's whole global path in one launch.

    h1 = W1 m + b1      h3 = W3 g + b3                       (N, H)      H = C_out / r, the hidden width
    g' = ReLU(W2 h1 + b2 + W4 h3 + b4)                       (N, C_out)  stored, the op's first output
    h5 = W5 g' + b5                                          (N, H)
    d  = W6 h5 + b6                                          (N, C_out)  stored, the op's second output

The six products are tiny (N is the batch, H = C_out / 16 in the paper), so on a GPU their cost is six
GEMM launches and the adds between them rather than arithmetic. Here one program owns BLOCK_N samples and
runs the four stages in order, each a loop of ``tl.dot`` tiles over the stage's outputs and its reduction;
the hidden vectors go through a small scratch buffer in global memory, and a barrier separates the stages
(a stage reads what every thread of the program wrote in the one before). Batches larger than BLOCK_N run
more programs. Products accumulate in float32; every intermediate is rounded to the inputs' dtype before it
feeds the next product, which is what the six ``nn.Linear`` calls of the reference do at that dtype.

The backward is six small GEMMs in PyTorch (lgd_fast/ops/global_update.py), on any device.
"""

from __future__ import annotations

import torch

from ._common import _HAS_TRITON, available, bounded, interpreting, unavailable_reason
from ._common import launch as _launch

__all__ = ["AOT_KERNELS", "available", "forward", "interpreting", "unavailable_reason"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import dot as _dot
    from ._common import rounded as _rounded

    # (BLOCK_N samples, BLOCK_O outputs, BLOCK_K reduction, warps, stages). A dot needs 16 or more on each
    # side. No software pipelining (the four stages' loops are all inlined; 2 stages spilled). Four warps: with
    # eight, triton 3.6 (the GPU machine's) spilled 4-8 bytes in float32 on sm_90a, triton 3.9 did not; with four
    # neither spills at any dtype or target (`lgd-fast doctor --aot sm_80,sm_90a` under each, 2026-12-06).
    _TILES = [(16, 64, 32, 4, 1), (32, 32, 32, 4, 1)]
    if interpreting():
        _TILES = [(16, 32, 32, 1, 1)]

    @triton.jit
    def _linear_tile(acc, x_ptr, w_ptr, n0, o0, N, K, O, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
        """acc + x[n0:n0+BLOCK_N, :K] @ w[o0:o0+BLOCK_O, :K]^T; x (N, K) and w (O, K) row-major."""
        rn = n0 + tl.arange(0, BLOCK_N)
        ro = o0 + tl.arange(0, BLOCK_O)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + ro[None, :] * K + rk[:, None], mask=(ro[None, :] < O) & (rk[:, None] < K), other=0.0)
            acc = _dot(x, w, acc, False)
        return acc

    @triton.jit
    def _store_tile(y_ptr, v, b_ptr, b2_ptr, n0, o0, N, O, RELU: tl.constexpr, TWO_BIASES: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
        """y[n0.., o0..] = rounded(v + b (+ b2), ReLU'd if RELU), y (N, O) row-major."""
        rn = n0 + tl.arange(0, BLOCK_N)
        ro = o0 + tl.arange(0, BLOCK_O)
        v = v + tl.load(b_ptr + ro, mask=ro < O, other=0.0).to(tl.float32)[None, :]
        if TWO_BIASES:
            v = v + tl.load(b2_ptr + ro, mask=ro < O, other=0.0).to(tl.float32)[None, :]
        if RELU:
            v = tl.maximum(v, 0.0)
        tl.store(y_ptr + rn[:, None] * O + ro[None, :], _rounded(v, y_ptr.dtype.element_ty),
                 mask=(rn[:, None] < N) & (ro[None, :] < O))  # fmt: skip

    @triton.jit
    def _global_update_kernel(
        m_ptr, g_ptr,  # (N, C_in)
        w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, w5_ptr, b5_ptr, w6_ptr, b6_ptr,
        h_ptr,  # (3, N, H) scratch in the inputs' dtype: h1, h3, h5
        g_new_ptr, d_ptr,  # (N, C_out) outputs
        N, C_in, H, C_out,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        n0 = tl.program_id(0) * BLOCK_N
        h1_ptr = h_ptr
        h3_ptr = h_ptr + N * H
        h5_ptr = h_ptr + 2 * N * H
        for o0 in range(0, H, BLOCK_O):  # stage 1: h1, h3
            zero = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
            h1 = _linear_tile(zero, m_ptr, w1_ptr, n0, o0, N, C_in, H, BLOCK_N, BLOCK_O, BLOCK_K)
            _store_tile(h1_ptr, h1, b1_ptr, b1_ptr, n0, o0, N, H, False, False, BLOCK_N, BLOCK_O)
            h3 = _linear_tile(zero, g_ptr, w3_ptr, n0, o0, N, C_in, H, BLOCK_N, BLOCK_O, BLOCK_K)
            _store_tile(h3_ptr, h3, b3_ptr, b3_ptr, n0, o0, N, H, False, False, BLOCK_N, BLOCK_O)
        tl.debug_barrier()
        for o0 in range(0, C_out, BLOCK_O):  # stage 2: g' = ReLU(W2 h1 + W4 h3 + b2 + b4)
            a = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
            a = _linear_tile(a, h1_ptr, w2_ptr, n0, o0, N, H, C_out, BLOCK_N, BLOCK_O, BLOCK_K)
            a = _linear_tile(a, h3_ptr, w4_ptr, n0, o0, N, H, C_out, BLOCK_N, BLOCK_O, BLOCK_K)
            _store_tile(g_new_ptr, a, b2_ptr, b4_ptr, n0, o0, N, C_out, True, True, BLOCK_N, BLOCK_O)
        tl.debug_barrier()
        for o0 in range(0, H, BLOCK_O):  # stage 3: h5 from the stored (rounded) g'
            h5 = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
            h5 = _linear_tile(h5, g_new_ptr, w5_ptr, n0, o0, N, C_out, H, BLOCK_N, BLOCK_O, BLOCK_K)
            _store_tile(h5_ptr, h5, b5_ptr, b5_ptr, n0, o0, N, H, False, False, BLOCK_N, BLOCK_O)
        tl.debug_barrier()
        for o0 in range(0, C_out, BLOCK_O):  # stage 4: d
            d = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
            d = _linear_tile(d, h5_ptr, w6_ptr, n0, o0, N, H, C_out, BLOCK_N, BLOCK_O, BLOCK_K)
            _store_tile(d_ptr, d, b6_ptr, b6_ptr, n0, o0, N, C_out, False, False, BLOCK_N, BLOCK_O)

    _global_update = triton.autotune(
        [
            triton.Config({"BLOCK_N": n, "BLOCK_O": o, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n, o, k, w, st in _TILES
        ],
        key=["N", "C_in", "H", "C_out"],
        prune_configs_by={"early_config_prune": lambda configs, named_args, **kwargs: bounded(configs)},
    )(_global_update_kernel)

    # What doctor.aot_compile builds ahead of time, as the JIT would: kernel, its runtime arguments at a typical
    # launch (tensors as Triton pointer types, {t}: the inputs' element type; the sizes of lgd3d_r50's first res3
    # block at batch 8: C_in 256, C_out 512, hidden 512 / 16), and (constexprs, warps, stages) of every config.
    AOT_KERNELS = {
        "global_update": (
            _global_update_kernel,
            {
                **{name: "*{t}" for name in _global_update_kernel.arg_names if name.endswith("_ptr")},
                **dict(N=8, C_in=256, H=32, C_out=512),
            },
            [({"BLOCK_N": n, "BLOCK_O": o, "BLOCK_K": k}, w, st) for n, o, k, w, st in _TILES],
        )
    }
else:
    AOT_KERNELS = {}


def forward(m: torch.Tensor, g: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g', d), both (N, C_out) in m's dtype, in one kernel launch.

    m, g: (N, C_in); weights: w1, b1, ..., w6, b6 as ``nn.Linear`` stores them, all of m's dtype and device
    (the op's caller checked shapes, dtypes and devices).
    """
    if not _HAS_TRITON:
        raise RuntimeError(f"global_update (triton): {unavailable_reason()}")
    if m.dtype not in _DTYPES:
        raise ValueError(f"global_update (triton): m must be float32, bfloat16 or float16, got {m.dtype}")
    if m.device.type != "cuda" and not interpreting():
        raise ValueError(f"global_update (triton): tensors must be on a CUDA device, got {m.device}")
    m, g = m.contiguous(), g.contiguous()
    weights = [w.contiguous() for w in weights]
    n, c_in = m.shape
    hidden, c_out = weights[0].shape[0], weights[2].shape[0]
    g_new = m.new_empty((n, c_out))
    d = m.new_empty((n, c_out))
    if n == 0:
        return g_new, d
    scratch = m.new_empty((3, n, hidden))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(_global_update, grid, m, g, *weights, scratch, g_new, d, n, c_in, hidden, c_out)
    return g_new, d
