"""The fast LGD-3D and LGD-2D: the reference networks with every block's end fused into one pass.

In the reference, each block ends with BN (of the residual), + shortcut, + broadcast diffusion vector,
ReLU, and the next block then pools the result again (five passes over the block's largest tensor).
Here each block ends with one :func:`~lgd_fast.ops.diffusion_epilogue`, whose second output is the
channel mean of the block's output: the next block's GAP, so no pooling pass runs between fused blocks
(SPEC.md section 1, the note). The block's global path (six linears, an add, a ReLU) is one
:func:`~lgd_fast.ops.global_update` call.

Each block's residual unit and projection shortcut are the fast P3D units of :mod:`.p3d` (every conv with its
BatchNorm, ReLU and addition in one :func:`~lgd_fast.ops.conv_bn` pass). The unit's last BatchNorm becomes
the epilogue's ``scale``/``shift``: from the last conv's batch statistics in training (gradients flow through
them as through BatchNorm, and the running statistics are updated as BatchNorm updates them), from running
statistics in eval. Modules, parameters and buffers are the reference's own: the fast model loads the very
same state_dict, and :func:`to_fast` converts a reference model in place.

How the stem and each block run (units fused or not, block end fused or not, layout, backend) is the
model's execution plan (:mod:`lgd_fast.plan`; ``model.execution_plan`` prints it).

The fast LGD-2D (:class:`FastLGD2D`) runs its frames as videos (N, C, T, H, W): the reference folds the T
frames into the batch, (N * T, C, H, W), and in channels_last those are the very same bytes as the videos in
channels_last_3d, so nothing is copied between the two views. Its units' Conv2d + BatchNorm2d run as the
(1, k, k) fused convs over every frame, and each block ends in the same diffusion epilogue as LGD-3D's, whose
mean over (T, H, W) is the per-video pooling of the next block. Its outputs (the local map as frames, g) have
the reference's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _triple

from .. import plan as planning
from ..arena import backward_in_arena, use_arena
from ..ops import bn_relu_max_pool, diffusion_epilogue, global_avg_pool, global_update, stem_conv_pool
from ..ops._common import layout, memory_format
from ..ops.conv_bn import (
    _dilation,
    _folded,
    _kernel,
    _padding,
    _strides,
    batch_norm_affine,
    batch_norm_arguments,
    compute_dtype,
    conv_bn,
    fold_norm,
    fusable_reason,
    norm_reason,
)
from ..ops.diffusion_epilogue import BACKENDS as EPILOGUE_BACKENDS
from ..ops.global_avg_pool import BACKENDS as POOL_BACKENDS
from ..ops.global_update import BACKENDS as GLOBAL_BACKENDS
from ..ops.global_update import block_weights
from ..recorded import recorded_call, register_for_compile, traced_as_one_op
from .blocks import LGDBlock, broadcast_to_positions
from .networks import LGD2D, LGD3D
from .p3d import (
    FRAME_UNITS,
    check_fusable,
    frames,
    reference_class,
    residual_body,
    shortcut,
    to_fast_unit,
    unit_note,
    videos,
)


def fused_block_forward(
    block: LGDBlock,
    x: torch.Tensor,
    g: torch.Tensor,
    x_mean: torch.Tensor,
    *,
    fused_units: bool = True,
    backend: str = "auto",
    op_backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LGD block with a fused end: (x, g, GAP(x)) -> (x', g', GAP(x')). ``fused_units``: the P3D unit's convs
    fused too (else its own modules); ``backend``: their conv backend; ``op_backend``: the plan's backend for
    the block-end ops (passed where an op implements it)."""
    r, stats = residual_body(block, x, fused=fused_units, backend=backend)
    scale, shift = batch_norm_affine(block.last_norm, r, stats)
    s = shortcut(block, x, fused=fused_units, backend=backend)
    if s.dtype != r.dtype:  # under autocast the shortcut may stay float32 while convs give bfloat16
        s = s.to(r.dtype)
    # The global path in one call, in the weights' dtype (float32 under autocast too: it is (N, C) small).
    weights = block_weights(block)
    g, d = global_update(x_mean.to(weights[0].dtype), g.to(weights[0].dtype), *weights,
                         backend=planning.op_backend(op_backend, GLOBAL_BACKENDS))  # fmt: skip
    if layout(r) is None:  # LGD-2D's contiguous frames seen as videos (N, T, C, H, W): a layout no kernel reads
        r = r.contiguous()
    s = s.contiguous(memory_format=memory_format(r))
    out, mean = diffusion_epilogue(r, s, d, scale, shift, backend=planning.op_backend(op_backend, EPILOGUE_BACKENDS))
    return out, g, mean


def modules_block_forward(block: LGDBlock, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block as the reference computes it, on its own modules (LGDBlock.forward with the reference body)."""
    if isinstance(block, FRAME_UNITS):  # LGD-2D: the reference block on the videos' frames
        out, g = LGDBlock.forward(block, frames(x), g)
        return videos(out, x.shape[0]), g
    r = reference_class(block).residual_body(block, x)
    r = r if block.last_norm is None else block.last_norm(r)
    s = x if block.downsample is None else block.downsample(x)
    g = block.update_global(x, g)
    return torch.relu(r + s + broadcast_to_positions(block.fc6(block.fc5(g)), r)), g


def run_block(
    block: LGDBlock, choice: planning.Choice, x: torch.Tensor, g: torch.Tensor, x_mean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One block under its plan's ``choice``: (x, g, GAP(x) or None) -> (x', g', GAP(x') or None)."""
    x = choice.to(x)
    if not choice.end:
        return (*modules_block_forward(block, x, g), None)
    op_backend = block._lgd_plan.backend
    if x_mean is None:
        x_mean = global_avg_pool(x, backend=planning.op_backend(op_backend, POOL_BACKENDS))
    return fused_block_forward(block, x, g, x_mean, fused_units=choice.fused, backend=choice.request,
                               op_backend=op_backend)  # fmt: skip


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


def _plain_max_pool(pool: nn.Module) -> bool:
    """A MaxPool3d or MaxPool2d whose forward is the class's own (a subclass's forward may compute anything)."""
    return type(pool).forward in (nn.MaxPool3d.forward, nn.MaxPool2d.forward)


def stem_kernel_reason(model: LGD3D | LGD2D) -> str | None:
    """None if the model's stem (conv1, bn1, ReLU, max-pool) is one :func:`~lgd_fast.ops.stem_conv_pool` computes
    at inference (a kt x 7 x 7 conv of stride (st, 2, 2) and padding (0, 3, 3), or LGD-2D's 7x7 over frames, a
    BatchNorm that folds, the 1x3x3 max-pool of stride 2 and padding 1), else why not."""
    return _stem_fold_reason(model) or _stem_conv_reason(model.conv1) or _stem_pool_reason(model)


def _stem_fold_reason(model: LGD3D | LGD2D) -> str | None:
    """None if conv1 and bn1 fold into one conv, else why not."""
    return fusable_reason(model.conv1) or norm_reason(model.bn1)


def _stem_conv_reason(conv: nn.Module) -> str | None:
    """None if conv1 is the 7x7 stem conv the kernel computes (stride (st, 2, 2), padding (0, 3, 3)), else why not."""
    kernel, strides = _kernel(conv), _strides(conv)
    if kernel[1:] != (7, 7) or strides[1:] != (2, 2) or _padding(conv) != [0, 3, 3] or conv.groups != 1:
        return f"conv1 {kernel} stride {strides} padding {conv.padding} groups {conv.groups} is not the 7x7 stem's"
    if _dilation(conv) != (1, 1, 1):
        return f"conv1 dilation {conv.dilation}"
    return None


def _stem_pool_reason(model: LGD3D | LGD2D) -> str | None:
    """None if the model's stem pool is the 1x3x3 max-pool of stride (1, 2, 2) and padding (0, 1, 1) (LGD-2D's 3x3
    of stride 2 and padding 1 over frames), computing nothing else, else why not."""
    pool = model.maxpool
    refused = f"the stem's pool {pool} is not the 1x3x3 max-pool of stride (1, 2, 2) and padding (0, 1, 1)"
    if not _plain_max_pool(pool):
        return refused
    if isinstance(pool, nn.MaxPool3d):  # (an int setting is all three dimensions': MaxPool3d(3, 2, 1) pools time)
        settings, want = [_triple(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)], [
            (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1)]  # fmt: skip
    elif isinstance(model, LGD2D):  # LGD-2D's MaxPool2d, over every frame (on LGD-3D's 5-D stem it would raise)
        settings, want = [_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)], [
            (3, 3), (2, 2), (1, 1), (1, 1)]  # fmt: skip
    else:
        return refused
    if settings != want or pool.ceil_mode or pool.return_indices:
        return refused
    return None


def stem_pool_op_reason(model: LGD3D | LGD2D) -> str | None:
    """None if the model's bn1, ReLU and max-pool are what :func:`~lgd_fast.ops.bn_relu_max_pool` computes (an
    nn.BatchNorm3d, or LGD-2D's nn.BatchNorm2d over frames, whose statistics over (N * T, H, W) are the videos' over
    (N, T, H, W); each with nn.BatchNorm's own forward; and the 1x3x3 max-pool of stride (1, 2, 2) and padding
    (0, 1, 1), LGD-2D's 3x3 over frames), else why not."""
    return _stem_norm_class_reason(model) or _stem_pool_reason(model)


def _stem_norm_class_reason(model: LGD3D | LGD2D) -> str | None:
    norm = model.bn1
    want = nn.BatchNorm2d if isinstance(model, LGD2D) else nn.BatchNorm3d
    if type(norm) is not want:
        return f"bn1 is {type(norm).__name__}, not the stem's nn.{want.__name__}"
    return None


def _stem_flags(model: LGD3D | LGD2D) -> tuple[bool, bool, bool]:
    """(fusable, pooled, pool_op) of the model's stem plan: conv1 + bn1 fold into one conv; the whole stem is the
    kernel's (which includes the first); bn1 + ReLU + max-pool are the training op's. Each part checked once (this
    runs on every eager call: _replan_changed_stem)."""
    fusable = _stem_fold_reason(model) is None
    pool = _stem_pool_reason(model) is None
    pooled = fusable and pool and _stem_conv_reason(model.conv1) is None
    return fusable, pooled, pool and _stem_norm_class_reason(model) is None


def _replan_changed_stem(model: LGD3D | LGD2D) -> None:
    """Where the stem's modules changed since the model was made fast (another pool or conv set on it), its plan's
    flags follow and its choices are decided again: a choice of the kernel must not outlive the stem it was made
    for. (A few attribute reads per eager call; a recorded program runs none, and is recorded again when a module
    is replaced: lgd_fast.recorded.module_state.)"""
    plan = model.__dict__.get("_lgd_plan")
    if plan is not None and plan.kind == "stem":
        flags = _stem_flags(model)
        if (plan.fusable, plan.pooled, plan.pool_op) != flags:
            plan.fusable, plan.pooled, plan.pool_op = flags
            plan.choices.clear()


def _stem_kernel(model: LGD3D | LGD2D, x: torch.Tensor) -> torch.Tensor:
    """The stem at inference as one kernel: conv1 with bn1 folded in, ReLU and max-pool; channels_last_3d videos.
    Eagerly the folded weight is cached until a parameter or statistic changes; traced by torch.compile the fold is
    part of the graph (with inductor's freezing, constants folded once)."""
    conv, norm = model.conv1, model.bn1
    dtype = compute_dtype(x)  # under bf16 autocast a bfloat16 weight: the op rounds the float32 clip itself
    weight, bias = (fold_norm if torch.compiler.is_compiling() else _folded)(conv, norm, dtype)
    return stem_conv_pool(x, weight, bias, stride_t=_strides(conv)[0], backend="cpp")


def _stem_pool_op(model: LGD3D | LGD2D, y: torch.Tensor) -> torch.Tensor:
    """bn1, ReLU and the max-pool of conv1's output ``y`` (videos (N, C, T, H, W)) as one
    :func:`~lgd_fast.ops.bn_relu_max_pool` op, with the arguments nn.BatchNorm's forward gives F.batch_norm (its
    count of batches and momentum, None's cumulative average included). Under CPU autocast ATen's max_pool3d runs in
    float32 (autocast's float32 list; max_pool2d is not), so LGD-3D's stem modules give float32 there: the op's
    bfloat16 output is widened to match; LGD-2D's stay bfloat16."""
    norm = model.bn1
    running_mean, running_var, batch_stats, momentum = batch_norm_arguments(norm)
    out = bn_relu_max_pool(y, running_mean, running_var, norm.weight, norm.bias, batch_stats, momentum, norm.eps,
                           backend="cpp")  # fmt: skip
    if out.dtype != torch.float32 and torch.is_autocast_enabled("cpu") and not isinstance(model, LGD2D):
        out = out.float()
    return out


def _spatial(setting) -> tuple[int, int]:
    """A conv's or pool's (h, w) setting: the last two of a 3-D one's (t, h, w), or an int for both."""
    return tuple(setting)[-2:] if isinstance(setting, tuple) else (setting, setting)


class _FastNet:
    """What the fast LGD-3D and LGD-2D share: the plan, the stem decision, the blocks loop and the heads (each
    subclass runs its own stem and says what its local map looks like on the way out)."""

    # Eager CPU inference runs in the activation arena (lgd_fast.arena): set False on a model to allocate as
    # PyTorch does.
    activation_arena: bool = True
    # Eager CPU inference runs as a recorded program of its op calls once an input key was seen (lgd_fast.recorded):
    # set False on a model to run every call through its layers' Python.
    recorded_inference: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        register_for_compile(self)  # and to_fast, __setstate__ (copies, unpickling): lgd_fast.recorded

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        register_for_compile(self)

    @property
    def execution_plan(self) -> planning.ExecutionPlan:
        """How the stem and every block run, per input seen so far (:mod:`lgd_fast.plan`)."""
        return planning.ExecutionPlan(self)

    def _stem_and_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (the last block's output as videos, g_L, its per-video mean): the mean comes out
        of the last block's epilogue where that block ends fused."""
        self.check_input(x)
        with use_arena(self, x):  # eager CPU inference (training: forward's own scope): reused memory (lgd_fast.arena)
            return self._stem_and_blocks_in_scope(x)

    def _stem_and_blocks_in_scope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _replan_changed_stem(self)
        stem = planning.decide(self, x, self._run_stem, group=(self.conv1, self.bn1, self.maxpool),
                               frames=self._stem_output_size(*x.shape[3:]), kind="stem")  # fmt: skip
        x = self._run_stem(stem, x)
        pool_backend = planning.op_backend(self._lgd_plan.backend, POOL_BACKENDS)
        x_mean = global_avg_pool(x.contiguous(memory_format=memory_format(x)), backend=pool_backend)
        g = x_mean
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                choice = planning.decide(block, x, lambda c, *a, block=block: run_block(block, c, *a), g, x_mean,
                                         kind="lgd_block")  # fmt: skip
                x, g, x_mean = run_block(block, choice, x, g, x_mean)
        if x_mean is None:
            x_mean = global_avg_pool(x.contiguous(memory_format=memory_format(x)), backend=pool_backend)
        return x, g, x_mean

    def _stem_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the stem's output (conv1 then max-pool) for an (H, W) input: the first block's frames. The
        spatial settings are the last two of a Conv3d's (t, h, w) and a Conv2d's (h, w) alike."""
        size = [height, width]
        for op in (self.conv1, self.maxpool):
            k, st, p = (_spatial(v) for v in (op.kernel_size, op.stride, op.padding))
            size = [(d + 2 * p[i] - k[i]) // st[i] + 1 for i, d in enumerate(size)]
        return size[0], size[1]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local_map, g, _ = self.forward_features_and_mean(x)
        return local_map, g

    def forward(self, x: torch.Tensor):
        self.check_input(x)  # (before the arena and the recorded program look at x)
        if traced_as_one_op(self, x):  # torch.compile of CPU inference: the eager program as one op (lgd_fast.recorded)
            return torch.ops.lgd_fast.recorded_inference(x, id(self))
        return self._eager_forward(x)

    def _eager_forward(self, x: torch.Tensor):
        with use_arena(self, x, backward=True):  # with autograd, the outputs' backward runs in the arena too
            out = recorded_call(self, x, self._forward_layers)
        return backward_in_arena(self, x, out)

    def _inference_output_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor like the logits that eval inference on clips ``x`` returns, autocast off: (N, classes) in
        the dtype of the classifier that makes them."""
        head = self.kernel_head.fc if self.classifier == "kernel" and self.stage == 2 else self.fc
        return x.new_empty((x.shape[0], self.num_classes), dtype=head.weight.dtype)

    def _forward_layers(self, x: torch.Tensor):
        local_map, g, local_mean = self.forward_features_and_mean(x)
        return self.forward_head(local_map, g, local_mean=local_mean)


class FastLGD3D(_FastNet, LGD3D):
    """LGD-3D whose blocks end in the fused diffusion epilogue; same modules and state_dict as LGD3D."""

    def forward_features_and_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (x_L, g_L, GAP(x_L))."""
        return self._stem_and_blocks(x)

    def _run_stem(self, choice: planning.Choice, x: torch.Tensor) -> torch.Tensor:
        """The reference stem (conv1, bn1, ReLU, max-pool) in the plan's layout, or at inference as one
        :func:`~lgd_fast.ops.stem_conv_pool` kernel where the plan chose it (``choice.fused and choice.end``).

        ATen's 1x3x3 max-pool is about 10x slower on contiguous tensors than on channels_last_3d ones; in eval a
        contiguous stem pools with :func:`max_pool_1x3x3` (a separable max over strided views, exactly equal):
        on (16, 16, 8, 16, 16) (lgd3d_tiny's stem at 16x32x32, batch 16) it took 0.45 ms, ATen's contiguous pool
        2.08 ms, the round trip through channels-last 0.52 ms; on channels-last input ATen's pool is the fastest
        (0.20 ms there, 2.06 ms vs 7.7 ms on R50's (4, 64, 8, 56, 56)).
        """
        if choice.fused and choice.end:  # eval: the whole stem as one kernel
            return _stem_kernel(self, x)
        if choice.end:  # with autograd: conv1, then bn1 + ReLU + max-pool as one op
            return _stem_pool_op(self, self.conv1(choice.to(x)))
        if choice.fused:  # eval (the plan's rule): the BatchNorm folded into conv1, the ReLU its post-op
            x = conv_bn(choice.to(x), self.conv1, self.bn1, relu=True, backend=choice.request)
        else:
            x = torch.relu(self.bn1(self.conv1(choice.to(x))))
        if not self.training and choice.layout == planning.CONTIGUOUS and _stem_pool_reason(self) is None:
            return max_pool_1x3x3(x)
        return self.maxpool(x)  # (any module: another pool, or an identity, runs as it is)


class FastLGD2D(_FastNet, LGD2D):
    """LGD-2D whose frames run as videos through fused units and fused block ends; same modules and state_dict
    as LGD2D (module docstring)."""

    def forward_features_and_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, T, H, W) -> (x_L as frames (N * T, C, H', W'), g_L, the per-video mean of x_L)."""
        x, g, x_mean = self._stem_and_blocks(x)
        return frames(x), g, x_mean

    def _run_stem(self, choice: planning.Choice, x: torch.Tensor) -> torch.Tensor:
        """The reference stem on the frames, in the plan's layout (channels_last_3d videos are channels_last
        frames), returned as videos."""
        if choice.fused and choice.end:  # eval: the whole stem as one kernel
            return _stem_kernel(self, x)  # (channels_last_3d videos: the frames in channels_last)
        clips = choice.to(x)
        if choice.end:  # with autograd: conv1 over the frames, then bn1 + ReLU + max-pool as one op on the videos
            return _stem_pool_op(self, videos(self.conv1(frames(clips)), x.shape[0]))
        if choice.fused:  # eval (the plan's rule): bn1 folded into conv1 (over every frame), the ReLU its post-op
            y = frames(conv_bn(clips, self.conv1, self.bn1, relu=True, backend=choice.request))
        else:
            y = torch.relu(self.bn1(self.conv1(frames(clips))))
        return videos(self.maxpool(y), x.shape[0])


def to_fast(model: nn.Module, *, backend: str | None = None, plan: str | None = None) -> FastLGD3D | FastLGD2D:
    """Turn a reference LGD-3D or LGD-2D into the fast model in place (same modules, parameters and buffers), with
    its execution plan (:mod:`lgd_fast.plan`): ``backend`` (conv and block-end backends, else
    ``$LGD_FAST_BACKEND``, else ``auto``) and ``plan`` (``"measure"``, ``"default"`` or ``"fused"``, else
    ``$LGD_FAST_PLAN``, else measure).

    Raises a TypeError for models the fused path does not cover (another network, or one whose blocks end in
    another normalisation than BatchNorm).
    """
    if not isinstance(model, LGD3D | LGD2D):
        raise TypeError(f"the fast path covers LGD-3D and LGD-2D models; got {type(model).__name__}")
    backend, mode = planning.resolve_options(backend, plan)
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, LGDBlock)]
    for name, module in blocks:
        if norm_reason(module.last_norm) is not None:
            raise TypeError(f"{name}: the fused block end folds BatchNorm only, got {type(module.last_norm)}")
        check_fusable(module, name)
    for name, module in blocks:
        if not isinstance(module, FRAME_UNITS):  # LGD-2D units run only inside their block's plan
            to_fast_unit(module, name, backend=backend, plan=mode)
        note = f"LGD block, {unit_note(module)}; block end as one diffusion_epilogue"
        planning.attach(module, "lgd_block", note, backend=backend, mode=mode)
    fusable, pooled, pool_op = _stem_flags(model)
    if isinstance(model, LGD2D):
        model.__class__ = FastLGD2D
        note = "stem (conv1, bn1, ReLU, max-pool) on the frames: its layout; in eval conv1+bn1+ReLU as one conv"
    else:
        model.__class__ = FastLGD3D  # adds no state: only forward_features/forward differ
        note = "stem (conv1, bn1, ReLU, max-pool): its layout; in eval conv1+bn1+ReLU as one conv"
    if pooled:
        note += ", or the whole stem as one stem_conv_pool kernel"
    if pool_op:
        note += "; with autograd bn1+ReLU+max-pool as one bn_relu_max_pool op"
    planning.attach(model, "stem", note, backend=backend, mode=mode, fusable=fusable, pooled=pooled, pool_op=pool_op)
    register_for_compile(model)
    return model
