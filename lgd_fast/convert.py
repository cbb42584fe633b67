"""``lgd_fast.convert``: make an existing video model faster in place, keeping every state_dict key.

What it converts:

- an LGD-3D reference model: into the fast LGD-3D (:func:`lgd_fast.models.to_fast`: every P3D unit and every
  block end fused);
- P3D blocks (``P3DBottleneck``, ``P3DBasicBlock``) inside any other model: their units fused
  (:func:`lgd_fast.models.p3d.to_fast_unit`);
- the (2+1)D pattern of other codebases: a ``Conv3d`` with a 1xkxk kernel and one with a kx1x1 kernel, either
  order, optionally with ``BatchNorm3d`` and ``ReLU`` between (and after the second): inside an
  ``nn.Sequential`` (torchvision's ``Conv2Plus1D`` and ``R2Plus1dStem``, or any Sequential holding such a run),
  or a module with ``conv_t`` / ``norm`` / ``activation`` / ``conv_xy`` attributes (pytorchvideo's
  ``Conv2plus1d``, either ``conv_xy_first``). Each conv runs as :func:`lgd_fast.ops.conv_bn` with its bias and
  the BatchNorm and ReLU after it in its epilogue (folded in eval; from the conv's statistics in training).

Conversion changes classes only (a container becomes a subclass of its own class with another ``forward``),
never modules, parameters or buffers: the state_dict is the same, key for key, and the converted model
computes the same function. Every converted layer gets an execution plan (:mod:`lgd_fast.plan`: fused or its
own modules, chosen by measurement on first use per input shape, or by the documented default);
``model.execution_plan`` prints it. Converting an already converted model keeps what was converted (the
report says so) and plans what is new.

Every ``Conv3d`` that stays as it was is reported with the reason (another kernel shape, a temporal stride,
groups, another norm, no partner conv: :func:`lgd_fast.ops.conv_bn.fusable_reason`, the one rule).
``inference=True`` also puts the model in eval mode (every BatchNorm folded into its conv, folded weights
cached) and moves it to channels_last_3d.

Save converted models with ``state_dict()`` (the converted classes are made at run time and do not pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from . import plan as planning
from .models.blocks import P3DBasicBlock, P3DBottleneck
from .models.fast import FastLGD3D, to_fast
from .models.networks import LGD2D, LGD3D
from .models.p3d import FastP3DBasicBlock, FastP3DBottleneck, check_fusable, to_fast_unit
from .ops.conv_bn import conv_bn, fusable_reason, norm_reason

__all__ = ["ConversionReport", "convert"]

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` and ``left`` are (module name, description or reason) pairs."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}:"]
        lines += [f"  {name or '(model)'}: {what}" for name, what in self.converted]
        lines.append(f"left as they were {len(self.left)}:")
        lines += [f"  {name or '(model)'}: {why}" for name, why in self.left]
        return "\n".join(lines)


def convert(
    model: nn.Module, *, inference: bool = False, backend: str | None = None, plan: str | None = None
) -> nn.Module:
    """Fuse ``model``'s LGD blocks, P3D units and (2+1)D conv pairs in place; returns ``model``.

    ``backend`` and ``plan`` are the execution plan's (:mod:`lgd_fast.plan`: the conv backend, else
    ``$LGD_FAST_BACKEND``, else auto; ``"measure"`` or ``"default"``, else ``$LGD_FAST_PLAN``, else measure).
    The report (:class:`ConversionReport`) is logged and kept as ``model.conversion_report``; the plan is
    ``model.execution_plan``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    options = planning.resolve_options(backend, plan)
    earlier = getattr(model, "conversion_report", None)
    report = ConversionReport()
    claimed: set[int] = set()  # Conv3d modules that a conversion covers
    if isinstance(model, FastLGD3D):
        report.left.append(("", "already the fast LGD-3D"))
        claimed |= {id(m) for m in model.modules()}
    elif isinstance(model, LGD3D):
        to_fast(model, backend=options[0], plan=options[1])
        report.converted.append(("", "LGD-3D -> FastLGD3D: every P3D unit and every block end fused"))
        claimed |= {id(m) for m in model.modules()}
    elif isinstance(model, LGD2D):
        report.left.append(("", "LGD-2D has no fused path yet (its convs are 2-D)"))
    else:
        _convert_p3d_blocks(model, report, claimed, options)
    for name, module in list(model.named_modules()):
        if id(module) in claimed:
            continue
        if isinstance(module, _FusedSequentialMixin | _FusedAttributePairMixin):
            report.left.append((name, "already converted (its plan is kept)"))
            claimed |= {id(m) for m in module.modules()}
        elif isinstance(module, nn.Sequential):
            _convert_sequential(name, module, report, claimed, options)
        elif _is_conv2plus1d_module(module):
            _convert_attribute_pair(name, module, report, claimed, options)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv3d) and id(module) not in claimed:
            report.left.append((name, _why_left(module)))
    if inference:
        model.eval()
        model.to(memory_format=torch.channels_last_3d)
    if isinstance(earlier, ConversionReport):  # a second call: what the first converted stays in the report
        mark = " (by an earlier convert call)"
        report.converted[:0] = [(n, what if what.endswith(mark) else what + mark) for n, what in earlier.converted]
    object.__setattr__(model, "conversion_report", report)
    if not isinstance(model, FastLGD3D):  # FastLGD3D has the property
        object.__setattr__(model, "execution_plan", planning.ExecutionPlan(model))
    logger.info("lgd_fast.convert:\n%s", report)
    return model


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


# ---- the (2+1)D pattern ------------------------------------------------------------------------------------


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
    if _kind(conv_) is None:
        return f"kernel {tuple(conv_.kernel_size)} is neither 1xkxk nor kx1x1"
    reason = fusable_reason(conv_)
    if reason is not None:
        return reason
    return f"a {_kind(conv_)} conv without a partner of the other kind right after it (through BatchNorm3d/ReLU)"


@dataclass
class _Run:
    """A (2+1)D run inside a container: child names of each conv, its BatchNorm and its ReLU (None if absent)."""

    first: str
    first_norm: str | None
    first_relu: str | None
    second: str
    second_norm: str | None
    second_relu: str | None
    fuse_second: bool
    names: list[str]


def _norm_and_relu(children: list[tuple[str, nn.Module]], j: int) -> tuple[str | None, str | None, int]:
    """The names of a BatchNorm3d at ``j`` and a ReLU after it (None where absent), and the index past them."""
    norm = relu = None
    if j < len(children) and type(children[j][1]) is nn.BatchNorm3d:
        norm, j = children[j][0], j + 1
    if j < len(children) and isinstance(children[j][1], nn.ReLU):
        relu, j = children[j][0], j + 1
    return norm, relu, j


def _find_runs(children: list[tuple[str, nn.Module]]) -> tuple[list[_Run], list[tuple[str, str]]]:
    """The (2+1)D runs among a Sequential's children, and (name, reason) for pairs that could not be fused."""
    runs, refused = [], []
    i = 0
    while i < len(children):
        name, first = children[i]
        kind = _kind(first)
        if kind is None:
            i += 1
            continue
        first_norm, first_relu, j = _norm_and_relu(children, i + 1)
        if j >= len(children) or _kind(children[j][1]) not in ({"spatial", "temporal"} - {kind}):
            i += 1
            continue
        second_name, second = children[j]
        reason = fusable_reason(first)
        if reason is not None:
            refused.append((name, reason))
            i += 1
            continue
        second_norm, second_relu, k = _norm_and_relu(children, j + 1)
        second_reason = fusable_reason(second)
        if second_reason is not None:  # the second conv (and what follows it) stays as it is
            k = j + 1
            second_norm = second_relu = None
        names = [n for n, _ in children[i:k]]
        runs.append(_Run(name, first_norm, first_relu, second_name, second_norm, second_relu,
                         second_reason is None, names))  # fmt: skip
        if second_reason is not None:
            refused.append((second_name, second_reason))
        i = k
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


def _run_forward(container: nn.Module, run: _Run, x: torch.Tensor) -> torch.Tensor:
    get = container._modules.__getitem__
    modules = [get(n) for n in run.names]

    def fused(x: torch.Tensor, backend: str) -> torch.Tensor:
        first_norm = run.first_norm and get(run.first_norm)
        x = conv_bn(x, get(run.first), first_norm, relu=run.first_relu is not None, backend=backend)
        if not run.fuse_second:
            return get(run.second)(x)
        second_norm = run.second_norm and get(run.second_norm)
        return conv_bn(x, get(run.second), second_norm, relu=run.second_relu is not None, backend=backend)

    return _planned(get(run.first), modules, x, fused)


class _FusedSequentialMixin:
    """forward of a converted Sequential: its children in order, each (2+1)D run as fused convs."""

    _lgd_runs: list[_Run]

    def forward(self, x):
        starts = {run.names[0]: run for run in self._lgd_runs}
        skip: set[str] = set()
        for name, module in self._modules.items():
            if name in skip:
                continue
            run = starts.get(name)
            if run is None:
                x = module(x)
            else:
                x = _run_forward(self, run, x)
                skip.update(run.names)
        return x


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type, mixin: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def _describe(run: _Run, container: nn.Module) -> str:
    def part(name: str) -> str:
        module = container._modules[name]
        if isinstance(module, nn.Conv3d):
            left = "" if run.fuse_second or name != run.second else ", left unfused"
            return f"{name} ({_kind(module)} {'x'.join(map(str, module.kernel_size))}{left})"
        return f"{name} ({type(module).__name__})"

    return "(2+1)D run " + " -> ".join(part(n) for n in run.names)


def _convert_sequential(name: str, seq: nn.Sequential, report: ConversionReport, claimed: set[int], options) -> None:
    runs, refused = _find_runs(list(seq._modules.items()))
    prefix = f"{name}." if name else ""
    for child, reason in refused:
        report.left.append((prefix + child, reason))
        claimed.add(id(seq._modules[child]))
    if not runs:
        return
    seq.__class__ = _fused_class(type(seq), _FusedSequentialMixin)
    seq._lgd_runs = runs
    for run in runs:
        description = _describe(run, seq)
        planning.attach(seq._modules[run.first], "conv_run", description, backend=options[0], mode=options[1])
        report.converted.append((name, description))
        claimed |= {id(seq._modules[n]) for n in (run.first, run.second) if run.fuse_second or n == run.first}


# ---- modules with conv_t / norm / activation / conv_xy (pytorchvideo's Conv2plus1d) --------------------------


def _is_conv2plus1d_module(module: nn.Module) -> bool:
    return _kind(getattr(module, "conv_t", None)) == "temporal" and _kind(getattr(module, "conv_xy", None)) == "spatial"


class _FusedAttributePairMixin:
    """forward of a converted conv_t / norm / activation / conv_xy module, in its own order."""

    def forward(self, x):
        first, second = (self.conv_xy, self.conv_t) if getattr(self, "conv_xy_first", False) else (
            self.conv_t, self.conv_xy)  # fmt: skip
        norm = getattr(self, "norm", None)
        activation = getattr(self, "activation", None)
        modules = [m for m in (first, norm, activation, second) if m is not None]

        def fused(x: torch.Tensor, backend: str) -> torch.Tensor:
            x = conv_bn(x, first, norm, relu=activation is not None, backend=backend)
            return conv_bn(x, second, backend=backend)

        return _planned(self, modules, x, fused)


def _convert_attribute_pair(
    name: str, module: nn.Module, report: ConversionReport, claimed: set[int], options
) -> None:
    norm, activation = getattr(module, "norm", None), getattr(module, "activation", None)
    reasons = [r for r in (fusable_reason(module.conv_t), fusable_reason(module.conv_xy)) if r]
    if norm is not None and norm_reason(norm) is not None:
        reasons.append(f"its norm is {type(norm).__name__}, not BatchNorm3d")
    if activation is not None and not isinstance(activation, nn.ReLU):
        reasons.append(f"its activation is {type(activation).__name__}, not ReLU")
    claimed |= {id(module.conv_t), id(module.conv_xy)}
    if reasons:
        report.left.append((name, "; ".join(reasons)))
        return
    module.__class__ = _fused_class(type(module), _FusedAttributePairMixin)
    order = "conv_xy -> conv_t" if getattr(module, "conv_xy_first", False) else "conv_t -> conv_xy"
    description = f"(2+1)D module {order} with its norm and activation fused"
    planning.attach(module, "conv_run", description, backend=options[0], mode=options[1])
    report.converted.append((name, description))
