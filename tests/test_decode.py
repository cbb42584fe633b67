"""lgd_fast.data.decode: probing, both decoding backends agree, bad files give clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lgd_fast.data.decode import VideoError, probe, read_clip
from video_testing import frame_pattern, truncate, write_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "vp9": write_video(root / "clip_vp9", 37, codec="vp9"),
        "h264": write_video(root / "clip_h264", 23, codec="h264", seed=1),
        "mjpeg": write_video(root / "clip_mjpeg", 9, codec="mjpeg", seed=2),
    }


def _closest_frames(clip: torch.Tensor, n: int, seed: int) -> list[int]:
    """For each decoded frame, the index of the nearest original frame (mean absolute difference)."""
    h, w = clip.shape[1:3]
    originals = np.stack([frame_pattern(i, h, w, seed) for i in range(n)]).astype(np.float32)
    return [int(np.abs(originals - f.numpy().astype(np.float32)).mean(axis=(1, 2, 3)).argmin()) for f in clip]


@pytest.mark.parametrize("codec,frames,seed", [("vp9", 37, 0), ("h264", 23, 1), ("mjpeg", 9, 2)])
def test_probe_counts_frames(videos, codec, frames, seed):
    info = probe(videos[codec])
    assert (info.num_frames, info.height, info.width) == (frames, 48, 64)
    assert info.codec == codec and info.fps == 25.0


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_and_pyav_give_the_same_frames(videos, codec):
    """Any order, repeats, first and last frame: the same frames from both backends (to 1 level of rounding)."""
    n = probe(videos[codec]).num_frames
    indices = [n - 1, 0, 3, 3, 1, n // 2]
    dali = read_clip(videos[codec], indices, backend="dali")
    pyav = read_clip(videos[codec], indices, backend="pyav")
    assert dali.shape == pyav.shape == (len(indices), 48, 64, 3) and dali.dtype == pyav.dtype == torch.uint8
    diff = (dali.int() - pyav.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05, f"backends differ by up to {diff.max()}"
    seed = {"vp9": 0, "mjpeg": 2}[codec]
    assert _closest_frames(pyav, n, seed) == indices  # and they are the frames asked for


def test_h264_pyav_decodes_and_dali_refuses_on_cpu(videos):
    clip = read_clip(videos["h264"], [22, 0, 11], backend="pyav")
    assert _closest_frames(clip, 23, 1) == [22, 0, 11]
    if torch.cuda.is_available():
        pytest.skip("a CUDA device decodes H.264 with DALI")
    with pytest.raises(VideoError, match="DALI does not decode h264 on the CPU.*backend='pyav'"):
        read_clip(videos["h264"], [0], backend="dali")
    assert torch.equal(read_clip(videos["h264"], [0, 5], backend="auto"), read_clip(videos["h264"], [0, 5], "pyav"))


def test_bad_files_name_the_problem(videos, tmp_path):
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = truncate(videos["vp9"], tmp_path / "truncated.webm", 0.4)
    cases = {
        str(tmp_path / "missing.webm"): "file not found",
        str(empty): "empty file",
        str(garbage): "cannot read the container",
        truncated: "truncated",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError, match=message) as info:
            probe(path)
        assert info.value.path == path
        with pytest.raises(VideoError, match=message):
            read_clip(path, [0], backend="pyav")


@pytest.mark.parametrize("codec", ["vp9", "h264", "mjpeg"])
def test_an_audio_track_longer_than_the_video_is_no_truncation(tmp_path, codec):
    """Downloaded clips carry audio, often running past the picture: the container's duration spans both, so the
    truncation check reads the video stream's own (MP4 and AVI: the stream's duration; WebM: its DURATION tag).
    Cut short, the WebM is still caught."""
    path = write_video(tmp_path / "with_audio", 25, codec=codec, audio_seconds=3.0)
    info = probe(path)
    assert info.num_frames == 25 and info.codec == codec
    assert read_clip(path, [0, 24], backend="pyav").shape == (2, 48, 64, 3)
    if codec == "vp9":
        with pytest.raises(VideoError, match=r"truncated: \d+ frames where its duration promises 25"):
            probe(truncate(path, tmp_path / "cut.webm", 0.4))


def test_a_frame_size_that_changes_mid_stream_is_a_video_error(videos, monkeypatch):
    """A stream whose frames change size (probe reads the first size only) cannot make one clip tensor: a
    VideoError naming the file and both sizes, which the loader skips (np.stack's ValueError ended training)."""
    from lgd_fast.data import decode

    rgb, converted = decode.frame_to_rgb, []

    def resized_after_the_first(frame):  # called for the frames asked for, in stream order: 0, 5, 9
        converted.append(frame)
        return rgb(frame) if len(converted) == 1 else rgb(frame)[:32, :40]

    monkeypatch.setattr(decode, "frame_to_rgb", resized_after_the_first)
    with pytest.raises(VideoError, match=r"frame size changes mid-stream: 64x48 at frame 0, 40x32 at frame 5") as info:
        read_clip(videos["vp9"], [0, 5, 9], backend="pyav")
    assert info.value.path == videos["vp9"]


def test_bad_indices_and_backend(videos):
    with pytest.raises(VideoError, match="frame 37 asked for, the video has 37 frames"):
        read_clip(videos["vp9"], [0, 37], backend="dali")
    with pytest.raises(ValueError, match=">= 0"):
        read_clip(videos["vp9"], [-1])
    with pytest.raises(ValueError, match="non-empty"):
        read_clip(videos["vp9"], [])
    with pytest.raises(ValueError, match="backend must be one of"):
        read_clip(videos["vp9"], [0], backend="opencv")


def test_frame_indices_must_be_integers(videos):
    """numpy read 1.7 as frame 1 and True as frame 1; a bare int failed with "'int' object is not iterable"."""
    for bad, shown in [([1.7], "1.7"), (["1"], "'1'"), ([True, False], "True"), (np.array([0.0, 2.5]), "0.0"),
                       (torch.tensor([1, 0]).bool(), "True")]:  # fmt: skip
        with pytest.raises(TypeError, match=rf"frame_indices must be integers, got .*{re.escape(shown)}"):
            read_clip(videos["mjpeg"], bad, backend="pyav")
    for bad in (3, "13"):
        with pytest.raises(TypeError, match=rf"frame_indices must be a sequence of frame numbers, got \w+ {bad!r}"):
            read_clip(videos["mjpeg"], bad, backend="pyav")
    expected = read_clip(videos["mjpeg"], [3, 0, 3], backend="pyav")  # numpy and torch integers still work
    for indices in (np.array([3, 0, 3]), np.array([3, 0, 3], dtype=np.uint8), torch.tensor([3, 0, 3]),
                    [np.int64(3), torch.tensor(0), np.int32(3)]):  # fmt: skip
        assert torch.equal(read_clip(videos["mjpeg"], indices, backend="pyav"), expected)
    assert read_clip(videos["mjpeg"], range(9), backend="pyav").shape == (9, 48, 64, 3)  # as check-data reads


def test_info_of_another_file_is_refused(videos, tmp_path):
    """read_clip(a, ..., info=probe(b)) decoded b, checking the indices against b's length."""
    info = probe(videos["vp9"])
    with pytest.raises(ValueError, match="info describes .*clip_vp9.*, not path .*clip_mjpeg") as error:
        read_clip(videos["mjpeg"], [5], backend="pyav", info=info)
    assert videos["vp9"] in str(error.value) and videos["mjpeg"] in str(error.value)
    with pytest.raises(TypeError, match="info must be a VideoInfo .* got str"):
        read_clip(videos["vp9"], [1], backend="pyav", info="x")
    link = tmp_path / "link.webm"  # the same file by another name: a link, a Path
    link.symlink_to(videos["vp9"])
    expected = read_clip(videos["vp9"], [1], backend="pyav")
    assert torch.equal(read_clip(link, [1], backend="pyav", info=info), expected)
    assert torch.equal(read_clip(Path(videos["vp9"]), [1], backend="pyav", info=info), expected)
