"""Triton kernels of lgd_fast::p3d_conv: the convolutions of a P3D unit as implicit GEMMs, channels-last-3d.

One kernel family serves every convolution a P3D ResNet has, by its kernel size (KT, KH, KW), all odd, with
"same" padding (KT // 2, KH // 2, KW // 2) and stride (1, S, S): the spatial 1xkxk conv, the temporal kx1x1
conv (variant B's carries the spatial stride too) and the pointwise 1x1x1 conv. With x in memory as
(N, T, H, W, C) rows of channels:

    forward  out[m, co]  = epilogue( sum_{tap, ci} x[m shifted by tap, ci] * w[tap, ci, co] )
             epilogue(a) = ReLU?( a * scale[co] + shift[co] + residual[m, co] )
             stats[co]   = (sum_m z, sum_m (z - mean z)^2) of z, the epilogue's value (no ReLU), as stored
                           (of the rounded values: the statistics a BatchNorm after the conv would take)
    dgrad    gx[p, ci]   = sum_{tap, co} g[p unshifted by tap, co] * w[tap, co, ci]   (strided taps masked)
    wgrad    gw[tap, ci, co] = sum_m x[m shifted by tap, ci] * g[m, co]               (split over m)

m runs over the N * T * Ho * Wo output positions, p over the N * T * H * W input positions. Every product is
accumulated in float32 (float32 operands as tf32 when the launcher asks: ``ops.p3d_conv.uses_tf32``); outputs
are rounded once on store. Statistics and the weight gradient are written as per-program float32 partials that
the launcher adds in a fixed order: no atomics, the same bits every run for a given block config. Each
program's statistics are centred on its own tile's mean, and the launcher merges them by Chan's rule in float64
(no E[z^2] - E[z]^2 cancellation where the mean is many standard deviations from zero); the partials are zeroed
before every launch the autotuner makes, so a config's tiles never add another config's leftovers. Block sizes
are autotuned per (M, Ci, Co) on a GPU (at most ``$LGD_FAST_AUTOTUNE_CONFIGS`` configs per tile class, see
``_common.bounded``); under ``TRITON_INTERPRET=1`` one small config runs on CPU tensors.
"""

from __future__ import annotations

import torch

from ._common import _HAS_TRITON, available, interpreting, unavailable_reason
from ._common import launch as _launch

__all__ = [
    "AOT_KERNELS", "available", "dgrad", "forward", "interpreting", "merge_tile_stats", "unavailable_reason", "wgrad"
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CL3D = torch.channels_last_3d

if _HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import bounded as _bounded
    from ._common import dot as _dot
    from ._common import rounded as _rounded

    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per operand width, every one free of register spills on sm_80
    # and sm_90a for every kernel here (`lgd-fast doctor --aot`). BLOCK_K slices the input channels of one tap
    # (forward, dgrad) or the positions (wgrad). 16-bit operands run on tensor cores; exact float32 (no tf32)
    # runs Triton's FMA dot, whose operands live in registers: smaller K slices. The fp32 list serves tf32 too.
    # 128x64 takes 3 stages: with 2 it spilled (forward, exact fp32: 28-32 bytes on sm_80, 4 on sm_90a). No 64x64
    # float32 tile is free of spills under both triton 3.6 (the GPU machine's) and 3.9 (CI's): with 4 warps and 1
    # stage 3.6 spilled 8-24 bytes (dgrad temporal, wgrad spatial), with 8 warps 3.9 spilled 4 (forward temporal,
    # sm_80), so float32 has none (`lgd-fast doctor --aot sm_80,sm_90a` under each, 2026-12-06).
    _TILES = {
        "16bit": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
        "fp32": [(128, 64, 16, 8, 3), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
    }
    if interpreting():
        _TILES = {"16bit": [(128, 64, 32, 1, 1)], "fp32": [(64, 64, 64, 1, 1)]}
    # Positions one wgrad program sums: a multiple of every BLOCK_K above.
    _WGRAD_QUANTUM = 256

    def _config(tile, cls):
        m, n, k, w, st = tile
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "TILES": cls}, num_warps=w, num_stages=st)

    _CONFIGS = [_config(tile, cls) for cls, tiles in _TILES.items() for tile in tiles]

    def _prune(operand: str):
        def prune(configs, named_args, **kwargs):
            cls = _TILE_CLASS[named_args[operand].dtype]
            return _bounded([c for c in configs if c.kwargs["TILES"] == cls])

        return {"early_config_prune": prune}

    _TILE_CLASS = {torch.float32: "fp32", torch.bfloat16: "16bit", torch.float16: "16bit"}

    @triton.jit
    def _position(r, T, H, W):
        """Row r of the (N, T, H, W) grid of positions, channels last -> (n, t, h, w)."""
        w = r % W
        q = r // W
        h = q % H
        q = q // H
        return q // T, q % T, h, w

    @triton.jit
    def _forward_kernel(
        x_ptr,  # (N, T, H, W, Ci) contiguous: channels_last_3d
        w_ptr,  # (KT*KH*KW, Ci, Co) packed weight, x's dtype
        out_ptr,  # (N, T, Ho, Wo, Co) contiguous: channels_last_3d
        scale_ptr,  # (Co,) float32
        shift_ptr,  # (Co,) float32
        res_ptr,  # (N, T, Ho, Wo, Co) residual, out's dtype
        part_ptr,  # (programs along M, 3, Co) float32 per tile: sum of z, sum of (z - tile mean)^2, count
        M,  # N * T * Ho * Wo
        T,  # frames
        H,  # input height
        W,  # input width
        Ho,  # output height
        Wo,  # output width
        Ci,  # input channels
        Co,  # output channels
        STRIDE: tl.constexpr,  # spatial stride
        KT: tl.constexpr,  # kernel extent in time
        KH: tl.constexpr,  # ... height
        KW: tl.constexpr,  # ... width
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        STATS: tl.constexpr,
        TF32: tl.constexpr,  # fp32 operands through tf32 tensor cores
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,  # the tile set ("16bit" or "fp32"): autotuning's pruning key, unused in the body
    ):
        pid_m = tl.program_id(0)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < Co
        n, t, ho, wo = _position(rm, T, Ho, Wo)
        n = n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in range(KT * KH * KW):
            ti = t + (tap // (KH * KW) - KT // 2)
            hi = ho * STRIDE + ((tap // KW) % KH - KH // 2)
            wi = wo * STRIDE + (tap % KW - KW // 2)
            ok = m_ok & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            base = (((n * T + ti) * H + hi) * W + wi) * Ci
            for k0 in range(0, Ci, BLOCK_K):
                ci = k0 + rk
                ci_ok = ci < Ci
                a = tl.load(x_ptr + base[:, None] + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
                b = tl.load(
                    w_ptr + (tap * Ci + ci)[:, None] * Co + rn[None, :], mask=ci_ok[:, None] & n_ok[None, :], other=0.0
                )
                acc = _dot(a, b, acc, TF32)
        z = acc
        if HAS_SCALE:
            z = z * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_SHIFT:
            z = z + tl.load(shift_ptr + rn, mask=n_ok, other=0.0)[None, :]
        off = rm.to(tl.int64)[:, None] * Co + rn[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            z = z + tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            z = tl.maximum(z, 0.0)
        stored = _rounded(z, out_ptr.dtype.element_ty)
        if STATS:  # of the values stored (what a BatchNorm after this conv sees); never with RELU (the op refuses)
            # per tile: the sum, the sum of squares about the tile's own mean, the count (merged by Chan's rule)
            zs = tl.where(mask, stored.to(tl.float32), 0.0)
            count = tl.sum(m_ok.to(tl.float32), axis=0)
            tile_sum = tl.sum(zs, axis=0)
            centred = tl.where(mask, zs - (tile_sum / tl.maximum(count, 1.0))[None, :], 0.0)
            part = part_ptr + pid_m.to(tl.int64) * 3 * Co + rn
            tl.store(part, tile_sum, mask=n_ok)
            tl.store(part + Co, tl.sum(centred * centred, axis=0), mask=n_ok)
            tl.store(part + 2 * Co, tl.zeros_like(tile_sum) + count, mask=n_ok)
        tl.store(out_ptr + off, stored, mask=mask)

    @triton.jit
    def _dgrad_kernel(
        g_ptr,  # (N, T, Ho, Wo, Co) gradient of the conv's output, contiguous
        w_ptr,  # (KT*KH*KW, Co, Ci) packed weight, g's dtype
        gx_ptr,  # (N, T, H, W, Ci) input gradient, contiguous: channels_last_3d
        M,  # N * T * H * W input positions
        T,  # frames
        H,  # input height
        W,  # input width
        Ho,  # output height
        Wo,  # output width
        Ci,  # input channels (the GEMM's columns)
        Co,  # output channels (reduced)
        STRIDE: tl.constexpr,
        KT: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        TF32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,  # the tile set ("16bit" or "fp32"): autotuning's pruning key, unused in the body
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < Ci
        n, t, h, w_ = _position(rm, T, H, W)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in range(KT * KH * KW):
            to = t - (tap // (KH * KW) - KT // 2)
            hs = h - ((tap // KW) % KH - KH // 2)  # = ho * STRIDE where this tap reads h
            ws = w_ - (tap % KW - KW // 2)
            ho = hs // STRIDE
            wo = ws // STRIDE
            ok = m_ok & (to >= 0) & (to < T) & (hs >= 0) & (ws >= 0) & (ho < Ho) & (wo < Wo)
            if STRIDE > 1:
                ok = ok & (hs % STRIDE == 0) & (ws % STRIDE == 0)
            base = (((n * T + to) * Ho + ho) * Wo + wo).to(tl.int64) * Co
            for k0 in range(0, Co, BLOCK_K):
                co = k0 + rk
                co_ok = co < Co
                a = tl.load(g_ptr + base[:, None] + co[None, :], mask=ok[:, None] & co_ok[None, :], other=0.0)
                b = tl.load(
                    w_ptr + (tap * Co + co)[:, None] * Ci + rn[None, :], mask=co_ok[:, None] & n_ok[None, :], other=0.0
                )
                acc = _dot(a, b, acc, TF32)
        off = rm.to(tl.int64)[:, None] * Ci + rn[None, :]
        tl.store(gx_ptr + off, _rounded(acc, gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _wgrad_kernel(
        x_ptr,  # (N, T, H, W, Ci) contiguous: channels_last_3d
        g_ptr,  # (N, T, Ho, Wo, Co) gradient of the conv's output, contiguous
        part_ptr,  # (splits, KT*KH*KW, Ci, Co) float32 partial weight gradients
        M,  # N * T * Ho * Wo output positions (reduced)
        T,  # frames
        H,  # input height
        W,  # input width
        Ho,  # output height
        Wo,  # output width
        Ci,  # input channels (the GEMM's rows, per tap)
        Co,  # output channels (the GEMM's columns)
        split_len,  # positions per program along M
        STRIDE: tl.constexpr,
        KT: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        TF32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,  # the tile set ("16bit" or "fp32"): autotuning's pruning key, unused in the body
    ):
        ci_blocks = tl.cdiv(Ci, BLOCK_M)
        tap = tl.program_id(0) // ci_blocks
        ci = (tl.program_id(0) % ci_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        pid_s = tl.program_id(2)
        ci_ok = ci < Ci
        co_ok = co < Co
        dt = tap // (KH * KW) - KT // 2
        dh = (tap // KW) % KH - KH // 2
        dw = tap % KW - KW // 2
        p0 = pid_s * split_len
        p1 = tl.minimum(p0 + split_len, M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(p0, p1, BLOCK_K):
            p = start + tl.arange(0, BLOCK_K)
            p_ok = p < p1
            n, t, ho, wo = _position(p, T, Ho, Wo)
            n = n.to(tl.int64)
            ti = t + dt
            hi = ho * STRIDE + dh
            wi = wo * STRIDE + dw
            ok = p_ok & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            base = (((n * T + ti) * H + hi) * W + wi) * Ci
            a = tl.load(x_ptr + ci[:, None] + base[None, :], mask=ci_ok[:, None] & ok[None, :], other=0.0)
            b = tl.load(
                g_ptr + p.to(tl.int64)[:, None] * Co + co[None, :], mask=p_ok[:, None] & co_ok[None, :], other=0.0
            )
            acc = _dot(a, b, acc, TF32)
        taps = KT * KH * KW
        out = part_ptr + ((pid_s * taps + tap).to(tl.int64) * Ci + ci[:, None]) * Co + co[None, :]
        tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])

    _KEY = ["M", "Ci", "Co", "KT", "KH", "KW", "STRIDE"]
    _forward = triton.autotune(
        configs=_CONFIGS, key=_KEY, prune_configs_by=_prune("x_ptr"), reset_to_zero=["part_ptr"]
    )(_forward_kernel)
    _dgrad = triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_prune("g_ptr"))(_dgrad_kernel)
    _wgrad = triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_prune("x_ptr"))(_wgrad_kernel)

    # What doctor.aot_compile builds ahead of time, as the JIT would: name -> (kernel, its runtime arguments at a
    # typical launch, (constexprs, warps, stages) of every autotune config, the element types they are for). The
    # arguments: tensors as Triton pointer types ({t}: the large tensors' element type; every tensor the
    # launchers pass is 16-byte aligned, as the JIT finds it), integers at lgd3d_r50's res3 at batch 8, 16
    # frames of 112 px (T = 4; the first block's 3x3 conv takes 28 x 28 to 14 x 14 with stride 2, 128 channels).
    # The JIT marks a multiple of 16 divisible by 16: so do these builds, as every real one does for M and the
    # channel counts (R50's are multiples of 64) and for wgrad's split_len (a multiple of _WGRAD_QUANTUM); the
    # frame count and spatial sizes (4, 28, 14; 7 at res5) are not. fp32 builds come exact and as tf32 (what runs
    # under torch.backends.cudnn.allow_tf32, on by default).
    def _aot(kernel, args, constexprs):
        variants = {"16bit": ("16bit", False), "fp32": ("fp32", False), "tf32": ("fp32", True)}
        return {
            name: (
                kernel,
                args,
                [
                    ({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "TILES": cls, **constexprs, "TF32": tf32}, w, st)
                    for m, n, k, w, st in _TILES[cls]
                ],
                ("fp32",) if cls == "fp32" else ("bf16", "fp16"),
            )
            for name, (cls, tf32) in variants.items()
        }

    _P, _F = "*{t}", "*fp32"
    _M, _C = 8 * 4 * 14 * 14, 128  # output positions, channels (in = out)
    _SIZES = dict(T=4, Ci=_C, Co=_C)
    _SPATIAL = dict(STRIDE=2, KT=1, KH=3, KW=3)
    _SPATIAL_SIZES = dict(H=28, W=28, Ho=14, Wo=14, **_SIZES)
    _TEMPORAL = dict(STRIDE=1, KT=3, KH=1, KW=1)
    _TEMPORAL_SIZES = dict(H=14, W=14, Ho=14, Wo=14, **_SIZES)
    # The epilogue at its heaviest (every option on).
    _EPILOGUE = dict(HAS_SCALE=True, HAS_SHIFT=True, HAS_RES=True, RELU=True, STATS=True)
    _FWD_ARGS = dict(x_ptr=_P, w_ptr=_P, out_ptr=_P, scale_ptr=_F, shift_ptr=_F, res_ptr=_P, part_ptr=_F, M=_M)
    _DGRAD_ARGS = dict(g_ptr=_P, w_ptr=_P, gx_ptr=_P)  # M: the input positions
    _WGRAD_ARGS = dict(x_ptr=_P, g_ptr=_P, part_ptr=_F, M=_M, split_len=1024)
    _KERNELS = {
        "p3d_conv_forward_spatial": (_forward_kernel, {**_FWD_ARGS, **_SPATIAL_SIZES}, {**_SPATIAL, **_EPILOGUE}),
        "p3d_conv_forward_temporal": (_forward_kernel, {**_FWD_ARGS, **_TEMPORAL_SIZES}, {**_TEMPORAL, **_EPILOGUE}),
        "p3d_conv_dgrad_spatial": (_dgrad_kernel, {**_DGRAD_ARGS, **_SPATIAL_SIZES, "M": 4 * _M}, _SPATIAL),
        "p3d_conv_dgrad_temporal": (_dgrad_kernel, {**_DGRAD_ARGS, **_TEMPORAL_SIZES, "M": _M}, _TEMPORAL),
        "p3d_conv_wgrad_spatial": (_wgrad_kernel, {**_WGRAD_ARGS, **_SPATIAL_SIZES}, _SPATIAL),
        "p3d_conv_wgrad_temporal": (_wgrad_kernel, {**_WGRAD_ARGS, **_TEMPORAL_SIZES}, _TEMPORAL),
    }
    AOT_KERNELS = {f"{name}[{cls}]": entry for name, spec in _KERNELS.items() for cls, entry in _aot(*spec).items()}
    # The backward's recomputation of the bare conv for the scale gradient: 16-bit operands, a float32 output.
    AOT_KERNELS["p3d_conv_forward_recompute_spatial[16bit]"] = _aot(
        _forward_kernel, {**_FWD_ARGS, "out_ptr": _F, **_SPATIAL_SIZES}, {**_SPATIAL, **dict.fromkeys(_EPILOGUE, False)}
    )["16bit"]
else:
    AOT_KERNELS = {}


def _require(x: torch.Tensor, what: str) -> None:
    if not _HAS_TRITON:
        raise RuntimeError(f"p3d_conv (triton): {unavailable_reason()}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"p3d_conv (triton): {what} is on {x.device}; the kernels need CUDA tensors")
    if x.dtype not in _DTYPES:
        raise TypeError(f"p3d_conv (triton): {what} has dtype {x.dtype}; expected float32, bfloat16 or float16")


def output_size(size: int, kernel: int, stride: int) -> int:
    """Output extent of a "same"-padded conv: (size + 2 * (kernel // 2) - kernel) // stride + 1."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _kernel_size(weight: torch.Tensor) -> tuple[int, int, int]:
    kt, kh, kw = weight.shape[2:]
    return kt, kh, kw


def _cl3d(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL3D)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    relu: bool,
    stats: bool,
    allow_tf32: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel. Returns out (channels_last_3d, ``out_dtype``, by default x's dtype) and
    stats (2, Co) float32 (sum, and sum of squares about the mean, of the value stored; shape (2, 0) when
    ``stats`` is False)."""
    _require(x, "x")
    x = _cl3d(x)
    N, Ci, T, H, W = x.shape
    Co = weight.shape[0]
    kt, kh, kw = _kernel_size(weight)
    Ho, Wo = output_size(H, kh, stride), output_size(W, kw, stride)
    M = N * T * Ho * Wo
    w = weight.to(x.dtype).permute(2, 3, 4, 1, 0).contiguous()  # (KT, KH, KW, Ci, Co)
    out = torch.empty((N, Co, T, Ho, Wo), device=x.device, dtype=out_dtype or x.dtype, memory_format=CL3D)
    dummy = out.new_empty(0, dtype=torch.float32)
    scale32 = scale.to(torch.float32).contiguous() if scale is not None else dummy
    shift32 = shift.to(torch.float32).contiguous() if shift is not None else dummy
    res = _cl3d(residual.to(x.dtype)) if residual is not None else out
    programs_m = triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in _forward.configs)) if stats else 0
    part = torch.zeros((programs_m, 3, Co), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Co, meta["BLOCK_N"]))

    _launch(
        _forward,
        grid,
        x, w, out, scale32, shift32, res, part,
        M, T, H, W, Ho, Wo, Ci, Co,
        STRIDE=stride, KT=kt, KH=kh, KW=kw,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None,
        RELU=relu, STATS=stats, TF32=allow_tf32,
    )  # fmt: skip
    return out, merge_tile_stats(part)


def merge_tile_stats(part: torch.Tensor) -> torch.Tensor:
    """(2, Co) float32 (sum, sum of squares about the mean) from per-tile (programs, 3, Co) rows of (sum, sum of
    squares about the tile's mean, count), by Chan's rule in float64; rows of count 0 (tiles no program of the
    launched config covers) add nothing."""
    if part.shape[0] == 0:  # no statistics asked
        return part.new_zeros((2, part.shape[2]))
    sums, m2, counts = part.double().unbind(1)
    total = counts.sum(0)
    mean = sums.sum(0) / total.clamp_min(1)
    tile_mean = sums / counts.clamp_min(1)
    spread = (counts * (tile_mean - mean) ** 2).sum(0)
    return torch.stack([sums.sum(0), m2.sum(0) + spread]).float()


def dgrad(
    g: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, ...], stride: int, allow_tf32: bool = False
) -> torch.Tensor:
    """Input gradient: g (N, Co, T, Ho, Wo) -> (N, Ci, T, H, W) channels_last_3d, g's dtype."""
    _require(g, "grad")
    N, Ci, T, H, W = input_shape
    Co, _, kt, kh, kw = weight.shape
    Ho, Wo = g.shape[3:]
    g = _cl3d(g)
    w = weight.to(g.dtype).permute(2, 3, 4, 0, 1).contiguous()  # (KT, KH, KW, Co, Ci)
    gx = torch.empty((N, Ci, T, H, W), device=g.device, dtype=g.dtype, memory_format=CL3D)
    M = N * T * H * W

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Ci, meta["BLOCK_N"]))

    _launch(
        _dgrad, grid, g, w, gx, M, T, H, W, Ho, Wo, Ci, Co,
        STRIDE=stride, KT=kt, KH=kh, KW=kw, TF32=allow_tf32,
    )  # fmt: skip
    return gx


def _wgrad_split(M: int, tiles: int) -> tuple[int, int]:
    """(split_len, splits): the positions cut so that about 1024 programs run; from the shape alone."""
    want = max(1, min(triton.cdiv(M, 4 * _WGRAD_QUANTUM), triton.cdiv(1024, max(tiles, 1))))
    split_len = triton.cdiv(triton.cdiv(M, want), _WGRAD_QUANTUM) * _WGRAD_QUANTUM
    return split_len, triton.cdiv(M, split_len)


def wgrad(x: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...], stride: int, allow_tf32=False):
    """Weight gradient: x (N, Ci, T, H, W), g (N, Co, T, Ho, Wo) -> (Co, Ci, KT, KH, KW) float32."""
    _require(x, "x")
    x = _cl3d(x)
    N, Ci, T, H, W = x.shape
    Co, _, kt, kh, kw = weight_shape
    Ho, Wo = g.shape[3:]
    g = _cl3d(g.to(x.dtype))
    M = N * T * Ho * Wo
    taps = kt * kh * kw
    split_len, splits = _wgrad_split(M, taps * triton.cdiv(Ci, 64) * triton.cdiv(Co, 64))
    part = torch.empty((splits, taps, Ci, Co), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (taps * triton.cdiv(Ci, meta["BLOCK_M"]), triton.cdiv(Co, meta["BLOCK_N"]), splits)

    _launch(
        _wgrad, grid, x, g, part, M, T, H, W, Ho, Wo, Ci, Co, split_len,
        STRIDE=stride, KT=kt, KH=kh, KW=kw, TF32=allow_tf32,
    )  # fmt: skip
    return part.sum(0).reshape(kt, kh, kw, Ci, Co).permute(4, 3, 0, 1, 2)
