"""The fast LGD-2D (frames run as videos through fused units and block ends) against the reference LGD-2D."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from lgd_fast import create_model
from lgd_fast.models import FastLGD2D
from lgd_fast.plan import forced
from test_fast_models import (
    _assert_steps_equal,
    _float64_copies,
    _rel,
    _train_step,
    _with_diffusion,
    forced_stack_cleared,
)

SMALL = {"widths": (16, 32, 64, 128), "stem_width": 16}  # the real architectures, narrow: fast on 2 cores


def _pair(name, gen, num_classes=7, **options):
    ref = _with_diffusion(create_model(name, num_classes, **SMALL, **options), gen)
    fast = create_model(name, num_classes, fast=True, **SMALL, **options)
    fast.load_state_dict(ref.state_dict())  # strict: the very same keys and shapes
    return ref, fast


@pytest.mark.parametrize("training_units", [True, False], ids=["fused-training-units", "default-training-units"])
@pytest.mark.parametrize("name,classifier", [("lgd2d_r18", "two_heads"), ("lgd2d_r50", "kernel")])
def test_float64_fast_lgd2d_equals_reference(name, classifier, training_units, gen):
    """float64: eval output, train outputs, every gradient and every running statistic to 1e-9."""
    ref, fast = _pair(name, gen, classifier=classifier)
    ref64, fast64 = _float64_copies(ref, fast)
    x = torch.randn(2, 3, 3, 65, 67, generator=gen, dtype=torch.float64)  # odd H, W: odd maps at every stage
    heads = 2 if classifier == "two_heads" else 1
    upstream = [torch.randn(2, 7, generator=gen, dtype=torch.float64) for _ in range(heads)]
    with forced(training=training_units):
        ref64.eval(), fast64.eval()
        with torch.no_grad():
            assert _rel(fast64(x), ref64(x)) < 1e-9
        ref_step = _train_step(ref64, x, upstream)
        fast_step = _train_step(fast64, x, upstream)
    _assert_steps_equal(fast_step, ref_step)
    for (key, a), b in zip(fast64.state_dict().items(), ref64.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), key


def test_fast_lgd2d_is_the_reference_class_with_the_same_keys_and_shapes(gen):
    ref, fast = _pair("lgd2d_r18", gen, classifier="kernel")
    assert isinstance(fast, FastLGD2D) and list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 3, 64, 64, generator=gen)
    ref.eval(), fast.eval()
    with torch.no_grad():
        (a, g), (b, h) = fast.forward_features(x), ref.forward_features(x)
    assert a.shape == b.shape == (6, 128, 2, 2) and g.shape == h.shape == (2, 128)  # frames, as the reference


# fp32 training gradients: over 8 draws by p3d_cases.GradientDraws (a ReLU input within float32 rounding of zero
# flips in one implementation in a few draws in a hundred). History: the per-tensor bound was 25% in every one of
# 6 draws, and a flip broke it in 3 of 288 draws, about one run in 16, while a gradient 1% wrong passed. Seed 344
# had two flipped draws of 6 (the float64 reference on perturbed input reproduced both). R50's gradients flip far
# more often at sizes a test can afford (the reference's own error over all gradients 6e-5..4.7e-2 over 4 draws);
# R50-2D's algebra is checked exactly in float64 above.


def test_fp32_eval_and_train_within_twice_the_references_error(gen):
    """fp32 eval and training step against float64: outputs, every parameter gradient and running statistic.

    Each parameter's gradient meets the 2x rule (floor p3d_cases.GRAD_FLOOR) in every draw outside its worst
    quarter. A ReLU input within float32 rounding of zero lands on either side in two implementations, and at these
    small maps (N=2, 4x4 and 2x2 frames deep in the net) one flipped position moves the global path's small
    gradients by tens of percent. Measured (seed 197543595, draw 0): the fast model's layer1.0.fc3.weight gradient
    2.5e-1 from float64, the reference's 7.7e-7; the float64 reference itself, on the input times (1 + 1e-6 noise)
    (the relative error float32 activations carry there), moved by the very same 2.5e-1, 3.1e-1 and 4.6e-2 on its
    three worst keys: one discrete flip, no defect. Flips hit a few draws in a hundred, each on its own; a defect
    repeats in every draw and still fails (a 1% error in the block end's scale gradient fails here), as the pooled
    check over all gradients does.
    """
    from p3d_cases import GradientDraws

    gradients = GradientDraws()
    for i in range(8):
        memory_format = torch.channels_last_3d if i % 2 else torch.contiguous_format
        ref, fast = _pair("lgd2d_r18", gen, classifier="two_heads")
        x = torch.randn(2, 3, 3, 64, 64, generator=gen).contiguous(memory_format=memory_format)
        upstream = [torch.randn(2, 7, generator=gen) for _ in range(2)]
        ref64 = copy.deepcopy(ref).double()
        with forced(training=True):
            ref.eval(), fast.eval(), ref64.eval()
            with torch.no_grad():
                exact = ref64(x.double())
                # 14 logits: a ratio of two fp32 errors over so few values is noise, so the floor is the fp32
                # rounding a deep net's outputs carry (measured 5e-7..2e-5 for both models over 12 seeds)
                assert _rel(fast(x), exact) <= max(2 * _rel(ref(x), exact), 3e-5)
            out64, grads64 = _train_step(ref64, x.double(), [u.double() for u in upstream])
            ref_out, ref_grads = _train_step(ref, x, upstream)
            fast_out, fast_grads = _train_step(fast, x, upstream)
        for a, b, e in zip(fast_out, ref_out, out64, strict=True):
            assert _rel(a, e) <= max(2 * _rel(b, e), 3e-5)
        gradients.add(fast_grads, ref_grads, grads64)
        exact_state = ref64.state_dict()  # running statistics: against float64's, by the 2x rule
        for (key, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
            if a.is_floating_point():
                e = exact_state[key]
                assert _rel(a, e) <= max(2 * _rel(b, e), 1e-6), (key, _rel(a, e), _rel(b, e))
            else:
                assert torch.equal(a, b), key
    gradients.check("lgd2d_r18 fp32 training")


@pytest.mark.parametrize("name", ["lgd2d_r18", "lgd2d_r50"])
def test_bf16_autocast_within_twice_pytorch_error(name, gen):
    """400 classes (Kinetics'), as test_fast_models' bf16 rule: the ratio of two bf16 errors over 14 logits (2
    clips, 7 classes) is mostly chance: r18's failed 2x + 1e-3 once in 180 draws (fast 5.97e-3 vs PyTorch's
    2.43e-3, a review's /tmp study). Over 800 logits, (fast - 1e-3) / PyTorch's error was at most 0.97 in 60
    draws of r18 and 1.15 in 40 of r50 (/tmp study, seeds 0-59 and 0-39)."""
    ref, fast = _pair(name, gen, num_classes=400, classifier="two_heads")
    x = torch.randn(2, 3, 3, 64, 64, generator=gen)
    ref.eval(), fast.eval()
    with torch.no_grad(), forced():
        exact = copy.deepcopy(ref).double()(x.double()).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16, fast_bf16 = ref(x).float(), fast(x).float()
    assert _rel(fast_bf16, exact) <= 2 * _rel(ref_bf16, exact) + 1e-3


def test_default_plan_and_compiled_fast_lgd2d_match(gen):
    """Nothing forced: the CPU's default plan; and torch.compile of the fast model."""
    ref, fast = _pair("lgd2d_r18", gen, classifier="two_heads")
    x = torch.randn(2, 3, 3, 96, 96, generator=gen)
    ref.eval(), fast.eval()
    with forced_stack_cleared(), torch.no_grad():
        expected = ref(x)
        assert _rel(fast(x), expected) < 1e-5
        assert "24x24" in str(fast.execution_plan)  # layer1's frames: decided and recorded
        # eval: the stem (7x7 conv, BatchNorm, ReLU, 3x3 max-pool over every frame) as one stem_conv_pool kernel
        assert "conv+BN+ReLU+pool kernel" in str(fast.execution_plan).splitlines()[2]
        torch._dynamo.reset()  # a fresh cache: the fast LGD-3D's forward is the same code (test_fast_models)
        compiled = torch.compile(fast, backend="inductor")
        assert _rel(compiled(x), expected) < 1e-5  # the recorded program as one op (tests/test_recorded.py)
        fast.recorded_inference = False  # traced layer by layer
        torch._dynamo.reset()
        assert _rel(torch.compile(fast, backend="inductor")(x), expected) < 1e-5


def test_measured_plan_times_every_candidate_on_the_kernels(gen, monkeypatch):
    """plan="measure" also times the contiguous candidates. Contiguous frames seen as videos are (N, T, C, H, W)
    in memory, neither layout the epilogue's kernels read: the block end must still run its kernel there (it
    fell back to the reference implementation, with a warning, and so timed the reference in that candidate)."""
    epilogue = importlib.import_module("lgd_fast.ops.diffusion_epilogue")  # the module (the package exports the op)

    def no_reference(*args):
        raise AssertionError("diffusion_epilogue ran its reference implementation")

    monkeypatch.setattr(epilogue, "diffusion_epilogue_reference", no_reference)
    ref = _with_diffusion(create_model("lgd2d_r18", 7, **SMALL, classifier="two_heads"), gen).eval()
    fast = create_model("lgd2d_r18", 7, fast=True, plan="measure", **SMALL, classifier="two_heads").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 3, 33, 31, generator=gen)
    with forced_stack_cleared(), torch.no_grad():
        assert _rel(fast(x), ref(x)) < 1e-5
    assert "end only/contiguous" in str(fast.execution_plan)  # the contiguous candidates were timed
