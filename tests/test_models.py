"""Reference models: shapes, parameter counts, the P3D cycle, initialisation, heads and bad input."""

import numpy as np
import pytest
import torch
from torch import nn

import lgd_fast
from lgd_fast import create_model, list_models
from lgd_fast.models import LGD2D, LGD3D, LGDBlock, P3DBasicBlock, P3DBottleneck, model_entry

SMALL_3D = (2, 3, 8, 40, 40)  # N, C, T, H, W: small enough for R152 on two cores, odd after the stem
SMALL_2D = (2, 3, 3, 40, 40)
ALL = list_models()


def _small_input(name, n=2):
    shape = list(SMALL_2D if name.startswith("lgd2d") else SMALL_3D)
    if name == "lgd3d_tiny":
        shape[2:] = [7, 33, 33]  # odd T, H, W
    shape[0] = n
    return torch.randn(shape)


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, LGDBlock)]


def test_registry_lists_every_variant():
    assert set(ALL) == {
        "lgd3d_r18", "lgd3d_r34", "lgd3d_r50", "lgd3d_r101", "lgd3d_r152", "lgd3d_tiny",
        "lgd2d_r18", "lgd2d_r50", "lgd2d_r101",
    }  # fmt: skip


def test_unknown_model_suggests_names():
    with pytest.raises(ValueError, match="unknown model 'lgd3d_r5'.*Did you mean lgd3d_r50"):
        create_model("lgd3d_r5", 10)


@pytest.mark.parametrize("name", ["lgd2d_r18", "lgd2d_r50", "lgd2d_r101"])
def test_fast_true_for_lgd2d_gives_the_fast_lgd2d_with_the_same_keys(name):
    from lgd_fast.models import FastLGD2D

    fast, ref = create_model(name, 5, fast=True), create_model(name, 5)
    assert isinstance(fast, FastLGD2D) and list(fast.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("classifier", ["kernel", "two_heads"])
def test_every_variant_runs_forward_and_backward(name, classifier):
    model = create_model(name, 11, classifier=classifier)
    x = _small_input(name)
    model.train()
    out = model(x)
    if classifier == "two_heads":
        local, global_ = out
        assert local.shape == global_.shape == (2, 11)
        loss = nn.functional.cross_entropy(local, torch.tensor([1, 3])) + nn.functional.cross_entropy(
            global_, torch.tensor([1, 3])
        )
    else:
        assert out.shape == (2, 11)
        loss = nn.functional.cross_entropy(out, torch.tensor([1, 3]))
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # Every parameter on the active path gets a gradient (fc6 starts at zero, yet its gradient is non-zero),
    # except fc5: its gradient flows back through fc6's weight, which is zero at initialisation.
    unused = ("kernel_head.",) if classifier == "two_heads" else ("fc.", "fc_g.")
    for key, grad in grads.items():
        if key.startswith(unused):
            continue
        if ".fc5." in key:
            assert grad is not None and grad.abs().sum() == 0, key
        else:
            assert grad is not None and grad.abs().sum() > 0, key
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 11)


def _bottleneck_params(cin, planes, stride, temporal, reduction=16):
    out = 4 * planes
    hidden = out // reduction
    n = cin * planes + planes * planes * 9 + planes * out + 2 * (planes + planes + out)
    if temporal:  # the temporal 3x1x1 conv of the P3D pair
        n += planes * planes * 3
    if stride != 1 or cin != out:
        n += cin * out + 2 * out
    return n + 2 * (cin * hidden + hidden) + 2 * (hidden * out + out) + out * hidden + hidden + hidden * out + out


def _basic_params(cin, planes, stride, variant, temporal, reduction=16):
    hidden = planes // reduction
    n = cin * planes * 9 + planes * planes * 9 + 2 * (2 * planes)
    if temporal:  # two temporal convs; B's first one reads the block input
        n += (cin if variant == "B" else planes) * planes * 3 + planes * planes * 3
    if stride != 1 or cin != planes:
        n += cin * planes + 2 * planes
    return (
        n
        + 2 * (cin * hidden + hidden)
        + 2 * (hidden * planes + planes)
        + planes * hidden
        + hidden
        + hidden * planes
        + planes
    )


def _expected_params(
    block,
    layers,
    num_classes,
    *,
    temporal,
    stem_t,
    classifier="two_heads",
    sketch=4096,
    widths=(64, 128, 256, 512),
    stem_width=64,
    reduction=16,
):
    n = 3 * stem_width * stem_t * 49 + 2 * stem_width
    cin, index = stem_width, 0
    for stage, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
        for i in range(depth):
            stride = 2 if stage and not i else 1
            if block == "bottleneck":
                n += _bottleneck_params(cin, planes, stride, temporal, reduction)
                cin = 4 * planes
            else:
                n += _basic_params(cin, planes, stride, "ABC"[index % 3], temporal, reduction)
                cin = planes
            index += 1
    n += 2 * (cin * num_classes + num_classes)  # fc and fc_g
    if classifier == "kernel":
        n += 2 * sketch * num_classes + num_classes
    return n


def _lgd_only_params(model):
    """Parameters a plain 2-D ResNet does not have: the global path fc1..fc6 and fc_g."""
    return sum(
        p.numel()
        for k, p in model.named_parameters()
        if k.startswith("fc_g.") or (k.startswith("layer") and k.split(".")[-2] in {f"fc{i}" for i in range(1, 7)})
    )


# torchvision's published parameter counts of ResNet-18/50/101 with 1000 classes: an outside anchor.
TORCHVISION_RESNET = {"r18": 11_689_512, "r50": 25_557_032, "r101": 44_549_160}


@pytest.mark.parametrize("depth", ["r18", "r50", "r101"])
def test_lgd2d_backbone_is_a_torchvision_resnet(depth):
    model = create_model(f"lgd2d_{depth}", 1000, classifier="two_heads")
    total = sum(p.numel() for p in model.parameters())
    assert total - _lgd_only_params(model) == TORCHVISION_RESNET[depth]


@pytest.mark.parametrize(
    "name,block,layers",
    [
        ("lgd3d_r18", "basic", (2, 2, 2, 2)),
        ("lgd3d_r34", "basic", (3, 4, 6, 3)),
        ("lgd3d_r50", "bottleneck", (3, 4, 6, 3)),
        ("lgd3d_r101", "bottleneck", (3, 4, 23, 3)),
        ("lgd3d_r152", "bottleneck", (3, 8, 36, 3)),
    ],
)
@pytest.mark.parametrize("classifier", ["two_heads", "kernel"])
def test_lgd3d_parameter_counts(name, block, layers, classifier):
    model = create_model(name, 400, classifier=classifier)
    expected = _expected_params(block, layers, 400, temporal=True, stem_t=4, classifier=classifier)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("classifier", ["two_heads", "kernel"])
def test_lgd3d_tiny_parameter_count(classifier):
    model = create_model("lgd3d_tiny", 8, classifier=classifier)
    expected = _expected_params(
        "basic", (1, 1, 1, 1), 8, temporal=True, stem_t=2, classifier=classifier, sketch=512,
        widths=(16, 32, 64, 128), stem_width=16, reduction=4,
    )  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == expected


def test_lgd2d_parameter_count_formula_agrees():
    model = create_model("lgd2d_r50", 400, classifier="two_heads")
    assert sum(p.numel() for p in model.parameters()) == _expected_params(
        "bottleneck", (3, 4, 6, 3), 400, temporal=False, stem_t=1
    )


@pytest.mark.parametrize("name", ["lgd3d_r18", "lgd3d_r50", "lgd3d_r101", "lgd3d_tiny"])
def test_p3d_variants_cycle_over_all_blocks(name):
    blocks = _blocks(create_model(name, 5))
    assert [b.variant for b in blocks] == ["ABC"[i % 3] for i in range(len(blocks))]
    for b in blocks:
        temporal = b.conv2_t if isinstance(b, P3DBottleneck) else b.conv1_t
        assert temporal.kernel_size == (3, 1, 1) and temporal.padding == (1, 0, 0)
        # Only the parallel variant B strides its temporal conv in space.
        assert temporal.stride == ((1, b.stride, b.stride) if b.variant == "B" else (1, 1, 1))
        if isinstance(b, P3DBasicBlock) and b.variant == "B":
            assert temporal.in_channels == b.in_channels  # the author's file uses `planes` here (SPEC.md)


def test_r18_has_stage_opening_b_blocks():
    """The case the author's module fails on: a B block opening a stage with more output channels."""
    blocks = _blocks(create_model("lgd3d_r18", 5))
    opening_b = [b for b in blocks if b.variant == "B" and b.in_channels != b.out_channels]
    assert opening_b, "R18 should have a stage whose first block is of type B"


def test_spec_output_shapes():
    model = create_model("lgd3d_r50", 7, classifier="two_heads").eval()
    x = torch.randn(1, 3, 16, 112, 112)
    with torch.no_grad():
        local, g = model.forward_features(x)
    assert local.shape == (1, 2048, 4, 4, 4) and g.shape == (1, 2048)
    model2d = create_model("lgd2d_r18", 7, classifier="two_heads").eval()
    with torch.no_grad():
        local, g = model2d.forward_features(torch.randn(2, 3, 3, 64, 64))
    assert local.shape == (6, 512, 2, 2) and g.shape == (2, 512)


def test_fresh_block_is_a_plain_residual_block():
    """fc6 starts at zero, so x' = ReLU(residual(x) + shortcut(x)) whatever g is; a non-zero fc6 changes that."""
    cases = [
        (P3DBottleneck(24, 8, variant="B", stride=2), torch.randn(3, 24, 5, 9, 9)),
        (P3DBasicBlock(16, 32, variant="C", stride=2), torch.randn(3, 16, 5, 9, 9)),
        (lgd_fast.models.Bottleneck2d(16, 8), torch.randn(6, 16, 9, 9)),  # 3 videos x 2 frames
    ]
    for block, x in cases:
        block.train()
        g1, g2 = torch.randn(3, x.shape[1]), torch.randn(3, x.shape[1]) * 5
        plain = torch.relu(block.residual(x) + block.shortcut(x))
        torch.testing.assert_close(block(x, g1)[0], plain, rtol=0, atol=0)
        torch.testing.assert_close(block(x, g2)[0], plain, rtol=0, atol=0)
        nn.init.normal_(block.fc6.weight)
        assert not torch.allclose(block(x, g1)[0], block(x, g2)[0])


def test_global_update_uses_input_mean_and_new_vector():
    """g' = ReLU(W2 W1 GAP(x) + W4 W3 g) and x' adds W6 W5 g' (the UPDATED vector), as SPEC.md states."""
    block = P3DBasicBlock(8, 16, variant="A", stride=2).eval()
    nn.init.normal_(block.fc6.weight)
    x, g = torch.randn(2, 8, 3, 7, 7), torch.randn(2, 8)
    out, g_new = block(x, g)
    expected_g = torch.relu(block.fc2(block.fc1(x.mean((2, 3, 4)))) + block.fc4(block.fc3(g)))
    torch.testing.assert_close(g_new, expected_g)
    d = block.fc6(block.fc5(expected_g))[:, :, None, None, None]
    torch.testing.assert_close(out, torch.relu(block.residual(x) + block.shortcut(x) + d))


def test_lgd2d_local_path_treats_frames_independently():
    model = create_model("lgd2d_r18", 5, classifier="two_heads").eval()
    x = torch.randn(1, 3, 3, 48, 48)
    y = x.clone()
    y[:, :, 2] = torch.randn(3, 48, 48)  # change only the third frame
    with torch.no_grad():
        a, _ = model.forward_features(x)
        b, _ = model.forward_features(y)
    torch.testing.assert_close(a[:2], b[:2], rtol=0, atol=0)  # fresh model: no diffusion yet
    for block in _blocks(model):
        nn.init.normal_(block.fc6.weight, std=0.1)
    with torch.no_grad():
        a, _ = model.forward_features(x)
        b, _ = model.forward_features(y)
    assert not torch.allclose(a[:2], b[:2]), "with diffusion, one frame reaches the others through g"


def test_videos_in_a_batch_do_not_interact_in_eval():
    model = create_model("lgd3d_tiny", 4).eval()
    for block in _blocks(model):
        nn.init.normal_(block.fc6.weight, std=0.1)
    x = torch.randn(3, 3, 8, 32, 32)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def test_two_heads_and_stages():
    model = create_model("lgd3d_tiny", 4, classifier="two_heads")
    assert not hasattr(model, "kernel_head")
    x = torch.randn(2, 3, 8, 32, 32)
    model.eval()
    with torch.no_grad():
        local = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(local, model.fc(feats[0].mean((2, 3, 4))))
    kernel_model = create_model("lgd3d_tiny", 4)
    assert kernel_model.stage == 2
    kernel_model.load_state_dict(model.state_dict(), strict=False)
    kernel_model.eval()
    with torch.no_grad():
        assert not torch.allclose(kernel_model(x), local)  # stage 2: the combination classifier's logits
        kernel_model.stage = 1
        torch.testing.assert_close(kernel_model(x), local)  # stage 1: the author's local head
    kernel_model.train()
    assert isinstance(kernel_model(x), tuple)  # stage 1 training: (local, global) logits
    kernel_model.stage = 2
    assert isinstance(kernel_model(x), torch.Tensor)


def test_creation_and_forward_are_deterministic():
    torch.manual_seed(123)
    a = create_model("lgd3d_tiny", 6)
    torch.manual_seed(123)
    b = create_model("lgd3d_tiny", 6)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randn(2, 3, 8, 32, 32)
    a.eval()
    with torch.no_grad():
        assert torch.equal(a(x), a(x))


def test_bf16_autocast_forward():
    model = create_model("lgd3d_tiny", 3).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(3, 8, 32, 32), ValueError, r"shape \(N, 3, T, H, W\), got a 4-D tensor"),
        (torch.randn(1, 4, 8, 32, 32), ValueError, "3 colour channels"),
        (torch.randint(0, 255, (1, 3, 8, 32, 32), dtype=torch.uint8), TypeError, "floating-point.*uint8"),
        (torch.randn(1, 3, 8, 32, 32, dtype=torch.float64), TypeError, "float64 does not match.*float32"),
        (torch.randn(1, 3, 1, 32, 32), ValueError, "1 frames but the stem's early temporal stride is 2"),
        ([1, 2, 3], TypeError, "expected a torch.Tensor"),
        (torch.randn(0, 3, 8, 32, 32), ValueError, r"every size >= 1, got an empty batch \(N = 0\)"),
        (torch.randn(1, 3, 8, 0, 32), ValueError, r"every size >= 1, got no frames or pixels"),
        (torch.randn(1, 3, 8, 32, 0), ValueError, r"every size >= 1, got no frames or pixels"),
    ],
)
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_bad_input_is_named(x, error, match, fast):
    """Reference and fast models name the problem (the fast one before its arena or recorded program looks at x;
    an empty batch made the kernel classifier's FFT fail with oneMKL's 'Inconsistent configuration parameters')."""
    model = create_model("lgd3d_tiny", 3, fast=fast)
    with pytest.raises(error, match=match):
        model(x)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="classifier must be one of"):
        create_model("lgd3d_tiny", 3, classifier="bilinear")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        create_model("lgd3d_tiny", 0)
    for wrong in (2.5, "10", True):
        with pytest.raises(TypeError, match="num_classes must be an int"):
            create_model("lgd3d_tiny", wrong)
    assert create_model("lgd3d_tiny", np.int64(5)).num_classes == 5
    with pytest.raises(ValueError, match="no hidden units"):
        create_model("lgd3d_tiny", 3, global_reduction=64)
    with pytest.raises(ValueError, match="variant must be one of"):
        P3DBottleneck(8, 4, variant="D")


def test_registry_input_sizes_run():
    for name in ("lgd3d_tiny", "lgd2d_r18"):
        c, t, h, w = model_entry(name).input_size
        model = create_model(name, 3).eval()
        with torch.no_grad():
            assert model(torch.randn(1, c, t, h, w)).shape == (1, 3)
    assert isinstance(create_model("lgd3d_tiny", 3), LGD3D) and isinstance(create_model("lgd2d_r18", 3), LGD2D)
