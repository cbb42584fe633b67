"""Small real video files for the data tests, written with PyAV (no downloads)."""

from __future__ import annotations

import os

import numpy as np

CODECS = {"vp9": ("libvpx-vp9", ".webm"), "h264": ("libx264", ".mp4"), "mjpeg": ("mjpeg", ".avi")}


def frame_pattern(i: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frame i: smooth random colour field plus a bright bar whose position encodes i (survives lossy codecs)."""
    rng = np.random.default_rng(seed * 1000 + i)
    base = rng.integers(40, 200, size=(4, 4, 3)).astype(np.float32)
    img = np.kron(base, np.ones((height // 4 + 1, width // 4 + 1, 1), np.float32))[:height, :width]
    x = (i * 5) % max(1, width - 8)
    img[:, x : x + 8] = 255.0
    return img.astype(np.uint8)


AUDIO = {".webm": "libopus", ".mp4": "aac", ".avi": "pcm_s16le", ".mkv": "aac"}


def write_video(path, num_frames: int, *, height: int = 48, width: int = 64, codec: str = "vp9", seed: int = 0,
                fps: int = 25, audio_seconds: float | None = None) -> str:
    """Encodes ``num_frames`` frames of ``frame_pattern`` into ``path`` (extension from the codec if missing);
    ``audio_seconds``: with a mono audio track of that length (noise at 48 kHz), as downloaded clips have."""
    import av

    name, ext = CODECS[codec]
    path = os.fspath(path)
    if not os.path.splitext(path)[1]:
        path += ext
    with av.open(path, "w") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b:v": "0"}
        elif codec == "h264":
            stream.options = {"preset": "ultrafast", "crf": "10"}
        audio = None if audio_seconds is None else container.add_stream(AUDIO[os.path.splitext(path)[1]], rate=48000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width, seed), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_seconds is not None:
            _write_audio(container, audio, audio_seconds, seed)
    return path


def _write_audio(container, stream, seconds: float, seed: int, chunk: int = 960) -> None:
    import av

    rate = stream.rate
    rng = np.random.default_rng(seed)
    for start in range(0, int(seconds * rate), chunk):
        frame = av.AudioFrame.from_ndarray(0.1 * rng.standard_normal((1, chunk), np.float32), layout="mono",
                                           format="flt")  # fmt: skip
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def truncate(path, out, fraction: float = 0.5) -> str:
    """A copy of ``path`` cut after ``fraction`` of its bytes."""
    with open(path, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return os.fspath(out)
