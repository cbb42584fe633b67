"""Video probing and clip decoding with two backends: NVIDIA DALI and PyAV (FFmpeg).

``probe(path)`` reads a file's container without decoding pixels: codec, size, frame rate and the number
of frames (counted from the demuxed packets, so it is right for files whose headers carry no count), and
rejects what training must skip: a missing or empty file, no video stream, a truncated file (fewer frames
than its video stream's stated duration promises; an audio track may run longer), zero frames.
``read_clip(path, frame_indices, backend=...)`` returns the frames asked for, in the order asked, as a uint8
tensor (T, H, W, 3) RGB: the same frames from either backend (tests/test_decode.py checks it).

DALI decodes on a GPU (``device="mixed"``: H.264, HEVC, VP8, VP9, AV1 where the card decodes it) or on the
CPU (VP8, VP9 and MJPEG only). ``backend="auto"`` takes DALI where it can decode the file and PyAV
otherwise, saying so once in the log; ``backend="dali"`` on a file DALI cannot decode here raises
``VideoError`` naming the codec.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "DALI_CPU_CODECS",
    "VideoError",
    "VideoInfo",
    "dali_codec_reason",
    "dali_error",
    "probe",
    "read_clip",
]

logger = logging.getLogger(__name__)

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
BACKENDS = ("auto", "dali", "pyav")
# A file whose packets fall short of its stated duration by more than this many frames is truncated.
_TRUNCATION_SLACK = 2


class VideoError(RuntimeError):
    """A video that cannot be used: ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` reads from a container: frames are counted, not estimated."""

    path: str
    codec: str
    num_frames: int
    height: int
    width: int
    fps: float


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency
        raise RuntimeError("PyAV is not installed (`pip install av`)") from exc
    return av


def probe(path: str | os.PathLike) -> VideoInfo:
    """Reads the container of ``path`` (no pixel decoding) and checks it is a usable video.

    Raises:
        VideoError: missing, empty, unreadable, no video stream, no frames, or truncated.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            height, width = stream.codec_context.height, stream.codec_context.width
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            duration = _video_seconds(container, stream)
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoError(path, f"cannot read the container ({type(exc).__name__}: {exc})") from exc
    if count == 0:
        raise VideoError(path, "no video frames")
    if duration and fps:
        expected = int(round(float(duration * Fraction(fps).limit_denominator(1001))))
        if count < expected - _TRUNCATION_SLACK:
            raise VideoError(path, f"truncated: {count} frames where its duration promises {expected}")
    if height <= 0 or width <= 0:
        raise VideoError(path, f"bad frame size {width}x{height}")
    return VideoInfo(path=path, codec=codec, num_frames=count, height=height, width=width, fps=fps)


def _video_seconds(container, stream) -> Fraction | None:
    """How long the header says the video stream runs, in seconds, or None where it does not say: the stream's own
    duration, else Matroska's per-stream ``DURATION`` tag, else the container's, but only when the video is its one
    stream (a container's duration spans every stream: audio running past the picture is no truncation)."""
    if stream.duration and stream.time_base:
        return Fraction(stream.duration) * Fraction(stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return (int(hours) * 60 + int(minutes)) * 60 + Fraction(seconds)
        except ValueError:
            pass  # not h:mm:ss.fraction: the container's length below, or none
    if container.duration and len(container.streams) == 1:
        return Fraction(container.duration, 1_000_000)  # microseconds
    return None


# ---- DALI ----------------------------------------------------------------------------------------------


def dali_error() -> str | None:
    """None if DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"NVIDIA DALI is not installed (`pip install nvidia-dali-cuda130`): {exc}"
    return None


def dali_device() -> str:
    """``"mixed"`` (GPU decoding) when torch sees a CUDA device, else ``"cpu"``."""
    return "mixed" if torch.cuda.is_available() else "cpu"


def dali_codec_reason(codec: str, device: str | None = None) -> str | None:
    """None if DALI decodes ``codec`` on ``device`` (default: this machine's), else why not."""
    device = device or dali_device()
    error = dali_error()
    if error is not None:
        return error
    supported = DALI_GPU_CODECS if device == "mixed" else DALI_CPU_CODECS
    if codec not in supported:
        where = "on the GPU" if device == "mixed" else "on the CPU (no CUDA device here)"
        return f"DALI does not decode {codec} {where}; it decodes {', '.join(sorted(supported))}"
    return None


_local = threading.local()


def _dali_clip_pipeline(device: str):
    """A batch-1 DALI pipeline decoding the frames fed to it, one per thread and device."""
    cache = getattr(_local, "pipelines", None)
    if cache is None:
        cache = _local.pipelines = {}
    if device not in cache:
        cache[device] = build_dali_pipeline(decode_fed_frames, batch_size=1, num_threads=1, device=device)
    return cache[device]


def decode_fed_frames(fn, types, device: str):
    """DALI graph: the encoded files and frame lists fed as ``"encoded"`` and ``"frames"``, decoded."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    return fn.decoders.video(encoded, frames=frames, device=device)


def build_dali_pipeline(graph, *, batch_size: int, num_threads: int, device: str):
    """A built DALI pipeline running ``graph(fn, types, device)`` on inputs given with ``feed_input`` before
    each ``run()`` (synchronous, no prefetch: a failed batch is caught and its files checked one by one)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=torch.cuda.current_device() if device == "mixed" else None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipeline():
        return graph(fn, types, device)

    pipe = pipeline()
    pipe.build()
    return pipe


def _read_dali(path: str, indices: np.ndarray) -> torch.Tensor:
    device = dali_device()
    pipe = _dali_clip_pipeline(device)
    with open(path, "rb") as f:
        encoded = np.frombuffer(f.read(), dtype=np.uint8)
    pipe.feed_input("encoded", [encoded])
    pipe.feed_input("frames", [indices.astype(np.int32)])
    try:
        (out,) = pipe.run()
    except RuntimeError as exc:
        _local.pipelines.pop(device, None)  # a failed run leaves the pipeline unusable
        raise VideoError(path, f"DALI could not decode frames {indices.tolist()}: {str(exc).splitlines()[-1]}") from exc
    if device == "mixed":
        out = out.as_cpu()
    return torch.from_numpy(np.array(out[0]))


# ---- PyAV ----------------------------------------------------------------------------------------------


def _plane(plane) -> np.ndarray:
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


def frame_to_rgb(frame) -> np.ndarray:
    """A decoded PyAV frame as uint8 (H, W, 3) RGB, converted as DALI converts (so both backends agree).

    4:2:0 frames (nearly every H.264/VP9/MJPEG file) get BT.601 YUV->RGB with bilinear, centre-sited chroma
    upsampling, limited range (or full range for JPEG-range frames), rounded to nearest; what DALI's
    decoder returns to within 1 level. Other pixel formats go through FFmpeg's own conversion.
    """
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        return frame.to_ndarray(format="rgb24")
    h, w = frame.height, frame.width
    y = torch.from_numpy(_plane(frame.planes[0]).astype(np.float32))
    uv = torch.from_numpy(np.stack([_plane(frame.planes[1]), _plane(frame.planes[2])]).astype(np.float32))
    uv = torch.nn.functional.interpolate(uv[None], size=(h, w), mode="bilinear", align_corners=False)[0] - 128.0
    full = frame.format.name == "yuvj420p" or int(frame.color_range or 0) == 2
    if not full:
        y = (y - 16.0) * (255.0 / 219.0)
        uv = uv * (255.0 / 224.0)
    u, v = uv[0], uv[1]
    rgb = torch.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], dim=-1)
    return rgb.round_().clamp_(0, 255).to(torch.uint8).numpy()



def _read_pyav(path: str, indices: np.ndarray) -> torch.Tensor:
    """Decodes from the start up to the last frame asked for (no seeking: exact frame numbers)."""
    av = _av()
    wanted = set(int(i) for i in indices)
    last = int(indices.max())
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame_to_rgb(frame)
                if i >= last:
                    break
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoError(path, f"PyAV could not decode ({type(exc).__name__}: {exc})") from exc
    missing = sorted(wanted - frames.keys())
    if missing:
        raise VideoError(path, f"frames {missing[:5]}{'...' if len(missing) > 5 else ''} are past the end")
    sizes = {i: f.shape[:2] for i, f in sorted(frames.items())}
    first = next(iter(sizes.items()))
    other = next(((i, size) for i, size in sizes.items() if size != first[1]), None)
    if other is not None:  # (a clip is one tensor: np.stack would fail with a ValueError naming no file)
        raise VideoError(path, f"the frame size changes mid-stream: {first[1][1]}x{first[1][0]} at frame {first[0]}, "
                               f"{other[1][1]}x{other[1][0]} at frame {other[0]}")  # fmt: skip
    return torch.from_numpy(np.stack([frames[int(i)] for i in indices]))


_said: set[str] = set()


def _frame_numbers(frame_indices) -> np.ndarray:
    """``frame_indices`` as int64 numbers; anything but integers (a float, bool, str) is a TypeError naming it (numpy
    would truncate 1.7 to frame 1 and read True as frame 1)."""
    if isinstance(frame_indices, torch.Tensor):
        frame_indices = frame_indices.detach().cpu().numpy()
    if isinstance(frame_indices, np.ndarray) and frame_indices.dtype.kind in "iu":
        return frame_indices.astype(np.int64)
    if isinstance(frame_indices, (str, bytes)) or not isinstance(frame_indices, Iterable):
        raise TypeError(f"frame_indices must be a sequence of frame numbers, got {type(frame_indices).__name__} "
                        f"{frame_indices!r}")  # fmt: skip
    numbers = []
    for i in frame_indices:
        number = None
        if not isinstance(i, (bool, np.bool_)) and not (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
            try:
                number = operator.index(i)
            except TypeError:
                pass
        if number is None:
            raise TypeError(f"frame_indices must be integers, got {i!r} ({type(i).__name__})")
        numbers.append(number)
    return np.asarray(numbers, dtype=np.int64)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: equal strings, or one file on disk (links, relative and absolute spellings)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # (one of them is no file here: not the same one)
        return False


def read_clip(
    path: str | os.PathLike, frame_indices: Sequence[int], backend: str = "auto", *, info: VideoInfo | None = None
) -> torch.Tensor:
    """The frames ``frame_indices`` (any order, repeats allowed) of a video, as uint8 (T, H, W, 3) RGB.

    Args:
        path: a video file.
        frame_indices: 0-based frame numbers, each in [0, number of frames): ints, or numpy/torch integers.
        backend: ``"dali"``, ``"pyav"`` or ``"auto"`` (DALI where it decodes the codec here, else PyAV).
        info: the file's ``probe`` result, if already known (saves reading the container again).

    Raises:
        VideoError: the file is unusable, an index is out of range, or DALI was asked for a codec it cannot
            decode here.
        TypeError: ``frame_indices`` is not a sequence of integers, or ``info`` is not a ``VideoInfo``.
        ValueError: unknown backend, an empty/negative index list, or ``info`` describing another file.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    indices = _frame_numbers(frame_indices)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError("frame_indices must be a non-empty list of frame numbers")
    if (indices < 0).any():
        raise ValueError(f"frame_indices must be >= 0, got {indices.min()}")
    if info is None:
        info = probe(path)
    elif not isinstance(info, VideoInfo):
        raise TypeError(f"info must be a VideoInfo (probe's result) or None, got {type(info).__name__}")
    elif not _same_file(os.fspath(path), info.path):
        raise ValueError(f"info describes {info.path!r}, not path {os.fspath(path)!r}: pass probe(path) or no info")
    if indices.max() >= info.num_frames:
        raise VideoError(info.path, f"frame {int(indices.max())} asked for, the video has {info.num_frames} frames")
    if backend == "pyav":
        return _read_pyav(info.path, indices)
    reason = dali_codec_reason(info.codec)
    if reason is None:
        return _read_dali(info.path, indices)
    if backend == "dali":
        raise VideoError(info.path, f"{reason}; use backend='pyav'")
    key = f"{info.codec}:{reason}"
    if key not in _said:
        _said.add(key)
        logger.info("decoding %s videos with PyAV: %s", info.codec, reason)
    return _read_pyav(info.path, indices)
