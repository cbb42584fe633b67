"""The execution plan (lgd_fast.plan): made once when a model is made fast, printable, overridable, measured."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from p3d_cases import randomise_norms
from torch import nn

import lgd_fast
from lgd_fast import create_model
from lgd_fast import plan as planning
from lgd_fast.cli import main


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def measured(monkeypatch):
    """The kinds of the layers measured during the test (a fresh measurement cache)."""
    calls = []
    real = planning._measure
    monkeypatch.setattr(planning, "_measure", lambda *a: calls.append(a[1].kind) or real(*a))
    monkeypatch.setattr(planning, "_MEASURED", {})
    return calls


@pytest.fixture
def no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the default plan must not measure")

    monkeypatch.setattr(planning, "_measure", refuse)


def test_r50_plan_prints_every_layer_with_backend_layout_and_why(gen, no_measuring):
    model = create_model("lgd3d_r50", 10, fast=True, plan="default")
    text = str(model.execution_plan)
    assert "17 planned layers" in text and "not decided yet" in text
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)  # layer1 and layer2.0 take 16x16 frames, later 8x8 and 4x4
    plan = model.execution_plan.resolve(x)  # inference: every block fused (packed oneDNN convs), channels_last_3d
    rows = {row["layer"]: row for row in plan.to_dict()}
    assert list(rows) == ["(model)"] + [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)]
    for name, row in rows.items():
        (choice,) = row["choices"]
        assert choice["why"].startswith("default")
        expected = ("convs+end", "channels_last_3d", "onednn")
        if name == "(model)":  # the stem as one stem_conv_pool kernel, reading the clip as it comes
            expected = ("conv+BN+ReLU+pool kernel", "as_input", "cpp")
        assert (choice["runs"], choice["layout"], choice["backend"]) == expected, name
    text = str(plan)
    assert "layer1.0: LGD block, P3DBottleneck A" in text and "float32 1x64x1x16x16 channels_last_3d: convs+end" in text
    assert model.training and all(p.grad is None for p in model.parameters())  # resolve restores the mode
    model.execution_plan.resolve(x, training=True)  # training: the frame-size rule (units on their own modules)
    for name, row in ((r["layer"], r) for r in plan.to_dict()):
        train = [c for c in row["choices"] if " train " in c["input"]]
        if name == "(model)":
            assert [(c["runs"], c["layout"]) for c in train] == [("conv, BN+ReLU+pool op", "channels_last_3d")]
        elif name.startswith("layer1") or name == "layer2.0":
            assert [(c["runs"], c["layout"]) for c in train] == [("end only", "channels_last_3d")], name
        else:
            assert [(c["runs"], c["layout"]) for c in train] == [("modules", "contiguous")], name


CL3D = "channels_last_3d"


@pytest.mark.parametrize(("widths", "layouts"), [((16, 32, 64, 128), (CL3D, CL3D, CL3D, CL3D)),
                                                 ((32, 64, 128, 256), (CL3D, CL3D, CL3D, "contiguous"))])
def test_training_default_runs_narrow_small_frame_blocks_channels_last(gen, no_measuring, widths, layouts):
    """Under 14x14 frames, training blocks of at most 64 input channels run their modules channels_last_3d, wider
    ones contiguous (benchmarks/run_plan_train_layouts.py); with gradients in eval they stay contiguous."""
    model = create_model("lgd3d_tiny", 10, fast=True, plan="default", widths=widths, stem_width=widths[0])
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)  # every block's input frames are 8x8 or smaller
    plan = model.execution_plan.resolve(x, training=True)
    rows = {r["layer"]: r["choices"] for r in plan.to_dict()}
    block_inputs = {"layer1.0": widths[0], "layer2.0": widths[0], "layer3.0": widths[1], "layer4.0": widths[2]}
    for (name, channels), want in zip(block_inputs.items(), layouts, strict=True):
        (choice,) = rows[name]
        assert (choice["runs"], choice["layout"]) == ("modules", want), (name, channels)
        assert f"{channels} <= 64 channels in training" in choice["why"] or want == "contiguous"
    assert [c["layout"] for c in rows["(model)"]] == [CL3D]  # the stem: channels-last in training
    model.eval()
    eval_grad = planning.decide(model.layer1[0], torch.randn(2, widths[0], 2, 8, 8, generator=gen), None,
                                kind="lgd_block")  # fmt: skip
    assert (eval_grad.fused, eval_grad.end, eval_grad.layout) == (False, False, "contiguous")


def test_a_model_with_channels_last_weights_measures_its_own_plan(gen, measured):
    """Identical layers share one measurement, but not across weight layouts: a model converted to channels_last_3d
    (its conv weights' strides) is measured again, not given the choices timed on contiguous weights."""
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)
    for converted in (False, True, False):
        model = create_model("lgd3d_tiny", 10, fast=True, plan="measure", classifier="two_heads").eval()
        if converted:
            model.to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            model(x)
    assert measured == (["stem"] + ["lgd_block"] * 4) * 2  # the third model (contiguous again) reuses the first's


def test_choices_are_made_once_per_key(gen, measured):
    reference = randomise_norms(create_model("lgd3d_tiny", 10, classifier="two_heads"), gen).eval()
    model = create_model("lgd3d_tiny", 10, fast=True, plan="measure", classifier="two_heads").eval()
    model.load_state_dict(reference.state_dict())
    calls = measured
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)
    with torch.no_grad():
        assert _rel(model(x), reference(x)) < 1e-5  # whatever was measured fastest computes the same
        assert calls == ["stem"] + ["lgd_block"] * 4
        model(x)
        assert len(calls) == 5  # cached by key: nothing measured again
        model(torch.randn(2, 3, 4, 64, 64, generator=gen))  # a new shape is a new key
    assert len(calls) == 10
    for row in model.execution_plan.to_dict():  # inference a recorded program runs: timed as programs
        assert len(row["choices"]) == 2, row
        assert all(c["why"].startswith("measured as recorded programs (ms): ") for c in row["choices"]), row


def test_inference_is_measured_as_the_program_that_will_run(gen, measured, monkeypatch):
    """Where the model records its inference (lgd_fast.recorded), each candidate is timed as the program of its
    own op calls: an eager call adds Python per op that the program does not run. Without recording, eagerly."""
    programs = []
    real = planning._programs
    monkeypatch.setattr(planning, "_programs", lambda *a: programs.append(len(a[0])) or real(*a))
    x = torch.randn(1, 3, 4, 32, 32, generator=gen)
    for recorded in (True, False):
        planning._MEASURED.clear()
        programs.clear()
        reference = randomise_norms(create_model("lgd3d_tiny", 10, classifier="two_heads"), gen).eval()
        model = create_model("lgd3d_tiny", 10, fast=True, plan="measure", classifier="two_heads").eval()
        model.load_state_dict(reference.state_dict())
        model.recorded_inference = recorded
        with torch.no_grad():
            for _ in range(3):  # measured, recorded, run as the program (or eagerly)
                assert _rel(model(x), reference(x)) < 1e-5
        whys = [c["why"] for row in model.execution_plan.to_dict() for c in row["choices"]]
        assert len(whys) == 5, whys
        if recorded:  # every candidate of the stem (4: the stem_conv_pool kernel too) and of each block (6)
            assert programs == [4, 6, 6, 6, 6]  # became a program
            assert all(w.startswith("measured as recorded programs (ms): ") for w in whys), whys
            assert "RecordedProgram" in str(model.execution_plan)
        else:
            assert programs == [] and all(w.startswith("measured (ms): ") for w in whys), whys
    import lgd_fast.recorded as recorded_module

    def refuse(fn, *inputs, **options):  # a candidate that cannot be recorded: its layer's all timed eagerly
        out = fn(*inputs)
        if isinstance(out, tuple):  # (a block's candidates return a tuple, the stem's a tensor)
            raise recorded_module.NotRecordable("refused by the test", out)
        return real_record(fn, *inputs, **options)

    real_record = recorded_module.record
    monkeypatch.setattr(recorded_module, "record", refuse)
    planning._MEASURED.clear()
    model = create_model("lgd3d_tiny", 10, fast=True, plan="measure", classifier="two_heads").eval()
    with torch.no_grad():
        model(x)
    whys = [c["why"] for row in model.execution_plan.to_dict() for c in row["choices"]]
    assert whys[0].startswith("measured as recorded programs (ms): "), whys  # the stem
    assert all(w.startswith("measured (ms): ") for w in whys[1:]), whys
    with torch.enable_grad():  # a forward with autograd records nothing: measured eagerly, forward and backward
        planning._MEASURED.clear()
        model = create_model("lgd3d_tiny", 10, fast=True, plan="measure", classifier="two_heads").eval()
        model(x.requires_grad_())
        whys = [c["why"] for row in model.execution_plan.to_dict() for c in row["choices"]]
        assert all(w.startswith("measured (ms): ") for w in whys), whys


def _run(channels: int) -> nn.Sequential:
    """A (2+1)D run as torchvision writes one: spatial conv, BN, ReLU, temporal conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(channels),
        nn.ReLU(inplace=True), nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(channels), nn.ReLU(inplace=True),
    )  # fmt: skip


def test_identical_layers_share_one_measurement(gen, measured):
    original = randomise_norms(nn.Sequential(_run(8), _run(8), _run(8)), gen).eval()
    model = lgd_fast.convert(copy.deepcopy(original), plan="measure")
    calls = measured
    x = torch.randn(2, 8, 3, 16, 16, generator=gen)
    with torch.no_grad():
        for run, run_original in zip(model, original, strict=True):  # each on x: one key, whatever was chosen
            assert _rel(run(x), run_original(x)) < 1e-5
    assert calls == ["conv_run"]  # three runs, one signature: measured once, as inductor caches by shape
    choices = [c for _, plan in model.execution_plan.layers() for c in plan.choices.values()]
    assert len(choices) == 3 and len(set(choices)) == 1
    with torch.no_grad():  # chained, a run's input is in the layout the one before it chose
        assert _rel(model(x), original(x)) < 1e-5


def test_measuring_a_training_step_leaves_buffers_and_gradients(gen, monkeypatch):
    monkeypatch.setattr(planning, "_MEASURED", {})
    options = {"classifier": "two_heads", "dropout": 0.0}
    reference = randomise_norms(create_model("lgd3d_tiny", 5, **options), gen)
    model = create_model("lgd3d_tiny", 5, fast=True, plan="measure", **options)
    model.load_state_dict(reference.state_dict())
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)
    model.execution_plan.resolve(x, training=True)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is None for p in model.parameters()) and model.training
    for a, b in zip(model(x), reference(x), strict=True):  # the measured training plan equals the reference
        assert _rel(a, b) < 1e-5
    stats = [(a, b) for a, b in zip(model.buffers(), reference.buffers(), strict=True) if a.is_floating_point()]
    assert all(_rel(a, b) < 1e-5 for a, b in stats)
    keys = {key[1] for _, plan in model.execution_plan.layers() for key in plan.choices}
    assert keys == {"train"}


def test_forced_overrides_and_backend_argument(gen, no_measuring):
    model = randomise_norms(create_model("lgd3d_tiny", 5, fast=True, plan="default", backend="reference"), gen).eval()
    x = torch.randn(1, 3, 4, 32, 32, generator=gen)  # 8x8 frames: the default runs every block on its modules
    with planning.forced():
        choice = planning.decide(model.layer1[0], torch.randn(1, 16, 4, 8, 8), None, None, None)
    assert (choice.fused, choice.end, choice.backend, choice.request, choice.why) == (
        True, True, "reference", "reference", "forced")  # fmt: skip
    with planning.forced(fused=False):
        choice = planning.decide(model.layer1[0], torch.randn(1, 16, 4, 8, 8), None, None, None)
    assert not choice.fused and not choice.end
    model.execution_plan.resolve(x)
    assert all(c.backend == "modules" for _, p in model.execution_plan.layers() for c in p.choices.values())
    with pytest.raises(ValueError, match="backend argument is 'bogus'"):
        create_model("lgd3d_tiny", 5, fast=True, backend="bogus")
    with pytest.raises(ValueError, match="plan argument is 'sometimes'"):
        create_model("lgd3d_tiny", 5, fast=True, plan="sometimes")
    with pytest.raises(TypeError, match="plan argument must be a str, one of: measure, default, fused; got int 3"):
        create_model("lgd3d_tiny", 5, fast=True, plan=3)
    with pytest.raises(TypeError, match="backend argument must be a str"):
        create_model("lgd3d_tiny", 5, fast=True, backend=3)
    with pytest.raises(ValueError, match="options of the fast model"):
        create_model("lgd3d_tiny", 5, plan="default")


@pytest.mark.parametrize("make", ["convert", "create_model"])
def test_a_backend_asked_for_that_cannot_run_on_the_input_is_an_error(gen, make, no_measuring):
    """backend="cuda" on CPU clips: an op without a cuda backend takes auto, so a converted conv run (no op with a
    cuda backend) ran on oneDNN while its plan said cuda, with no word. Now the first call per input key says so;
    a backend that does run there (cpp: the extension's ops, auto for the convs) still runs."""
    x = torch.randn(1, 3, 4, 16, 16, generator=gen)
    if make == "convert":
        run = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU()).eval()
        model, works = lgd_fast.convert(run, backend="cuda", plan="default"), None
    else:
        model = create_model("lgd3d_tiny", 5, fast=True, backend="cuda", plan="default").eval()
        works = create_model("lgd3d_tiny", 5, fast=True, backend="cpp", plan="default").eval()
        x = torch.randn(1, 3, 4, 32, 32, generator=gen)
    message = r"made with backend='cuda', which cannot run on its input \(cpu tensors\): the cuda backend runs on CUDA"
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        model(x)
    if works is not None:
        with torch.no_grad():
            assert torch.isfinite(works(x)).all()
        with pytest.raises(RuntimeError, match="backend='cpp', which cannot run on its input \\(meta tensors\\)"):
            planning._check_backend_runs(works.layer1[0]._lgd_plan, torch.empty(1, device="meta"))  # (no CUDA here)


def test_environment_sets_the_mode_when_the_model_is_made(monkeypatch):
    monkeypatch.setenv(planning.ENV_VAR, "measure")
    assert create_model("lgd3d_tiny", 5, fast=True).layer1[0]._lgd_plan.mode == "measure"
    monkeypatch.setenv(planning.ENV_VAR, "default")
    model = create_model("lgd3d_tiny", 5, fast=True)
    monkeypatch.setenv(planning.ENV_VAR, "measure")  # read once: changing it later changes nothing
    assert model.layer1[0]._lgd_plan.mode == "default"


def test_compiled_model_takes_the_choices_made_eagerly(gen, monkeypatch):
    from lgd_fast.models import fast as fast_module

    model = create_model("lgd3d_tiny", 5, fast=True, plan="default", classifier="two_heads")
    model = randomise_norms(model, gen).eval()
    model.recorded_inference = False  # traced layer by layer (else torch.compile calls the eager program as one op)
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)  # 16x16 frames in layer1: the default fuses it
    fused_calls = []
    real = fast_module.fused_block_forward
    monkeypatch.setattr(
        fast_module, "fused_block_forward", lambda b, *a, **k: fused_calls.append(b) or real(b, *a, **k)
    )
    with torch.no_grad():
        eager = model(x)
        assert model.layer1[0] in fused_calls  # the default fuses layer1
        plan = model.layer1[0]._lgd_plan  # overrule layer1's eager choice: its own modules, same layout
        plan.choices = {k: planning.replace(c, fused=False, end=False, why="test") for k, c in plan.choices.items()}
        fused_calls.clear()
        monkeypatch.setattr(planning, "_measure", lambda *a: pytest.fail("measured while tracing"))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(x)
    assert model.layer1[0] not in fused_calls  # tracing followed the recorded choice, not the default
    assert _rel(compiled, eager) < 1e-5


def test_measuring_works_under_autocast_inference_mode_and_direct_construction(gen, measured):
    from lgd_fast.models import FastLGD3D, P3DBasicBlock

    model = create_model("lgd3d_r18", 5, fast=True, plan="measure", classifier="two_heads").eval()
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # fused and unfused blocks mix dtypes
        assert torch.isfinite(model(x)).all()
    train = create_model("lgd3d_tiny", 5, fast=True, plan="measure", classifier="two_heads")
    with torch.inference_mode():  # BatchNorm recalibration: train mode, no gradients, measured forward only
        local, _ = train(torch.randn(2, 3, 4, 64, 64, generator=gen))
    assert {key[1] for key in train.layer1[0]._lgd_plan.choices} == {"train, no grad"}
    direct = FastLGD3D(block=P3DBasicBlock, layers=(1, 1, 1, 1), num_classes=5, widths=(16, 32, 64, 128),
                       stem_width=16, early_stride=2, global_reduction=4, classifier="two_heads").eval()  # fmt: skip
    with torch.no_grad():
        assert direct(torch.randn(1, 3, 4, 32, 32, generator=gen)).shape == (1, 5)
    assert direct._lgd_plan.kind == "stem" and direct.layer1[0]._lgd_plan.kind == "lgd_block"


def test_plan_command(capsys):
    assert main(["plan", "lgd3d_tiny", "--batch", "1", "--size", "64", "--frames", "4", "--mode", "default"]) == 0
    out = capsys.readouterr().out
    assert "lgd3d_tiny, input 1x3x4x64x64, inference" in out and "layer1.0: LGD block" in out
    assert main(["plan", "lgd3d_tiny", "--batch", "1", "--size", "32", "--frames", "4", "--json", "--train"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["training"] and [r["layer"] for r in payload["layers"]][:2] == ["(model)", "layer1.0"]
    assert all(r["choices"][0]["input"].startswith("cpu train") for r in payload["layers"])
    assert main(["plan", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_autocast_is_part_of_the_key(gen, no_measuring):
    model = create_model("lgd3d_tiny", 5, fast=True, plan="default").eval()
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    modes = {key[1] for key in model.layer1[0]._lgd_plan.choices}
    assert modes == {"eval", "eval autocast bfloat16"}


def test_training_without_gradients_takes_the_training_default(gen, no_measuring):
    """BatchNorm with batch statistics under no_grad (recalibration) is training for the default rule: the units
    on their own modules, the block end fused, as with gradients."""
    model = create_model("lgd3d_tiny", 5, fast=True, plan="default", classifier="two_heads")
    x = torch.randn(1, 3, 4, 64, 64, generator=gen)
    with torch.no_grad():
        model(x)
    model(x)
    choices = {key[1]: c for key, c in model.layer1[0]._lgd_plan.choices.items()}
    assert set(choices) == {"train", "train, no grad"}
    assert all((c.fused, c.end, c.layout) == (False, True, "channels_last_3d") for c in choices.values())


def test_plan_fused_runs_every_layer_fused_and_equals_the_reference(gen, no_measuring):
    """plan="fused": every block takes its fused code (units and block end, in training too) at frames the
    default rule would leave to the modules; recorded as such, equal to the reference in float64."""
    ref = randomise_norms(create_model("lgd3d_tiny", 5, dropout=0.0), gen).double()
    fast = create_model("lgd3d_tiny", 5, dropout=0.0, fast=True, plan="fused", backend="reference").double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 4, 32, 32, generator=gen, dtype=torch.float64)  # 8x8 frames and less
    for train in (False, True):
        ref.train(train), fast.train(train)
        want, got = ref(x), fast(x)
        for a, b in zip(got, want, strict=True):
            assert _rel(a, b) < 1e-10, (train, _rel(a, b))
        if train:
            sum(o.square().sum() for o in want).backward()
            sum(o.square().sum() for o in got).backward()
            for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
                assert (p.grad is None) == (q.grad is None), name  # e.g. the kernel head, unused here
                assert p.grad is None or _rel(q.grad, p.grad) < 1e-9, name
    choices = [(layer, c) for layer, p in fast.execution_plan.layers() for c in p.choices.values()]
    blocks = [c for layer, c in choices if layer]  # the stem is the model itself: ""
    assert len(blocks) == 8 and all(c.fused and c.end and c.why == "plan fused" for c in blocks), choices


@pytest.mark.parametrize(
    "x_layout, times, chosen",
    [
        ("channels_last_3d", (0.97, 1.00), "channels_last_3d"),  # both within the margin: no layout change
        ("channels_last_3d", (1.10, 1.00), "contiguous"),  # the default beats staying by more than the margin
        ("contiguous", (0.97, 1.00), "contiguous"),  # the default, in the layout x comes in
        ("contiguous", (0.90, 1.00), "channels_last_3d"),  # beats the default by more than the margin
        ("channels_last_3d", (1.04, 1.00), "channels_last_3d"),  # staying is within the margin of the default
    ],
)
def test_within_the_margin_a_layer_keeps_the_layout_its_input_comes_in(monkeypatch, x_layout, times, chosen):
    """The margin rule (timing noise should not flip a choice) keeps the default's code in the layout x already
    has where that runs within the margin: a layout change is measured with this layer, the change back it may
    cause in the next is not (lgd3d_tiny's measured training plan changed layout at three of four blocks)."""
    import lgd_fast.bench

    def scripted(calls, *, repeats, warmup=0, device=None, **_):  # candidate i takes times[i]
        if repeats == 0:
            return {}, {i: times[i] for i in calls}
        return {i: [times[i]] * repeats for i in calls}, {}

    monkeypatch.setattr(lgd_fast.bench, "time_interleaved", scripted)
    conv = nn.Conv3d(4, 4, 1)
    plan = planning.attach(conv, "conv_run", "a test layer", backend="auto", mode="measure")
    cl, contiguous = planning.CL, planning.CONTIGUOUS
    candidates = [planning.Choice(False, False, lay, "modules", "") for lay in (cl, contiguous)]
    default = planning.Choice(False, False, contiguous, "modules", "default")
    formats = {"channels_last_3d": torch.channels_last_3d, "contiguous": torch.contiguous_format}
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=formats[x_layout])
    choice = planning._measure([conv], plan, "eval", default, candidates, lambda c, t: conv(t), (x,))
    assert choice.layout == chosen, choice.why
    assert choice.why.endswith("kept the input's layout") == (times[0] > 0.95 and chosen != default.layout)
    stem = planning.attach(nn.Conv3d(4, 4, 1), "stem", "a test stem", backend="auto", mode="measure")
    choice = planning._measure([conv], stem, "eval", default, candidates, lambda c, t: conv(t), (x,))
    assert choice.layout == (chosen if times[0] <= 0.95 else default.layout), "the stem keeps its default layout"
