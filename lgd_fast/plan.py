"""The execution plan of a fast model: how each layer runs, decided in this one file.

When a model is made fast (``create_model(..., fast=True)``, :func:`lgd_fast.models.to_fast`,
:func:`lgd_fast.convert`), every layer that can run fused gets a :class:`LayerPlan` (``module._lgd_plan``):
its kind, the conv backend asked for (``backend=``, else ``$LGD_FAST_BACKEND``, else ``auto``) and the plan
mode (``plan=``, else ``$LGD_FAST_PLAN``, else ``"measure"``). How the layer runs is a :class:`Choice`:

- ``fused``: its convolutions as :func:`lgd_fast.ops.conv_bn` (BatchNorm, residual add and ReLU in the conv's
  epilogue), or its own modules;
- ``end`` (LGD blocks in the fast LGD-3D): the block end (last BN, shortcut add, diffusion add, ReLU and the
  next block's pooling) as one :func:`~lgd_fast.ops.diffusion_epilogue`, or the block's own code;
- ``layout``: the memory format the layer's input is put in (``as_input``: left as it comes);
- ``backend``: the conv backend the fused convs run on for that device (``modules`` when not fused).

A choice is made on a layer's first call for each key (device, mode, autocast dtype, input dtype, shape and
layout; mode is ``train`` when a BatchNorm of the layer uses batch statistics, else ``eval`` or ``eval+grad``)
and kept on the layer, so no forward decides anything again:

- ``measure`` (the default): every candidate is timed on the call's own input (one warm-up, then at least
  :data:`REPEATS` rounds of interleaved calls, more for fast layers; each candidate's fastest call counts,
  since interference only slows a call down; forward only with no grad, forward and backward otherwise,
  running statistics restored afterwards), and the fastest is kept unless it beats the default by less than
  :data:`MARGIN` (timing noise should not flip a choice); then the default's code is kept, in the layout the
  input comes in where that runs within the margin too (a layout change is measured with the layer, the change
  back that it may cause in the next layer is not; the stem excepted, whose default is the first block's
  layout). Inference that will run as a recorded program (:mod:`lgd_fast.recorded`: a fast model's eager CPU
  inference records on its second call for an input key and runs the program from the third) is timed as
  that: each candidate as the program of its own op calls, since an eager call's Python per op would favour
  the candidate with fewer ops (on lgd3d_tiny at batch 16 eager timing chose the blocks' own modules, which ran
  8-12% slower than fused blocks once recorded). Where a candidate cannot be recorded, the layer's candidates
  are timed eagerly; where the model's own recording is refused later (:mod:`lgd_fast.recorded` logs why), its
  layers keep the choices timed as programs and run eagerly. Identical layers (same class, variant, parameter
  shapes and strides) share one measurement, as inductor's autotuning caches a choice by shape; the parameters'
  memory layout is part of that (a model converted to channels_last_3d is measured again).
- ``default``, and whenever measuring is not possible (under ``torch.compile`` tracing, where a choice already
  measured for the key is still used; with ``torch.distributed`` initialised, since ranks could pick
  different code): a deterministic rule, measured once on this project's 2-core CPU
  (``benchmarks/run_p3d_cpu.py``, ``benchmarks/results/p3d_cpu.json``). Off the CPU: fused, end fused, as
  the input comes (the stem on its own modules). On the CPU, inference without autograd (mode ``eval``) on
  oneDNN: every LGD block and P3D unit fused in channels_last_3d, the stem's conv1 + bn1 + ReLU as one conv
  (each conv one oneDNN primitive whose folded weight is packed once into oneDNN's layout: faster than the
  modules at every R50 frame size, 4x4 included); into the 7x7 stem with its 1x3x3 max-pool
  (``LayerPlan.pooled``), with the backend ``auto``, a float32 clip (autocast off), or bfloat16 (clips or
  autocast) on a CPU with AVX512_BF16: the whole stem as one :func:`~lgd_fast.ops.stem_conv_pool` kernel
  (``benchmarks/run_stem_conv_pool.py``: 1.07-1.69x the fused conv and pool in float32). With gradients: layers
  whose input frames have at least
  :data:`CPU_FUSED_MIN_PIXELS` (14x14)
  pixels run fused in channels_last_3d (fused blocks were 1.07-1.38x faster there, tied at 7x7, 3-22% slower at
  4x4 and below; a converted model's conv runs, :func:`lgd_fast.convert`, take channels_last_3d too, where
  measuring times that and contiguous); smaller ones run their own modules, contiguous, except LGD blocks in
  training (batch statistics and gradients) with at most :data:`CPU_TRAIN_CL_MAX_CHANNELS` (64) input channels,
  channels_last_3d (float32: 1.04-1.19x faster at 8x8 frames and larger, 0.91-1.02x at 4x4 and below; bf16
  autocast: 1.09-1.33x; from 128 channels on contiguous was faster below 8x8 frames in 23 of 25 blocks:
  ``benchmarks/run_plan_train_layouts.py``); in training the P3D
  units' convs run as their own modules (ATen's BatchNorm kernels beat the composite, 6% over R50's units)
  while the block end stays fused. The stem follows the first block's layout (channels-last in training); with
  autograd on the CPU, where that layout is channels-last, the stem (``LayerPlan.pool_op``: LGD-3D's
  nn.BatchNorm3d or LGD-2D's nn.BatchNorm2d, and the 1x3x3 max-pool) runs conv1 on its module, then bn1 + ReLU +
  max-pool forward and backward as one :func:`~lgd_fast.ops.bn_relu_max_pool` op in channels_last_3d
  (``benchmarks/run_bn_relu_max_pool.py``, ``benchmarks/run_stem_pool_op_ab.py``).

- ``fused``: every layer takes its fused code (P3D units and conv runs in training too, block ends fused),
  layouts by the default rule: deterministic like ``default``, and the way to run the fused code at any size
  in another process (the fast model's DDP test under ``torchrun`` uses it; small frames take their own
  modules under ``default``).

:func:`forced` overrides every choice (tests use it to check the fused code on this CPU). A measured plan
can differ between processes (timing); ``plan="default"`` (or ``LGD_FAST_PLAN=default``) makes the code path,
and so the result bit for bit, the same in every run. ``model.execution_plan`` (or :func:`execution_plan`)
prints the plan; ``lgd-fast plan MODEL`` resolves and prints one for an input size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .ops import _backend, to_channels_last
from .ops._common import layout as layout_of
from .ops._common import memory_format
from .ops.conv_bn import compute_dtype, uses_batch_stats
from .ops.p3d_conv import BACKENDS as CONV_BACKENDS
from .ops.p3d_conv import resolve_backend
from .ops.stem_conv_pool import bf16_dot_products as stem_bf16_dot_products
from .ops.stem_conv_pool import kernel_applies as stem_kernel_applies
from .ops.to_channels_last import to_channels_last_3d

__all__ = [
    "CPU_FUSED_MIN_PIXELS",
    "CPU_TRAIN_CL_MAX_CHANNELS",
    "ENV_VAR",
    "MARGIN",
    "REPEATS",
    "Choice",
    "ExecutionPlan",
    "LayerPlan",
    "attach",
    "decide",
    "execution_plan",
    "forced",
    "is_forced",
    "op_backend",
]

ENV_VAR = "LGD_FAST_PLAN"
MODES = ("measure", "default", "fused")
CPU_FUSED_MIN_PIXELS = 14 * 14
CPU_TRAIN_CL_MAX_CHANNELS = 64  # training below CPU_FUSED_MIN_PIXELS: blocks this narrow run channels-last
REPEATS = 3  # timed calls per candidate at least; more, up to MAX_REPEATS, while under MIN_SECONDS in all
MAX_REPEATS = 10
MIN_SECONDS = 0.2
MARGIN = 0.05
STAY_IN_LAYOUT = True  # within the margin, the layout the input comes in (benchmarks/run_plan_layout_ab.py)
CL, CONTIGUOUS, AS_INPUT = "channels_last_3d", "contiguous", "as_input"
_FORMATS = {CL: torch.channels_last_3d, CONTIGUOUS: torch.contiguous_format}


@dataclass(frozen=True)
class Choice:
    """How one layer runs for one key (see the module docstring)."""

    fused: bool
    end: bool
    layout: str
    backend: str  # what the fused convs run on (as resolved for the input), or "modules"
    why: str
    request: str = "auto"  # what the fused convs are asked for: the plan's backend where p3d_conv has it

    def to(self, x: torch.Tensor) -> torch.Tensor:
        """x in this choice's layout (a contiguous clip, C <= 4 on the CPU, by
        :func:`lgd_fast.ops.to_channels_last_3d`, the layer's backend permitting)."""
        if self.layout == AS_INPUT:
            return x
        if self.layout == CL and _clip_op_takes(x):
            return to_channels_last_3d(x, backend="reference" if self.request == "reference" else "auto")
        return x.contiguous(memory_format=_FORMATS[self.layout])

    def label(self, kind: str) -> str:
        if kind == "lgd_block":
            return {(True, True): "convs+end", (False, True): "end only", (False, False): "modules"}.get(
                (self.fused, self.end), "convs, own end"
            )
        if kind == "stem":
            if self.fused and self.end:
                return "conv+BN+ReLU+pool kernel"
            if self.end:
                return "conv, BN+ReLU+pool op"
            return "conv+BN+ReLU fused" if self.fused else "modules"
        return "convs" if self.fused else "modules"


def _clip_op_takes(x: torch.Tensor) -> bool:
    """A float clip (C <= 4) that :func:`lgd_fast.ops.to_channels_last_3d` converts with its compiled op (a plain
    contiguous CPU tensor: ``to_channels_last.kernel_applies``); anything else takes ATen's conversion, with no
    fallback warning."""
    return (x.dim() == 5 and x.shape[1] <= 4 and x.is_floating_point()
            and to_channels_last.kernel_applies(x))  # fmt: skip


@dataclass
class LayerPlan:
    """A layer's plan: what it is, what can be fused, the backend and mode asked for, and its choices by key."""

    kind: str  # "lgd_block", "p3d_unit", "conv_run" or "stem"
    backend: str  # "auto" or a backend name, as asked when the model was made fast
    mode: str  # "measure" or "default"
    note: str  # what the layer is and what its fused code covers
    choices: dict[tuple, Choice] = field(default_factory=dict)
    fusable: bool = True  # a stem: its conv, BatchNorm and ReLU can run as one fused conv
    pooled: bool = False  # a stem: its conv, BatchNorm, ReLU and max-pool can run as one stem_conv_pool kernel
    pool_op: bool = False  # a stem: its BatchNorm, ReLU and max-pool can run as one bn_relu_max_pool op (training)


def resolve_options(backend: str | None, plan: str | None) -> tuple[str, str]:
    """(backend, plan mode) from the arguments, else ``$LGD_FAST_BACKEND`` / ``$LGD_FAST_PLAN``, else auto /
    measure. Read once, when a model is made fast."""
    backend = _backend.requested_backend(backend)
    if plan is not None and not isinstance(plan, str):
        raise TypeError(f"plan argument must be a str, one of: {', '.join(MODES)}; got {type(plan).__name__} {plan!r}")
    mode = (plan if plan is not None else os.environ.get(ENV_VAR, "measure")).strip().lower() or "measure"
    if mode not in MODES:
        source = "plan argument" if plan is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} is {mode!r}; expected one of: {', '.join(MODES)}")
    return backend, mode


def attach(module: nn.Module, kind: str, note: str, *, backend: str, mode: str, fusable: bool = True,
           pooled: bool = False, pool_op: bool = False) -> LayerPlan:  # fmt: skip
    """Gives ``module`` its plan (kept when it already has one of the same kind, so converting twice re-uses it)."""
    existing = getattr(module, "_lgd_plan", None)
    if isinstance(existing, LayerPlan) and (existing.kind, existing.backend, existing.mode, existing.fusable,
                                            existing.pooled, existing.pool_op) == (
                                                kind, backend, mode, fusable, pooled, pool_op):  # fmt: skip
        return existing
    plan = LayerPlan(kind, backend, mode, note, fusable=fusable, pooled=pooled, pool_op=pool_op)
    module._lgd_plan = plan
    return plan


def op_backend(layer_backend: str, op_backends: Sequence[str]) -> str:
    """What to pass an op's ``backend=``: the layer's backend where the op implements it, else ``"auto"``."""
    return layer_backend if layer_backend in op_backends else _backend.AUTO


# ---- overrides ----------------------------------------------------------------------------------------------

_FORCED: list[dict[str, bool]] = []


@contextlib.contextmanager
def forced(*, fused: bool = True, training: bool = True) -> Iterator[None]:
    """Within the block, every layer takes its fused code (``fused=True``) or its own modules
    (``fused=False``), whatever its plan says; ``training=False`` leaves P3D units and conv runs in training
    on their own modules (the block end stays fused). Layouts follow the default rule. Nothing is recorded."""
    _FORCED.append({"fused": fused, "training": training})
    try:
        yield
    finally:
        _FORCED.pop()


@contextlib.contextmanager
def recorded_next() -> Iterator[None]:
    """Within the block, the forward's inference (mode ``eval``) will run as a recorded program
    (:mod:`lgd_fast.recorded` enters it around a model's first, eager call for an input key): measuring then
    times each candidate as a program of its own op calls, which is what will run."""
    _RECORDED_NEXT.depth = getattr(_RECORDED_NEXT, "depth", 0) + 1
    try:
        yield
    finally:
        _RECORDED_NEXT.depth -= 1


def is_forced() -> bool:
    """Whether a :func:`forced` block is open (its choices are not the plan's)."""
    return bool(_FORCED)


# ---- the decision ---------------------------------------------------------------------------------------------


def _mode(group: Sequence[nn.Module]) -> str:
    modules = [m for g in group for m in g.modules()]
    # (inference mode disables grad mode, so the second test only matters eagerly: dynamo cannot trace it)
    grad = torch.is_grad_enabled() and (torch.compiler.is_compiling() or not torch.is_inference_mode_enabled())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and uses_batch_stats(m) for m in modules):
        return "train" if grad else "train, no grad"
    if grad and any(p.requires_grad for m in modules for p in m.parameters(recurse=False)):
        return "eval+grad"
    return "eval"


def _conv_backend(layer_backend: str, x: torch.Tensor) -> str:
    """The p3d_conv backend the fused convs run on for x (an explicit one that cannot run raises)."""
    return resolve_backend(x, op_backend(layer_backend, CONV_BACKENDS))


def _default(plan: LayerPlan, x: torch.Tensor, mode: str, backend: str, frames: tuple[int, int], request: str):
    """The deterministic rule (module docstring); ``frames``: the (H, W) the rule looks at."""
    if plan.kind == "stem" and _stem_kernel_takes(plan, x, mode, request) and (
            compute_dtype(x) == torch.float32 or stem_bf16_dot_products()):  # fmt: skip
        # lgd3d_tiny's, LGD-2D's and R50's stems in float32, batch 1 to 16: 1.07-1.69x the fused oneDNN conv and
        # ATen's pool (benchmarks/run_stem_conv_pool.py). In bfloat16 (autocast or bfloat16 clips) where the CPU has
        # AVX512_BF16's dot products; without them the kernel multiplies in float32, 0.75-0.77x oneDNN's bfloat16
        # conv at R50's stem (a measured plan still times it).
        return Choice(True, True, AS_INPUT, "cpp", "default: eval, conv1+bn1+ReLU+max-pool as one kernel", request)
    rule = replace(_default_rule(plan, x, mode, backend, frames), request=request)
    if plan.kind == "stem" and rule.layout == CL and _stem_pool_op_takes(plan, x, mode, request):
        # Training (or autograd) in channels_last_3d: conv1 on its module, then BatchNorm + ReLU + max-pool forward
        # and backward as one op (benchmarks/run_bn_relu_max_pool.py: faster than ATen's modules and torch.compile
        # of them at lgd3d_tiny's and R50's stems; run_stem_pool_op_ab.py: 1.033x on tiny's training step).
        return Choice(False, True, CL, "cpp", "default: with autograd, conv1 then bn1+ReLU+max-pool as one op", request)
    return rule


def _stem_kernel_takes(plan: LayerPlan, x: torch.Tensor, mode: str, request: str) -> bool:
    """Whether the stem can run as one :func:`~lgd_fast.ops.stem_conv_pool` kernel on x: its modules are such a
    stem (``plan.pooled``), CPU inference without autograd, a clip the kernel takes in a dtype it computes in
    (float32, or bfloat16 clips or autocast), and no conv backend named (the kernel is none of p3d_conv's)."""
    return (plan.pooled and mode == "eval" and request == _backend.AUTO
            and stem_kernel_applies(x, compute_dtype(x)))  # fmt: skip


def _stem_pool_op_takes(plan: LayerPlan, x: torch.Tensor, mode: str, request: str) -> bool:
    """Whether the stem's BatchNorm, ReLU and max-pool can run as one :func:`~lgd_fast.ops.bn_relu_max_pool` op after
    conv1 on x: its modules are such a stem (``plan.pool_op``), on the CPU, with batch statistics or autograd (the
    op's statistics and backward are its reason to be: at inference the whole stem is one kernel or a fused conv),
    a float32 or bfloat16 clip and conv output (its kernel's dtypes: under bf16 autocast conv1 gives bfloat16 for a
    float32 clip; a float64 clip stays float64 under any autocast, float16 autocast gives float16), and no backend
    named."""
    return (plan.pool_op and mode != "eval" and request == _backend.AUTO and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and compute_dtype(x) in (torch.float32, torch.bfloat16)
            and _backend.extension_available())  # fmt: skip


def _default_rule(plan: LayerPlan, x: torch.Tensor, mode: str, backend: str, frames: tuple[int, int]) -> Choice:
    if x.device.type != "cpu":
        if plan.kind == "stem":
            return Choice(False, False, AS_INPUT, "modules", "default off the CPU: the stem's own modules")
        return Choice(True, True, AS_INPUT, backend, f"default off the CPU: fused on {backend}")
    big = frames[0] * frames[1] >= CPU_FUSED_MIN_PIXELS
    pixels = f"{frames[0]}x{frames[1]} frames {'>=' if big else '<'} 14x14"
    if mode == "eval" and backend == "onednn" and plan.kind in ("stem", "lgd_block", "p3d_unit"):
        # Inference without autograd on oneDNN: one primitive per conv with its weight folded and packed once; in
        # channels_last_3d that beat the modules at every R50 frame size (README, issue 14's measurements).
        if plan.kind == "stem":
            if plan.fusable:
                return Choice(True, False, CL, "onednn", "default: eval, conv1+bn1+ReLU as one conv")
            return Choice(False, False, CL, "modules", "default: eval, the first block's layout")
        return Choice(True, True, CL, backend, "default: eval, packed oneDNN convs, channels_last_3d")
    if plan.kind == "stem":
        layout = CL if mode.startswith("train") or big else CONTIGUOUS
        return Choice(False, False, layout, "modules", f"default: the first block's layout ({pixels} after it)")
    if plan.kind == "lgd_block":
        if not big and mode == "train" and x.shape[1] <= CPU_TRAIN_CL_MAX_CHANNELS:
            # narrow blocks in training: channels_last_3d modules ran 1.04-1.19x faster than contiguous ones at 8x8
            # frames and larger with 16-64 input channels, 0.91-1.02x at 4x4 and below (where staying saves a
            # conversion), 1.09-1.33x under bf16 autocast; from 128 channels on contiguous was faster below 8x8 in 23
            # of 25 blocks (benchmarks/results/plan_train_small_frames_cpu.json)
            return Choice(False, False, CL, "modules",
                          f"default: {pixels}, {x.shape[1]} <= {CPU_TRAIN_CL_MAX_CHANNELS} channels in training: "
                          "own modules, channels_last_3d")  # fmt: skip
        if not big:
            return Choice(False, False, CONTIGUOUS, "modules", f"default: {pixels}: own modules")
        if mode.startswith("train"):
            return Choice(False, True, CL, "modules", f"default: {pixels}; training units on own modules")
        return Choice(True, True, CL, backend, f"default: {pixels}")
    if not big:
        return Choice(False, False, AS_INPUT, "modules", f"default: {pixels}: own modules")
    if mode.startswith("train"):
        return Choice(False, False, AS_INPUT, "modules", "default: training on own modules")
    if plan.kind == "conv_run":  # what most measured conv runs of R(2+1)D, R3D and X3D chose (README, convert)
        return Choice(True, False, CL, backend, f"default: {pixels}, channels_last_3d")
    return Choice(True, False, AS_INPUT, backend, f"default: {pixels}")


def _forced_choice(plan: LayerPlan, default: Choice, mode: str, backend: str, force: dict[str, bool],
                   why: str = "forced") -> Choice:  # fmt: skip
    if plan.kind == "stem":
        return default
    fused = force["fused"] and (not mode.startswith("train") or force["training"])
    end = force["fused"] and plan.kind == "lgd_block"
    return replace(default, fused=fused, end=end, backend=backend if fused else "modules", why=why)


def _candidates(plan: LayerPlan, x: torch.Tensor, backend: str, mode: str, request: str) -> list[Choice]:
    if plan.kind == "stem":
        layouts = (CL, CONTIGUOUS) if x.device.type == "cpu" else (AS_INPUT,)
        fusable = plan.fusable and mode == "eval" and x.device.type == "cpu"
        fused = [Choice(True, False, CL, "onednn", "")] if fusable else []
        if _stem_kernel_takes(plan, x, mode, request):
            fused.insert(0, Choice(True, True, AS_INPUT, "cpp", ""))
        if _stem_pool_op_takes(plan, x, mode, request):
            fused.append(Choice(False, True, CL, "cpp", ""))
        return fused + [Choice(False, False, lay, "modules", "") for lay in layouts]
    if plan.kind == "lgd_block":
        layouts = (CL, CONTIGUOUS) if x.device.type == "cpu" else (CL, AS_INPUT)
        shapes = ((True, True, backend), (False, True, "modules"), (False, False, "modules"))
        return [Choice(f, e, lay, b, "") for f, e, b in shapes for lay in layouts]
    if plan.kind == "conv_run" and x.device.type == "cpu":  # a converted model's layers: the layout measured too
        return [Choice(True, False, lay, backend, "") for lay in (CL, CONTIGUOUS)] + [
            Choice(False, False, AS_INPUT, "modules", "")
        ]
    return [Choice(True, False, AS_INPUT, backend, ""), Choice(False, False, AS_INPUT, "modules", "")]


# identical layers share a measurement: (signature, key, timed as programs) -> Choice
_MEASURED: dict[tuple, Choice] = {}
_RECORDED_NEXT = threading.local()  # .depth: recorded_next() scopes open on this thread


def _signature(group: Sequence[nn.Module]) -> tuple:
    modules = [m for g in group for m in g.modules()]
    convs = tuple((tuple(m.weight.shape), m.stride, m.bias is not None) for m in modules
                  if isinstance(m, nn.Conv3d | nn.Conv2d))
    # (extra_repr: every conv's, pool's and norm's settings, so that a stem whose padding or pool differs, which the
    # stem kernel does not compute, never takes a measurement made for one it does)
    kinds = tuple((type(m).__qualname__, getattr(m, "variant", None), m.extra_repr()) for m in modules)
    # (each parameter's strides too: channels-last conv weights change what runs fastest, and a model converted with
    # model.to(memory_format=...) must not take a measurement made on contiguous ones)
    return kinds, convs, tuple((tuple(p.shape), p.stride()) for m in modules for p in m.parameters(recurse=False))


def decide(
    owner: nn.Module,
    x: torch.Tensor,
    runner: Callable[..., Any],
    *args: Any,
    group: Sequence[nn.Module] | None = None,
    frames: tuple[int, int] | None = None,
    kind: str = "p3d_unit",
) -> Choice:
    """The choice for the layer whose plan ``owner`` holds, on input ``x``: the plan's choice for this key, made
    now if it has none. ``runner(choice, x, *args)`` runs the layer under a candidate (for measuring);
    ``group``: the layer's modules when they are not ``owner``'s own (a conv run); ``frames``: the (H, W) the
    default rule looks at, where not x's (the stem's output); ``kind``: the plan's kind should ``owner`` have none
    yet (a fast module made directly, not through to_fast / convert: then planned with the environment's
    options)."""
    plan: LayerPlan | None = getattr(owner, "_lgd_plan", None)
    if plan is None:  # a fast module made directly (not through to_fast / convert): options from the environment
        backend, mode = resolve_options(None, None)
        plan = attach(owner, kind, f"{type(owner).__name__} (planned on first use)", backend=backend, mode=mode)
    return _decide(plan, owner, x, runner, args, group, frames)


def _check_backend_runs(plan: LayerPlan, x: torch.Tensor) -> None:
    """A backend asked for by name that cannot run on x's device is an error, not auto's choice: an op that lacks
    the backend takes ``auto``, so a model of such ops alone (a converted conv run under ``backend="cuda"`` on
    CPU clips) would otherwise run on another backend than the one asked for, with no word."""
    if plan.backend in (_backend.AUTO, "reference"):
        return
    reason = _backend.backend_unavailable_reason(plan.backend, x.device.type)
    if reason is not None:
        raise RuntimeError(f"this fast model was made with backend={plan.backend!r}, which cannot run on its input "
                           f"({x.device.type} tensors): {reason}. Make it with backend='auto' (the default) to let "
                           "each op take the fastest backend for the device")  # fmt: skip


def _decide(plan, owner, x, runner, args, group, frames) -> Choice:
    group = (owner,) if group is None else group
    mode = _mode(group)
    frames = tuple(x.shape[-2:]) if frames is None else frames
    request = op_backend(plan.backend, CONV_BACKENDS)
    if _FORCED:
        _check_backend_runs(plan, x)
        backend = _conv_backend(plan.backend, x)
        return _forced_choice(plan, _default(plan, x, mode, backend, frames, request), mode, backend, _FORCED[-1])
    device = x.device.type
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    key = (device, mode if amp is None else f"{mode} autocast {str(amp).removeprefix('torch.')}", x.dtype,
           tuple(x.shape), layout_of(x))  # fmt: skip
    choice = plan.choices.get(key)
    if choice is not None:
        return choice
    _check_backend_runs(plan, x)
    backend = _conv_backend(plan.backend, x)
    default = _default(plan, x, mode, backend, frames, request)
    if plan.mode == "fused":
        choice = _forced_choice(plan, default, mode, backend, {"fused": True, "training": True}, "plan fused")
    elif torch.compiler.is_compiling():
        return default
    elif plan.mode == "measure" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        as_programs = mode == "eval" and device == "cpu" and getattr(_RECORDED_NEXT, "depth", 0) > 0
        signature = (_signature(group), plan.kind, plan.backend, plan.fusable, plan.pooled, plan.pool_op,
                     str(x.device), key, as_programs)  # fmt: skip
        choice = _MEASURED.get(signature)
        if choice is None:
            candidates = [replace(c, request=request) for c in _candidates(plan, x, backend, mode, request)]
            choice = _measure(group, plan, mode, default, candidates, runner, (x, *args), as_programs)
            _MEASURED[signature] = choice
    else:
        choice = default
    plan.choices[key] = choice
    return choice


@contextlib.contextmanager
def _buffers_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block the modules' buffers (running statistics, counters) may change; after it they are as
    before."""
    buffers = [b for m in modules for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                # by value: nn.BatchNorm updates its running statistics without a new version. An unchanged buffer
                # (eval: all) keeps its version, so a recorded program (lgd_fast.recorded) sees the model unchanged.
                if not torch.equal(b, s):
                    b.copy_(s)


def _programs(candidates: Sequence[Choice], runner, inputs: tuple) -> dict[int, Callable[[], Any]] | None:
    """Each candidate's call as a recorded program of its op calls (:func:`lgd_fast.recorded.record`; the tensors
    among ``inputs`` its variables), or None where one cannot be recorded."""
    from .recorded import NotRecordable, record  # (it imports this module)

    tensors: list[torch.Tensor] = []  # each tensor once (the first block takes g and x_mean as one tensor)
    where = []  # (argument position, index into tensors)
    for i, a in enumerate(inputs):
        if isinstance(a, torch.Tensor):
            same = [k for k, t in enumerate(tensors) if t is a]
            where.append((i, same[0] if same else len(tensors)))
            if not same:
                tensors.append(a)

    def function(choice: Choice) -> Callable[..., Any]:
        def run(*values: torch.Tensor) -> Any:
            args = list(inputs)
            for i, k in where:
                args[i] = values[k]
            return runner(choice, *args)

        return run

    calls = {}
    with torch.no_grad():
        for i, choice in enumerate(candidates):
            try:  # (a unit whose shortcut is its input returns that input: the program returns it too)
                _, program = record(function(choice), *tensors, inputs_out=True)
            except NotRecordable:
                return None
            calls[i] = lambda program=program: program(*tensors)
    return calls


def _measure(group, plan, mode, default, candidates, runner, inputs, as_programs: bool = False) -> Choice:
    """Times every candidate on ``inputs`` (module docstring); the layer's buffers are restored after. With
    ``as_programs`` (inference a recorded program will run: :func:`recorded_next`) each candidate is timed as the
    program of its op calls, where every candidate can be recorded: eager calls add Python per op, which a
    program does not run, so they would favour the candidate with fewer ops."""
    x = inputs[0]
    backward = mode in ("train", "eval+grad")  # forward only where the call itself computes no gradient
    params = [p for g in group for p in g.parameters() if p.requires_grad] if backward else []
    gen = torch.Generator().manual_seed(0)  # upstream gradients; the global RNG is left alone
    upstream: dict[tuple, torch.Tensor] = {}

    def call(choice: Choice) -> None:
        args = [a.detach().requires_grad_(backward and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                for a in inputs]  # fmt: skip
        with torch.enable_grad() if backward else torch.no_grad():
            outs = runner(choice, *args)
            if backward:
                outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None and o.requires_grad]
                grads = []
                for o in outs:
                    k = (tuple(o.shape), o.dtype)
                    if k not in upstream:
                        upstream[k] = torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device)
                    grads.append(upstream[k].contiguous(memory_format=memory_format(o)))
                wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + params
                torch.autograd.grad(outs, wrt, grads, allow_unused=True)

    from .bench import time_interleaved  # the project's one timer (lgd_fast.bench imports the package)

    calls = {i: (lambda c=c: call(c)) for i, c in enumerate(candidates)}
    timed = "measured"
    with _buffers_kept(group):
        _, warmup = time_interleaved(calls, repeats=0, warmup=1, device=x.device)  # folds weights, fills caches
        programs = _programs(candidates, runner, inputs) if as_programs else None
        if programs is not None:  # (recording ran each once more: their warm-up; the rounds as counted eagerly)
            calls, timed = programs, "measured as recorded programs"
        rounds = int(MIN_SECONDS / max(sum(warmup.values()), 1e-9))
        times, _ = time_interleaved(calls, repeats=min(max(rounds, REPEATS), MAX_REPEATS), device=x.device)
    best_times = [min(times[i]) for i in range(len(candidates))]  # interference only ever slows a call down
    best = min(range(len(candidates)), key=best_times.__getitem__)
    def shape(c: Choice) -> tuple:  # what a choice runs: "as_input" is x's own layout
        return c.fused, c.end, layout_of(x) if c.layout == AS_INPUT else c.layout

    same = [i for i, c in enumerate(candidates) if shape(c) == shape(default)]
    kept = ""
    if same and best_times[best] > (1 - MARGIN) * best_times[same[0]]:
        best = same[0]  # within the margin of the default: keep the default
        # ... in the layout x comes in, where that runs within the margin too: a layout change here is measured
        # with this layer, but the change back that it may cause in the next is not. (Not the stem: its default
        # layout is the first block's, and staying in the clip's would move the change into that block.)
        stay = [i for i, c in enumerate(candidates) if shape(c) == (*shape(default)[:2], layout_of(x))]
        if (STAY_IN_LAYOUT and plan.kind != "stem" and stay and stay[0] != best
                and best_times[best] > (1 - MARGIN) * best_times[stay[0]]):  # fmt: skip
            best, kept = stay[0], f"; within {MARGIN:.0%} of the default: kept the input's layout"
    pairs = zip(candidates, best_times, strict=True)
    summary = ", ".join(f"{c.label(plan.kind)}/{c.layout} {1e3 * t:.2f}" for c, t in pairs)
    return replace(candidates[best], why=f"{timed} (ms): {summary}{kept}")


# ---- printing -------------------------------------------------------------------------------------------------


def _describe_key(key: tuple) -> str:
    device, mode, dtype, shape, lay = key
    return f"{device} {mode} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))} {lay or 'strided'}"


class ExecutionPlan:
    """The plan of every planned layer of a model, in module order; ``str()`` prints it as a table."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def layers(self) -> list[tuple[str, LayerPlan]]:
        return [(n, m.__dict__["_lgd_plan"]) for n, m in self.model.named_modules() if "_lgd_plan" in m.__dict__]

    def resolve(self, x: torch.Tensor, *, training: bool = False) -> ExecutionPlan:
        """Makes the choices for input ``x``: one forward (and backward with ``training``) in that mode; the
        model's mode, buffers and gradients are left as they were."""
        model = self.model
        was_training = model.training
        grads = [p.grad for p in model.parameters()]
        # the global RNG as it was (dropout draws): resolving changes nothing but the plan
        try:
            with _buffers_kept([model]), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                model.train(training)
                if training:
                    out = model(x)
                    outs = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward([o.float().sum() for o in outs])
                else:
                    with torch.no_grad():
                        model(x)
        finally:
            model.train(was_training)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
        return self

    def to_dict(self) -> list[dict[str, Any]]:
        rows = []
        for name, plan in self.layers():
            row = {"layer": name or "(model)", "kind": plan.kind, "backend": plan.backend, "mode": plan.mode,
                   "fuses": plan.note, "choices": []}  # fmt: skip
            for key, c in plan.choices.items():
                row["choices"].append({"input": _describe_key(key), "runs": c.label(plan.kind), "layout": c.layout,
                                       "backend": c.backend, "why": c.why})  # fmt: skip
            rows.append(row)
        return rows

    def __str__(self) -> str:
        layers = self.layers()
        if not layers:
            return f"{type(self.model).__name__}: no planned layers (nothing was made fast)"
        _, first = layers[0]
        lines = [f"execution plan of {type(self.model).__name__} ({len(layers)} planned layers; plan {first.mode}, "
                 f"backend {first.backend})"]  # fmt: skip
        for name, plan in layers:
            lines.append(f"{name or '(model)'}: {plan.note}")
            if not plan.choices:
                lines.append("    not decided yet: decided on first use for each input shape (ExecutionPlan.resolve)")
            for key, c in plan.choices.items():
                lines.append(f"    {_describe_key(key)}: {c.label(plan.kind)}, {c.layout}, {c.backend}; {c.why}")
        from .recorded import recorded_programs  # (it imports this module)

        for (shape, strides, dtype, amp, _), program in recorded_programs(self.model).items():
            if program is None:
                what = "records on its next call"
            else:
                what = f"eager, not recorded: {program}" if isinstance(program, str) else repr(program)
            amp = f", autocast {str(amp).removeprefix('torch.')}" if amp is not None else ""
            lines.append(f"recorded inference, {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))} "
                         f"strides {strides}{amp}: {what}")  # fmt: skip
        return "\n".join(lines)

    __repr__ = __str__


def execution_plan(model: nn.Module) -> ExecutionPlan:
    """The :class:`ExecutionPlan` of a model made fast (its planned layers' choices so far)."""
    return ExecutionPlan(model)
