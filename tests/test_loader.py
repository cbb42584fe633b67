"""lgd_fast.data.loader: both backends give the same batches; bad files are skipped and counted; sharding."""

from __future__ import annotations

import logging

import pytest
import torch

from lgd_fast.data.annotations import VideoRecord
from lgd_fast.data.loader import ClipSpec, VideoClipLoader
from video_testing import truncate, write_video

SPEC = ClipSpec(clip_len=8, step=2, test_clips=3, resize_shorter=40, crop=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    lengths = [30, 5, 17, 24, 40, 12]  # 5 and 12 frames: shorter than a clip (8 frames, step 2 -> 15)
    return [VideoRecord(write_video(root / f"v{i}", n, seed=i), i % 3) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def broken(records, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    empty = root / "empty.webm"
    empty.write_bytes(b"")
    return [
        VideoRecord(str(root / "missing.webm"), 0),
        VideoRecord(str(empty), 1),
        VideoRecord(truncate(records[0].path, root / "truncated.webm", 0.3), 2),
    ]


@pytest.mark.parametrize("training", [True, False])
def test_dali_and_pyav_batches_agree(records, training):
    kwargs = dict(spec=SPEC, batch_size=4, training=training, seed=3, num_workers=0)
    dali = list(VideoClipLoader(records, backend="dali", **kwargs))
    pyav = list(VideoClipLoader(records, backend="pyav", **kwargs))
    assert len(dali) == len(pyav) == (2 if training else 5)  # 6 clips, or 6 videos x 3 test clips
    for a, b in zip(dali, pyav, strict=True):
        assert a.clips.shape == b.clips.shape and a.clips.shape[1:] == (3, 8, 32, 32)
        assert a.clips.dtype == torch.float32 and torch.isfinite(a.clips).all()
        assert torch.equal(a.labels, b.labels) and torch.equal(a.video_ids, b.video_ids)
        # same frames, crops and flips; only the resampling filters differ (DALI's and torch's antialiased
        # bilinear): measured ~0.004 mean, ~0.02 max of a normalised range of ~1 std; a wrong frame, crop or
        # flip differs by O(1)
        err = (a.clips - b.clips).abs()
        assert err.mean() < 0.01 and err.max() < 0.1, f"difference mean {err.mean():.3f}, max {err.max():.3f}"
    if not training:
        ids = torch.cat([b.video_ids for b in dali])
        assert ids.tolist() == [i for i in range(6) for _ in range(3)]


def test_training_epochs_shuffle_and_replay(records):
    loader = VideoClipLoader(records, spec=SPEC, batch_size=3, backend="pyav", seed=1, num_workers=0)
    first = torch.cat([b.video_ids for b in loader])
    second = torch.cat([b.video_ids for b in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(6))
    assert loader.epoch == 2
    loader.set_epoch(0)  # resuming at epoch 0 replays it exactly
    replay = list(loader)
    assert torch.equal(torch.cat([b.video_ids for b in replay]), first)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_resumed_at_a_batch_yields_the_rest_of_that_epoch(records, num_workers):
    """set_epoch(e, start_batch=k): the batches k, k+1, ... of epoch e exactly, clips included; the global torch
    generator is left alone (a DataLoader draws its worker seed from it unless given its own)."""
    loader = VideoClipLoader(records, spec=SPEC, batch_size=2, backend="pyav", seed=4, num_workers=num_workers)
    loader.set_epoch(3)
    rng = torch.get_rng_state()
    full = list(loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(full) == 3 and loader.position == 3
    loader.set_epoch(3, start_batch=1, skipped=[("earlier.webm", "unreadable")])
    rest = list(loader)
    assert len(rest) == 2 and loader.position == 3 and loader.epoch == 4
    for a, b in zip(full[1:], rest, strict=True):
        assert torch.equal(a.video_ids, b.video_ids) and torch.equal(a.clips, b.clips)
    assert loader.skipped == [("earlier.webm", "unreadable")]  # the epoch's first part, carried over
    assert len(list(loader)) == 3 and loader.skipped == []  # the next epoch starts at its beginning


def test_bad_files_are_skipped_with_one_warning_each(records, broken, caplog):
    caplog.set_level(logging.WARNING, logger="lgd_fast.data")
    loader = VideoClipLoader(records + broken, spec=SPEC, batch_size=4, backend="pyav", num_workers=0)
    assert [p for p, _ in loader.dropped] == [r.path for r in broken]
    reasons = " | ".join(r for _, r in loader.dropped)
    assert "file not found" in reasons and "empty file" in reasons and "truncated" in reasons
    assert sum(len(b.labels) for b in loader) == len(records)
    assert sum("skipping" in r.message for r in caplog.records) == len(broken)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert summary == [f"epoch 1: 0 clip(s) skipped (unreadable during the epoch), {len(broken)} file(s) left out "
                       f"(unusable when probed); {len(records)} video(s) used"]  # fmt: skip


def test_file_broken_after_probing_is_skipped_in_the_epoch(records, tmp_path, caplog):
    victim = VideoRecord(write_video(tmp_path / "victim", 20, seed=9), 1)
    for backend in ("dali", "pyav"):
        loader = VideoClipLoader([*records, victim], spec=SPEC, batch_size=4, backend=backend, num_workers=0)
        with open(victim.path, "r+b") as f:  # corrupt it after the loader has probed it
            f.seek(200)
            f.write(b"\xff" * 2000)
            f.truncate(2400)
        caplog.clear()
        seen = sum(len(b.labels) for b in loader)
        assert seen == len(records) and [p for p, _ in loader.skipped] == [victim.path], backend
        loader.batch_size, loader.yield_empty = 1, True  # (distributed training) its batch comes as None
        batches = list(loader)
        assert len(batches) == len(records) + 1 and sum(b is None for b in batches) == 1, backend
        assert [p for p, _ in loader.skipped] == [victim.path], backend
        write_video(tmp_path / "victim", 20, seed=9)  # restore for the next backend


def test_a_dali_failure_with_no_bad_file_is_an_error_under_dali_and_said_under_auto(records, monkeypatch, caplog):
    """A DALI batch that fails is decoded by PyAV to find the broken file (the test above). Where PyAV finds none,
    DALI itself failed (a stream its decoder lacks): with backend 'dali' (or strict) that is an error naming the
    files; with 'auto' PyAV decodes the batch, with a warning each time and the batch in ``pyav_batches``."""

    def fails(plans, encoded):
        raise RuntimeError("[DALI] simulated decoder failure")

    loader = VideoClipLoader(records, spec=SPEC, batch_size=4, backend="dali", num_workers=0)
    monkeypatch.setattr(loader, "_run_dali", fails)
    with pytest.raises(RuntimeError, match=r"DALI failed on a batch whose every file PyAV decodes \(.*v\d\.webm.*"
                                           r"simulated decoder failure.*backend='auto'"):  # fmt: skip
        next(iter(loader))
    auto = VideoClipLoader(records, spec=SPEC, batch_size=4, backend="auto", num_workers=0)
    assert auto.backend_used == "dali"  # (VP9: DALI decodes it here)
    monkeypatch.setattr(auto, "_run_dali", fails)
    want = list(VideoClipLoader(records, spec=SPEC, batch_size=4, backend="pyav", num_workers=0))
    got = list(auto)
    assert len(got) == len(want) and all(torch.equal(a.clips, b.clips) for a, b in zip(got, want, strict=True))
    assert len(auto.pyav_batches) == len(want) and "PyAV decoded it (backend 'auto')" in caplog.text
    monkeypatch.setattr(loader, "_build_dali", lambda: (_ for _ in ()).throw(RuntimeError("no pipeline")))
    loader._pipeline = None
    with pytest.raises(RuntimeError, match="^no pipeline$"):  # a pipeline that cannot be built: its own error
        next(iter(loader))


def test_test_time_sharding_partitions_the_videos(records):
    ids = []
    for shard_id in range(4):
        loader = VideoClipLoader(records, spec=SPEC, batch_size=8, backend="pyav", shard_id=shard_id, num_shards=4,
                                 num_workers=0, training=False)
        ids.append({int(i) for b in loader for i in b.video_ids})
    assert set().union(*ids) == set(range(6)) and sum(len(s) for s in ids) == 6


@pytest.mark.parametrize("num_shards", [2, 4])
def test_training_shards_split_each_global_batch(records, num_shards):
    """Rank r's k-th batch (global batch / num_shards clips) is its part of the single-process k-th batch."""
    whole = VideoClipLoader(records, spec=SPEC, batch_size=4, backend="pyav", seed=5, num_workers=0)
    global_plans = whole._plans()
    parts = [
        VideoClipLoader(records, spec=SPEC, batch_size=4 // num_shards, backend="pyav", seed=5, num_workers=0,
                        shard_id=r, num_shards=num_shards)._plans()
        for r in range(num_shards)
    ]
    assert {len(p) for p in parts} == {-(-6 // num_shards)}  # padded to equal lengths
    for k in range(len(global_plans) // 4):
        union = sorted(p for part in parts for p in part[k * 4 // num_shards : (k + 1) * 4 // num_shards])
        assert union == sorted(global_plans[k * 4 : (k + 1) * 4])


def test_h264_on_cpu_falls_back_to_pyav_or_errors_when_strict(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device decodes H.264 with DALI")
    records = [VideoRecord(write_video(tmp_path / "h", 20, codec="h264"), 0)]
    caplog.set_level(logging.WARNING, logger="lgd_fast.data")
    loader = VideoClipLoader(records, spec=SPEC, batch_size=1, num_workers=0)
    assert loader.backend_used == "pyav" and "instead of DALI" in caplog.text and "h264" in caplog.text
    assert next(iter(loader)).clips.shape == (1, 3, 8, 32, 32)
    with pytest.raises(RuntimeError, match="DALI backend cannot decode.*h264"):
        VideoClipLoader(records, spec=SPEC, strict=True, num_workers=0)


def test_reversed_clips_are_the_clips_played_backwards(records):
    kwargs = dict(batch_size=6, training=False, backend="pyav", num_workers=0)
    forward = next(iter(VideoClipLoader(records, spec=SPEC, **kwargs)))
    backward = next(iter(VideoClipLoader(records, spec=ClipSpec(**{**SPEC.__dict__, "reverse": True}), **kwargs)))
    assert torch.equal(backward.clips, forward.clips.flip(2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop"):
        ClipSpec(resize_shorter=32, crop=64)
    with pytest.raises(ValueError, match="test_crops must be 1 or 3"):
        ClipSpec(test_crops=2)
    with pytest.raises(ValueError, match="no usable video"):
        VideoClipLoader([VideoRecord("/nonexistent/x.webm", 0)], num_workers=0)
