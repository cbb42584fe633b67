"""Fast P3D units on the CPU: every variant of both block kinds against the reference block, eval and train.

float32: the whole LGD block (fused unit, fused projection shortcut, global path), outputs x' and g', the
gradients of x, g and every parameter, and in training the running statistics after the step, within 1e-4.
bfloat16: the P3D unit and its shortcut under the 2x-PyTorch rule, pooled over fresh draws
(``p3d_cases.run_unit_case`` and ``check_pooled_ratio`` say why). Inputs contiguous and channels_last_3d.
The Triton backend runs the same cases under the interpreter in tests/test_p3d_triton.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from p3d_cases import (
    ReluBranches,
    check_fp32_draws,
    check_pooled_ratio,
    randomise_block,
    run_unit_case,
    unit_case_id,
)

from lgd_fast import plan
from lgd_fast.models import (
    FastP3DBasicBlock,
    FastP3DBottleneck,
    P3DBasicBlock,
    P3DBottleneck,
    create_model,
    to_fast,
)
from lgd_fast.models import p3d as p3d_models
from lgd_fast.models.p3d import to_fast_unit
from lgd_fast.ops import conv_bn as conv_bn_module
from lgd_fast.ops import p3d_conv

# (unit, variant, stride, (N, C_in, T, H, W), planes): A/B/C at strides 1 and 2, identity and projection
# shortcuts, T = 1, 5, 7, H = W = 7, 15, batch 1 and 3, odd channel counts.
GEOMETRIES = [
    ("bottleneck", "A", 1, (3, 20, 5, 7, 7), 5),
    ("bottleneck", "B", 2, (1, 12, 7, 15, 15), 7),
    ("bottleneck", "C", 1, (2, 36, 1, 7, 7), 9),
    ("bottleneck", "A", 2, (1, 9, 5, 7, 7), 5),
    ("bottleneck", "B", 1, (3, 28, 5, 7, 7), 7),
    ("bottleneck", "C", 2, (1, 13, 7, 15, 15), 5),
    ("basic", "A", 2, (3, 7, 5, 7, 7), 9),
    ("basic", "B", 2, (1, 5, 7, 15, 15), 11),
    ("basic", "B", 1, (2, 9, 5, 7, 7), 9),
    ("basic", "C", 1, (1, 17, 7, 7, 7), 17),
]
FP32_DRAWS = 4  # fresh draws per float32 case (p3d_cases.check_fp32_draws says why)
DRAWS = 16  # fresh draws per bfloat16 case (p3d_cases.check_pooled_ratio says why)
CASES = [
    (*g, mode, dtype, layout)
    for g in GEOMETRIES
    for mode in ("eval", "train")
    for dtype in ("float32", "bfloat16")
    for layout in ("contiguous", "channels_last_3d")
]


@pytest.mark.parametrize("case", CASES, ids=[unit_case_id(*c) for c in CASES])
def test_fast_unit_matches_reference_block(case, gen):
    *geometry, layout = case
    scope = "block" if case[6] == "float32" else "unit"
    with plan.forced():  # the fused training path (the default CPU training path is the reference's own)
        draws = [
            run_unit_case(*geometry, gen=gen, scope=scope, layout=layout)
            for _ in range(FP32_DRAWS if scope == "block" else DRAWS)
        ]
    if scope == "block":  # (first: a run whose ReLUs differ from the reference's is named there)
        check_fp32_draws(draws, unit_case_id(*case), tol=1e-4)
    else:
        check_pooled_ratio(draws, unit_case_id(*case), set_aside=0)
    names = {r["name"] for r in draws[0]}
    assert {"out", "grad_x", "grad_bn1.weight", "grad_conv1.weight"} <= names
    assert scope == "unit" or {"g", "grad_g", "grad_fc1.weight"} <= names
    if case[5] == "train":
        assert "bn1.running_var" in names


def test_the_float64_run_forced_through_its_own_branches_is_the_reference(gen):
    """ReluBranches' forcing reproduces a run exactly when given that run's own masks, and moves it when one mask
    element flips: run_unit_case's yardstick differs from the float64 reference only where the branches do."""
    block = randomise_block(P3DBottleneck(12, 5, variant="C", stride=2, global_reduction=4), gen).double()
    x = torch.randn(2, 12, 3, 9, 9, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 5 * 4, 3, 5, 5, generator=gen, dtype=torch.float64)

    def run(branches):
        model = copy.deepcopy(block)
        xs = x.clone().requires_grad_()
        with branches.active():
            out, g_out = model(xs, g)
        grads = torch.autograd.grad((out * upstream).sum() + g_out.sum(), [xs, *model.parameters()])
        return [out, g_out, *grads]

    recorded = ReluBranches()
    natural = run(recorded)
    assert len(recorded.masks) == 5  # the unit's three (C variant), the global path's and the block end's
    for a, b in zip(natural, run(ReluBranches(force=recorded.masks)), strict=True):
        assert torch.equal(a, b)
    flipped = [m.clone() for m in recorded.masks]
    flipped[0].view(-1)[0] ^= True
    assert not torch.equal(natural[2], run(ReluBranches(force=flipped))[2])  # grad_x


def test_a_fused_relu_that_drops_a_real_value_fails_the_unit_check(gen, monkeypatch):
    """Each run is judged through its own ReLU branches (run_unit_case); a branch no rounding explains (the
    largest value of a fused ReLU's output zeroed, with a backward that agrees) must still fail, by the flip
    check."""
    real = p3d_models.conv_bn

    def drops_largest(*args, relu=False, **kwargs):
        out = real(*args, relu=relu, **kwargs)
        if not relu:
            return out
        keep = torch.ones_like(out, memory_format=torch.contiguous_format)
        keep.view(-1)[out.detach().flatten().argmax()] = 0  # flatten and a contiguous view: the logical order
        return out * keep

    monkeypatch.setattr(p3d_models, "conv_bn", drops_largest)
    geometry = ("bottleneck", "A", 1, (2, 20, 3, 7, 7), 5, "eval", "bfloat16")
    with plan.forced():
        draws = [run_unit_case(*geometry, gen=gen, scope="unit", layout="channels_last_3d") for _ in range(2)]
    with pytest.raises(AssertionError, match=r"relu0 flips: \d+ masks differ from float64.s"):
        check_pooled_ratio(draws, "dropped value", set_aside=0)


def test_fast_units_load_the_reference_state_dict_and_add_no_state():
    ref = P3DBottleneck(16, 8, variant="B", stride=2)
    fast = FastP3DBottleneck(16, 8, variant="B", stride=2)
    fast.load_state_dict(ref.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    converted = to_fast_unit(copy.deepcopy(ref))
    assert type(converted) is FastP3DBottleneck and converted.state_dict().keys() == ref.state_dict().keys()
    assert type(to_fast_unit(P3DBasicBlock(16, 16, variant="C"))) is FastP3DBasicBlock
    x = torch.randn(2, 16, 3, 9, 9)
    ref.eval(), fast.eval()
    torch.testing.assert_close(fast.residual(x), ref.residual(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.shortcut(x), ref.shortcut(x), rtol=1e-5, atol=1e-5)


def test_fast_model_blocks_are_fast_units():
    model = create_model("lgd3d_tiny", 4, fast=True)
    blocks = [m for m in model.modules() if isinstance(m, P3DBasicBlock)]
    assert blocks and all(type(b) is FastP3DBasicBlock for b in blocks)


def test_unfusable_blocks_are_refused_with_the_module_named(gen):
    block = randomise_block(P3DBottleneck(8, 4, variant="A"), gen)
    block.conv2.padding = (0, 2, 2)
    with pytest.raises(TypeError, match=r"block\.conv2: the fused P3D path takes odd kernels with same padding"):
        to_fast_unit(block)
    model = create_model("lgd3d_tiny", 4)
    model.layer1[0].bn1 = torch.nn.GroupNorm(1, model.layer1[0].bn1.num_features)
    with pytest.raises(TypeError, match=r"layer1\.0\.bn1: the fused P3D path folds BatchNorm3d only"):
        to_fast(model)


def test_cpu_training_defaults_to_the_blocks_own_modules_and_eval_to_fused_convs(gen, monkeypatch):
    """The measured CPU strategy: training runs the reference modules (ATen's BatchNorm), eval the fused convs."""
    block = to_fast_unit(randomise_block(P3DBottleneck(16, 4, variant="B", stride=2, global_reduction=4), gen))
    calls = []
    monkeypatch.setattr(conv_bn_module, "p3d_conv", lambda *a, **k: calls.append(k) or p3d_conv(*a, **k))
    x = torch.randn(2, 16, 3, 15, 15, generator=gen)  # 15x15 frames: the CPU fuses such blocks (>= 14x14)
    block.train()(x, torch.randn(2, 16, generator=gen))
    assert calls == []
    with plan.forced():
        block(x, torch.randn(2, 16, generator=gen))
    assert calls and any(k.get("stats") for k in calls)
    onednn = []
    real = conv_bn_module._onednn
    monkeypatch.setattr(conv_bn_module, "_onednn", lambda *a, **k: onednn.append(a) or real(*a, **k))
    packed = conv_bn_module._PACKED
    with torch.no_grad():  # eval: every conv one oneDNN call, BatchNorm folded and packed (cached), ReLU fused
        block.eval()(x, torch.randn(2, 16, generator=gen))
        assert len(onednn) == 5 and any(a[4] for a in onednn)  # conv1, conv2, conv2_t, conv3, downsample.0
        assert all(a[0] in packed and packed[a[0]][1] == a[2].shape for a in onednn)  # (conv, norm, x, ...)
        g = torch.ones(2, 16)
        cached = block(x, g)[0]
        block.bn1.running_var.mul_(2.0)  # a new running statistic must refold
        assert not torch.allclose(block(x, g)[0], cached)
        reference = copy.deepcopy(block)
        reference.__class__ = P3DBottleneck
        assert torch.allclose(block(x, g)[0], reference(x, g)[0], atol=1e-5)
        onednn.clear()  # 9x9 frames: fused in inference too (the frame-size rule is for gradients)
        small = torch.randn(2, 16, 3, 9, 9, generator=gen)
        assert torch.allclose(block(small, g)[0], reference(small, g)[0], atol=1e-5) and len(onednn) == 5
    onednn.clear()  # eval with gradients at 9x9 frames: the block's own modules, no fused conv
    assert torch.allclose(block(small, g)[0], reference(small, g)[0], atol=1e-5) and onednn == []


@pytest.mark.parametrize(
    "size,expected", [(28, torch.channels_last_3d), (14, torch.channels_last_3d), (7, None), (4, None)]
)
def test_cpu_layout_rule(size, expected, gen):
    """The plan's deterministic default: in inference fused in channels_last_3d at every size; with gradients
    channels_last_3d and fused from 14x14 frames, contiguous below."""
    expected = expected or torch.contiguous_format
    model = create_model("lgd3d_tiny", 4, fast=True, plan="default").eval()
    block = model.layer1[0]
    x = torch.randn(1, 16, 2, size, size, generator=gen)
    never = lambda *a: pytest.fail("the default rule measures nothing")  # noqa: E731
    with torch.no_grad():
        choice = plan.decide(block, x, never, None, None)
    assert choice.to(x).is_contiguous(memory_format=torch.channels_last_3d) and choice.fused and choice.end
    assert choice.why.startswith("default: eval")
    choice = plan.decide(block, x, never, None, None)  # eval with gradients (the block's parameters want them)
    assert choice.to(x).is_contiguous(memory_format=expected)
    assert choice.fused == choice.end == (expected == torch.channels_last_3d)
