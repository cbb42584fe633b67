"""Recorded inference: a fast model's eager CPU inference as one straight-line program of the op calls it makes.

A fast model's eager forward runs Python per layer: the plan's choice, the conv + BatchNorm home's checks, the fold
and packing caches, layout tests, the arena scope. None of it changes from call to call for the same input shape
and the same weights, only the op calls do. So, per input key (shape, strides, dtype, autocast, inference mode), the
fast model records its forward once (its second call for that key, after the first has planned and filled the
caches), as the ATen and custom-op calls a ``TorchDispatchMode`` sees, and from then on runs that program: one
generated Python function of those calls, in order, with every intermediate deleted after its last use (so the
activation arena reuses its memory as eagerly). In the program:

- the input and every value an op computes from it are variables;
- everything else (folded and packed weights, parameters, buffers, shapes) is a constant, computed once while
  recording (an op none of whose tensors come from the input is run then and its result kept: the BatchNorm affine
  of a block end, a weight cast under autocast);
- an op that makes a tensor from nothing (``empty``, ``zeros``) is called every time, so no two calls share memory;
  so is one that draws random numbers.

A program is used only while the model is as it was when recorded (:func:`module_state`): the same modules, the
same parameter and buffer objects at the same versions and memory (an in-place update, ``load_state_dict``, an
optimizer step all change a version), the same ``training`` flags, plans and hooks. Otherwise the call runs eagerly
and the next one records again. Some forwards
cannot be recorded, and then run eagerly with the reason logged once:

- an op's result read in Python (``.item()``, a comparison used in an ``if``): the path could differ for another
  input;
- an op writing into a constant (the recorded program would change it on every call);
- a shape that depends on the input's values (``nonzero``, a boolean mask), which Python may read with no op;
- an op returning a nested structure;
- an output that does not come from the input;
- forward hooks on a submodule, or global ones (Python the program would not call; a pure hook, one in
  :data:`PURE_FORWARD_HOOKS` such as :func:`lgd_fast.convert`'s layout hook, is recorded with the rest);
- parameters that are inference tensors (made under ``torch.inference_mode``), whose changes cannot be seen.

Where it applies: eager (not traced by torch.compile), no autograd (``torch.no_grad`` / ``inference_mode``), the
model in eval, CPU input, the model's ``recorded_inference`` True (the default) and ``LGD_FAST_RECORD`` not 0, no
forced plan (:func:`lgd_fast.plan.forced`). Under torch.compile (not for freezing, autocast off), a fast LGD model's
CPU inference is traced as one op, ``lgd_fast::recorded_inference``, whose calls run this program eagerly
(:func:`traced_as_one_op`, at the end of this module).

Measured on LGD-3D R50 (fp32, 16x112x112, 2 cores): see the README's *Recorded inference*.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from . import plan as planning
from .arena import backward_in_arena, use_arena
from .ops._backend import extension_available
from .ops._common import traced_for_freezing

__all__ = [
    "ENV",
    "NotRecordable",
    "RecordedInference",
    "RecordedProgram",
    "forget_programs",
    "module_state",
    "record",
    "recorded_call",
    "recorded_programs",
    "register_for_compile",
    "traced_as_one_op",
]

log = logging.getLogger(__name__)

ENV = "LGD_FAST_RECORD"  # "0": fast models run every call eagerly
MAX_PROGRAMS = 8  # per model: the most recently used input keys keep theirs
_STAMPS = itertools.count(1)


class NotRecordable(RuntimeError):
    """The forward cannot run as a recorded program; the message says why. ``output``: what the recording call
    returned (it ran to its end)."""

    def __init__(self, reason: str, output: Any = None) -> None:
        super().__init__(reason)
        self.output = output


# ---- recording -------------------------------------------------------------------------------------------------


@dataclass
class _Step:
    op: Callable[..., Any]
    args: list  # templates: ("var", i) | ("const", value) | ("seq", type, [templates])
    kwargs: dict[str, Any]
    outs: list[int | None]  # variable per output leaf (None: a None leaf)
    single: bool  # the op returns one tensor (not a tuple or list)


class _Recorder(TorchDispatchMode):
    """Runs every op as usual and writes down those that read a variable (the input or what was computed from it),
    and those that make a tensor from nothing; stops writing (``refused``) at the first thing a program cannot do."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.var = WeakIdKeyDictionary()  # tensor -> variable number (weak: a dead tensor's id may be reused)
        for i, x in enumerate(inputs):
            if x in self.var:
                raise ValueError(f"record: input {i} is input {self.var[x]} again (each input one tensor object)")
            self.var[x] = i
        self.count = len(inputs)
        self.steps: list[_Step] = []
        self.refused: str | None = None

    def _template(self, a: Any) -> tuple:
        if isinstance(a, torch.Tensor):
            i = self.var.get(a)
            return ("var", i) if i is not None else ("const", a)
        if isinstance(a, list | tuple) and any(isinstance(b, torch.Tensor) for b in a):
            return ("seq", type(a), [self._template(b) for b in a])
        return ("const", a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused is not None:
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        reads_var = any(a in self.var for a in inputs)
        leaves, _ = tree_flatten(out)
        makes_tensor = any(isinstance(o, torch.Tensor) for o in leaves)
        tags = getattr(func, "tags", ())
        seeded = torch.Tag.nondeterministic_seeded in tags  # draws from the generator: again on every call
        if not reads_var and not seeded and (inputs or not makes_tensor):
            return out  # a constant: computed now, kept as a value of the program
        if reads_var and not all(o is None or isinstance(o, torch.Tensor) for o in leaves):
            self.refused = f"{func} returns a value Python reads (the path could depend on the input's values)"
            return out
        if reads_var and _data_dependent_shape(func, tags, args):
            self.refused = f"{func} gives a shape that depends on the input's values, which Python may read"
            return out
        written = _written_constants(func, args, kwargs, self.var)
        if written:
            self.refused = f"{func} writes into {written}, a constant of the program"
            return out
        single = isinstance(out, torch.Tensor)
        if not (out is None or single or (isinstance(out, tuple | list) and len(out) == len(leaves))):
            self.refused = f"{func} returns a nested structure, which a program does not unpack"
            return out
        outs = []
        for o in leaves:
            if o is None:
                outs.append(None)
                continue
            i = self.var.get(o)  # an in-place op returns its input: the same variable
            if i is None:
                i = self.var[o] = self.count
                self.count += 1
            outs.append(i)
        self.steps.append(_Step(func, [self._template(a) for a in args],
                                {k: self._template(v) for k, v in kwargs.items()}, outs, single))  # fmt: skip
        return out


def _data_dependent_shape(func, tags, args) -> bool:
    """Whether ``func``'s output shape depends on its inputs' values (``nonzero``, ``masked_select``, indexing with a
    boolean mask): Python may read it (``y.shape[0]``) without an op, so a program would keep the recorded one."""
    if torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags:
        return True
    if func in (torch.ops.aten.index.Tensor, torch.ops.aten._unsafe_index.Tensor) and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def _written_constants(func, args, kwargs, variables) -> str | None:
    """The name of an argument ``func`` writes into that is not a variable (a constant), or None."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        tensors = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(t, torch.Tensor) and t not in variables for t in tensors):
            return f"its argument {arg.name!r}"
    return None


def record(fn: Callable[..., Any], x: torch.Tensor, *more: torch.Tensor,
           inputs_out: bool = False) -> tuple[Any, RecordedProgram]:  # fmt: skip
    """Calls ``fn(x, *more)`` once, recording its op calls: (its output, the program that recomputes it for other
    inputs of the same shapes, strides and dtypes, called as ``program(x, *more)``; each input a distinct tensor).
    Raises :class:`NotRecordable` (after the call ran to its end; its output in the exception's ``output``) with
    the reason where a program cannot recompute it: among them an output that is one of the inputs, unless
    ``inputs_out`` (the program then returns that input)."""
    inputs = (x, *more)
    recorder = _Recorder(*inputs)
    with recorder:
        out = fn(*inputs)
    if recorder.refused is not None:
        raise NotRecordable(recorder.refused, out)
    leaves, spec = tree_flatten(out)
    outputs = []
    for leaf in leaves:
        if leaf is None:  # (a None output is returned as None)
            outputs.append(None)
            continue
        i = recorder.var.get(leaf) if isinstance(leaf, torch.Tensor) else None
        if i is None or (i < len(inputs) and not inputs_out):
            raise NotRecordable(f"an output ({type(leaf).__name__}) is not computed from the input", out)
        outputs.append(i)
    return out, RecordedProgram(recorder.steps, outputs, spec, len(inputs))


# ---- the program -----------------------------------------------------------------------------------------------


class RecordedProgram:
    """One recorded forward as a generated Python function of its op calls (``source`` holds its text)."""

    def __init__(self, steps: list[_Step], outputs: list[int | None], spec, num_inputs: int = 1) -> None:
        constants: list[Any] = []

        def expr(t: tuple) -> str:
            kind = t[0]
            if kind == "var":
                return f"v{t[1]}"
            if kind == "seq":
                items = ", ".join(expr(u) for u in t[2])
                return f"[{items}]" if t[1] is list else f"({items},)"
            value = t[1]
            if value is None or type(value) in (bool, int, str) or (type(value) is float and math.isfinite(value)):
                return repr(value)  # a literal reads as itself (a float's repr round-trips exactly)
            constants.append(value)
            return f"C[{len(constants) - 1}]"

        last_use: dict[int, int] = {}

        def mark(t: tuple, i: int) -> None:
            if t[0] == "var":
                last_use[t[1]] = i
            elif t[0] == "seq":
                for u in t[2]:
                    mark(u, i)

        for i, step in enumerate(steps):
            for t in (*step.args, *step.kwargs.values()):
                mark(t, i)
        for v in outputs:
            if v is not None:
                last_use[v] = len(steps)
        lines = []
        for i, step in enumerate(steps):
            call = ", ".join([expr(a) for a in step.args] + [f"{k}={expr(v)}" for k, v in step.kwargs.items()])
            names = [f"v{o}" if o is not None and o in last_use else "_" for o in step.outs]
            if not step.outs or step.outs == [None] and not step.single:  # an op returning None (in place)
                lines.append(f"    F[{i}]({call})  # {step.op}")
            else:
                target = names[0] if step.single else ", ".join(names) + ","
                lines.append(f"    {target} = F[{i}]({call})  # {step.op}")
            dead = sorted({v for v, j in last_use.items() if j == i})
            if dead:
                lines.append(f"    del {', '.join(f'v{v}' for v in dead)}")
        lines.append(f"    return [{', '.join('None' if v is None else f'v{v}' for v in outputs)}]")
        params = "".join(f"v{i}, " for i in range(num_inputs))
        self.source = f"def program({params}F, C):\n" + "\n".join(lines) + "\n"
        namespace: dict[str, Any] = {}
        exec(compile(self.source, "<lgd_fast recorded program>", "exec"), namespace)
        self._function = namespace["program"]
        self._ops = tuple(step.op for step in steps)
        # what the program calls: each OpOverload's own builtin, without OpOverload.__call__'s Python frame (which
        # only forwards to it; about 0.4 us an op call, 2% of lgd3d_tiny's batch-1 call)
        self._calls = tuple(getattr(op, "_op", op) for op in self._ops)
        self._constants = tuple(constants)
        self._spec = spec
        self.calls = 0

    @property
    def num_ops(self) -> int:
        return len(self._ops)

    def __call__(self, x: torch.Tensor, *more: torch.Tensor) -> Any:
        self.calls += 1
        # The casts autocast made are ops of the program already: it runs them as recorded.
        with torch.autocast("cpu", enabled=False):
            return tree_unflatten(self._function(x, *more, self._calls, self._constants), self._spec)

    def __repr__(self) -> str:
        return f"RecordedProgram({self.num_ops} op calls, {len(self._constants)} constants, {self.calls} calls)"


# ---- when a model's program applies --------------------------------------------------------------------------


def module_state(module: torch.nn.Module) -> tuple | None:
    """What a recorded program of ``module`` depends on besides the input: every submodule (a stamp of its own, its
    class, an instance ``forward``), its ``training`` flag, plan and hooks (their handles), its parameter and buffer
    objects, their versions and memory, and the global module hooks. None where the versions cannot be read (inference
    tensors). Not in it: other attributes of a module changed after recording (``bn.eps``, ``conv.padding``, a
    plain tensor attribute) and writes through ``.data`` (no version): after such a change call
    :func:`forget_programs`."""
    out: list[Any] = []
    add = out.append
    stack = [module]
    try:
        while stack:
            m = stack.pop()
            d = m.__dict__
            stamp = d.get("_lgd_stamp")
            if stamp is None:  # a number no other module gets (an id may be a freed module's)
                stamp = d["_lgd_stamp"] = next(_STAMPS)
            add(stamp)
            add(type(m))
            add(id(d.get("forward")))  # an instance's own forward, if one was set
            add(d["training"])
            add(id(d.get("_lgd_plan")))
            add(tuple(d["_forward_hooks"]))  # the hooks' handle ids: a hook swapped for another is a change
            add(tuple(d["_forward_pre_hooks"]))
            for tensors in (d["_parameters"], d["_buffers"]):
                for t in tensors.values():
                    if t is not None:
                        add(id(t))
                        add(t._version)
                        add(t.data_ptr())  # p.data = other: the same tensor and version, other memory
            stack.extend(c for c in d["_modules"].values() if c is not None)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    nn_module = torch.nn.modules.module
    add(tuple(nn_module._global_forward_hooks))
    add(tuple(nn_module._global_forward_pre_hooks))
    return tuple(out)


class _Programs(OrderedDict):
    """A module's programs by input key. A copy of the module (``copy.deepcopy``) or a pickle of it (``torch.save``)
    gets none: they hold generated functions, and the copy's parameters are other tensors anyway."""

    def __deepcopy__(self, memo) -> _Programs:
        return _Programs()

    def __reduce__(self):
        return (_Programs, ())


def forget_programs(module: torch.nn.Module) -> None:
    """Drops ``module``'s recorded programs, and its convs' folded weights (:func:`lgd_fast.ops.conv_bn.forget_folds`):
    its next call per input key runs eagerly, the one after records. For a change the guard does not see
    (:func:`module_state`)."""
    from .ops.conv_bn import forget_folds

    module.__dict__.pop("_lgd_recorded", None)
    forget_folds(module)


@dataclass
class _Entry:
    state: tuple
    keep: list  # :func:`_kept_alive`
    program: RecordedProgram | None = None
    refused: str | None = None


def _program_allowed(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """No autograd, CPU input, the model in eval, its ``recorded_inference`` on, ``LGD_FAST_RECORD`` not 0, no forced
    plan: where a recorded program may run, eagerly (:func:`_applies`) or as the compiled op
    (:func:`traced_as_one_op`)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and not module.training
            and getattr(module, "recorded_inference", True) and os.environ.get(ENV, "1") != "0"
            and not planning.is_forced())  # fmt: skip


def _applies(module: torch.nn.Module, x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and _program_allowed(module, x)


def _key(x: torch.Tensor) -> tuple:
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return tuple(x.shape), x.stride(), x.dtype, amp, torch.is_inference_mode_enabled()


_WARNED: set[tuple[str, str]] = set()


def recorded_call(module: torch.nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], Any]) -> Any:
    """``forward(x)``, as ``module``'s recorded program where one applies (module docstring): the first call for an
    input key runs eagerly, the second records, the later ones run the program while ``module`` is unchanged."""
    if not _applies(module, x):
        return forward(x)
    state = _state(module)
    if state is None:
        return forward(x)
    programs = module.__dict__.get("_lgd_recorded")
    if programs is None:
        programs = module.__dict__["_lgd_recorded"] = _Programs()
    key = _key(x)
    entry = programs.get(key)
    if entry is not None:
        programs.move_to_end(key)
    if entry is None or entry.state != state:  # a new key, or the module changed: eager now, record next time
        programs[key] = _Entry(state, _kept_alive(module))
        while len(programs) > MAX_PROGRAMS:
            programs.popitem(last=False)
        if _hooked_submodule(module) is not None:  # (it will not record: see below)
            return forward(x)
        with planning.recorded_next():  # the plan's measurements time what will run: programs
            return forward(x)
    if entry.program is not None:
        return entry.program(x)
    if entry.refused is not None:
        return forward(x)
    try:
        if (hooked := _hooked_submodule(module)) is not None:
            raise NotRecordable(f"{hooked} has forward hooks, which a program would not call", forward(x))
        out, program = record(forward, x)
    except NotRecordable as e:
        entry.refused = str(e)
        if (type(module).__name__, entry.refused) not in _WARNED:
            _WARNED.add((type(module).__name__, entry.refused))
            log.warning("lgd_fast: %s runs its inference eagerly (not recorded): %s", type(module).__name__, e)
        return e.output
    if _state(module) == state:  # the recording call changed nothing the program depends on
        entry.program = program
    return out


# Forward hooks that only compute from the output with torch ops (no other Python effect): a recording sees their
# ops as the program's own, so a submodule carrying one records (lgd_fast.convert's layout hook).
PURE_FORWARD_HOOKS: set[Callable[..., Any]] = set()


def impure_forward_hooks(m: torch.nn.Module) -> bool:
    """Whether ``m`` has forward pre-hooks, or forward hooks other than :data:`PURE_FORWARD_HOOKS`."""
    return bool(m._forward_pre_hooks) or bool(m._forward_hooks) and any(
        h not in PURE_FORWARD_HOOKS for h in m._forward_hooks.values())  # fmt: skip


def _hooked_submodule(module: torch.nn.Module) -> str | None:
    """The name of a submodule with forward (pre-)hooks, "a module" for global ones, or None: a hook is Python that
    runs when the module is called, and a program calls no module (the root's own hooks run around it as ever).
    A pure hook (:data:`PURE_FORWARD_HOOKS`) does not count: its ops are recorded with the rest."""
    nn_module = torch.nn.modules.module
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "every module (global hooks)"
    for name, m in module.named_modules():
        if m is not module and impure_forward_hooks(m):
            return name
    return None


def _kept_alive(module: torch.nn.Module) -> list:
    """The plans, instance forwards, parameters and buffers whose ids ``module_state`` holds, and the classes whose
    addresses its packed form (:func:`_state`) holds, so that no new object takes one of those ids while the state is
    compared (modules have stamps instead: keeping them here, in the module's own dict, would make a cycle that keeps a
    dead model's arena blocks until the garbage collector runs)."""
    kept = []
    for m in module.modules():
        kept += [m.__dict__.get("_lgd_plan"), m.__dict__.get("forward"), type(m)]
    return [*kept, *module.parameters(), *module.buffers()]


def _state(module: torch.nn.Module) -> tuple | bytes | None:
    """:func:`module_state` as the extension computes it (``lgd_fast._C.module_state``: the same values packed into
    bytes, equal exactly where the tuples are; about 10x faster, the guard every recorded call pays), where it can: the
    first call stamps the modules through :func:`module_state`; a model the extension does not read (a parameter that
    is not a tensor) keeps the tuple."""
    if not extension_available():
        return module_state(module)
    from lgd_fast import _C

    packed = _C.module_state(module)
    if packed is NotImplemented:
        state = module_state(module)  # (gives the modules their stamps)
        packed = _C.module_state(module)
        if packed is NotImplemented:
            return state
    return packed


def recorded_programs(module: torch.nn.Module) -> dict[tuple, RecordedProgram | str | None]:
    """The module's recorded programs by input key (shape, strides, dtype, autocast dtype, inference mode): the
    program, the reason it could not be recorded, or None (seen once, records on the next call)."""
    programs = module.__dict__.get("_lgd_recorded", {})
    return {k: e.program if e.program is not None else e.refused for k, e in programs.items()}


class RecordedInference(torch.nn.Module):
    """Any model (a :func:`lgd_fast.convert`-ed one, say) whose eager CPU inference runs as the fast LGD models' does:
    in the activation arena (:mod:`lgd_fast.arena`) and as recorded programs of its op calls (module docstring);
    every other call (training, autograd, CUDA, torch.compile) is ``model(x)`` as it is.

        runner = lgd_fast.RecordedInference(lgd_fast.convert(model, inference=True))
        with torch.inference_mode():
            logits = runner(clips)  # (N, 3, T, H, W): eager, then recorded, then the program

    The model is ``runner.module`` (its state_dict keys gain the ``module.`` prefix, as DDP's). Its forward takes
    the clip tensor as its one argument; ``recorded_inference`` / ``activation_arena`` on the runner turn either
    off. A model with forward hooks on its submodules (pure ones aside) runs eagerly (a program calls no module).
    A program runs with autocast off, its casts being recorded ops: a third-party custom op whose body relies on
    autocast would compute in another dtype there (lgd_fast's own ops do not).
    """

    recorded_inference: bool = True
    activation_arena: bool = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"RecordedInference wraps a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        self.train(model.training)  # in the model's mode: runner.eval() / .train() set both from then on

    def forward(self, x: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RecordedInference: the model's one input must be a tensor, got {type(x).__name__}")
        with use_arena(self, x, backward=True):
            out = recorded_call(self, x, self.module)
        return backward_in_arena(self, x, out)


# ---- under torch.compile: the recorded inference as one op -----------------------------------------------------
#
# Traced by torch.compile (no freezing), a fast model's CPU inference would become inductor's graph of its ops: no
# activation arena (every activation a fresh allocation, whose pages fault) and no recorded program, around the very
# oneDNN convs the eager model calls, which inductor cannot fuse into. Measured on LGD-3D R50 (README, *Compiled*):
# that graph was slower than the eager fast model, and than the compiled reference. So there, the model's forward is
# one op, ``lgd_fast::recorded_inference``, whose body is the eager inference (recorded program, arena): one node in
# the graph (fullgraph=True holds), the model found by ``id(model)``, which dynamo bakes into the graph (and guards,
# with the model itself). Traced for inductor's freezing, the model is traced as ever (freezing folds and packs the
# modules' weights itself), as it is with autograd, in training, under autocast, on another device, for export, and
# where the recorded program does not apply (``recorded_inference`` False, ``LGD_FAST_RECORD=0``, a forced plan).

_COMPILABLE: dict[int, Any] = {}  # id(model) -> weakref.ref(model), for the models that may run as the op


def register_for_compile(module: torch.nn.Module) -> None:
    """Let torch.compile trace ``module``'s CPU inference as ``lgd_fast::recorded_inference``
    (:func:`traced_as_one_op`); the fast models register themselves when made, converted, copied or unpickled. The
    entry goes with the model."""
    key = id(module)

    def gone(ref, key=key):
        if _COMPILABLE.get(key) is ref:
            del _COMPILABLE[key]

    _COMPILABLE[key] = weakref.ref(module, gone)


def _registered(key: int) -> torch.nn.Module:
    ref = _COMPILABLE.get(key)
    module = None if ref is None else ref()
    if module is None:
        raise RuntimeError(
            f"lgd_fast::recorded_inference: no live model with id {key} (a graph compiled for a model that is gone, "
            "or one never registered: lgd_fast.recorded.register_for_compile)"
        )
    return module


def traced_as_one_op(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether torch.compile traces ``module(x)`` as ``lgd_fast::recorded_inference`` (the comment above): dynamo
    tracing (not export, not for freezing), no autograd, CPU, eval, no CPU autocast, the recorded program allowed."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not traced_for_freezing()
            and not torch.is_autocast_enabled("cpu") and _program_allowed(module, x))  # fmt: skip


@torch.library.custom_op("lgd_fast::recorded_inference", mutates_args=())
def _recorded_inference(x: torch.Tensor, model: int) -> torch.Tensor:
    """The model's eager CPU inference (``model._eager_forward``: its recorded program in the activation arena) on x;
    checked against what the graph was traced with (``model._inference_output_like``)."""
    module = _registered(model)
    out = module._eager_forward(x)
    like = module._inference_output_like(x)
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"lgd_fast::recorded_inference: {type(module).__name__} returned {got}, the compiled graph "
                           f"expects {tuple(like.shape)} {like.dtype}")  # fmt: skip
    return out


@_recorded_inference.register_fake
def _(x: torch.Tensor, model: int) -> torch.Tensor:
    return _registered(model)._inference_output_like(x)
