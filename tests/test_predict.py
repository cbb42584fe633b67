"""lgd-fast predict: a trained checkpoint's top-k classes for video files, as eval scores them; bad files named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lgd_fast.cli import main
from lgd_fast.data.annotations import read_annotations
from lgd_fast.data.synthetic import make_dataset
from lgd_fast.engine import load_checkpoint, predict
from lgd_fast.engine.checkpoint import CHECKPOINT_FORMAT, write_text_atomic
from video_testing import truncate, write_video

SMALL = [
    "data.resize_shorter=32", "data.crop=24", "data.clip_len=8", "data.test_clips=3", "data.workers=0",
    "data.backend=pyav", "optim.batch_size=8", "model.name=lgd3d_tiny", "model.sketch_dim=64", "progress=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained through both stages (so the kernel classifier predicts), then eval on val.txt."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    make_dataset(data, classes=4, videos_per_class=6, frames=16, size=32, seed=2, progress=False)
    out = root / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--stage2-epochs", "1", "--quiet"]
    assert main(argv + [a for item in SMALL for a in ("--set", item)]) == 0
    checkpoint = out / "checkpoints" / "last.pt"
    assert main(["eval", "--data", str(data), "--checkpoint", str(checkpoint)]) == 0
    return {"data": data, "checkpoint": checkpoint, "eval": json.loads((out / "eval.json").read_text())}


def test_predictions_are_evals_per_video_scores(run, capsys):
    """Every held-out video: predict's top-5 names and probabilities are eval's scores for it, in order."""
    classes = run["eval"]["class_names"]
    records = read_annotations(run["data"] / "val.txt", class_index=classes)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--json", *(r.path for r in records)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["video"] for row in rows] == [r.path for r in records]
    scores = dict(zip(run["eval"]["video_ids"], run["eval"]["scores"], strict=True))
    assert run["eval"]["views_per_video"] == [3] * len(records)
    for i, row in enumerate(rows):
        expected = torch.tensor(scores[i], dtype=torch.float64)
        probs, order = expected.topk(4)  # 4 classes: top-5 is all of them
        assert [t["class"] for t in row["top"]] == [classes[c] for c in order], row["video"]
        assert [t["probability"] for t in row["top"]] == pytest.approx(probs.tolist(), rel=1e-6, abs=1e-9)
        assert row["views"] == 3
    predicted = [classes.index(row["top"][0]["class"]) for row in rows]
    assert predicted == run["eval"]["predictions"]


def test_a_bad_file_is_named_and_the_others_are_predicted(run, tmp_path, capsys):
    good = write_video(tmp_path / "good", 20, height=32, width=32, seed=5)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    broken = truncate(good, tmp_path / "broken.webm", 0.3)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    videos = [good, str(tmp_path / "missing.mp4"), str(empty), broken, str(text)]
    result = predict(run["checkpoint"], videos, top_k=2)
    assert [p.video for p in result] == videos
    assert result[0].error is None and len(result[0].top) == 2 and result[0].views == 3
    assert result[0].top[0][1] >= result[0].top[1][1] and 0.0 < sum(p for _, p in result[0].top) <= 1.0 + 1e-6
    reasons = [p.error for p in result[1:]]
    assert all(reasons), reasons
    assert "not found" in reasons[0] and "empty" in reasons[1] and "truncated" in reasons[2], reasons
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--top-k", "3", *videos]) == 1
    printed = capsys.readouterr()
    assert f"{good} (3 views)" in printed.out and "  3. " in printed.out
    for path in videos[1:]:
        assert f"{path}: error: " in printed.out
    assert "4 of 5 file(s) could not be predicted" in printed.err


def test_only_bad_files_still_says_why_for_each(run, tmp_path):
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    result = predict(run["checkpoint"], [str(empty), str(tmp_path / "gone.webm")])
    assert "empty" in result[0].error and "not found" in result[1].error


def test_h264_files_are_predicted_too(run, tmp_path):
    """Any codec: H.264 (PyAV decodes it; DALI's CPU pipeline does not) gives eval's views, like VP9."""
    video = write_video(tmp_path / "clip", 20, height=32, width=32, codec="h264", seed=3)
    (p,) = predict(run["checkpoint"], [video], backend="auto")
    assert p.error is None and p.views == 3 and len(p.top) == 4


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (bytes(range(7, 256)) * 40, "is not a PyTorch file"),
        (None, "damaged or truncated"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_so(run, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.pt"
    if content is None:
        bad.write_bytes(run["checkpoint"].read_bytes()[:2000])
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"not an lgd_fast checkpoint: .*{message}") as info:
        load_checkpoint(bad)
    assert "weights_only" not in str(info.value)
    assert main(["predict", "--checkpoint", str(bad), shutil.which("python") or "x.webm"]) == 2
    err = capsys.readouterr().err
    assert message in err and "weights_only" not in err


def test_a_checkpoint_of_a_newer_format_names_it(tmp_path):
    newer = tmp_path / "newer.pt"
    torch.save({"model": {"w": torch.ones(2)}, "format": CHECKPOINT_FORMAT + 1}, newer)
    with pytest.raises(ValueError, match=f"newer lgd_fast \\(checkpoint format {CHECKPOINT_FORMAT + 1}; this"):
        load_checkpoint(newer)


def test_a_checkpoint_keeps_the_current_gpu_generator_and_restores_it_there(monkeypatch):
    """One process a device (DDP): the checkpoint holds the CPU generator and the current device's (every process
    draws alike), and restores it on the resuming process's own device; it never reads every device's state (rank
    0's view of the others is their first state, and reading them makes a context on each). A checkpoint written
    before, with every device's state as its process saw them, restores this process's device's. (CUDA's calls
    faked: no GPU here.)"""
    from lgd_fast.engine.checkpoint import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every device's state was set"))
    state = rng_state()
    assert state["cuda"].tolist() == [7] and torch.equal(state["torch"], torch.get_rng_state())
    set_rng_state(state)
    set_rng_state({**state, "cuda": [torch.tensor([3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)]})
    assert [t.tolist() for t in restored] == [[7], [4]]  # (the old format: this process's device, cuda:1)


def test_text_files_are_replaced_whole_or_not_at_all(tmp_path):
    """config.yaml, metrics.json and eval.json are written as checkpoints are: a failure while writing keeps the
    old text and leaves no temporary file."""
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"new: bytes are no text")  # fails inside the write
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes files (mkstemp alone: 0600)


def test_a_checkpoint_holding_objects_is_refused_without_advice(tmp_path):
    bad = tmp_path / "objects.pt"
    torch.save({"model": {}, "extra": torch.nn.Linear(2, 2)}, bad)  # a whole module: pickled classes
    with pytest.raises(ValueError, match="holds Python objects") as info:
        load_checkpoint(bad)
    assert "weights_only" not in str(info.value)
