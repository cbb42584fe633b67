"""The fast models' eval stem as one stem_conv_pool kernel: where the plan runs it, where it must not, and that the
model's output is the reference's either way."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lgd_fast import create_model
from lgd_fast import plan as planning
from lgd_fast.bench import trained_like
from lgd_fast.models import fast as fast_module
from lgd_fast.models.fast import stem_kernel_reason
from lgd_fast.models.p3d import frames, videos

CL = torch.channels_last_3d


def _pair(name, gen, **options):
    ref = trained_like(create_model(name, 7, classifier="two_heads"), generator=gen).eval()
    fast = create_model(name, 7, fast=True, classifier="two_heads", **options).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _DoubledPool(nn.MaxPool3d):
    """The stem's max-pool with a forward of its own (the kernel would skip it)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _counted(monkeypatch, name: str) -> list[tuple[int, ...]]:
    """The shapes of the first argument of every call of ``lgd_fast.models.fast.<name>`` from now on."""
    calls = []
    real = getattr(fast_module, name)

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fast_module, name, counting)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """The stems that ran the kernel (each call's clip shape)."""
    return _counted(monkeypatch, "stem_conv_pool")


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd3d_r18", "lgd2d_r18"])
@pytest.mark.parametrize("plan", ["default", "measure"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_eval_stem_runs_as_the_kernel_and_the_model_equals_the_reference(arch, plan, layout, gen, kernel_calls):
    ref, fast = _pair(arch, gen, plan=plan)
    x = torch.randn((2, 3, 4, 48, 40), generator=gen)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        want = ref(x)
        for _ in range(3):  # decided (measured), recorded, run as the program
            got = fast(x)
            assert _rel(got, want) < 1e-5
    assert stem_kernel_reason(fast) is None and fast._lgd_plan.pooled
    if plan == "default":  # (a measured plan may choose another candidate: it is timed)
        assert kernel_calls, "the default plan's eval stem did not run the kernel"
        assert "conv+BN+ReLU+pool kernel" in str(fast.execution_plan)


def test_the_kernel_is_not_used_in_training_under_float16_autocast_or_another_backend(gen, kernel_calls):
    x = torch.randn((2, 3, 4, 32, 32), generator=gen)
    ref, fast = _pair("lgd3d_tiny", gen, plan="default")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        fast(x)  # (the kernel computes in float32 or with bfloat16 products)
    fast.train()
    fast(x)[0].sum().backward()  # training: batch statistics, the stem's own modules
    with torch.no_grad():
        fast.eval()(x)  # eval with autograd off, no autocast: the kernel
    assert len(kernel_calls) == 1
    kernel_calls.clear()
    _, named = _pair("lgd3d_tiny", gen, plan="default", backend="reference")
    with torch.no_grad():
        named(x)
    assert not kernel_calls  # a conv backend named: the kernel is not one of p3d_conv's


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
@pytest.mark.parametrize("clips", ["autocast", "bf16"])
def test_bf16_stem_runs_the_kernel_where_the_cpu_has_bf16_dot_products(arch, clips, gen, kernel_calls):
    """Under bf16 autocast (a float32 clip) and with bfloat16 weights and clips, the default plan's eval stem runs
    the kernel with a bfloat16 weight where AVX512_BF16 is there (else oneDNN's bf16 conv, as before), and the
    stem's output is within twice PyTorch's own bf16 error of float64 (the stem's modules under autocast, or in
    bfloat16)."""
    from lgd_fast.ops.stem_conv_pool import bf16_dot_products

    ref, fast = _pair(arch, gen, plan="default")
    x = torch.randn((2, 3, 4, 48, 40), generator=gen)
    if clips == "bf16":
        ref, fast, x = ref.bfloat16(), fast.bfloat16(), x.bfloat16()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=clips == "autocast")
    outputs, run_stem = [], fast._run_stem

    def recording(choice, clip):  # the stem's output as the fast model hands it to its first block
        outputs.append(run_stem(choice, clip))
        return outputs[-1]

    fast._run_stem = recording
    fast.recorded_inference = False
    as_input = (lambda t: t) if arch.startswith("lgd3d") else frames  # LGD-2D's stem runs over frames
    with torch.no_grad():
        with amp:
            fast(x)
            plain = ref.maxpool(torch.relu(ref.bn1(ref.conv1(as_input(x)))))
        ref64 = copy.deepcopy(ref).double()
        exact = ref64.maxpool(torch.relu(ref64.bn1(ref64.conv1(as_input(x.double())))))
    got = as_input(outputs[0])
    plain = plain.bfloat16()  # (CPU autocast runs BatchNorm in float32; the first block's conv takes it in bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert bool(kernel_calls) == bf16_dot_products()
    err, err_torch = _rel(got, exact), _rel(plain, exact)
    assert 0 < err <= 2 * err_torch, (err, err_torch)


def test_without_bf16_dot_products_the_bf16_stem_stays_on_onednn(gen, kernel_calls, monkeypatch):
    """Where bfloat16 products would run on the float32 tiles (no AVX512_BF16), the default plan keeps the fused
    oneDNN stem under bf16 autocast (0.75-0.77x oneDNN's bf16 conv at R50 there), and the float32 stem the kernel."""
    monkeypatch.setattr(planning, "stem_bf16_dot_products", lambda: False)
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    x = torch.randn((2, 3, 4, 32, 32), generator=gen)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x)
        assert not kernel_calls
        fast(x)
    assert len(kernel_calls) == 1
    assert "conv+BN+ReLU fused" in str(fast.execution_plan)


def test_compiled_model_under_bf16_autocast_calls_the_kernel_as_eager(gen):
    """torch.compile of the fast model under bf16 autocast (layer by layer, no recorded program): the stem is the op
    with a bfloat16 weight folded in the graph, and the result is the eager one's."""
    from torch._inductor.utils import run_and_get_code

    from lgd_fast.ops.stem_conv_pool import bf16_dot_products

    if not bf16_dot_products():
        pytest.skip("the default plan takes the bf16 stem kernel only with AVX512_BF16")
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    fast.recorded_inference = False
    x = torch.randn((2, 3, 8, 32, 32), generator=gen)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fast(x)
        got, code = run_and_get_code(torch.compile(fast), x)
    assert "lgd_fast.stem_conv_pool" in "\n".join(code)
    assert got.dtype == torch.bfloat16 and torch.equal(got, eager)


@pytest.mark.parametrize("plan", ["default", "measure"])
@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: setattr(m, "maxpool", nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1), ceil_mode=True)), "pool"),
        (lambda m: setattr(m, "maxpool", nn.MaxPool3d(3, 2, 1)), "pool"),  # (pools over time too)
        (lambda m: setattr(m, "maxpool", nn.MaxPool3d((1, 2, 2), (1, 2, 2))), "pool"),
        (lambda m: setattr(m, "maxpool", nn.AvgPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))), "pool"),
        (lambda m: setattr(m.conv1, "dilation", (1, 2, 2)), "dilation"),
        (lambda m: setattr(m.conv1, "padding", (0, 2, 2)), "padding"),
        (lambda m: setattr(m, "bn1", nn.GroupNorm(4, 16)), "BatchNorm"),
        (lambda m: setattr(m, "maxpool", _DoubledPool((1, 3, 3), (1, 2, 2), (0, 1, 1))), "pool"),
    ],
)
def test_other_stems_keep_their_modules(change, reason, plan, gen, kernel_calls, monkeypatch):
    """A stem the kernel does not compute is refused with its reason, and runs as before (same output as the
    reference made the same way), also where a measurement made on a stem the kernel computes, with the same
    parameter shapes, is in the process's cache (identical layers share measurements)."""
    x = torch.randn((2, 3, 4, 32, 32), generator=gen)
    if plan == "measure":  # every measurement picks the first candidate: for a stem the kernel computes, the kernel
        monkeypatch.setattr(planning, "_measure", lambda group, p, mode, default, candidates, *a, **k: planning.replace(
            candidates[0], why="test: the first candidate"))  # fmt: skip
        planning._MEASURED.clear()
        _, pooled = _pair("lgd3d_tiny", gen, plan="measure")
        with torch.no_grad():
            pooled(x)
        assert kernel_calls, "the first candidate was not the kernel"
        kernel_calls.clear()
    ref = trained_like(create_model("lgd3d_tiny", 7, classifier="two_heads"), generator=gen)
    change(ref)
    fast = create_model("lgd3d_tiny", 7, classifier="two_heads")
    change(fast)
    fast.load_state_dict(ref.state_dict())
    assert reason in (stem_kernel_reason(fast) or "")
    fast_module.to_fast(fast, plan=plan)
    assert not fast._lgd_plan.pooled
    with torch.no_grad():
        assert _rel(fast.eval()(x), ref.eval()(x)) < 1e-5
    assert not kernel_calls


@pytest.mark.parametrize("freezing", [False, True], ids=["compiled", "frozen"])
def test_compiled_model_traces_the_kernel(freezing, gen):
    """Traced by torch.compile (layer by layer, and with inductor's freezing, which traces the modules), a stem whose
    plan chose the kernel calls the op with the BatchNorm folded in the graph; the blocks see the input their eager
    choices were made for (no new key), and the result is the eager one's."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    ref, fast = _pair("lgd3d_tiny", gen, plan="default")
    fast.recorded_inference = False
    x = torch.randn((1, 3, 4, 64, 64), generator=gen)
    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        eager = fast(x)
        keys = set(fast.layer1[0]._lgd_plan.choices)
        torch._dynamo.reset()
        compiled, code = run_and_get_code(torch.compile(fast, backend="inductor"), x)
    assert "lgd_fast.stem_conv_pool" in "\n".join(code), "the compiled graph does not call the stem kernel"
    assert set(fast.layer1[0]._lgd_plan.choices) == keys  # no new key: the kernel's layout, as eagerly
    assert _rel(compiled, eager) < 1e-5 and _rel(eager, ref(x)) < 1e-5


def test_lgd2d_stem_pool_given_as_pairs_is_taken(gen):
    """LGD-2D's max-pool over frames written with pairs, MaxPool2d((3, 3), (2, 2), (1, 1)): the same stem."""
    ref, fast = _pair("lgd2d_r18", gen, plan="default")
    ref.maxpool = nn.MaxPool2d((3, 3), (2, 2), (1, 1))
    fast.maxpool = nn.MaxPool2d((3, 3), (2, 2), (1, 1))
    assert stem_kernel_reason(fast) is None


def test_a_2d_pool_on_lgd3d_is_refused(gen):
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    fast.maxpool = nn.MaxPool2d(3, 2, 1)  # (the reference stem would raise on its 5-D input)
    assert "pool" in stem_kernel_reason(fast)


def test_a_stem_changed_after_conversion_is_planned_again(gen, kernel_calls):
    """A model made fast, run (the kernel chosen and recorded), then given another pool: the stem's plan follows
    the new module and the output is the reference's with that pool; back to the stem's pool, the kernel again."""
    ref, fast = _pair("lgd3d_tiny", gen, plan="default")
    x = torch.randn((2, 3, 4, 32, 32), generator=gen)
    with torch.no_grad():
        for _ in range(3):
            fast(x)
        assert kernel_calls
        kernel_calls.clear()
        ref.maxpool = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        fast.maxpool = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        for _ in range(3):  # eager, recorded, the program
            assert _rel(fast(x), ref(x)) < 1e-5
        assert not kernel_calls and not fast._lgd_plan.pooled
        ref.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        fast.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        for _ in range(3):
            assert _rel(fast(x), ref(x)) < 1e-5
        assert kernel_calls and fast._lgd_plan.pooled


# ---- training: bn1 + ReLU + max-pool as one bn_relu_max_pool op after conv1 -----------------------------------------


@pytest.fixture
def pool_op_calls(monkeypatch):
    """The training stems that ran the bn_relu_max_pool op (each call's conv1 output shape)."""
    return _counted(monkeypatch, "bn_relu_max_pool")


def _conv1_input(model, x):
    """conv1's input: the clip, LGD-2D's as frames."""
    return frames(x) if isinstance(model.bn1, nn.BatchNorm2d) else x


def _stem_modules(model, x):
    """The stem's own modules on the clip (videos out, LGD-2D's frames seen as videos)."""
    out = model.maxpool(torch.relu(model.bn1(model.conv1(_conv1_input(model, x)))))
    return videos(out, x.shape[0]) if out.dim() == 4 else out


def _grid_pair(gen, arch="lgd3d_tiny", **options):
    """A reference and a fast ``arch`` of one weights, and a clip, such that conv1's output lies on a grid of 1/8
    steps (integer clips, conv1's weight in eighths: every sum exact in float32): two values of a pool window are
    then equal or a step apart, so the op and ATen's pool pick the same tap (off a grid, values within rounding of
    each other are picked by rounding, a whole upstream value's difference in the gradient). bn1's bias puts zero
    half-way between two grid values' normalised levels (batch statistics), for the same reason at the ReLU."""
    ref, fast = _pair(arch, gen, **options)
    x = torch.randint(-4, 5, (2, 3, 4, 32, 32), generator=gen).float()
    with torch.no_grad():
        weight = torch.randint(-2, 3, ref.conv1.weight.shape, generator=gen).float() / 8
        for model in (ref, fast):
            model.conv1.weight.copy_(weight)
        y = _conv1_float64(ref, x)
        dims = [d for d in range(y.dim()) if d != 1]
        norm = ref.bn1
        scale = norm.weight.double() * torch.rsqrt(y.var(dims, correction=0) + norm.eps)
        offset = (norm.bias.double() - y.mean(dims) * scale) / (scale / 8)
        bias = norm.bias.double() + (0.5 - (offset - offset.floor())) * scale / 8
        for model in (ref, fast):
            model.bn1.bias.copy_(bias.float())
    return ref.train(), fast.train(), x


def _running_statistics_as_float64(ref, fast, twin, x):
    """Each of bn1's running statistics within 2x the reference's own error against ``twin`` (a float64 bn1 that saw
    conv1's float64 outputs; ATen's channels-last statistics are seen 1e-6 off float64, the op's 1e-7)."""
    for key in ("running_mean", "running_var"):
        exact = getattr(twin, key)
        ours, theirs = (_rel(getattr(m.bn1, key), exact) for m in (fast, ref))
        assert ours <= 2 * theirs + 1e-7, (key, ours, theirs)
    assert fast.bn1.num_batches_tracked == ref.bn1.num_batches_tracked == twin.num_batches_tracked


def _twin(ref):
    return copy.deepcopy(ref.bn1).double().train()


def _conv1_float64(ref, x):
    with torch.no_grad():
        return copy.deepcopy(ref.conv1).double()(_conv1_input(ref, x).double())


def _step(model, x, labels):
    torch.manual_seed(3)  # the same dropout draws
    local, global_ = model(x)
    if model.training:
        loss = torch.nn.functional.cross_entropy(local, labels) + torch.nn.functional.cross_entropy(global_, labels)
    else:  # (eval's outputs are the video's class scores of both heads)
        loss = local.sum() + global_.sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _stem_region(ref, fast, x, gen):
    """The stem's output and the gradients of conv1's weight and bn1's affine under one upstream gradient: the fast
    stem's op (``_run_stem`` with the op's choice) within 2x the reference modules' own error against the modules
    in float64 (a floor of a few float32 roundings: ATen's channels-last statistics are 1e-6 off, the op's 1e-7)."""
    exact = copy.deepcopy(ref).double()
    op = planning.Choice(False, True, planning.CL, "cpp", "the op")
    outs = [_stem_modules(m, x.to(dtype)) for m, dtype in ((exact, torch.float64), (ref, torch.float32))]
    outs.append(fast._run_stem(op, x))
    assert outs[2].dtype == outs[1].dtype and outs[2].shape == outs[1].shape
    upstream = torch.randn(outs[0].shape, generator=gen, dtype=torch.float64)
    grads = [torch.autograd.grad(out, (m.conv1.weight, m.bn1.weight, m.bn1.bias), upstream.to(out.dtype))
             for out, m in zip(outs, (exact, ref, fast), strict=True)]  # fmt: skip
    for name, values in zip(("out", "conv1.weight", "bn1.weight", "bn1.bias"),
                            [outs, *zip(*grads, strict=True)], strict=True):  # fmt: skip
        want, theirs, ours = values
        assert _rel(ours, want) <= 2 * _rel(theirs, want) + 1e-6, (name, _rel(ours, want), _rel(theirs, want))


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
@pytest.mark.parametrize("plan", ["default", "measure"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_training_stem_runs_the_op_and_equals_the_stems_modules(arch, plan, layout, gen, pool_op_calls):
    """The fast model's training steps (the plan's choice) against the reference's: the same losses and running
    statistics; and the stem region itself, op against modules, forward and its parameters' gradients. (Gradients
    past the stem are the blocks' business: a stem output one rounding away can flip a ReLU downstream.)"""
    ref, fast, x = _grid_pair(gen, arch, plan=plan)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=CL)
    labels = torch.randint(0, 7, (2,), generator=gen)
    twin = _twin(ref)
    for _ in range(2):  # (measured on the first call; the running statistics move twice)
        want_loss, _ = _step(ref, x, labels)
        got_loss, _ = _step(fast, x, labels)
        twin(_conv1_float64(ref, x))
        assert _rel(got_loss, want_loss) < 1e-5
    (choice,) = fast._lgd_plan.choices.values()
    if choice.end:  # (where a measured plan chose the modules, ATen's channels-last statistics ran: 1e-6 off)
        _running_statistics_as_float64(ref, fast, twin, x)
    if plan == "default":  # (a measured plan may choose the modules: it is timed)
        conv1_out = (2, 16, 2, 16, 16) if arch == "lgd3d_tiny" else (2, 64, 4, 16, 16)
        assert pool_op_calls == [conv1_out] * 2
        assert "conv, BN+ReLU+pool op" in str(fast.execution_plan)
    _stem_region(ref, fast, x, gen)


def test_training_stem_op_follows_batchnorms_momentum_none_and_eval_with_gradients(gen, pool_op_calls):
    """momentum=None (the cumulative average over num_batches_tracked), as the stem's modules compute it; and eval with
    autograd on (running statistics, the op's eval backward) in the stem region (the plan's rule runs tiny's eval
    stem contiguous, its modules)."""
    ref, fast, x = _grid_pair(gen, plan="default")
    ref.bn1.momentum = fast.bn1.momentum = None
    labels = torch.randint(0, 7, (2,), generator=gen)
    twin = _twin(ref)
    for _ in range(3):
        _step(ref, x, labels), _step(fast, x, labels), twin(_conv1_float64(ref, x))
    _running_statistics_as_float64(ref, fast, twin, x)
    ref.eval(), fast.eval()
    _step(fast, x, labels)  # eval with autograd: the plan's key "eval+grad", whose rule is contiguous at 8x8 frames
    assert len(pool_op_calls) == 3 and "eval+grad float32 2x3x4x32x32 contiguous: modules, contiguous" in str(
        fast.execution_plan)  # fmt: skip
    _stem_region(ref, fast, x, gen)


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
def test_training_stem_op_under_bf16_autocast_gives_the_modules_dtype(arch, gen, pool_op_calls):
    """Under CPU autocast LGD-3D's stem modules end in float32 (ATen's max_pool3d is on autocast's float32 list): the
    op's bfloat16 output is widened, so the first block sees what the reference's does; LGD-2D's max_pool2d is not
    on that list, and its stem stays bfloat16."""
    ref, fast, x = _grid_pair(gen, arch, plan="default")
    op = planning.Choice(False, True, planning.CL, "cpp", "the op")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _stem_modules(ref, x)
        got = fast._run_stem(op, x)
        torch.manual_seed(3)  # the same dropout draws
        logits_ref = ref(x)[0]
        torch.manual_seed(3)
        logits_fast = fast(x)[0]
    assert got.dtype == want.dtype == (torch.float32 if arch == "lgd3d_tiny" else torch.bfloat16)
    assert _rel(got, want) < 1e-2  # (bfloat16 rounds the normalised values: ATen's BatchNorm output, the op's output)
    assert logits_fast.dtype == logits_ref.dtype
    assert _rel(logits_fast.float(), logits_ref.float()) < 5e-2  # bfloat16 convs, BatchNorm rounded differently
    assert len(pool_op_calls) == 2


def test_other_training_stems_keep_their_modules(gen, pool_op_calls):
    """A bn1 of another class (its forward may compute anything), another pool, a backend named, or float64 (also
    under bf16 autocast): the stem's own modules."""

    class _Norm(nn.BatchNorm3d):
        def forward(self, x):
            return super().forward(x) + 1.0

    x = torch.randn((2, 3, 4, 32, 32), generator=gen)
    cases = []
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    fast.bn1 = _Norm(16)
    cases.append((fast, x))
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    fast.maxpool = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
    cases.append((fast, x))
    cases.append((_pair("lgd3d_tiny", gen, plan="default", backend="reference")[1], x))
    cases.append((_pair("lgd3d_tiny", gen, plan="default")[1].double(), x.double()))
    for model, clip in cases:
        model.train()(clip)[0].sum().backward()
        assert "BN+ReLU+pool op" not in str(model.execution_plan)
    _, fast = _pair("lgd3d_tiny", gen, plan="default")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (a float64 clip stays float64 under autocast)
        fast.double().train()(x.double())[0].sum().backward()
    assert "BN+ReLU+pool op" not in str(fast.execution_plan)
    assert not pool_op_calls
