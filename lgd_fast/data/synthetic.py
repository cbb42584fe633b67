"""The built-in motion dataset: real encoded videos whose classes differ by the direction of time only.

Classes come in time-reversal twins: class ``2k + 1`` is class ``2k`` played backwards. A video of class ``2k + 1``
is rendered exactly as a class-``2k`` video with the same random parameters, then its frame order is reversed, so
the distribution of a class's videos reversed in time is the twin's distribution. Every frame (and every unordered
set of frames) of one twin is as likely under the other: only temporal order separates them.

Twin pairs (forward class first). Every random phase is uniform, so the videos are stationary in time: any 16-frame
window shows the motion, and the frame at any position (the codec's first, key, frame included) has the same
distribution in both twins.

0. ``move_down`` / ``move_up``: one or two large shapes slide vertically, wrapping around the frame.
1. ``expand`` / ``contract``: concentric rings (circles, squares or diamonds) move out of / into a centre.
2. ``converge_horizontal`` / ``diverge_horizontal``: bars move towards / away from a vertical centre line.
3. ``brighten`` / ``darken``: on a dark background, a large shape brightens over 4-7 frames then snaps back dark
   (reversed: snaps bright, then darkens); brighter always means more contrast too.
4. ``converge_vertical`` / ``diverge_vertical``: bars move towards / away from a horizontal centre line.

Design for early learning: object/background luminance gap of at least ~0.45 (0.6 for the ramp), shapes spanning
a third to four fifths of the frame, patterns filling it, speeds of 5-8% of the frame side per frame (2.4-3.8 px
at 48 px, 1.9-3.1 px after resizing to 40 for 32-px crops), static low-contrast background texture. Measured on
the default dataset (``lgd3d_tiny``, 16x32x32 clips from frames resized to 40, flip on, Adam 1e-3, batch 16, 2 CPU
cores): the direction within the right pair is 79% right after the first epoch; held-out clip accuracy is 77% after
3 epochs (13 s), 97% after 8 (36 s).

Horizontal flip: every class keeps its label under a left-right flip (no left/right or clockwise/anticlockwise
classes), so flip augmentation is safe (``FLIP_SAFE``). A vertical flip would swap ``move_down`` and ``move_up``.
Time reversal swaps every twin, by construction.

Layout written by :func:`make_dataset` under ``OUT``::

    videos/<class>/<class>_<index:04d>.webm|.mp4    classes.txt    train.txt    val.txt    dataset.json
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decode import _av

__all__ = [
    "CLASS_NAMES",
    "CODECS",
    "FLIP_SAFE",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "PAIRS",
    "DatasetInfo",
    "MotionPair",
    "VideoParams",
    "make_dataset",
    "render_video",
    "sample_params",
    "video_rng",
    "write_video",
]

FORMAT_VERSION = 1
FLIP_SAFE = True  # every class keeps its label under a horizontal flip
GENERATOR = "lgd_fast.data.synthetic"
MANIFEST = "dataset.json"
INCOMPLETE_MARKER = "dataset.incomplete"  # present while make_dataset writes; an interrupted run leaves it behind
CODECS = {  # codec -> (encoder, file extension, encoder options); one thread each, so the bytes are reproducible
    "vp9": ("libvpx-vp9", ".webm", {"crf": "16", "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "0"}),
    "h264": ("libx264", ".mp4", {"crf": "10", "preset": "veryfast", "tune": "zerolatency"}),
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SHAPES = ("disc", "square", "diamond", "ring", "plus")


@dataclass(frozen=True, eq=False)
class VideoParams:
    """The random scene and motion of one video of a twin pair, before the time direction is applied.

    ``background`` is (size, size, 3) float32 in [0, 1]; ``motion`` holds the pair's own parameters (pixels, frames).
    """

    pair: int
    frames: int
    size: int
    background: np.ndarray
    motion: dict[str, Any]


@dataclass(frozen=True)
class MotionPair:
    """One twin pair: ``forward`` is class 2k, ``backward`` (class 2k + 1) is it played backwards."""

    forward: str
    backward: str
    forward_motion: str
    backward_motion: str
    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, dict[str, Any]]]  # -> background colour, motion
    render: Callable[[VideoParams], np.ndarray]  # -> (T, H, W, 3) float32 in [0, 1], forward time
    flip_safe: bool = True


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`make_dataset` wrote: ``class_names[i]`` is label i, ``twins[i]`` the label of its time reversal."""

    root: Path
    class_names: tuple[str, ...]
    twins: tuple[int, ...]
    train_count: int
    val_count: int
    flip_safe: bool = FLIP_SAFE

    @property
    def train_list(self) -> Path:
        return self.root / "train.txt"

    @property
    def val_list(self) -> Path:
        return self.root / "val.txt"

    def summary(self) -> str:
        """A few lines for people: where, how many videos, every class with its twin."""
        flip = "safe" if self.flip_safe else "NOT safe (a left-right flip swaps some twins)"
        lines = [
            f"{self.root}: {len(self.class_names)} classes, {self.train_count} train + {self.val_count} val videos "
            f"(train.txt, val.txt, classes.txt, dataset.json); horizontal flip {flip}"
        ]
        for label, name in enumerate(self.class_names):
            twin = self.twins[label]
            lines.append(f"  {label:2d} {name:<20} time-reversed twin: {twin} {self.class_names[twin]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# drawing helpers: pixel-unit signed distances, anti-aliased coverage


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased area covered by the region sdf < 0 (sdf in pixels)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _band_coverage(s: np.ndarray, period: float, width: float) -> np.ndarray:
    """Coverage of bands [0, width) repeating every ``period`` pixels along the coordinate s."""
    m = np.mod(s, period)
    inside = np.minimum(m, width - m)
    outside = np.minimum(m - width, period - m)
    return _coverage(-np.where(m < width, inside, -outside))


def _shape_sdf(shape: dict[str, Any], dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape centred at dx = dy = 0."""
    c, s = np.cos(shape["angle"]), np.sin(shape["angle"])
    u, v = c * dx + s * dy, c * dy - s * dx
    r, kind = shape["radius"], shape["kind"]
    if kind == "disc":
        return np.hypot(u, v) - r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    if kind == "diamond":
        return (np.abs(u) + np.abs(v) - 1.2 * r) / np.sqrt(2.0)
    if kind == "ring":
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    arm = 0.35 * r  # plus
    return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r))


def _tinted(rng: np.random.Generator, luminance: float, saturation: float = 0.4) -> np.ndarray:
    """A random colour (3,) of about the given luminance."""
    chroma = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    chroma -= chroma @ _LUMA  # zero-luminance tint
    return np.clip(luminance + saturation * chroma, 0.0, 1.0)


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours (3,) with luminances at least ~0.45 apart."""
    dark, bright = rng.uniform(0.05, 0.28), rng.uniform(0.72, 0.95)
    if rng.random() < 0.5:
        dark, bright = bright, dark
    return _tinted(rng, dark), _tinted(rng, bright)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) smooth noise in [-1, 1]: a random coarse grid, bilinearly upsampled."""
    cells = int(rng.integers(3, 7))
    grid = rng.uniform(-1.0, 1.0, (cells, cells))
    at = np.linspace(0, cells - 1, size)
    rows = np.stack([np.interp(at, np.arange(cells), row) for row in grid])  # (cells, size)
    return np.stack([np.interp(at, np.arange(cells), col) for col in rows.T], axis=1)


def _background(rng: np.random.Generator, colour: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) static background: a colour plus low-contrast smooth noise and a gradient."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    texture = rng.uniform(0.02, 0.06) * _smooth_noise(rng, size)
    texture += rng.uniform(0.0, 0.08) * (np.cos(angle) * xx + np.sin(angle) * yy)
    return np.clip(colour + texture[..., None], 0.0, 1.0).astype(np.float32)


def _sample_fill(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """A shape's texture: stripes that move with it."""
    return {
        "period": rng.uniform(0.15, 0.3) * size,
        "angle": rng.uniform(0, np.pi),
        "phase": rng.uniform(0, 2 * np.pi),
        "contrast": rng.uniform(0.08, 0.2),
    }


def _fill(colour: np.ndarray, fill: dict[str, Any], dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """(..., 3) textured colour at object-local pixel offsets dx, dy."""
    along = np.cos(fill["angle"]) * dx + np.sin(fill["angle"]) * dy
    stripes = 1.0 + fill["contrast"] * np.sin(2 * np.pi * along / fill["period"] + fill["phase"])
    return colour * stripes[..., None]


def _composite(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return under * (1.0 - alpha[..., None]) + over * alpha[..., None]


def _speed(rng: np.random.Generator, size: int) -> float:
    """Pixels per frame: 5-8% of the frame side."""
    return rng.uniform(0.05, 0.08) * size


# ----------------------------------------------------------------------------------------------------------------
# the twin pairs: sample(rng, size) -> (background colour (3,), motion parameters); render(params) -> forward frames


def _sample_slide(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    background, colour = _contrasting_colours(rng)
    count = int(rng.integers(1, 3))
    centres = [rng.uniform(0.3, 0.7)] if count == 1 else [rng.uniform(0.2, 0.4), rng.uniform(0.6, 0.8)]
    objects = []
    for x in centres:
        shape = {
            "kind": _SHAPES[rng.integers(len(_SHAPES))],
            "radius": rng.uniform(0.16, 0.26) * size,
            "angle": rng.uniform(0, np.pi / 2),
        }
        objects.append(
            {
                "shape": shape,
                "x": x * size,
                "y": rng.uniform(0, size),
                "speed": _speed(rng, size),
                "colour": _tinted(rng, float(colour @ _LUMA)),
                "fill": _sample_fill(rng, size),
            }
        )
    return background, {"objects": objects}


def _render_slide(p: VideoParams) -> np.ndarray:
    """Shapes sliding down with wrap-around (each object is smaller than half the frame, so one copy per pixel)."""
    t = np.arange(p.frames, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0 : p.size, 0 : p.size].astype(np.float32)
    video = np.broadcast_to(p.background, (p.frames, p.size, p.size, 3))
    for obj in p.motion["objects"]:
        centre_y = obj["y"] + obj["speed"] * t
        dy = np.mod(yy - centre_y + p.size / 2, p.size) - p.size / 2  # (T, H, W), wrapped
        dx = np.broadcast_to(xx - obj["x"], dy.shape)
        alpha = _coverage(_shape_sdf(obj["shape"], dx, dy))
        video = _composite(video, _fill(obj["colour"], obj["fill"], dx, dy), alpha)
    return video


def _sample_rings(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    background, colour = _contrasting_colours(rng)
    period = rng.uniform(0.25, 0.38) * size
    return background, {
        "colour": colour,
        "norm": ("l2", "linf", "l1")[rng.integers(3)],
        "centre": (size - 1) / 2 + rng.uniform(-0.1, 0.1, 2) * size,
        "angle": rng.uniform(0, np.pi / 2),
        "period": period,
        "width": rng.uniform(0.35, 0.6) * period,
        "offset": rng.uniform(0, period),
        "speed": _speed(rng, size),
    }


def _render_rings(p: VideoParams) -> np.ndarray:
    """Concentric rings moving outwards."""
    m = p.motion
    yy, xx = np.mgrid[0 : p.size, 0 : p.size].astype(np.float32)
    dx, dy = xx - m["centre"][0], yy - m["centre"][1]
    c, s = np.cos(m["angle"]), np.sin(m["angle"])
    u, v = c * dx + s * dy, c * dy - s * dx
    distance = {"l2": np.hypot(u, v), "linf": np.maximum(np.abs(u), np.abs(v)), "l1": np.abs(u) + np.abs(v)}[m["norm"]]
    t = np.arange(p.frames, dtype=np.float32)[:, None, None]
    alpha = _band_coverage(distance - m["speed"] * t + m["offset"], m["period"], m["width"])
    return _composite(p.background, m["colour"], alpha)


def _sample_bars(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    background, colour = _contrasting_colours(rng)
    period = rng.uniform(0.22, 0.34) * size
    return background, {
        "colour": colour,
        "centre": (size - 1) / 2 + rng.uniform(-0.08, 0.08) * size,
        "period": period,
        "width": rng.uniform(0.35, 0.6) * period,
        "offset": rng.uniform(0, period),
        "speed": _speed(rng, size),
        "band_centre": (size - 1) / 2 + rng.uniform(-0.15, 0.15) * size,
        "band_height": rng.uniform(0.6, 1.2) * size,
    }


def _render_bars(p: VideoParams, *, vertical: bool) -> np.ndarray:
    """Bars moving towards a centre line (vertical line, or horizontal one when ``vertical``), confined to a band."""
    m = p.motion
    yy, xx = np.mgrid[0 : p.size, 0 : p.size].astype(np.float32)
    across, along = (yy, xx) if vertical else (xx, yy)
    t = np.arange(p.frames, dtype=np.float32)[:, None, None]
    alpha = _band_coverage(np.abs(across - m["centre"]) + m["speed"] * t + m["offset"], m["period"], m["width"])
    alpha = alpha * _coverage(np.abs(along - m["band_centre"]) - m["band_height"] / 2)
    return _composite(p.background, m["colour"], alpha)


def _sample_ramp(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A dark background and a shape that starts about as dark: brightening always means gaining contrast too."""
    background = rng.uniform(0.03, 0.2)
    dark = background + rng.uniform(0.0, 0.08)
    bright = min(dark + rng.uniform(0.6, 0.8), 0.98)
    tint = _tinted(rng, 0.5) - 0.5
    shape = {
        "kind": _SHAPES[rng.integers(len(_SHAPES))],
        "radius": rng.uniform(0.3, 0.42) * size,
        "angle": rng.uniform(0, np.pi / 2),
    }
    return _tinted(rng, background, saturation=0.2), {
        "shape": shape,
        "centre": (size - 1) / 2 + rng.uniform(-0.12, 0.12, 2) * size,
        "dark": np.clip(dark + tint, 0, 1),
        "bright": np.clip(bright + tint, 0, 1),
        "cycle": rng.uniform(4.0, 7.0),  # frames from dark to bright
        "phase": rng.uniform(0, 1),
        "fill": _sample_fill(rng, size),
    }


def _render_ramp(p: VideoParams) -> np.ndarray:
    """A static shape that brightens linearly over ``cycle`` frames, then snaps back dark (a sawtooth)."""
    m = p.motion
    yy, xx = np.mgrid[0 : p.size, 0 : p.size].astype(np.float32)
    dx, dy = xx - m["centre"][0], yy - m["centre"][1]
    ramp = np.mod(np.arange(p.frames) / m["cycle"] + m["phase"], 1.0)[:, None]  # (T, 1)
    colours = (m["dark"] * (1 - ramp) + m["bright"] * ramp)[:, None, None, :]  # (T, 1, 1, 3)
    texture = _fill(np.ones(3, np.float32), m["fill"], dx, dy)  # (H, W, 3)
    alpha = np.broadcast_to(_coverage(_shape_sdf(m["shape"], dx, dy)), (p.frames, p.size, p.size))
    return _composite(p.background, colours * texture, alpha)


PAIRS: tuple[MotionPair, ...] = (
    MotionPair(
        "move_down",
        "move_up",
        "shapes slide down, wrapping around",
        "shapes slide up, wrapping around",
        _sample_slide,
        _render_slide,
    ),
    MotionPair(
        "expand",
        "contract",
        "concentric rings move out of a centre",
        "concentric rings move into a centre",
        _sample_rings,
        _render_rings,
    ),
    MotionPair(
        "converge_horizontal",
        "diverge_horizontal",
        "bars move towards a vertical line",
        "bars move away from a vertical line",
        _sample_bars,
        lambda p: _render_bars(p, vertical=False),
    ),
    MotionPair(
        "brighten",
        "darken",
        "a shape brightens slowly, then snaps dark",
        "a shape snaps bright, then darkens slowly",
        _sample_ramp,
        _render_ramp,
    ),
    MotionPair(
        "converge_vertical",
        "diverge_vertical",
        "bars move towards a horizontal line",
        "bars move away from a horizontal line",
        _sample_bars,
        lambda p: _render_bars(p, vertical=True),
    ),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for pair in PAIRS for name in (pair.forward, pair.backward))
MAX_CLASSES = len(CLASS_NAMES)


def video_rng(seed: int, class_id: int, index: int) -> np.random.Generator:
    """The generator that draws every random choice of video ``index`` of class ``class_id``."""
    return np.random.default_rng([seed, class_id, index])


def sample_params(class_id: int, rng: np.random.Generator, *, frames: int, size: int) -> VideoParams:
    """Random scene and motion for a video of ``class_id``'s twin pair (identical for class 2k and 2k + 1)."""
    if not 0 <= class_id < MAX_CLASSES:
        raise ValueError(f"class_id must be in [0, {MAX_CLASSES}), got {class_id}")
    background, motion = PAIRS[class_id // 2].sample(rng, size)
    return VideoParams(class_id // 2, frames, size, _background(rng, background, size), motion)


def render_video(class_id: int, params: VideoParams) -> np.ndarray:
    """Raw frames (T, H, W, 3) uint8 of a ``class_id`` video; an odd class is its even twin reversed in time."""
    if class_id // 2 != params.pair:
        raise ValueError(f"params were sampled for twin pair {params.pair}, not for class {class_id}")
    video = PAIRS[params.pair].render(params)
    video = np.rint(np.clip(video, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(video[::-1] if class_id % 2 else video)


def write_video(path: str | os.PathLike, frames: np.ndarray, *, codec: str = "vp9", fps: int = 25) -> None:
    """Encodes (T, H, W, 3) uint8 RGB frames (H, W even) to ``path`` (.webm for vp9, .mp4 for h264), yuv420p."""
    av = _av()
    encoder, _, options = CODECS[codec]
    with av.open(os.fspath(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# ----------------------------------------------------------------------------------------------------------------
# the dataset on disk


def _check_arguments(classes, videos_per_class, val_fraction, seed, codec, frames, size, fps) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(classes) or classes < 2 or classes % 2 or classes > MAX_CLASSES:
        raise ValueError(f"classes must be an even number in [2, {MAX_CLASSES}] (twin pairs), got {classes!r}")
    if not is_int(videos_per_class) or videos_per_class < 2:
        raise ValueError(
            f"videos_per_class must be an integer >= 2 (one train, one val at least), got {videos_per_class!r}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if not is_int(frames) or frames < 8:
        raise ValueError(f"frames must be an integer >= 8, got {frames!r}")
    if not is_int(size) or size < 16 or size % 2:
        raise ValueError(f"size must be an even integer >= 16 (yuv420p needs even sides), got {size!r}")
    if not is_int(fps) or not 1 <= fps <= 240:
        raise ValueError(f"fps must be an integer in [1, 240], got {fps!r}")


def _val_count(videos_per_class: int, val_fraction: float) -> int:
    return min(max(int(videos_per_class * val_fraction + 0.5), 1), videos_per_class - 1)


def _write_text(path: Path, text: str) -> None:
    """Writes a file atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """This generator's dataset.json under root, or None if there is none (or it is not ours)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _listed_files_exist(root: Path) -> bool:
    for name in ("classes.txt", "train.txt", "val.txt"):
        if not (root / name).is_file():
            return False
    for name in ("train.txt", "val.txt"):
        for line in (root / name).read_text().splitlines():
            path = root / line.rsplit(" ", 1)[0]
            if not path.is_file() or path.stat().st_size == 0:
                return False
    return True


def _class_entry(label: int) -> dict[str, Any]:
    pair = PAIRS[label // 2]
    motion = pair.backward_motion if label % 2 else pair.forward_motion
    return {
        "label": label,
        "name": CLASS_NAMES[label],
        "twin": label ^ 1,
        "flip_safe": pair.flip_safe,
        "motion": motion,
    }


def _info(root: Path, manifest: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(
        root=root,
        class_names=tuple(c["name"] for c in manifest["classes"]),
        twins=tuple(c["twin"] for c in manifest["classes"]),
        train_count=manifest["counts"]["train"],
        val_count=manifest["counts"]["val"],
        flip_safe=manifest["flip_safe"],
    )


def _remove_own_outputs(root: Path) -> None:
    """Deletes what a previous (interrupted or other-parameter) run of this generator wrote; nothing else."""
    shutil.rmtree(root / "videos", ignore_errors=True)
    for name in ("classes.txt", "train.txt", "val.txt", MANIFEST):
        (root / name).unlink(missing_ok=True)


def make_dataset(
    out: str | os.PathLike,
    *,
    classes: int = 8,
    videos_per_class: int = 40,
    val_fraction: float = 0.25,
    seed: int = 0,
    codec: str = "vp9",
    frames: int = 32,
    size: int = 48,
    fps: int = 25,
    progress: bool = True,
) -> DatasetInfo:
    """Writes the motion dataset (``classes`` classes, twins 2k / 2k + 1) as real video files under ``out``.

    Each video is (frames, size, size) RGB, deterministic for (seed, class, index). The last
    ``round(videos_per_class * val_fraction)`` videos of each class (at least one, never all) go to val.txt, the rest
    to train.txt (videos are i.i.d., so which ones does not matter). If ``out``
    already holds a complete dataset made with the same arguments, it is returned as is; a non-empty ``out`` that is
    not this generator's output (complete or interrupted) is refused.
    """
    _check_arguments(classes, videos_per_class, val_fraction, seed, codec, frames, size, fps)
    root = Path(out)
    parameters = {
        "seed": int(seed),
        "codec": codec,
        "frames": int(frames),
        "size": int(size),
        "fps": int(fps),
        "videos_per_class": int(videos_per_class),
        "val_fraction": float(val_fraction),
    }
    manifest = _read_manifest(root)
    incomplete = (root / INCOMPLETE_MARKER).exists()
    if manifest is not None and not incomplete:
        found = {key: manifest.get(key) for key in parameters} | {"classes": len(manifest.get("classes", []))}
        if manifest.get("format_version") != FORMAT_VERSION or found != parameters | {"classes": classes}:
            raise FileExistsError(
                f"{root} holds a dataset made with other parameters ({found}, format {manifest.get('format_version')})"
                f"; pick another directory or delete this one"
            )
        if _listed_files_exist(root):
            return _info(root, manifest)
    elif root.exists() and not incomplete and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and is not a dataset written by make_dataset; pick an empty or new directory"
        )

    root.mkdir(parents=True, exist_ok=True)
    _write_text(root / INCOMPLETE_MARKER, json.dumps(parameters) + "\n")
    _remove_own_outputs(root)

    from tqdm.auto import tqdm

    names = CLASS_NAMES[:classes]
    extension = CODECS[codec][1]
    n_val = _val_count(videos_per_class, val_fraction)
    lists: dict[str, list[str]] = {"train": [], "val": []}
    with tqdm(total=classes * videos_per_class, desc="make-dataset", unit="video", disable=not progress) as bar:
        for label, name in enumerate(names):
            (root / "videos" / name).mkdir(parents=True, exist_ok=True)
            for index in range(videos_per_class):
                relative = f"videos/{name}/{name}_{index:04d}{extension}"
                params = sample_params(label, video_rng(seed, label, index), frames=frames, size=size)
                tmp = root / (relative + ".tmp" + extension)  # keeps the extension: the muxer is chosen by it
                write_video(tmp, render_video(label, params), codec=codec, fps=fps)
                os.replace(tmp, root / relative)
                lists["val" if index >= videos_per_class - n_val else "train"].append(f"{relative} {label}")
                bar.update()

    _write_text(root / "classes.txt", "".join(f"{name}\n" for name in names))
    for split, lines in lists.items():
        _write_text(root / f"{split}.txt", "".join(f"{line}\n" for line in lines))
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        **parameters,
        "flip_safe": FLIP_SAFE,
        "classes": [_class_entry(label) for label in range(classes)],
        "counts": {
            "train": len(lists["train"]),
            "val": len(lists["val"]),
            "train_per_class": videos_per_class - n_val,
            "val_per_class": n_val,
        },
        "encoder": {"name": CODECS[codec][0], "options": CODECS[codec][2], "pyav": _av().__version__},
    }
    _write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (root / INCOMPLETE_MARKER).unlink()
    return _info(root, manifest)
