"""Author-format checkpoints and ImageNet inflation."""

import os

import pytest
import torch
from torch import nn

from lgd_fast import create_model, inflate_imagenet, load_author_checkpoint
from lgd_fast.models import LGDBlock


def _randomise(model):
    """Non-trivial weights everywhere: random BN statistics and a non-zero global->local path."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, LGDBlock):
                m.fc6.weight.normal_(0, 0.1)
                m.fc6.bias.normal_(0, 0.1)
    return model


def _author_checkpoint(model):
    """A checkpoint as the author's train_3d.py writes it: DDP prefix inside a training dict."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith("kernel_head.")}
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.04}]}, "epoch": 12}


def test_author_checkpoint_round_trip(tmp_path):
    source = _randomise(create_model("lgd3d_tiny", 5, classifier="two_heads")).eval()
    path = tmp_path / "current.pth"
    torch.save(_author_checkpoint(source), path)
    target = create_model("lgd3d_tiny", 5, classifier="two_heads").eval()
    report = load_author_checkpoint(target, path)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(source.state_dict())
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_kernel_model_loads_author_checkpoint_keeping_its_head():
    source = _randomise(create_model("lgd3d_tiny", 5, classifier="two_heads"))
    target = create_model("lgd3d_tiny", 5)  # classifier="kernel"
    head_before = {k: v.clone() for k, v in target.kernel_head.state_dict().items()}
    report = load_author_checkpoint(target, source.state_dict())
    assert report.initialised and all(k.startswith("kernel_head.") for k in report.initialised)
    for k, v in target.kernel_head.state_dict().items():
        assert torch.equal(v, head_before[k])
    assert torch.equal(target.layer4[0].fc6.weight, source.layer4[0].fc6.weight)


def test_mismatching_checkpoints_are_named():
    r18 = create_model("lgd3d_r18", 5, classifier="two_heads").state_dict()
    tiny = create_model("lgd3d_tiny", 5, classifier="two_heads")
    with pytest.raises(ValueError, match="(?s)unexpected in the source: .*layer1.1.*wrong shape: .*layer1.0"):
        load_author_checkpoint(tiny, r18)
    with pytest.raises(ValueError, match="wrong shape"):
        load_author_checkpoint(tiny, {k: v for k, v in r18.items() if k in tiny.state_dict()})
    partial = {k: v for k, v in tiny.state_dict().items() if not k.startswith("fc_g.")}
    with pytest.raises(ValueError, match="missing from the source.*fc_g"):
        load_author_checkpoint(tiny, partial)
    report = load_author_checkpoint(tiny, partial, strict=False)
    assert report.missing == ["fc_g.weight", "fc_g.bias"]
    with pytest.raises(ValueError, match="wrong shape"):  # even without strict: nothing sensible to load
        load_author_checkpoint(tiny, {k: v for k, v in r18.items() if k in tiny.state_dict()}, strict=False)


class _NotATensor:
    pass


def test_untrusted_and_missing_files(tmp_path):
    model = create_model("lgd3d_tiny", 5)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_author_checkpoint(model, tmp_path / "absent.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "hook": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_author_checkpoint(model, evil)
    for i in range(20):  # random bytes break the unpickler in many ways (CI once saw an IndexError escape)
        garbage = tmp_path / f"garbage{i}.pth"
        garbage.write_bytes(os.urandom(64))
        with pytest.raises(ValueError, match=f"garbage{i}.pth"):
            load_author_checkpoint(model, garbage)
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_author_checkpoint(model, {"epoch": 3})


def _imagenet_from_lgd2d(model2d):
    """A torchvision-format ResNet state_dict: LGD-2D minus what LGD adds, plus an ImageNet classifier."""
    sd = {k: v for k, v in model2d.state_dict().items() if not (k.startswith(("fc", "kernel_head")) or ".fc" in k)}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, model2d.feature_dim), torch.randn(1000)
    return sd


@pytest.mark.parametrize("depth,early_stride", [("r18", 4), ("r50", 2)])
def test_inflated_lgd3d_on_a_static_video_equals_lgd2d_per_frame(tmp_path, depth, early_stride):
    """Identity (A) / zero (B, C) temporal kernels and a centre-tap stem make a clip of one repeated image
    behave exactly like the 2-D network on that image, frame by frame (SPEC.md section 3)."""
    model2d = _randomise(create_model(f"lgd2d_{depth}", 5, classifier="two_heads")).double().eval()
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save(_imagenet_from_lgd2d(model2d), path)
    model3d = create_model(f"lgd3d_{depth}", 5, classifier="two_heads", early_stride=early_stride).double().eval()
    report = inflate_imagenet(model3d, path)
    assert "fc.weight" in report.skipped and not report.missing and not report.unexpected
    # the global path is not in an ImageNet file: copy it so both networks diffuse identically
    lgd_keys = {k: v for k, v in model2d.state_dict().items() if ".fc" in k}
    model3d.load_state_dict(lgd_keys, strict=False)

    image = torch.randn(1, 3, 1, 56, 56, dtype=torch.float64)  # float64: equal up to 1e-10, not just close
    frames = 2
    with torch.no_grad():
        local3d, g3d = model3d.forward_features(image.expand(1, 3, frames * early_stride, 56, 56).contiguous())
        local2d, g2d = model2d.forward_features(image.expand(1, 3, frames, 56, 56).contiguous())
    assert local3d.shape[2] == frames
    for t in range(frames):
        torch.testing.assert_close(local3d[:, :, t], local2d[t : t + 1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g3d, g2d, rtol=1e-10, atol=1e-10)


def test_inflation_initialises_temporal_kernels_by_variant():
    model = create_model("lgd3d_r18", 5)
    model2d = create_model("lgd2d_r18", 5)
    inflate_imagenet(model, _imagenet_from_lgd2d(model2d))
    for block in (m for m in model.modules() if isinstance(m, LGDBlock)):
        for conv in (block.conv1_t, block.conv2_t):
            w = conv.weight
            if block.variant == "A":
                assert torch.equal(w[:, :, 1, 0, 0], torch.eye(w.shape[0])) and w[:, :, [0, 2]].abs().sum() == 0
            else:
                assert w.abs().sum() == 0
    stem = model.conv1.weight  # early stride 4: the 2-D kernel sits at temporal index 2, zeros elsewhere
    assert torch.equal(stem[:, :, 2], model2d.conv1.weight) and stem[:, :, [0, 1, 3]].abs().sum() == 0


def test_lgd2d_loads_imagenet_directly():
    source = _randomise(create_model("lgd2d_r18", 5))
    target = create_model("lgd2d_r18", 5)
    report = inflate_imagenet(target, _imagenet_from_lgd2d(source))
    assert torch.equal(target.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert any("kept as initialised" in why for why in report.initialised.values())


def test_inflation_rejects_another_depth():
    r50_imagenet = _imagenet_from_lgd2d(create_model("lgd2d_r50", 5))
    with pytest.raises(ValueError, match="does not match LGD3D|wrong shape|cannot inflate|does not fit"):
        inflate_imagenet(create_model("lgd3d_r18", 5), r50_imagenet)
    with pytest.raises(TypeError, match="takes an LGD3D or LGD2D"):
        inflate_imagenet(nn.Linear(2, 2), r50_imagenet)
