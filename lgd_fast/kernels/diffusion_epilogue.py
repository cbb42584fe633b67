"""Triton kernels of lgd_fast::diffusion_epilogue, forward and backward, and their launchers.

    out[n,c,l] = ReLU(r[n,c,l] * scale[c] + bias[n,c] + s[n,c,l])      bias = shift[c] + d[n,c]
    mean[n,c]  = mean_l out[n,c,l]

    g[n,c,l]   = (grad_out[n,c,l] + grad_mean[n,c] / L) * (out[n,c,l] > 0)
    grad_r = g * scale[c]    grad_s = g    grad_d = sum_l g    grad_scale = sum_{n,l} g * r    grad_shift = sum_n grad_d

One pass over the large tensors each way. Two layouts: contiguous (N*C rows of L values; a program owns
BLOCK_R rows) and channels_last_3d (per n, L positions of C values; a program owns a BLOCK_C slice of one
sample's channels). L is cut into ``splits`` stretches of ``split_len`` values chosen from the shape alone
(never the device), each program writes float32 partial sums for its stretch, and the launcher adds the
(splits, N, C) partials in a fixed order: no atomics, the same bits every run for a given block config.
float32, bfloat16 and float16 tensors are loaded, computed in float32 and rounded once on store; the
forward's mean sums the rounded outputs (the mean of what the caller gets), as the CPU kernel does.

Triton is optional: this module imports without it (``available()`` is then False and the launchers raise).
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one block config (no autotuning).
"""

from __future__ import annotations

import torch

from ..ops._common import layout
from ._common import _HAS_TRITON, available, bounded, interpreting, unavailable_reason
from ._common import launch as _launch

__all__ = ["AOT_KERNELS", "available", "backward", "forward", "interpreting", "unavailable_reason"]

# Stretch of L one program sums (a multiple of every BLOCK_L below), and the programs a launch aims for.
_SPLIT_QUANTUM = 1024
_TARGET_PROGRAMS = 2048
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if _HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rounded as _rounded

    # (BLOCK_R rows, BLOCK_L positions, warps) for the contiguous layout; (BLOCK_P positions, BLOCK_C
    # channels, warps) for channels_last_3d. Tiles of 2K-4K elements; autotuning picks per (L, C) shape.
    _ROW_TILES = [(1, 1024, 4), (4, 256, 4), (16, 64, 4), (2, 1024, 8)]
    _CL_TILES = [(32, 64, 4), (16, 128, 4), (64, 32, 4), (8, 256, 4)]
    if interpreting():
        _ROW_TILES, _CL_TILES = [(4, 64, 1)], [(16, 16, 1)]

    def _configs(tiles, names):
        return [triton.Config({names[0]: a, names[1]: b}, num_warps=w) for a, b, w in tiles]

    @triton.jit
    def _forward_rows_kernel(
        r_ptr,  # (rows, L) residual branch
        s_ptr,  # (rows, L) shortcut
        scale_ptr,  # (C,) float32
        bias_ptr,  # (rows,) float32, shift + d
        out_ptr,  # (rows, L) output, r's dtype
        partial_ptr,  # (splits, rows) float32 partial sums of out
        rows,  # N * C
        C,  # channels
        L,  # T * H * W
        split_len,  # positions per stretch
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        pid_s = tl.program_id(1)
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = row < rows
        a = tl.load(scale_ptr + row % C, mask=row_ok, other=0.0)
        b = tl.load(bias_ptr + row, mask=row_ok, other=0.0)
        base = row.to(tl.int64) * L
        l0 = pid_s * split_len
        l1 = tl.minimum(l0 + split_len, L)
        acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
        for start in range(l0, l1, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            m = row_ok[:, None] & (pos < l1)[None, :]
            off = base[:, None] + pos[None, :]
            rv = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
            sv = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
            v = _rounded(tl.maximum(rv * a[:, None] + b[:, None] + sv, 0.0), out_ptr.dtype.element_ty)
            tl.store(out_ptr + off, v, mask=m)
            acc += tl.where(m, v.to(tl.float32), 0.0)
        tl.store(partial_ptr + pid_s * rows + row, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _forward_cl_kernel(
        r_ptr,  # (N, L, C) residual branch
        s_ptr,  # (N, L, C) shortcut
        scale_ptr,  # (C,) float32
        bias_ptr,  # (N, C) float32, shift + d
        out_ptr,  # (N, L, C) output, r's dtype
        partial_ptr,  # (splits, N, C) float32 partial sums of out
        N,  # batch
        C,  # channels
        L,  # T * H * W
        split_len,  # positions per stretch
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        c_blocks = tl.cdiv(C, BLOCK_C)
        n = tl.program_id(0) // c_blocks
        pid_s = tl.program_id(1)
        ch = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        ch_ok = ch < C
        a = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
        b = tl.load(bias_ptr + n * C + ch, mask=ch_ok, other=0.0)
        sample = n.to(tl.int64) * L * C
        r_ptr += sample
        s_ptr += sample
        out_ptr += sample
        l0 = pid_s * split_len
        l1 = tl.minimum(l0 + split_len, L)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(l0, l1, BLOCK_P):
            pos = start + tl.arange(0, BLOCK_P)
            m = (pos < l1)[:, None] & ch_ok[None, :]
            off = pos[:, None] * C + ch[None, :]  # within sample n; L * C < 2**31
            rv = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
            sv = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
            v = _rounded(tl.maximum(rv * a[None, :] + b[None, :] + sv, 0.0), out_ptr.dtype.element_ty)
            tl.store(out_ptr + off, v, mask=m)
            acc += tl.where(m, v.to(tl.float32), 0.0)
        tl.store(partial_ptr + (pid_s * N + n) * C + ch, tl.sum(acc, axis=0), mask=ch_ok)

    @triton.jit
    def _backward_rows_kernel(
        gout_ptr,  # (rows, L) grad of out
        out_ptr,  # (rows, L) forward output
        r_ptr,  # (rows, L) residual branch
        scale_ptr,  # (C,) float32
        gmean_ptr,  # (rows,) float32, grad_mean / L
        grad_r_ptr,  # (rows, L) out: g * scale
        grad_s_ptr,  # (rows, L) out: g
        part_g_ptr,  # (splits, rows) float32 partial sums of g
        part_gr_ptr,  # (splits, rows) float32 partial sums of g * r
        rows,  # N * C
        C,  # channels
        L,  # T * H * W
        split_len,  # positions per stretch
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        pid_s = tl.program_id(1)
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = row < rows
        a = tl.load(scale_ptr + row % C, mask=row_ok, other=0.0)
        gm = tl.load(gmean_ptr + row, mask=row_ok, other=0.0)
        base = row.to(tl.int64) * L
        l0 = pid_s * split_len
        l1 = tl.minimum(l0 + split_len, L)
        acc_g = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
        acc_gr = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
        for start in range(l0, l1, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            m = row_ok[:, None] & (pos < l1)[None, :]
            off = base[:, None] + pos[None, :]
            ov = tl.load(out_ptr + off, mask=m, other=0.0).to(tl.float32)
            gv = tl.load(gout_ptr + off, mask=m, other=0.0).to(tl.float32)
            rv = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = tl.where(ov > 0.0, gv + gm[:, None], 0.0)
            tl.store(grad_s_ptr + off, _rounded(g, grad_s_ptr.dtype.element_ty), mask=m)
            tl.store(grad_r_ptr + off, _rounded(g * a[:, None], grad_r_ptr.dtype.element_ty), mask=m)
            acc_g += g
            acc_gr += g * rv
        tl.store(part_g_ptr + pid_s * rows + row, tl.sum(acc_g, axis=1), mask=row_ok)
        tl.store(part_gr_ptr + pid_s * rows + row, tl.sum(acc_gr, axis=1), mask=row_ok)

    @triton.jit
    def _backward_cl_kernel(
        gout_ptr,  # (N, L, C) grad of out
        out_ptr,  # (N, L, C) forward output
        r_ptr,  # (N, L, C) residual branch
        scale_ptr,  # (C,) float32
        gmean_ptr,  # (N, C) float32, grad_mean / L
        grad_r_ptr,  # (N, L, C) out: g * scale
        grad_s_ptr,  # (N, L, C) out: g
        part_g_ptr,  # (splits, N, C) float32 partial sums of g
        part_gr_ptr,  # (splits, N, C) float32 partial sums of g * r
        N,  # batch
        C,  # channels
        L,  # T * H * W
        split_len,  # positions per stretch
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        c_blocks = tl.cdiv(C, BLOCK_C)
        n = tl.program_id(0) // c_blocks
        pid_s = tl.program_id(1)
        ch = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        ch_ok = ch < C
        a = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
        gm = tl.load(gmean_ptr + n * C + ch, mask=ch_ok, other=0.0)
        sample = n.to(tl.int64) * L * C
        gout_ptr += sample
        out_ptr += sample
        r_ptr += sample
        grad_r_ptr += sample
        grad_s_ptr += sample
        l0 = pid_s * split_len
        l1 = tl.minimum(l0 + split_len, L)
        acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc_gr = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(l0, l1, BLOCK_P):
            pos = start + tl.arange(0, BLOCK_P)
            m = (pos < l1)[:, None] & ch_ok[None, :]
            off = pos[:, None] * C + ch[None, :]  # within sample n; L * C < 2**31
            ov = tl.load(out_ptr + off, mask=m, other=0.0).to(tl.float32)
            gv = tl.load(gout_ptr + off, mask=m, other=0.0).to(tl.float32)
            rv = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = tl.where(ov > 0.0, gv + gm[None, :], 0.0)
            tl.store(grad_s_ptr + off, _rounded(g, grad_s_ptr.dtype.element_ty), mask=m)
            tl.store(grad_r_ptr + off, _rounded(g * a[None, :], grad_r_ptr.dtype.element_ty), mask=m)
            acc_g += g
            acc_gr += g * rv
        tl.store(part_g_ptr + (pid_s * N + n) * C + ch, tl.sum(acc_g, axis=0), mask=ch_ok)
        tl.store(part_gr_ptr + (pid_s * N + n) * C + ch, tl.sum(acc_gr, axis=0), mask=ch_ok)

    _KEY = ["C", "L", "split_len"]
    _BOUNDED = {"early_config_prune": lambda configs, named_args, **kwargs: bounded(configs)}

    def _tuned(kernel, tiles, names):
        return triton.autotune(_configs(tiles, names), key=_KEY, prune_configs_by=_BOUNDED)(kernel)

    _forward_rows = _tuned(_forward_rows_kernel, _ROW_TILES, ("BLOCK_R", "BLOCK_L"))
    _forward_cl = _tuned(_forward_cl_kernel, _CL_TILES, ("BLOCK_P", "BLOCK_C"))
    _backward_rows = _tuned(_backward_rows_kernel, _ROW_TILES, ("BLOCK_R", "BLOCK_L"))
    _backward_cl = _tuned(_backward_cl_kernel, _CL_TILES, ("BLOCK_P", "BLOCK_C"))

    # What doctor.aot_compile builds ahead of time, as the JIT would: kernel, its runtime arguments at a typical
    # launch (tensors as Triton pointer types, {t} standing for the large tensors' element type; integers at
    # lgd3d_r50's res3 block end at batch 8, 16 frames of 112 px: N = 8, C = 512, L = T*H*W = 4*14*14, split_len
    # as _split makes it, so that the JIT's divisibility-by-16 marks are those of a real launch), and the tile
    # constexprs of every autotune config.
    def _aot(kernel, args, tiles, names):
        return kernel, args, [({names[0]: a, names[1]: b}, w) for a, b, w in tiles]

    _P, _F = "*{t}", "*fp32"
    _ROW_SIZES = dict(rows=8 * 512, C=512, L=4 * 14 * 14, split_len=1024)
    _CL_SIZES = dict(N=8, C=512, L=4 * 14 * 14, split_len=1024)
    AOT_KERNELS = {
        "forward_rows": _aot(
            _forward_rows_kernel,
            dict(r_ptr=_P, s_ptr=_P, scale_ptr=_F, bias_ptr=_F, out_ptr=_P, partial_ptr=_F, **_ROW_SIZES),
            _ROW_TILES,
            ("BLOCK_R", "BLOCK_L"),
        ),
        "forward_channels_last": _aot(
            _forward_cl_kernel,
            dict(r_ptr=_P, s_ptr=_P, scale_ptr=_F, bias_ptr=_F, out_ptr=_P, partial_ptr=_F, **_CL_SIZES),
            _CL_TILES,
            ("BLOCK_P", "BLOCK_C"),
        ),
        "backward_rows": _aot(
            _backward_rows_kernel,
            dict(gout_ptr=_P, out_ptr=_P, r_ptr=_P, scale_ptr=_F, gmean_ptr=_F, grad_r_ptr=_P, grad_s_ptr=_P,
                 part_g_ptr=_F, part_gr_ptr=_F, **_ROW_SIZES),
            _ROW_TILES,
            ("BLOCK_R", "BLOCK_L"),
        ),
        "backward_channels_last": _aot(
            _backward_cl_kernel,
            dict(gout_ptr=_P, out_ptr=_P, r_ptr=_P, scale_ptr=_F, gmean_ptr=_F, grad_r_ptr=_P, grad_s_ptr=_P,
                 part_g_ptr=_F, part_gr_ptr=_F, **_CL_SIZES),
            _CL_TILES,
            ("BLOCK_P", "BLOCK_C"),
        ),
    }
else:
    AOT_KERNELS = {}


def _split(rows: int, L: int) -> tuple[int, int]:
    """(split_len, splits): L cut into stretches so that about _TARGET_PROGRAMS programs run; shape-only."""
    want = max(1, min(triton.cdiv(L, _SPLIT_QUANTUM), triton.cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    split_len = triton.cdiv(triton.cdiv(L, want), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    return split_len, triton.cdiv(L, split_len)


def _layout(t: torch.Tensor) -> str:
    found = layout(t)
    if found is not None:
        return found
    raise ValueError(
        f"diffusion_epilogue (triton): tensor must be contiguous or channels_last_3d, strides {t.stride()}"
    )


def _check_large(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"diffusion_epilogue (triton): {name} is {tuple(t.shape)} {t.dtype} on {t.device}, "
            f"r is {tuple(like.shape)} {like.dtype} on {like.device}"
        )
    if _layout(t) != _layout(like):
        raise ValueError(f"diffusion_epilogue (triton): {name} and r must share a memory format")


def _require(r: torch.Tensor) -> None:
    if not _HAS_TRITON:
        raise RuntimeError(f"diffusion_epilogue (triton): {unavailable_reason()}")
    if r.dim() != 5 or r.dtype not in _DTYPES:
        raise ValueError(
            f"diffusion_epilogue (triton): r must be 5-D float32/bfloat16/float16, got {r.dtype} {r.dim()}-D"
        )
    if r[0].numel() >= 2**31:
        raise ValueError(f"diffusion_epilogue (triton): one sample has {r[0].numel()} elements, 2**31 or more")
    if r.device.type != "cuda" and not interpreting():
        raise ValueError(f"diffusion_epilogue (triton): tensors must be on a CUDA device, got {r.device}")


def forward(
    r: torch.Tensor, s: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = ReLU(r * scale + shift + s + d), (N, C, T, H, W) in r's dtype and layout; mean (N, C) in r's dtype.

    r, s: (N, C, T, H, W), same dtype, both contiguous or both channels_last_3d; d: (N, C); scale, shift: (C,).
    """
    _require(r)
    _check_large(s, "s", r)
    N, C = r.shape[:2]
    L = r.shape[2] * r.shape[3] * r.shape[4]
    cl = _layout(r) == "channels_last_3d"
    out = torch.empty_like(r, memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    if L == 0 or N * C == 0:
        return out, torch.full((N, C), float("nan"), dtype=r.dtype, device=r.device)
    scale32 = scale.to(torch.float32).contiguous()
    bias = (d.to(torch.float32) + shift.to(torch.float32)[None, :]).contiguous()
    split_len, splits = _split(N * C, L)
    partial = torch.empty((splits, N, C), dtype=torch.float32, device=r.device)
    if cl:
        grid = lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]), splits)  # noqa: E731
        _launch(_forward_cl, grid, r, s, scale32, bias, out, partial, N, C, L, split_len)
    else:
        grid = lambda meta: (triton.cdiv(N * C, meta["BLOCK_R"]), splits)  # noqa: E731
        _launch(_forward_rows, grid, r, s, scale32, bias, out, partial, N * C, C, L, split_len)
    mean = (partial.sum(0) / L).to(r.dtype)
    return out, mean


def backward(
    grad_out: torch.Tensor, grad_mean: torch.Tensor, out: torch.Tensor, r: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward: grad_r, grad_s (r's dtype and layout); grad_d (N, C), grad_scale, grad_shift (C,) float32.

    grad_out: (N, C, T, H, W) any layout (made r's); grad_mean: (N, C); out: the forward's output.
    """
    _require(r)
    _check_large(out, "out", r)
    N, C = r.shape[:2]
    L = r.shape[2] * r.shape[3] * r.shape[4]
    fmt = torch.channels_last_3d if _layout(r) == "channels_last_3d" else torch.contiguous_format
    gout = grad_out.to(r.dtype).contiguous(memory_format=fmt)
    grad_r = torch.empty_like(r, memory_format=fmt)
    grad_s = torch.empty_like(r, memory_format=fmt)
    if L == 0 or N * C == 0:
        zeros = r.new_zeros((N, C), dtype=torch.float32)
        return grad_r, grad_s, zeros, zeros.sum(0), zeros.sum(0)
    scale32 = scale.to(torch.float32).contiguous()
    gmean = (grad_mean.to(torch.float32) / L).contiguous()
    split_len, splits = _split(N * C, L)
    part_g = torch.empty((splits, N, C), dtype=torch.float32, device=r.device)
    part_gr = torch.empty((splits, N, C), dtype=torch.float32, device=r.device)
    args = (gout, out, r, scale32, gmean, grad_r, grad_s, part_g, part_gr)
    if fmt == torch.channels_last_3d:
        grid = lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]), splits)  # noqa: E731
        _launch(_backward_cl, grid, *args, N, C, L, split_len)
    else:
        grid = lambda meta: (triton.cdiv(N * C, meta["BLOCK_R"]), splits)  # noqa: E731
        _launch(_backward_rows, grid, *args, N * C, C, L, split_len)
    grad_d = part_g.sum(0)
    return grad_r, grad_s, grad_d, part_gr.sum((0, 1)), grad_d.sum(0)
