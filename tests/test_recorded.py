"""Recorded inference (lgd_fast.recorded): the recorder on small functions (what it keeps as constants, what it
refuses), and the fast models' recorded programs equal to their eager forward bit for bit, on fresh inputs, with
every reused arena block poisoned, and given up as soon as the model changes."""

import copy
import importlib
import logging
import weakref

import pytest
import torch

import foreign_models
import lgd_fast
from lgd_fast import _C
from lgd_fast.models import create_model
from lgd_fast.plan import forced
from lgd_fast.recorded import (
    ENV,
    MAX_PROGRAMS,
    NotRecordable,
    RecordedInference,
    RecordedProgram,
    record,
    recorded_programs,
)

recorded_module = importlib.import_module("lgd_fast.recorded")  # the module (its warn-once set)


def _clip(arch: str, gen: torch.Generator, batch: int = 2, size: int = 32) -> torch.Tensor:
    shape = (batch, 3, 7, size, size) if arch.startswith("lgd3d") else (batch, 3, 3, 48, 48)
    return torch.randn(shape, generator=gen)


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _program(model, x: torch.Tensor | None = None) -> RecordedProgram:
    """The model's one recorded program, or the one for x's shape and strides."""
    programs = recorded_programs(model)
    if x is None:
        (program,) = programs.values()
    else:
        (program,) = (p for key, p in programs.items() if key[:2] == (tuple(x.shape), x.stride()))
    assert isinstance(program, RecordedProgram), program
    return program


# ---- the recorder ---------------------------------------------------------------------------------------------


def test_constants_are_computed_once_and_the_program_recomputes_the_rest(gen):
    w = torch.randn(5, 4, generator=gen)
    b = torch.randn(4, generator=gen)

    def fn(x):
        return torch.relu(x @ (w * 2) + b.square()), x.sum(0)  # w * 2 and b ** 2 read no input: constants

    x0 = torch.randn(3, 5, generator=gen)
    out, program = record(fn, x0)
    assert _equal(out, fn(x0))
    assert [str(op) for op in program._ops] == ["aten.mm.default", "aten.add.Tensor", "aten.relu.default",
                                                "aten.sum.dim_IntList"]  # fmt: skip
    x = torch.randn(3, 5, generator=gen)
    assert _equal(program(x), fn(x))
    assert "del v1" in program.source  # an intermediate is dropped after its last use


def test_a_tensor_made_from_nothing_is_made_on_every_call(gen):
    def fn(x):
        return torch.zeros(x.shape[0]).add_(x.sum(1))

    _, program = record(fn, torch.randn(4, 3, generator=gen))
    x = torch.randn(4, 3, generator=gen)
    first, second = program(x), program(x)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, fn(x)) and torch.equal(second, fn(x))


def test_a_value_read_in_python_is_refused_and_the_call_still_returns(gen):
    def fn(x):
        return x * 2 if x.sum() > 0 else -x

    x = torch.randn(6, generator=gen)
    with pytest.raises(NotRecordable, match="returns a value Python reads") as info:
        record(fn, x)
    assert torch.equal(info.value.output, fn(x))


def test_writing_into_a_constant_is_refused(gen):
    total = torch.zeros(3)

    def fn(x):
        total.add_(x.sum(0))
        return x + 1

    with pytest.raises(NotRecordable, match="writes into its argument 'self', a constant"):
        record(fn, torch.randn(2, 3, generator=gen))


def test_an_output_not_computed_from_the_input_is_refused(gen):
    w = torch.randn(3, generator=gen)
    with pytest.raises(NotRecordable, match="not computed from the input"):
        record(lambda x: (x + 1, w), torch.randn(3, generator=gen))
    with pytest.raises(NotRecordable, match="not computed from the input"):
        record(lambda x: x, torch.randn(3, generator=gen))


def test_several_inputs_are_variables_and_a_none_output_stays_none(gen):
    """record(fn, x, *more): every input a variable of the program (what the plan times a layer's candidates as),
    an output that is None returned as None; an input returned as it came is not computed from the inputs."""
    w = torch.randn(5, 4, generator=gen)

    def fn(x, g):
        return x @ w + g, None, g.sum(0)

    x0, g0 = torch.randn(3, 5, generator=gen), torch.randn(3, 4, generator=gen)
    out, program = record(fn, x0, g0)
    assert _equal(out, fn(x0, g0)) and out[1] is None
    x, g = torch.randn(3, 5, generator=gen), torch.randn(3, 4, generator=gen)
    got = program(x, g)
    assert got[1] is None and _equal(got, fn(x, g))  # g is a variable: not its recorded value
    assert not torch.equal(got[2], out[2])
    with pytest.raises(NotRecordable, match="not computed from the input"):
        record(lambda x, g: (x + 1, g), x0, g0)
    _, program = record(lambda x, g: (x + 1, g), x0, g0, inputs_out=True)  # (the plan's layer candidates)
    got = program(x, g)
    assert got[1] is g and torch.equal(got[0], x + 1)
    with pytest.raises(ValueError, match="input 1 is input 0 again"):
        record(lambda x, y: x + y, x0, x0)


# ---- the fast models ------------------------------------------------------------------------------------------

CASES = [
    ("lgd3d_tiny", "kernel", torch.channels_last_3d, None),
    ("lgd3d_tiny", "two_heads", torch.contiguous_format, None),
    ("lgd3d_tiny", "kernel", torch.channels_last_3d, torch.bfloat16),
    ("lgd2d_r18", "kernel", torch.channels_last_3d, None),
    ("lgd2d_r18", "two_heads", torch.contiguous_format, torch.bfloat16),
]


@pytest.mark.parametrize(("arch", "classifier", "layout", "amp"), CASES,
                         ids=[f"{a}-{c}-{str(m).split('.')[-1]}-{d or 'fp32'}" for a, c, m, d in CASES])  # fmt: skip
def test_recorded_program_equals_the_eager_forward_on_fresh_inputs(arch, classifier, layout, amp, gen):
    fast = create_model(arch, num_classes=7, classifier=classifier, fast=True).eval()
    eager = create_model(arch, num_classes=7, classifier=classifier, fast=True).eval()
    eager.load_state_dict(fast.state_dict())
    eager.recorded_inference = False
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        for _ in range(3):  # eager (plans), eager again (the plan measured: buffers restored), records
            fast(_clip(arch, gen).contiguous(memory_format=layout))
        program = _program(fast)
        for _ in range(2):
            x = _clip(arch, gen).contiguous(memory_format=layout)
            expected = eager(x)
            calls = program.calls
            _C._arena_poison()  # every arena block the program takes holds NaN until it writes it
            got = fast(x)
            assert program.calls == calls + 1
            assert _equal(got, expected)
    assert recorded_programs(eager) == {}


def _established(model, x):
    for _ in range(3):
        model(x)
    return _program(model, x)


@pytest.mark.parametrize("change", ["in-place weight", "load_state_dict", "new parameter", "running statistics",
                                    "submodule mode"])  # fmt: skip
def test_a_changed_model_runs_eagerly_and_records_again(change, gen):
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    eager = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    eager.recorded_inference = False
    x = _clip("lgd3d_tiny", gen)
    with torch.inference_mode():
        old = _established(fast, x)
    with torch.no_grad():
        conv = fast.layer2[0].conv2
        if change == "in-place weight":
            conv.weight.mul_(1.5)
        elif change == "load_state_dict":
            state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in fast.state_dict().items()}  # fmt: skip
            fast.load_state_dict(state)
        elif change == "new parameter":
            conv.weight = torch.nn.Parameter(conv.weight * 0.5)
        elif change == "running statistics":
            fast.layer3[0].bn1.running_var.mul_(3.0)
        else:
            fast.layer1[0].bn1.train()  # batch statistics in that BatchNorm from now on
    eager.load_state_dict(fast.state_dict())
    if change == "submodule mode":
        eager.layer1[0].bn1.train()
    with torch.inference_mode():
        for _ in range(3):
            y = _clip("lgd3d_tiny", gen)
            got, expected = fast(y), eager(y)
            assert old.calls == 1 and _equal(got, expected)
    if change == "submodule mode":  # a BatchNorm in training updates its buffers on every call: never recorded
        assert not any(isinstance(p, RecordedProgram) for p in recorded_programs(fast).values())
    else:
        assert _program(fast) is not old


def test_where_recording_does_not_apply(monkeypatch, gen):
    x = _clip("lgd3d_tiny", gen)
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    for _ in range(3):
        fast(x)  # autograd on
    with torch.no_grad(), forced(fused=True):
        for _ in range(3):
            fast(x)
    fast.train()
    with torch.no_grad():
        for _ in range(3):
            fast(x)
    fast.eval()
    monkeypatch.setenv(ENV, "0")
    with torch.no_grad():
        for _ in range(3):
            fast(x)
    assert recorded_programs(fast) == {}
    monkeypatch.delenv(ENV)
    with torch.inference_mode():
        inference_made = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()  # versions unreadable
        for _ in range(3):
            inference_made(x)
    assert recorded_programs(inference_made) == {}


def test_each_input_key_has_its_program_and_the_oldest_go(gen):
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    with torch.inference_mode():
        x = _clip("lgd3d_tiny", gen)
        _established(fast, x)
        _established(fast, x.contiguous(memory_format=torch.channels_last_3d))
        assert len(recorded_programs(fast)) == 2
        for size in range(MAX_PROGRAMS):
            fast(torch.randn(1, 3, 4, 16 + 2 * size, 16, generator=gen))
    keys = list(recorded_programs(fast))
    assert len(keys) == MAX_PROGRAMS and keys[0][0] != tuple(x.shape)


def test_an_unrecordable_forward_warns_once_and_runs_eagerly(caplog, gen, monkeypatch):
    monkeypatch.setattr(recorded_module, "_WARNED", set())  # once per process: an earlier run here may have warned
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    eager = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    eager.load_state_dict(fast.state_dict())
    eager.recorded_inference = False
    for model in (fast, eager):
        head = model.forward_head

        def forward_head(*args, head=head, **kwargs):  # a value read in Python on the way
            out = head(*args, **kwargs)
            return out if out.sum() > 0 else -out

        model.forward_head = forward_head
    with caplog.at_level(logging.WARNING, logger="lgd_fast.recorded"), torch.no_grad():
        for _ in range(4):
            x = _clip("lgd3d_tiny", gen)
            assert _equal(fast(x), eager(x))
    warnings = [r.message for r in caplog.records if "not recorded" in r.message]
    assert len(warnings) == 1 and "returns a value Python reads" in warnings[0]
    (reason,) = recorded_programs(fast).values()
    assert "returns a value Python reads" in reason


def test_a_dead_model_and_its_programs_go_at_once(gen):
    """No reference cycle through the recorded programs: the model, its programs and the arena blocks their constants
    hold are freed when the last reference goes, without waiting for the garbage collector."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    with torch.inference_mode():
        program = weakref.ref(_established(fast, _clip("lgd3d_tiny", gen)))
    model = weakref.ref(fast)
    del fast
    assert model() is None and program() is None


def test_a_submodule_hook_keeps_the_forward_eager(gen):
    """A forward hook on a submodule is Python that runs when that module is called: the program would skip it, so
    the model is not recorded while one is there, and records once it is removed."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    seen = []
    handle = fast.kernel_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = _clip("lgd3d_tiny", gen)
    with torch.no_grad():
        for _ in range(4):
            fast(x)
        assert len(seen) == 4
        (reason,) = recorded_programs(fast).values()
        assert reason == "kernel_head has forward hooks, which a program would not call"
        handle.remove()
        _established(fast, x)


@pytest.mark.parametrize("name", ["r3d", "csn"])
def test_recorded_inference_runs_a_converted_foreign_model(name, gen):
    """RecordedInference over lgd_fast.convert(model, inference=True) of models written torchvision's and
    pytorchvideo's way: the program's outputs equal the converted model's eager ones bit for bit on fresh inputs,
    and the original's to fp32 rounding; outside inference the wrapper is the model."""
    make = {"r3d": lambda: foreign_models.r3d((1, 1), (8, 16), 5), "csn": foreign_models.csn}[name]
    original = make().eval()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    converted = lgd_fast.convert(copy.deepcopy(original), inference=True)
    runner = lgd_fast.RecordedInference(converted)
    assert runner.module is converted and set(runner.state_dict()) == {f"module.{k}" for k in converted.state_dict()}
    clip = lambda: torch.randn(2, 3, 4, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last_3d)  # noqa: E731
    with torch.inference_mode():
        x = clip()
        for _ in range(3):
            runner(x)
        program = _program(runner)
        calls = program.calls
        for _ in range(2):
            x = clip()
            expected = converted(x)
            _C._arena_poison()
            got = runner(x)
            assert _equal(got, expected)
            assert ((got.double() - original(x).double()).norm() / original(x).double().norm()) < 1e-5
        assert program.calls == calls + 2
    out = runner(clip())  # autograd on: the model as it is, no program
    assert out.requires_grad and program.calls == calls + 2
    with pytest.raises(TypeError, match="wraps a torch.nn.Module"):
        RecordedInference(lambda x: x)


def test_a_shape_that_depends_on_the_values_is_refused(gen):
    def fn(x):
        kept = x[x > 0]
        return kept.sum(0) / kept.shape[0]  # the count is read in Python, by no op

    x = torch.randn(6, generator=gen).abs() + 0.1
    x[::2] = -x[::2]  # three kept, three dropped: with all six negative the mean would be 0/0
    with pytest.raises(NotRecordable, match="shape that depends on the input's values") as info:
        record(fn, x)
    assert torch.equal(info.value.output, fn(x))


@torch.library.custom_op("lgd_fast_test::double_in_place", mutates_args=("x",))
def _double_in_place(x: torch.Tensor) -> None:
    x.mul_(2)


def test_an_op_returning_nothing_and_a_random_draw_run_on_every_call(gen):
    w = torch.randn(5, generator=gen)

    def fn(x):
        y = x + 1
        _double_in_place(y)  # returns None
        return y + torch.randn_like(w)  # reads only a constant, but draws: again on every call

    _, program = record(fn, torch.randn(5, generator=gen))
    x = torch.randn(5, generator=gen)
    torch.manual_seed(7)
    expected = fn(x)
    torch.manual_seed(7)
    assert torch.equal(program(x), expected)
    assert not torch.equal(program(x), expected)  # the generator moved on, as eagerly


def test_changes_the_guard_sees_beyond_versions(gen):
    """A submodule swapped for another (a new module may reuse a freed one's id), ``p.data = t`` (same tensor, same
    version), a global hook added after recording: each makes the next call eager."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    runner = RecordedInference(model)
    x = torch.randn(3, 4, generator=gen)
    calls = []
    with torch.no_grad():
        for change in ("swap", "data"):
            program = _established(runner, x)
            before = program.calls
            if change == "swap":
                model[1] = torch.nn.GELU()
            else:
                model[0].weight.data = torch.randn(4, 4, generator=gen)
            assert _equal(runner(x), model(x)) and program.calls == before
        program = _established(runner, x)
        before = program.calls
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: calls.append(1))
        try:
            runner(x)
            runner(x)
        finally:
            handle.remove()
        assert program.calls == before and len(calls) >= 2


def test_a_copy_or_a_pickle_of_a_model_has_no_programs(gen, tmp_path):
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    x = _clip("lgd3d_tiny", gen)
    with torch.inference_mode():
        _established(fast, x)
    twin = copy.deepcopy(fast)
    assert recorded_programs(twin) == {}
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert recorded_programs(loaded) == {}
    with torch.inference_mode():
        assert _equal(_established(twin, x)(x), fast(x))
    lgd_fast.recorded.forget_programs(fast)
    assert recorded_programs(fast) == {}


# ---- under torch.compile: the recorded program as one op -------------------------------------------------------


def _traced_targets(model, x, *, freezing: bool = False, grad: bool = False, amp: bool = False) -> set[str]:
    """The call targets dynamo hands its backend when compiling ``model(x)`` (fullgraph) in that setting."""
    from torch._inductor import config as inductor_config

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    amp_ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with torch.set_grad_enabled(grad), inductor_config.patch(freezing=freezing), amp_ctx:
        torch.compile(model, backend=recording, fullgraph=True)(x)
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
def test_compiled_cpu_inference_is_the_recorded_program_as_one_op(arch, gen):
    """torch.compile (fullgraph) of a fast model's CPU inference: one ``lgd_fast::recorded_inference`` node, whose
    calls run the model's recorded program (bit for bit the eager forward's result) in the activation arena."""
    classifier = "kernel" if arch == "lgd3d_tiny" else "two_heads"  # both heads' logits (_inference_output_like)
    fast = create_model(arch, num_classes=7, fast=True, classifier=classifier).eval()
    x = _clip(arch, gen, size=64)  # (at 32x32 no activation reaches the arena's 64 KiB minimum)
    with torch.no_grad():
        assert _traced_targets(fast, x) == {"lgd_fast.recorded_inference"}
        torch._dynamo.reset()
        compiled = torch.compile(fast, fullgraph=True)
        eager = fast(x)
        first = compiled(x)  # the model's second call for this key: it records
        program = _program(fast, x)
        calls, hits = program.calls, lgd_fast.arena_stats().hits
        again = compiled(torch.randn(x.shape, generator=gen))
        assert _equal(compiled(x), eager) and _equal(first, eager)
    assert program.calls == calls + 2 and lgd_fast.arena_stats().hits > hits
    assert again.shape == (2, 7) and torch.isfinite(again).all()


@pytest.mark.parametrize("setting", ["bfloat16 weights", "channels_last_3d clip"])
def test_the_op_runs_bf16_models_and_channels_last_clips(setting, gen):
    """The recorded_inference op with a bfloat16 model (its clips bfloat16) and with a channels_last_3d clip: traced
    as the one op, opcheck'd (schema, fake sizes, strides and dtype against the real call), and its compiled calls
    the eager forward's result bit for bit."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True, classifier="two_heads").eval()
    x = _clip("lgd3d_tiny", gen)
    if setting.startswith("bfloat16"):
        fast, x = fast.to(torch.bfloat16), x.to(torch.bfloat16)
    else:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert _traced_targets(fast, x) == {"lgd_fast.recorded_inference"}
        torch.library.opcheck(torch.ops.lgd_fast.recorded_inference.default, (x, id(fast)),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip
        torch._dynamo.reset()
        compiled = torch.compile(fast, fullgraph=True)
        eager = fast(x)
        first, second = compiled(x), compiled(x)  # (the second of the model's calls for this key records)
        assert eager.dtype == x.dtype and _equal(first, eager) and _equal(second, eager)


def test_compile_traces_the_layers_where_the_program_does_not_apply(gen, monkeypatch):
    """Freezing (which folds and packs the modules' weights itself), autograd, training, autocast, the recorded
    program turned off, a forced plan: the model's own ops are traced, as ever; and export never sees the op."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True, classifier="two_heads").eval()
    x = _clip("lgd3d_tiny", gen)
    with torch.no_grad():
        fast(x)  # plans decided eagerly (tracing takes the choices made)
    settings = {"freezing": {"freezing": True}, "autograd": {"grad": True}, "autocast": {"amp": True}}
    for why, options in settings.items():
        targets = _traced_targets(fast, x, **options)
        assert "lgd_fast.recorded_inference" not in targets and any("conv" in t for t in targets), (why, targets)
    fast.train()
    assert "lgd_fast.recorded_inference" not in _traced_targets(fast, x)
    fast.eval()
    fast.recorded_inference = False
    assert "lgd_fast.recorded_inference" not in _traced_targets(fast, x)
    fast.recorded_inference = True
    with forced(training=False):
        assert "lgd_fast.recorded_inference" not in _traced_targets(fast, x)
    monkeypatch.setenv(ENV, "0")
    assert "lgd_fast.recorded_inference" not in _traced_targets(fast, x)
    monkeypatch.delenv(ENV)
    with torch.no_grad():
        exported = torch.export.export(fast, (x,))
    assert not any("recorded_inference" in str(n.target) for n in exported.graph.nodes)


def test_compiled_copies_and_unpickled_models_run_their_own_weights(gen, tmp_path):
    """The op finds its model by id: a copy, or a model loaded from a pickle, registers as itself, never as the
    model it came from."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    twin = copy.deepcopy(fast)
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = _clip("lgd3d_tiny", gen)
    with torch.no_grad():
        for model in (twin, loaded):
            model.kernel_head.fc.bias.add_(torch.randn(model.kernel_head.fc.bias.shape, generator=gen))
        torch._dynamo.reset()
        for model in (fast, twin, loaded):
            assert _equal(torch.compile(model, fullgraph=True)(x), model(x))
        assert not torch.equal(twin(x), fast(x))


def test_the_op_checks_what_it_returns_and_its_model(gen, monkeypatch):
    """The op's schema, fake and dispatch pass torch.library.opcheck; an output unlike the one the graph was traced
    with, or a model that is gone, is an error that says so."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True, classifier="two_heads").eval()
    x = _clip("lgd3d_tiny", gen)
    op = torch.ops.lgd_fast.recorded_inference.default
    with torch.no_grad():
        torch.library.opcheck(op, (x, id(fast)), test_utils=("test_schema", "test_faketensor"))
        like = fast._inference_output_like(x)
        monkeypatch.setattr(type(fast), "_inference_output_like", lambda self, x: like.to(torch.float64))
        with pytest.raises(RuntimeError, match=r"returned \(2, 7\) torch.float32, the compiled graph expects"):
            op(x, id(fast))
        monkeypatch.undo()
        key = id(fast)
        del fast
        with pytest.raises(RuntimeError, match="no live model with id"):
            op(x, key)


def test_a_pure_hook_swapped_for_another_hook_is_a_change(gen, monkeypatch):
    """A submodule's pure forward hook (PURE_FORWARD_HOOKS) is recorded with the program; replacing it with another
    hook (the same number of hooks) is a change: the next call runs eagerly and calls the new hook, not the stale
    program."""

    def pure(module, args, output):
        return output * 2

    monkeypatch.setattr(recorded_module, "PURE_FORWARD_HOOKS", {pure})
    inner = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(inner, torch.nn.ReLU()).eval()
    runner = RecordedInference(model).eval()
    x = torch.randn(2, 4, generator=gen)
    handle = inner.register_forward_hook(pure)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, inner.weight, inner.bias)  # the Linear without its hooks
        for _ in range(3):  # eager, recorded, the program
            out = runner(x)
        assert torch.equal(out, torch.relu(2 * plain)) and _program(runner).calls == 1
        handle.remove()
        seen = []
        inner.register_forward_hook(lambda m, a, o: seen.append(o.shape) or o * 3)
        out = runner(x)
    assert seen == [(2, 3)] and torch.equal(out, torch.relu(3 * plain))  # the new hook ran: no stale program


def _changes(model):
    """Changes a recorded program's guard must see, and ones it must not (name, function, seen)."""
    conv, norm = model.layer2[0].conv2, model.layer3[0].bn1

    class Subclass(type(norm)):
        pass

    return [
        ("nothing", lambda: None, False),
        ("a forward of the same module read", lambda: model(torch.randn(1, 3, 4, 16, 16)), False),
        ("in-place weight", lambda: conv.weight.mul_(1.5), True),
        ("new parameter", lambda: setattr(conv, "weight", torch.nn.Parameter(conv.weight * 0.5)), True),
        ("p.data = other", lambda: setattr(conv.weight, "data", conv.weight.detach() * 2), True),
        ("running statistics", lambda: norm.running_var.mul_(3.0), True),
        ("a buffer set to None", lambda: setattr(norm, "num_batches_tracked", None), True),
        ("submodule mode", lambda: norm.train(), True),
        ("submodule swapped", lambda: setattr(model.layer1[0], "relu", torch.nn.ReLU()), True),
        ("class changed", lambda: setattr(norm, "__class__", Subclass), True),
        ("instance forward", lambda: setattr(norm, "forward", lambda x: x), True),
        ("forward hook", lambda: conv.register_forward_hook(lambda *a: None), True),
        ("pre-hook", lambda: conv.register_forward_pre_hook(lambda *a: None), True),
        ("global hook", lambda: torch.nn.modules.module.register_module_forward_hook(lambda *a: None), True),
        ("plan replaced", lambda: setattr(model.layer1[0], "_lgd_plan", None), True),
    ]


@pytest.mark.parametrize("index", range(15))
def test_the_packed_guard_sees_what_module_state_sees(index, gen):
    """lgd_fast._C.module_state (what a recorded call compares) changes exactly where lgd_fast.recorded.module_state
    (its specification) does, for each change a program depends on and for none it does not."""
    from lgd_fast import _C
    from lgd_fast.recorded import _state, module_state

    model = create_model("lgd3d_tiny", num_classes=7, fast=True).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 4, 16, 16, generator=gen))
    name, change, seen = _changes(model)[index]
    assert _C.module_state(torch.nn.Linear(2, 2)) is NotImplemented  # (no stamps yet: the Python function gives them)
    tuple_before, packed_before = module_state(model), _C.module_state(model)
    assert isinstance(packed_before, bytes) and _state(model) == packed_before
    handles = []
    try:
        with torch.no_grad():
            handles.append(change())
        tuple_after, packed_after = module_state(model), _C.module_state(model)
    finally:
        for h in handles:
            if isinstance(h, torch.utils.hooks.RemovableHandle):
                h.remove()
    assert (tuple_after != tuple_before) == seen, name
    assert (packed_after != packed_before) == seen, name


def test_the_packed_guard_is_none_for_inference_tensors():
    from lgd_fast import _C
    from lgd_fast.recorded import _state, module_state

    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    assert module_state(model) is None and _C.module_state(model) is None and _state(model) is None
