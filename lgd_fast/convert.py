"""``lgd_fast.convert``: make an existing video model faster in place, keeping every state_dict key.

What it converts:

- an LGD-3D reference model: into the fast LGD-3D (:func:`lgd_fast.models.to_fast`: every P3D unit and every
  block end fused);
- P3D blocks (``P3DBottleneck``, ``P3DBasicBlock``) inside any other model: their units fused
  (:func:`lgd_fast.models.p3d.to_fast_unit`);
- every ``Conv3d`` followed by a ``BatchNorm3d`` (and a ``ReLU``), whatever its kernel, stride or groups, as
  other codebases write them: inside an ``nn.Sequential`` (a conv with its norm and ReLU, and the (2+1)D pair
  of a 1xkxk and a kx1x1 conv, either order, as one run: torchvision's stems, ``Conv2Plus1D`` and blocks); in
  pytorchvideo's chain modules, recognised by their attributes (``ResNetBasicStem``, ``BottleneckBlock``,
  ``Conv2plus1d``: see "modules whose forward is a chain" below); and the end of a residual block
  (torchvision's ``BasicBlock`` / ``Bottleneck``, pytorchvideo's ``ResBlock``): its last conv's BatchNorm,
  the shortcut addition and the ReLU in that conv's epilogue. Each conv runs as :func:`lgd_fast.ops.conv_bn`
  with its bias and the BatchNorm and ReLU after it in its epilogue (folded in eval; from the conv's
  statistics in training).

Conversion changes classes only (a container becomes a subclass of its own class with another ``forward``; a
padded ``nn.Conv3d`` becomes :class:`lgd_fast.models.blocks.Conv3d`, which works around PyTorch's wrong CPU
bfloat16 weight gradient where a padded dimension is no longer than the kernel: ``report.patched``), never
modules, parameters or buffers: the state_dict is the same, key for key, and the converted model computes the
same function. Every converted layer gets an execution plan (:mod:`lgd_fast.plan`: fused or its
own modules, chosen by measurement on first use per input shape, or by the documented default);
``model.execution_plan`` prints it. Converting an already converted model keeps what was converted (the
report says so) and plans what is new.

Every ``Conv3d`` that stays as it was is reported with the reason (nothing to fuse after it, another padding
mode: :func:`lgd_fast.ops.conv_bn.fusable_reason`, the one rule), and so is every residual block whose end is
left unfused.
``inference=True`` also puts the model in eval mode (every BatchNorm folded into its conv, folded weights
cached); the fast LGD models it also moves to channels_last_3d. Elsewhere each converted layer's plan puts its
input in the layout it runs fastest in (measured on first use: channels_last_3d and contiguous timed; by the
default rule, channels_last_3d for frames of 14x14 and more), so a layout change that does not pay is not made.
What the model returns does not leak that choice: where the input and every conv weight are contiguous (so the
unconverted model's output certainly is), a forward hook on the converted model makes each 5-D tensor it returns
in channels_last_3d contiguous, so a caller's ``.view()`` of a feature map works as before.

Save converted models with ``state_dict()`` (the converted classes are made at run time and do not pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import plan as planning
from .models.blocks import Conv3d, P3DBasicBlock, P3DBottleneck
from .models.fast import FastLGD2D, FastLGD3D, to_fast
from .models.networks import LGD2D, LGD3D
from .models.p3d import FastP3DBasicBlock, FastP3DBottleneck, check_fusable, to_fast_unit
from .ops._common import cpp_float_input_reason, layout
from .ops.conv_bn import conv_bn, fusable_reason, norm_reason, p3d_geometry_reason
from .ops.p3d_conv import BACKENDS as CONV_BACKENDS
from .ops.squeeze_excite import BACKENDS as SQUEEZE_EXCITE_BACKENDS
from .ops.squeeze_excite import squeeze_excite, squeeze_excite_convs
from .recorded import PURE_FORWARD_HOOKS, impure_forward_hooks

__all__ = ["ConversionReport", "convert"]

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` and ``left`` are (module name, description or reason) pairs."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    # padded nn.Conv3d given PyTorch's bf16 weight-gradient workaround (lgd_fast.models.blocks.Conv3d, README)
    patched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}:"]
        lines += [f"  {name or '(model)'}: {what}" for name, what in self.converted]
        lines.append(f"left as they were {len(self.left)}:")
        lines += [f"  {name or '(model)'}: {why}" for name, why in self.left]
        if self.patched:
            lines.append(f"padded Conv3d given the CPU bf16 weight-gradient workaround {len(self.patched)}: "
                         + ", ".join(self.patched))  # fmt: skip
        return "\n".join(lines)


def _patch_padded_convs(model: nn.Module) -> list[str]:
    """Every plain ``nn.Conv3d`` with zero padding becomes :class:`lgd_fast.models.blocks.Conv3d` (a class change
    only: the same parameters, state_dict and function), whose forward pads where PyTorch's CPU bfloat16 weight
    gradient is wrong (:func:`lgd_fast.ops._common.conv3d`): a converted layer that runs as its own modules would
    otherwise train on garbage there. Its names."""
    patched = []
    for name, module in model.named_modules():
        cls = type(module)
        if (not isinstance(module, nn.Conv3d) or getattr(cls, "lgd_padded_workaround", False)
                or cls._conv_forward is not nn.Conv3d._conv_forward or cls.forward is not nn.Conv3d.forward
                or module.padding_mode != "zeros" or isinstance(module, nn.modules.lazy.LazyModuleMixin)
                or nn.utils.parametrize.is_parametrized(module)):  # fmt: skip
            continue  # (its own forward, a lazy conv that becomes nn.Conv3d, a parametrization's class: left)
        if module.padding == "same" or (not isinstance(module.padding, str) and any(module.padding)):
            module.__class__ = Conv3d if cls is nn.Conv3d else _padded_class(cls)
            patched.append(name)
    return patched


_PADDED_CLASSES: dict[type, type] = {}


def _padded_class(cls: type) -> type:
    """A subclass of an ``nn.Conv3d`` subclass (torchvision's ``Conv3DSimple``, ...) of the same name, with
    :class:`Conv3d`'s ``_conv_forward``."""
    if cls not in _PADDED_CLASSES:
        _PADDED_CLASSES[cls] = type(cls.__name__, (cls,), {"_conv_forward": Conv3d._conv_forward,
                                                           "lgd_padded_workaround": True, "__module__": __name__})
    return _PADDED_CLASSES[cls]


def _to_channels_last(model: nn.Module) -> None:
    """5-D weights to channels_last_3d and 4-D ones (Conv2d: LGD-2D's, a 2-D stem) to channels_last, each in the
    format its rank has (``Module.to(memory_format=channels_last_3d)`` refuses a model holding both ranks)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    model._apply(move)


def convert(
    model: nn.Module, *, inference: bool = False, backend: str | None = None, plan: str | None = None
) -> nn.Module:
    """Fuse ``model``'s LGD blocks, P3D units and every Conv3d + BatchNorm3d (+ ReLU, + residual block end) in
    place (module docstring); returns ``model``.

    ``backend`` and ``plan`` are the execution plan's (:mod:`lgd_fast.plan`: the conv backend, else
    ``$LGD_FAST_BACKEND``, else auto; ``"measure"``, ``"default"`` or ``"fused"``, else ``$LGD_FAST_PLAN``, else
    measure).
    The report (:class:`ConversionReport`) is logged and kept as ``model.conversion_report``; the plan is
    ``model.execution_plan``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    options = planning.resolve_options(backend, plan)
    earlier = getattr(model, "conversion_report", None)
    report = ConversionReport()
    claimed: set[int] = set()  # Conv3d modules that a conversion covers
    report.patched = _patch_padded_convs(model)  # (first: the fused runs below record their modules' classes)
    if isinstance(model, FastLGD3D | FastLGD2D):
        report.left.append(("", f"already the fast {'LGD-3D' if isinstance(model, FastLGD3D) else 'LGD-2D'}"))
        claimed |= {id(m) for m in model.modules()}
    elif isinstance(model, LGD3D):
        to_fast(model, backend=options[0], plan=options[1])
        report.converted.append(("", "LGD-3D -> FastLGD3D: every P3D unit and every block end fused"))
        claimed |= {id(m) for m in model.modules()}
    elif isinstance(model, LGD2D):
        to_fast(model, backend=options[0], plan=options[1])
        report.converted.append(("", "LGD-2D -> FastLGD2D: every unit (over frames) and every block end fused"))
        claimed |= {id(m) for m in model.modules()}
    else:
        _convert_p3d_blocks(model, report, claimed, options)
    for name, module in list(model.named_modules()):
        if id(module) in claimed:
            continue
        if isinstance(module, _FusedSequentialMixin) and _stale(module):  # changed since: its runs found anew
            _convert_sequential(name, module, report, claimed, options)
            continue
        if isinstance(module, _FusedSequentialMixin | _FusedChainMixin | _FusedResidualMixin):
            report.left.append((name, "already converted (its plan is kept)"))
            if not isinstance(module, _FusedResidualMixin):  # a block's inner modules were reported on their own
                claimed |= {id(m) for m in module.modules()
                            if m is module or not (isinstance(m, _FusedSequentialMixin) and _stale(m))}  # fmt: skip
            elif getattr(module, "branch1_conv", None) is not None:  # its shortcut conv runs in the fused forward
                claimed.add(id(module.branch1_conv))
            continue
        _convert_residual(name, module, report, claimed, options)
        if isinstance(module, nn.Sequential):
            _convert_sequential(name, module, report, claimed, options)
        else:
            _convert_chain(name, module, report, claimed, options)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv3d) and id(module) not in claimed:
            report.left.append((name, _why_left(module)))
    if inference:
        model.eval()
        if isinstance(model, FastLGD3D | FastLGD2D):  # as benchmarked (benchmarks/bench_e2e.py, lgd-fast bench)
            _to_channels_last(model)
    if isinstance(earlier, ConversionReport):  # a second call: what the first converted stays in the report
        mark = " (by an earlier convert call)"
        report.converted[:0] = [(n, what if what.endswith(mark) else what + mark) for n, what in earlier.converted]
        report.patched[:0] = earlier.patched
    object.__setattr__(model, "conversion_report", report)
    if not isinstance(model, FastLGD3D | FastLGD2D):  # the fast LGD models have the property
        object.__setattr__(model, "execution_plan", planning.ExecutionPlan(model))
        # no channels-last output where the unconverted model's is contiguous (_in_the_original_layout)
        object.__setattr__(model, "_lgd_convs", tuple(m for m in model.modules() if isinstance(m, nn.Conv3d)))
        if report.converted and _in_the_original_layout not in model._forward_hooks.values():
            model.register_forward_hook(_in_the_original_layout, prepend=True, with_kwargs=True)
    logger.info("lgd_fast.convert:\n%s", report)
    return model


def _in_the_original_layout(module: nn.Module, args: tuple, kwargs: dict, output):
    """The converted model's forward hook: a 5-D tensor it returns channels-last where the unconverted model's is
    certainly contiguous is made contiguous, so a caller's ``.view()`` works as before. Certain means: the input
    (the first 5-D tensor among the arguments) contiguous and every conv weight of the model contiguous, where
    ATen's convs, on every path and dtype, write contiguous output; only the plan's choice of channels_last_3d
    for a layer makes it channels-last then. Elsewhere (channels-last input or weights, where ATen's own choice
    depends on path and dtype) nothing is changed. A forward that itself moves its input to channels_last_3d is
    not seen: its output is made contiguous too. It only copies (torch ops): a recorded program
    (:mod:`lgd_fast.recorded`) records it with the rest."""
    leaves, spec = tree_flatten(output)

    def leaked(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 5 and layout(t) == "channels_last_3d"

    if not any(leaked(t) for t in leaves):  # (most calls: logits, or a feature map as the original's; checked first)
        return None
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() == 5]
    if not tensors or not tensors[0].is_contiguous():
        return None
    if any(not conv.weight.is_contiguous() for conv in module.__dict__.get("_lgd_convs", ())
           if not nn.parameter.is_lazy(conv.weight)):  # fmt: skip
        return None
    return tree_unflatten([t.contiguous() if leaked(t) else t for t in leaves], spec)


PURE_FORWARD_HOOKS.add(_in_the_original_layout)


# ---- P3D blocks in other models ----------------------------------------------------------------------------


def _convert_p3d_blocks(model: nn.Module, report: ConversionReport, claimed: set[int], options) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, FastP3DBottleneck | FastP3DBasicBlock):
            report.left.append((name, "already a fast P3D unit (its plan is kept)"))
            claimed |= {id(m) for m in module.modules()}
        elif isinstance(module, P3DBottleneck | P3DBasicBlock):
            try:
                check_fusable(module, name)
            except TypeError as exc:
                report.left.append((name, str(exc)))
                continue
            to_fast_unit(module, name, backend=options[0], plan=options[1])
            report.converted.append((name, f"{type(module).__name__}: residual unit and shortcut fused"))
            claimed |= {id(m) for m in module.modules()}


# ---- runs of Conv3d -> BatchNorm3d -> ReLU inside an nn.Sequential ----------------------------------------


def _kind(conv_: nn.Module) -> str | None:
    """"spatial" (1xkxk), "temporal" (kx1x1, k > 1) or None for any other Conv3d."""
    if not isinstance(conv_, nn.Conv3d):
        return None
    kt, kh, kw = conv_.kernel_size
    if kt == 1 and (kh, kw) != (1, 1):
        return "spatial"
    if kt > 1 and (kh, kw) == (1, 1):
        return "temporal"
    return None


def _why_left(conv_: nn.Conv3d) -> str:
    reason = fusable_reason(conv_)
    if reason is not None:
        return reason
    return ("nothing to fuse: no BatchNorm3d or ReLU follows it in an nn.Sequential, and it is in no block "
            "convert knows (module docstring)")  # fmt: skip


def computes_silu(module: nn.Module) -> bool:
    """Whether ``module`` is SiLU (Swish, ``x * sigmoid(x)``): ``nn.SiLU``, or a module without parameters or
    buffers whose output on a float64 probe from -12 to 12 is ``F.silu``'s to 1e-12 (pytorchvideo's ``Swish`` and
    X3D's as other codebases write it). A module that cannot run on the probe is not."""
    if isinstance(module, nn.SiLU):
        return True
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return False
    probe = torch.linspace(-12.0, 12.0, 97, dtype=torch.float64).reshape(1, 97, 1, 1, 1)
    try:
        with torch.no_grad():
            out = module(probe.clone())
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False  # not provably SiLU: the layer keeps calling the module itself (tests: _Float32Only)
    want = torch.nn.functional.silu(probe)
    return isinstance(out, torch.Tensor) and out.shape == want.shape and out.dtype == want.dtype and bool(
        torch.allclose(out, want, rtol=1e-12, atol=1e-15))  # fmt: skip


@dataclass(frozen=True)
class _Step:
    """One fused conv: module paths (relative to the converted module) of the conv, its BatchNorm3d, the modules
    that run after the BatchNorm inside the same norm slot (X3D's squeeze-excitation), and the activation, which
    is fused when it is a ReLU and nothing runs between it and the norm. ``silu``: the activation computes SiLU
    (:func:`computes_silu`, checked when converting), so without autograd it runs as one ``F.silu`` (one pass
    where ``x * sigmoid(x)`` takes two and a temporary); with autograd the module's own forward runs.
    ``excite``: ``after`` is one squeeze-excitation module (proved by :func:`squeeze_excite_convs`) and the
    activation SiLU; the paths of its two 1x1x1 convs, so that on CPU without autograd the module and the SiLU
    run as one :func:`lgd_fast.ops.squeeze_excite` call (two passes over the activation instead of four)."""

    conv: str
    norm: str | None = None
    after: tuple[str, ...] = ()
    act: str | None = None
    silu: bool = False
    excite: tuple[str, str] | None = None

    def fused_relu(self, owner: nn.Module) -> bool:
        return self.act is not None and not self.after and _is_relu(owner.get_submodule(self.act))

    def paths(self) -> list[str]:
        return [p for p in (self.conv, self.norm, *self.after, self.act) if p is not None]


def _step_forward(owner: nn.Module, step: _Step, x: torch.Tensor, backend: str, **epilogue) -> torch.Tensor:
    """``step`` of ``owner`` with its conv as one conv_bn call (``epilogue``: conv_bn's residual / shortcut)."""
    get = owner.get_submodule
    relu = step.fused_relu(owner)
    x = conv_bn(x, get(step.conv), step.norm and get(step.norm), relu=relu, backend=backend, **epilogue)
    if step.excite is not None and _excite_applies(owner, step, x):
        fc1, fc2 = get(step.excite[0]), get(step.excite[1])
        return squeeze_excite(x, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias, silu=True,
                              backend=planning.op_backend(backend, SQUEEZE_EXCITE_BACKENDS))  # fmt: skip
    for path in step.after:
        x = get(path)(x)
    if step.act is not None and not relu:
        grad = torch.is_grad_enabled() and x.requires_grad
        x = torch.nn.functional.silu(x) if step.silu and not grad else get(step.act)(x)
    return x


def _excite_applies(owner: nn.Module, step: _Step, x: torch.Tensor) -> bool:
    """Whether ``step``'s squeeze-excitation and SiLU run as one op on ``x``: a CPU tensor the kernel takes
    (float32, bfloat16, float64; contiguous or channels_last_3d), nothing for autograd to record (neither x nor
    the layers' parameters), the modules it stands in for in eval (what was proved) and no hooks on them, of
    their own or global (they would not run)."""
    if x.device.type != "cpu" or cpp_float_input_reason("cpp", x) is not None:
        return False
    stood_in = [owner.get_submodule(step.act), *(m for p in step.after for m in owner.get_submodule(p).modules())]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in stood_in for p in m.parameters())):
        return False
    return not _hooked(stood_in) and not any(m.training for m in stood_in)


def _describe_steps(owner: nn.Module, steps: list[_Step]) -> str:
    def conv_part(path: str) -> str:
        conv_ = owner.get_submodule(path)
        kind = _kind(conv_)
        other = p3d_geometry_reason(conv_)
        text = f"{path} ({(kind + ' ') if kind else ''}{'x'.join(map(str, conv_.kernel_size))}"
        return text + (f", {other}" if other else "") + ")"

    parts = []
    for step in steps:
        parts.append(conv_part(step.conv))
        for path in step.paths()[1:]:
            module = owner.get_submodule(path)
            unfused = path == step.act and not step.fused_relu(owner)
            silu = ", as F.silu without autograd" if path == step.act and step.silu else ""
            if step.excite is not None and path in (*step.after, step.act):
                silu = ", with the SiLU as one squeeze_excite op on CPU without autograd"
            parts.append(f"{path} ({type(module).__name__}{', after' if unfused else ''}{silu})")
    kinds = [_kind(owner.get_submodule(s.conv)) for s in steps]
    label = "(2+1)D run" if len(steps) == 2 and set(kinds) == {"spatial", "temporal"} else "conv run"
    return f"{label} " + " -> ".join(parts)


@dataclass
class _Run:
    """A run inside a Sequential: its steps (child names) and every child it covers."""

    steps: list[_Step]
    names: list[str]
    types: tuple[type, ...] = ()  # its children's classes when converted (a changed Sequential runs as it is)


def _is_relu(module: nn.Module) -> bool:
    """``nn.ReLU`` itself or a subclass that keeps its forward (a subclass computing something else is not fused)."""
    return isinstance(module, nn.ReLU) and type(module).forward is nn.ReLU.forward


def _hooked(modules) -> bool:
    """Whether a fused path would skip hooks: global module hooks, or hooks (forward, pre-forward, backward) on
    any of ``modules`` (each checked itself: pass every module of the subtree), which the fused convs do not call
    (weight_norm's pre-hook among them). Their modules then run as they are. A pure forward hook
    (``PURE_FORWARD_HOOKS``: the layout hook a converted submodule carries) does not count."""
    m = nn.modules.module
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks or (
            m._global_backward_pre_hooks):  # fmt: skip
        return True
    for sub in modules:
        if impure_forward_hooks(sub) or sub._backward_hooks or sub._backward_pre_hooks:
            return True
    return False


def _watched(module: nn.Module) -> tuple[nn.Module, ...]:
    """Every module under ``module`` (not itself), kept when it is converted: what :func:`_hooked` checks on each
    call (a walk of the tree every call cost 0.8 ms a forward on an X3D). Modules put into it after convert are
    watched once it is converted again."""
    return tuple(sub for child in module.children() for sub in child.modules())


def _norm_and_relu(children: list[tuple[str, nn.Module]], j: int) -> tuple[str | None, str | None, int]:
    """The names of a BatchNorm3d at ``j`` and a ReLU after it (None where absent), and the index past them."""
    norm = relu = None
    if j < len(children) and type(children[j][1]) is nn.BatchNorm3d:
        norm, j = children[j][0], j + 1
    if j < len(children) and _is_relu(children[j][1]):
        relu, j = children[j][0], j + 1
    return norm, relu, j


def _find_runs(children: list[tuple[str, nn.Module]]) -> tuple[list[_Run], list[tuple[str, str]]]:
    """The runs among a Sequential's children: a Conv3d with the BatchNorm3d and ReLU after it, and a (2+1)D pair
    (a 1xkxk and a kx1x1 conv, either order, through BatchNorm3d/ReLU) as one run; and (name, reason) for convs
    that cannot be fused."""
    runs, refused = [], []
    i = 0
    while i < len(children):
        name, first = children[i]
        if not isinstance(first, nn.Conv3d):
            i += 1
            continue
        if (reason := fusable_reason(first)) is not None:
            refused.append((name, reason))
            i += 1
            continue
        norm, relu, j = _norm_and_relu(children, i + 1)
        steps = [_Step(name, norm, (), relu)]
        kind = _kind(first)
        if kind and j < len(children) and _kind(children[j][1]) == ({"spatial", "temporal"} - {kind}).pop():
            if fusable_reason(children[j][1]) is None:
                second_norm, second_relu, k = _norm_and_relu(children, j + 1)
                steps.append(_Step(children[j][0], second_norm, (), second_relu))
                j = k
        if len(steps) == 1 and norm is None and relu is None:
            i += 1  # a conv alone: nothing to fuse
            continue
        runs.append(_Run(steps, [n for n, _ in children[i:j]], tuple(type(m) for _, m in children[i:j])))
        i = j
    return runs, refused


def _run_modules(modules: list[nn.Module], choice: planning.Choice, x: torch.Tensor, fused) -> torch.Tensor:
    """A run under its plan's ``choice``: ``fused(x)`` (its convs as conv_bn calls), or its own modules in order."""
    x = choice.to(x)
    if choice.fused:
        return fused(x, choice.request)
    for module in modules:
        x = module(x)
    return x


def _planned(owner: nn.Module, modules: list[nn.Module], x: torch.Tensor, fused) -> torch.Tensor:
    """Runs ``modules`` (a run whose plan ``owner`` holds) as its plan chooses."""
    choice = planning.decide(owner, x, lambda c, t: _run_modules(modules, c, t, fused), group=modules)
    return _run_modules(modules, choice, x, fused)


class _FusedSequentialMixin:
    """forward of a converted Sequential: its children in order, each run as fused convs."""

    _lgd_runs: list[_Run]

    def forward(self, x):
        if _stale(self):
            if not self.__dict__.get("_lgd_said_changed"):  # sliced, inserted into, a child replaced: said once
                self._lgd_said_changed = True
                logger.warning("%s changed since lgd_fast.convert (a slice, or children inserted or replaced): "
                               "its children run as they are; convert it again to fuse them", type(self).__name__)
            return nn.Sequential.forward(self, x)
        starts = {run.names[0]: run for run in self._lgd_runs}
        skip: set[str] = set()
        for name, module in self._modules.items():
            if name in skip:
                continue
            run = starts.get(name)
            if run is None:
                x = module(x)
                continue
            modules = [self._modules[n] for n in run.names]
            skip.update(run.names)
            if _hooked(modules):  # (no plan measured either: its timing runs would call the hooks too)
                for module in modules:
                    x = module(x)
                continue

            def fused(t: torch.Tensor, backend: str, run=run) -> torch.Tensor:
                for step in run.steps:
                    t = _step_forward(self, step, t, backend)
                return t

            x = _planned(self._modules[run.names[0]], modules, x, fused)
        return x


def _stale(seq: nn.Module) -> bool:
    """Whether a converted Sequential's runs no longer name modules of the classes they covered (children inserted
    or replaced by others), or it has none (a slice). Classes, not identities: a copy (deepcopy, an EMA model,
    DataParallel's replicas) has new children of the same classes, and stays fused."""
    runs = seq.__dict__.get("_lgd_runs")
    return runs is None or not all(tuple(type(seq._modules.get(n)) for n in run.names) == run.types for run in runs)


_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(cls: type, mixin: type) -> type:
    if (cls, mixin) not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls, mixin] = type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls, mixin]


def _convert_sequential(name: str, seq: nn.Sequential, report: ConversionReport, claimed: set[int], options) -> None:
    prefix = f"{name}." if name else ""
    cls = type(seq).__bases__[1] if isinstance(seq, _FusedSequentialMixin) else type(seq)  # (converted again)
    if cls.forward is not nn.Sequential.forward:  # its own forward decides what its children compute
        for child, module in seq._modules.items():
            if isinstance(module, nn.Conv3d):
                report.left.append((prefix + child, f"in {type(seq).__name__}, whose forward is its own (not "
                                                    "nn.Sequential's), left as it is"))  # fmt: skip
                claimed.add(id(module))
        return
    runs, refused = _find_runs(list(seq._modules.items()))
    for child, reason in refused:
        report.left.append((prefix + child, reason))
        claimed.add(id(seq._modules[child]))
    if not runs:
        if cls is not type(seq):  # converted once, nothing to fuse now: its own class again
            seq.__class__ = cls
            seq.__dict__.pop("_lgd_runs", None)
        return
    seq.__class__ = _fused_class(cls, _FusedSequentialMixin)
    seq._lgd_runs = runs
    seq.__dict__.pop("_lgd_said_changed", None)
    for run in runs:
        description = _describe_steps(seq, run.steps)
        planning.attach(seq._modules[run.names[0]], "conv_run", description, backend=options[0], mode=options[1])
        report.converted.append((name, description))
        claimed |= {id(seq.get_submodule(step.conv)) for step in run.steps}


# ---- modules whose forward is a chain of named convs, norms and activations (pytorchvideo) ---------------------
#
# Recognised by their attributes, as pytorchvideo writes them (every forward runs its modules in this order,
# skipping those that are None):
# (by class name and attributes)
#   Conv2plus1d       conv_t -> norm -> activation -> conv_xy   (conv_xy first with conv_xy_first; which of the
#                                                                 two is spatial is read from the kernels)
#   ResNetBasicStem   conv -> norm -> activation -> pool        (conv: a Conv3d or a Conv2plus1d, as X3D's)
#   BottleneckBlock   conv_a -> norm_a -> act_a -> conv_b -> norm_b -> act_b -> conv_c -> norm_c
# A norm slot holds a BatchNorm3d, or an nn.Sequential that starts with one (X3D: BatchNorm3d, squeeze-excite).


def _slot(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _norm_step(owner: nn.Module, conv: str, norm: str | None, act: str | None) -> tuple[_Step | None, str | None]:
    """The step for ``conv`` with the norm slot ``norm`` and activation ``act`` (paths; a path that is None, or
    whose attribute is None, is absent), or (None, why not)."""
    conv_ = _slot(owner, conv)
    if (reason := fusable_reason(conv_)) is not None:
        return None, f"{conv}: {reason}"
    norm_ = None if norm is None else _slot(owner, norm)
    act = act if act is not None and _slot(owner, act) is not None else None
    silu = act is not None and computes_silu(_slot(owner, act))
    if norm_ is None:
        return _Step(conv, None, (), act, silu), None
    if type(norm_) is nn.BatchNorm3d:
        return _Step(conv, norm, (), act, silu), None
    if isinstance(norm_, nn.Sequential) and len(norm_) and type(norm_[0]) is nn.BatchNorm3d:
        rest = tuple(f"{norm}.{child}" for child in list(norm_._modules)[1:])
        excite = None
        if silu and len(rest) == 1 and (convs := squeeze_excite_convs(owner.get_submodule(rest[0]),
                                                                       conv_.out_channels)):  # fmt: skip
            excite = (f"{rest[0]}.{convs[0]}", f"{rest[0]}.{convs[1]}")
        return _Step(conv, f"{norm}.{next(iter(norm_._modules))}", rest, act, silu, excite), None
    return None, f"{norm}: {norm_reason(norm_)}"


def _conv2plus1d_steps(owner: nn.Module, prefix: str = "") -> list[_Step] | str:
    module = owner.get_submodule(prefix.rstrip(".")) if prefix else owner
    order = ("conv_xy", "conv_t") if getattr(module, "conv_xy_first", False) else ("conv_t", "conv_xy")
    first, why = _norm_step(owner, prefix + order[0], prefix + "norm", prefix + "activation")
    if first is None:
        return why
    second, why = _norm_step(owner, prefix + order[1], None, None)
    return why if second is None else [first, second]


def _chain_steps(module: nn.Module) -> tuple[str, list[_Step | str]] | None:
    """(what the module is, its links: steps and plain module paths in forward order, or a reason string as the
    only link) for a module whose forward convert knows; None for any other."""
    name = type(module).__name__.removeprefix("Fused")
    has = lambda *names: all(hasattr(module, n) for n in names)  # noqa: E731
    pair = has("conv_t", "norm", "activation", "conv_xy") and {_kind(module.conv_t), _kind(module.conv_xy)}
    if name == "Conv2plus1d" and pair == {"spatial", "temporal"}:
        steps = _conv2plus1d_steps(module)
        return "(2+1)D module", [steps] if isinstance(steps, str) else steps
    if name == "ResNetBasicStem" and has("conv", "norm", "activation", "pool"):
        links: list[_Step | str] = []
        if isinstance(module.conv, nn.Conv3d):
            step, why = _norm_step(module, "conv", "norm", "activation")
            if step is None:
                return "stem", [why]
            links.append(step)
        elif (inner_chain := _chain_steps(module.conv)) is not None and inner_chain[0] == "(2+1)D module":
            inner = _conv2plus1d_steps(module, "conv.")
            if isinstance(inner, str):
                return "stem", [inner]
            last, why = _norm_step(module, inner[-1].conv, "norm", "activation")
            if last is None:
                return "stem", [why]
            links += [*inner[:-1], last]
        else:
            return None
        if module.pool is not None:
            links.append("pool")
        return "stem", links
    if name == "BottleneckBlock" and has("conv_a", "norm_a", "act_a", "conv_b", "norm_b", "act_b", "conv_c", "norm_c"):
        links = []
        for c in "abc":
            step, why = _norm_step(module, f"conv_{c}", f"norm_{c}", f"act_{c}" if c != "c" else None)
            if step is None:
                return "bottleneck block", [why]
            links.append(step)
        return "bottleneck block", links
    return None


def _run_links(owner: nn.Module, links: list[_Step | str], x: torch.Tensor, backend: str, **last) -> torch.Tensor:
    for i, link in enumerate(links):
        if isinstance(link, str):
            x = owner.get_submodule(link)(x)
        else:
            x = _step_forward(owner, link, x, backend, **(last if i == len(links) - 1 else {}))
    return x


def _original_forward(module: nn.Module, mixin: type, x: torch.Tensor) -> torch.Tensor:
    """The forward of the class ``module`` had before it was converted."""
    return super(mixin, module).forward(x)


class _FusedChainMixin:
    """forward of a converted chain module (pytorchvideo's Conv2plus1d, ResNetBasicStem, BottleneckBlock): its
    links with every conv a conv_bn call, or (as its plan chooses) its own forward."""

    _lgd_links: list[_Step | str]

    def _lgd_fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return _run_links(self, self._lgd_links, x, backend)

    def forward(self, x):
        return _planned_own(self, _FusedChainMixin, x, self._lgd_fused)


PROBE_SHAPE = (2, 4, 16, 16)  # N, T, H, W of the input a recognised block is probed on


def _fuse_if_equal(module: nn.Module, mixin: type, in_channels: int | None, backend: str, **attrs) -> str | None:
    """Converts ``module`` with ``mixin`` (its class, ``attrs`` and the modules it watches for hooks) and keeps the
    conversion if :func:`_probe_reason` finds the fused path equal to its own forward (None); otherwise puts the
    module back as it was and returns the reason. ``in_channels`` None: nothing to probe."""
    cls = type(module)
    module.__class__ = _fused_class(cls, mixin)
    attrs["_lgd_watched"] = _watched(module)
    module.__dict__.update(attrs)
    why = None if in_channels is None else _probe_reason(module, mixin, in_channels, backend)
    if why is not None:
        module.__class__ = cls
        for attr in attrs:
            del module.__dict__[attr]
    return why


def _probe_reason(module: nn.Module, mixin: type, in_channels: int, backend: str) -> str | None:
    """None if ``module``'s fused path (converted with ``mixin``) computes what its own forward computes, else why
    not. Blocks are recognised by class name and attributes, so a forward that does more than the pattern (a
    scaled branch, stochastic depth, an extra term) must be caught before it is replaced: both run on a random
    (N, C, T, H, W) probe (:data:`PROBE_SHAPE`), in eval and in training, and must agree to rounding. They run on a
    copy whose hooks are removed (a user's hooks see no probe) and whose parameters and buffers are drawn afresh
    from one seed (a term that vanishes at the current weights, as a zero-initialised last BatchNorm's branch,
    or weights not loaded yet, would hide a difference); both runs start from one seed. A block that cannot be
    copied or run so is left, with the reason."""
    import copy

    param = next(module.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
    n, t, h, w = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_channels, t, h, w, generator=gen).to(device, dtype)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    request = planning.op_backend(backend, CONV_BACKENDS)
    try:
        probe = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 (e.g. weight_norm's computed weight, which deepcopy refuses)
        return f"it could not be copied to be probed ({type(exc).__name__}: {exc})"
    _redraw(probe, gen)
    for training in (False, True):
        probe.train(training)
        outs = []
        for run in (lambda t: _original_forward(probe, mixin, t), lambda t: probe._lgd_fused(t, request)):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(0)
                try:
                    outs.append(run(x.clone()))
                except Exception as exc:  # noqa: BLE001 (whatever fails, the block is not the pattern)
                    return f"its forward could not be probed ({type(exc).__name__}: {exc})"
        want, got = outs
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape):
            return "its forward returns something else than the pattern's tensor"
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        if not err <= tol:
            return (f"its forward computes something else than the pattern (on a probe in "
                    f"{'training' if training else 'eval'}: relative difference {err:.2g})")  # fmt: skip
    return None


def _redraw(module: nn.Module, gen: torch.Generator) -> None:
    """``module`` (a probe's copy) without hooks and with every floating parameter and buffer drawn afresh: weights
    at He scale, BatchNorm scales and running variances in [0.5, 1.5), other vectors and scalars normal."""
    with torch.no_grad():
        for sub in module.modules():
            for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks, sub._backward_pre_hooks):
                hooks.clear()
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("running_var", "weight") and t.dim() == 1:  # a norm's variance and scale
                fresh = 0.5 + torch.rand(t.shape, generator=gen)
            elif t.dim() > 1:
                fresh = torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5
            else:
                fresh = torch.randn(t.shape, generator=gen)
            t.copy_(fresh.to(t.dtype))


def _planned_own(module: nn.Module, mixin: type, x: torch.Tensor, fused) -> torch.Tensor:
    """``fused(x, backend)`` or the module's original forward, as its plan chooses (the original where a hook
    would be skipped: :func:`_hooked`)."""
    if _hooked(module.__dict__.get("_lgd_watched") or _watched(module)):
        return _original_forward(module, mixin, x)

    def run(choice: planning.Choice, t: torch.Tensor) -> torch.Tensor:
        t = choice.to(t)
        return fused(t, choice.request) if choice.fused else _original_forward(module, mixin, t)

    choice = planning.decide(module, x, run, group=(module,))
    return run(choice, x)


def _convert_chain(name: str, module: nn.Module, report: ConversionReport, claimed: set[int], options) -> bool:
    found = _chain_steps(module)
    if found is None:
        return False
    what, links = found
    steps = [link for link in links if isinstance(link, _Step)]
    if any(id(module.get_submodule(s.conv)) in claimed for s in steps):  # inside a chain converted already
        return True
    claimed |= {id(module.get_submodule(s.conv)) for s in steps}
    if len(links) == 1 and isinstance(links[0], str):
        report.left.append((name, f"{what}: {links[0]}"))
        claimed |= {id(m) for m in module.modules() if isinstance(m, nn.Conv3d)}
        return True
    cls = type(module)
    in_channels = module.get_submodule(steps[0].conv).in_channels if steps else None  # (steps in forward order)
    why = _fuse_if_equal(module, _FusedChainMixin, in_channels, options[0], _lgd_links=links)
    if why is not None:
        report.left.append((name, f"{what} {cls.__name__}, left as it is: {why}"))
        return True
    description = f"{what} {type(module).__name__}: " + _describe_steps(module, steps)
    planning.attach(module, "conv_run", description, backend=options[0], mode=options[1])
    report.converted.append((name, description))
    return True


# ---- residual blocks: the last conv's BatchNorm, the shortcut addition and the ReLU in one epilogue ------------
#
#   (by class name and attributes, 3-D convs only)
#   torchvision's BasicBlock / Bottleneck: conv1, conv2 (, conv3): Sequentials, the last exactly (Conv3d,
#       BatchNorm3d); downsample (or None); relu. forward: relu(convs(x) + (downsample or identity)(x)).
#   pytorchvideo's ResBlock: branch1_conv / branch1_norm (or None), branch2 (a BottleneckBlock), activation
#       (ReLU or None), branch_fusion (checked to be the sum). forward: activation(fusion(shortcut(x), branch2(x))).


def _is_sum(fusion) -> bool:
    """Whether ``fusion(a, b)`` is ``a + b`` (checked on a random pair; pytorchvideo's default, or a lambda)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    try:
        got = fusion(a.clone(), b.clone())
    except Exception:  # noqa: BLE001 (any failure means: not a plain sum)
        return False
    return isinstance(got, torch.Tensor) and got.shape == a.shape and torch.equal(got, a + b)


def _residual_kind(module: nn.Module) -> str | None:
    name = type(module).__name__.removeprefix("Fused")
    if not any(isinstance(m, nn.Conv3d) for m in module.modules()):  # a 2-D network's blocks
        return None
    torchvision = ("conv1", "conv2", "relu", "downsample")
    if name in ("BasicBlock", "Bottleneck") and all(hasattr(module, a) for a in torchvision):
        return "torchvision"
    pytorchvideo = ("branch1_conv", "branch1_norm", "branch2", "activation", "branch_fusion")
    if name == "ResBlock" and all(hasattr(module, a) for a in pytorchvideo):
        return "pytorchvideo"
    return None


def _residual_reason(module: nn.Module, kind: str) -> str | None:
    if kind == "torchvision":
        last = module.conv3 if hasattr(module, "conv3") else module.conv2
        if not (isinstance(last, nn.Sequential) and len(last) == 2 and isinstance(last[0], nn.Conv3d)
                and type(last[1]) is nn.BatchNorm3d):  # fmt: skip
            return "its last conv is not an nn.Sequential of exactly (Conv3d, BatchNorm3d)"
        if fusable_reason(last[0]) is not None:
            return fusable_reason(last[0])
        return None if _is_relu(module.relu) else f"its relu is {type(module.relu).__name__}, not ReLU"
    branch = _chain_steps(module.branch2)
    if branch is None or branch[0] != "bottleneck block" or isinstance(branch[1][-1], str):
        return "its branch2 is not a bottleneck block convert fuses"
    if branch[1][-1].after or branch[1][-1].act is not None:
        return "its branch2 does not end in conv -> BatchNorm3d"
    if module.activation is not None and not _is_relu(module.activation):
        return f"its activation is {type(module.activation).__name__}, not ReLU"
    if not _is_sum(module.branch_fusion):
        return "its branch_fusion is not the sum"
    if module.branch1_conv is not None:
        _, why = _norm_step(module, "branch1_conv", "branch1_norm", None)
        return why
    return None


class _FusedResidualMixin:
    """forward of a converted residual block: the shortcut, the residual branch, and its last conv with the
    BatchNorm, the addition and the ReLU as one conv_bn call."""

    _lgd_residual: str

    def _lgd_fused(self, t: torch.Tensor, backend: str) -> torch.Tensor:
        if self._lgd_residual == "torchvision":
            shortcut = t if self.downsample is None else self.downsample(t)
            convs = [self.conv1, self.conv2] + ([self.conv3] if hasattr(self, "conv3") else [])
            for container in convs[:-1]:
                t = container(t)
            out = conv_bn(t, convs[-1][0], convs[-1][1], shortcut=shortcut, relu=True, backend=backend)
            return out.to(t.dtype)  # torchvision adds in place (out += residual): the branch's dtype
        if self.branch1_conv is None:
            shortcut = t
        else:
            norm = "branch1_norm" if self.branch1_norm is not None else None
            shortcut = _step_forward(self, _Step("branch1_conv", norm), t, backend)
        links = self._lgd_branch_links
        y = _run_links(self.branch2, links[:-1], t, backend)
        relu = self.activation is not None
        last = links[-1]
        norm = last.norm and self.branch2.get_submodule(last.norm)
        return conv_bn(y, self.branch2.get_submodule(last.conv), norm, shortcut=shortcut, relu=relu,
                       backend=backend)  # fmt: skip

    def forward(self, x):
        return _planned_own(self, _FusedResidualMixin, x, self._lgd_fused)


def _convert_residual(name: str, module: nn.Module, report: ConversionReport, claimed: set[int], options) -> None:
    kind = _residual_kind(module)
    if kind is None:
        return
    reason = _residual_reason(module, kind)
    if reason is not None:
        report.left.append((name, f"residual block {type(module).__name__}, its end left unfused: {reason}"))
        return
    cls = type(module)
    links = {"_lgd_branch_links": _chain_steps(module.branch2)[1]} if kind == "pytorchvideo" else {}
    first = (next(m for m in module.conv1.modules() if isinstance(m, nn.Conv3d)) if kind == "torchvision"
             else module.branch2.conv_a)  # fmt: skip
    why = _fuse_if_equal(module, _FusedResidualMixin, first.in_channels, options[0], _lgd_residual=kind, **links)
    if why is not None:
        report.left.append((name, f"residual block {cls.__name__}, its end left unfused: {why}"))
        return
    if kind == "pytorchvideo" and module.branch1_conv is not None:
        claimed.add(id(module.branch1_conv))
    last = ("conv3" if hasattr(module, "conv3") else "conv2") if kind == "torchvision" else "branch2.conv_c"
    description = (f"residual block {type(module).__name__}: {last}'s BatchNorm, the shortcut addition and the "
                   "ReLU fused into its conv")  # fmt: skip
    if kind == "pytorchvideo" and module.branch1_conv is not None:
        norm = "branch1_norm" if module.branch1_norm is not None else None
        description += "; the shortcut " + _describe_steps(module, [_Step("branch1_conv", norm)])
    planning.attach(module, "conv_run", description, backend=options[0], mode=options[1])
    report.converted.append((name, description))
