"""lgd_fast.engine.evaluate: view averaging, video-level metrics, reports and feature extraction."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lgd_fast
from lgd_fast.data.annotations import VideoRecord
from lgd_fast.data.loader import ClipBatch, ClipSpec, VideoClipLoader
from lgd_fast.engine.evaluate import (
    EvalResult,
    aggregate_views,
    evaluate,
    extract_features,
    format_eval,
    save_features,
    write_eval,
)
from video_testing import write_video

# Views of two videos (3 classes). Video 0: view argmaxes 0, 1, 1 and one huge logit, so the mean of the
# logits says 0 but the mean of the softmax says 1. Video 1: argmaxes 0, 1, 1 again, majority vote says 1,
# the mean of the softmax says 0 (one confident view against two nearly uniform ones).
VIEW_LOGITS = torch.tensor(
    [
        [20.0, 0.0, 0.0],  # video 0
        [5.0, 0.0, 0.0],  # video 1
        [0.0, 3.0, 0.0],  # video 0
        [0.0, 0.2, 0.0],  # video 1
        [0.0, 3.0, 0.0],  # video 0
        [0.0, 0.2, 0.0],  # video 1
    ]
)
VIEW_IDS = torch.tensor([0, 1, 0, 1, 0, 1])
VIEW_LABELS = torch.tensor([1, 0, 1, 0, 1, 0])


def softmax_row(row: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(row, dtype=np.float64))
    return e / e.sum()


def test_aggregate_views_averages_softmax_probabilities():
    ids, labels, scores = aggregate_views(VIEW_LOGITS, VIEW_IDS, VIEW_LABELS)
    assert ids.tolist() == [0, 1] and labels.tolist() == [1, 0]
    by_hand = [
        (softmax_row([20, 0, 0]) + 2 * softmax_row([0, 3, 0])) / 3,
        (softmax_row([5, 0, 0]) + 2 * softmax_row([0, 0.2, 0])) / 3,
    ]
    np.testing.assert_allclose(scores.numpy(), np.stack(by_hand), rtol=1e-6, atol=1e-7)
    assert scores.argmax(1).tolist() == [1, 0]  # neither the mean of logits ([0, 0]) nor majority vote ([1, 1])
    assert VIEW_LOGITS[::2].mean(0).argmax() == 0 and VIEW_LOGITS[1::2].argmax(1).tolist() == [0, 1, 1]


def test_aggregate_views_orders_by_video_id_and_checks_labels():
    perm = torch.tensor([5, 2, 0, 3, 1, 4])
    ids, labels, scores = aggregate_views(VIEW_LOGITS[perm], VIEW_IDS[perm] + 10, VIEW_LABELS[perm])
    ref = aggregate_views(VIEW_LOGITS, VIEW_IDS, VIEW_LABELS)[2]
    assert ids.tolist() == [10, 11] and labels.tolist() == [1, 0]
    torch.testing.assert_close(scores, ref)
    with pytest.raises(ValueError, match=r"video 1 has views with different labels \[0, 2\]"):
        aggregate_views(VIEW_LOGITS, VIEW_IDS, torch.tensor([1, 0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        aggregate_views(VIEW_LOGITS, VIEW_IDS[:4], VIEW_LABELS)


def test_metrics_from_hand_made_scores():
    # 7 classes (top-5 is a real top-5); class 6 has no video
    scores = torch.tensor(
        [
            [0.70, 0.10, 0.05, 0.05, 0.04, 0.03, 0.03],  # label 0, predicted 0
            [0.10, 0.60, 0.10, 0.05, 0.05, 0.05, 0.05],  # label 2, predicted 1, label 2nd -> top-5 hit
            [0.50, 0.20, 0.10, 0.08, 0.06, 0.04, 0.02],  # label 6, predicted 0, label 7th -> top-5 miss
            [0.05, 0.05, 0.80, 0.04, 0.03, 0.02, 0.01],  # label 2, predicted 2
            [0.30, 0.20, 0.15, 0.12, 0.11, 0.07, 0.05],  # label 5, predicted 0, label 6th -> top-5 miss
        ],
        dtype=torch.float64,
    )
    result = EvalResult.from_scores([3, 4, 7, 8, 9], [0, 2, 6, 2, 5], scores, num_classes=7)
    assert result.num_videos == 5 and result.predictions == [0, 1, 0, 2, 0]
    assert result.top1 == pytest.approx(2 / 5)
    assert result.topk == 5
    assert result.per_class == [1.0, None, 0.5, None, None, 0.0, 0.0]
    expected = np.zeros((7, 7), dtype=int)
    for t, p in [(0, 0), (2, 1), (6, 0), (2, 2), (5, 0)]:
        expected[t, p] += 1
    assert result.confusion == expected.tolist()
    assert result.top5 == pytest.approx(3 / 5)
    two = EvalResult.from_scores([0, 1], [1, 0], [[0.2, 0.8], [0.4, 0.6]], num_classes=2)
    assert two.topk == 2 and two.top5 == 1.0 and two.top1 == 0.5
    with pytest.raises(ValueError, match="label 7 of video 9 is outside 0..6"):
        EvalResult.from_scores([3, 9], [0, 7], scores[:2], num_classes=7)


class KeyedLogits(nn.Module):
    """Returns TABLE[k] for a clip whose pixels all hold k (float(k) of the first pixel)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.scale = nn.Parameter(torch.ones(()))  # a parameter: evaluate casts clips to its dtype

    def forward(self, clips):
        assert not self.training and torch.is_inference_mode_enabled()
        keys = clips[:, 0, 0, 0, 0].round().long()
        return self.table[keys] * self.scale

    def forward_features(self, clips):
        keys = clips[:, 0, 0, 0, 0]
        n = clips.shape[0]
        local = keys.view(n, 1, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1, 1).expand(n, 4, 2, 3, 3)
        local = local + torch.arange(18.0).view(1, 1, 2, 3, 3)  # mean over positions adds 8.5
        return local, -keys[:, None].expand(n, 4)


class StubLoader:
    """A test loader: fixed batches of clips keyed by view, plus the files it dropped and skipped."""

    training = False

    def __init__(self, batches, dropped=(), skipped=()):
        self.batches, self.dropped, self.skipped = batches, list(dropped), list(skipped)

    def __iter__(self):
        return iter(self.batches)


def keyed_batches(keys, ids, labels, splits):
    """ClipBatches of clips (N, 3, 2, 4, 4) filled with their key, cut at the given sizes."""
    clips = torch.tensor(keys, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 3, 2, 4, 4).contiguous()
    parts = zip(clips.split(splits), torch.tensor(ids).split(splits), torch.tensor(labels).split(splits), strict=True)
    return [ClipBatch(c, lab, i) for c, i, lab in parts]


# views grouped by video in loader order; video 2 has the most confident wrong views
IDS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
LABELS = [1, 1, 1, 0, 0, 0, 2, 2, 2]
TABLE = torch.cat([VIEW_LOGITS, torch.tensor([[0.0, 4.0, 0.0], [1.0, 3.0, 2.0], [0.0, 2.0, 1.0]])])
KEYS = [0, 2, 4, 1, 3, 5, 6, 7, 8]


@pytest.mark.parametrize("splits", [[9], [2, 2, 4, 1], [1] * 9], ids=["one_batch", "split_views", "one_view_each"])
def test_evaluate_matches_hand_computation(splits):
    loader = StubLoader(
        keyed_batches(KEYS, IDS, LABELS, splits), dropped=[("/x/a.mp4", "empty file")], skipped=[("/x/b.mp4", "bad")]
    )
    model = KeyedLogits(TABLE).train()
    result = evaluate(model, loader, num_classes=3, progress=False, class_names=["a", "b", "c"])
    assert model.training  # the mode is restored
    ids, labels, scores = aggregate_views(TABLE[KEYS], torch.tensor(IDS), torch.tensor(LABELS))
    assert result.video_ids == [0, 1, 2] and result.labels == [1, 0, 2]
    np.testing.assert_allclose(np.array(result.scores), scores.numpy(), rtol=1e-6)
    assert result.predictions == [1, 0, 1]  # video 2: every view says 1
    assert result.top1 == pytest.approx(2 / 3) and result.top5 == 1.0  # 3 classes: top-3
    assert result.per_class == [1.0, 1.0, 0.0]
    assert result.confusion == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert result.views_per_video == [3, 3, 3]
    assert result.skipped == [("/x/a.mp4", "empty file"), ("/x/b.mp4", "bad")]
    assert result.class_names == ["a", "b", "c"] and result.seconds >= 0


def test_evaluate_errors():
    batches = keyed_batches(KEYS, IDS, LABELS, [4, 5])
    model = KeyedLogits(TABLE)
    training = StubLoader(batches)
    training.training = True
    with pytest.raises(ValueError, match="training mode"):
        evaluate(model, training, num_classes=3, progress=False)
    with pytest.raises(ValueError, match=r"returns 3 logits per clip but num_classes is 5"):
        evaluate(model, StubLoader(batches), num_classes=5, progress=False)
    assert model.training  # restored after the error too
    assert not torch.is_inference_mode_enabled()
    with pytest.raises(ValueError, match=r"no video was evaluated.*2 file\(s\) skipped"):
        evaluate(model, StubLoader([], dropped=[("a", "x")], skipped=[("b", "y")]), num_classes=3, progress=False)
    with pytest.raises(ValueError, match="3 class names for num_classes=4"):
        evaluate(model, StubLoader(batches), num_classes=4, progress=False, class_names=["a", "b", "c"])
    mixed = keyed_batches(KEYS, IDS, [1, 1, 1, 0, 0, 0, 2, 2, 0], [9])
    with pytest.raises(ValueError, match="video 2 has views with different labels"):
        evaluate(model, StubLoader(mixed), num_classes=3, progress=False)


def test_evaluate_with_progress_bar_and_autocast(capsys):
    loader = StubLoader(keyed_batches(KEYS, IDS, LABELS, [5, 4]))
    result = evaluate(KeyedLogits(TABLE), loader, num_classes=3, amp_dtype=torch.bfloat16)
    assert result.predictions == [1, 0, 1]
    assert "eval" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_videos")
    return [VideoRecord(write_video(root / f"v{i}", n, seed=i), i) for i, n in enumerate([12, 20, 9])]


def test_evaluate_end_to_end_on_real_videos(tiny_videos):
    torch.manual_seed(0)
    model = lgd_fast.create_model("lgd3d_tiny", 3, classifier="two_heads")
    spec = ClipSpec(clip_len=8, step=1, test_clips=2, resize_shorter=40, crop=32)
    loader = VideoClipLoader(tiny_videos, spec=spec, batch_size=4, training=False, backend="pyav", num_workers=0)
    result = evaluate(model, loader, num_classes=3, progress=False)
    assert result.num_videos == 3 and result.video_ids == [0, 1, 2] and result.labels == [0, 1, 2]
    assert len(result.scores) == 3 and len(result.scores[0]) == 3
    assert result.views_per_video == [2, 2, 2]
    np.testing.assert_allclose(np.array(result.scores).sum(axis=1), 1.0, rtol=1e-6)
    assert result.predictions == np.array(result.scores).argmax(axis=1).tolist()
    assert sum(map(sum, result.confusion)) == 3 and result.skipped == []
    features = extract_features(model, loader, progress=False)
    assert features["local"].shape == features["global"].shape == (3, model.feature_dim)
    assert features["video_ids"].tolist() == [0, 1, 2] and features["views"].tolist() == [2, 2, 2]


def test_write_eval_and_format_eval(tmp_path):
    loader = StubLoader(keyed_batches(KEYS, IDS, LABELS, [9]), skipped=[("/x/b.mp4", "bad")])
    result = evaluate(KeyedLogits(TABLE), loader, num_classes=3, progress=False)
    names = ["walk", "run", "jump"]
    paths = write_eval(result, tmp_path / "out", class_names=names, prefix="val")
    assert paths["json"] == tmp_path / "out" / "val.json" and paths["png"].name == "val_confusion.png"
    data = json.loads(paths["json"].read_text())
    assert data["class_names"] == names
    assert data["per_class_table"][2] == {"class": 2, "name": "jump", "videos": 1, "correct": 0, "accuracy": 0.0}
    fields = {k: data[k] for k in EvalResult.__dataclass_fields__}
    fields["skipped"] = [tuple(item) for item in fields["skipped"]]
    fields["class_names"] = None
    assert EvalResult(**fields) == result
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    import matplotlib.image

    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.05
    text = format_eval(result, names)
    assert "66.67 %" in text and "top-3" in text and "1 file(s) skipped" in text
    assert [line.split()[0] for line in text.splitlines()[-3:]] == names
    assert format_eval(result).splitlines()[-1].split()[0] == "2"


def test_extract_features_averages_views(tmp_path):
    keys = [1, 3, 2, 6, 4]
    ids, labels = [5, 5, 7, 7, 7], [0, 0, 1, 1, 1]
    loader = StubLoader(keyed_batches(keys, ids, labels, [3, 2]))
    out = extract_features(KeyedLogits(TABLE), loader, progress=False)
    assert out["video_ids"].tolist() == [5, 7] and out["labels"].tolist() == [0, 1]
    assert out["views"].tolist() == [2, 3]
    key_means = np.array([2.0, 4.0])  # (1 + 3) / 2, (2 + 6 + 4) / 3
    np.testing.assert_allclose(out["local"], key_means[:, None] * np.arange(1, 5) + 8.5, rtol=1e-6)
    np.testing.assert_allclose(out["global"], -key_means[:, None] * np.ones(4), rtol=1e-6)
    assert out["local"].dtype == np.float32 and out["local"].shape == (2, 4)

    path = save_features(out, tmp_path / "feats")
    assert path.name == "feats.npz"
    with np.load(path) as loaded:
        assert set(loaded.files) == set(out) and np.array_equal(loaded["local"], out["local"])


def test_save_features_safetensors(tmp_path, monkeypatch):
    features = {"local": np.ones((2, 3), np.float32), "video_ids": np.arange(2)}
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors, or save to a .npz"):
        save_features(features, tmp_path / "f.safetensors")
    monkeypatch.undo()
    from safetensors.numpy import load_file  # a dev dependency: the round trip must run

    path = save_features(features, tmp_path / "f.safetensors")
    assert np.array_equal(load_file(str(path))["local"], features["local"])
