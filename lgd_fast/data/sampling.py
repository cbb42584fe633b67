"""Which frames and which crop windows to read: pure index arithmetic, no decoding.

Temporal samplers (``N`` = frames in the video):

* ``clip_indices`` (LGD-3D): clips of ``clip_len`` frames taken every ``step`` frames, so one clip spans
  ``clip_span(clip_len, step) = (clip_len - 1) * step + 1`` frames. Training: one clip with a start drawn
  uniformly from ``0 .. N - span`` (every start reachable). Test: ``num_clips`` clips whose starts are evenly
  spaced from ``0`` to ``N - span`` (the last clip ends on the last frame), ``start_i = round(i * (N - span) /
  (num_clips - 1))`` with halves rounded up; ``num_clips=1`` takes the centred clip, ``(N - span) // 2``.
  N=100, clip_len=16, 15 clips gives starts 0, 6, 12, ..., 84.
* ``segment_indices`` (LGD-2D, TSN): the video is cut into ``num_segments`` integer segments, segment ``k``
  being frames ``k*N//T .. (k+1)*N//T - 1``, and one frame is taken from each. Training: a frame drawn
  uniformly within each segment. Test: ``num_views`` frame sets; view ``v`` takes the frame at fraction
  ``(v + 0.5) / num_views`` through every segment, ``start_k + (2v + 1) * len_k // (2 * num_views)``, so a
  single view takes each segment's centre (30 frames, 3 segments: 5, 15, 25) and 10 views spread evenly.

Test views repeat or overlap when the video has fewer distinct positions than views (e.g. N=17, clip_len=16:
starts are 0 or 1): the formulas above are kept, never shortened, so the number of views is always the one
asked for and averaging over them stays well defined.

Short videos (``SHORT_VIDEO_RULE = "loop"``): a video with fewer frames than one clip spans
(``N < span``), or fewer frames than segments (``N < num_segments``), is read as if it looped: the clip
starts at frame 0 and index ``j`` is ``(j * step) % N`` (5 frames, clip_len 16: 0, 1, 2, 3, 4, 0, 1, ...);
segment ``k`` takes frame ``k % N``. The rule is the same in training and at test (all test views are then
the same frames), so a short video never raises. ``N <= 0`` raises ``ValueError``.

Spatial windows, ``crop_offsets``: ``(top, left)`` of ``crop``-sized windows. Test: 1 crop is the centre;
3 crops are the start/centre/end along the frame's long side, left/centre/right for a landscape or square
frame and top/centre/bottom for a portrait one (``height > width``), as PySlowFast's ``uniform_crop`` does,
centre offsets being ``ceil((size - crop) / 2)`` there too. Training: one window, each offset drawn
uniformly from ``0 .. size - crop`` inclusive.

Randomness comes only from the ``rng`` argument: a ``numpy.random.Generator`` or a ``torch.Generator``;
``None`` uses torch's global generator, which DataLoader seeds separately in every worker.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

__all__ = [
    "SHORT_VIDEO_RULE",
    "clip_indices",
    "clip_span",
    "crop_offsets",
    "segment_indices",
]

SHORT_VIDEO_RULE = "loop"  # frames shorter than a clip / fewer than the segments are read modulo num_frames


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _frame_count(num_frames) -> int:
    num_frames = operator.index(num_frames)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames} (an empty or unreadable video?)")
    return num_frames


def _randint(rng, low: int, high: int) -> int:
    """One integer drawn uniformly from ``low .. high`` inclusive."""
    if high <= low:
        return low
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    if rng is None or isinstance(rng, torch.Generator):
        return int(torch.randint(low, high + 1, (1,), generator=rng).item())
    raise TypeError(f"rng must be a numpy.random.Generator, a torch.Generator or None, got {type(rng).__name__}")


def _spread(i: int, n: int, total: int) -> int:
    """``round(i * total / (n - 1))`` with halves rounded up, in integers (n >= 2)."""
    return (2 * i * total + n - 1) // (2 * (n - 1))


def clip_span(clip_len: int, step: int = 1) -> int:
    """Frames one clip covers from its first to its last index: ``(clip_len - 1) * step + 1``."""
    return (_positive_int("clip_len", clip_len) - 1) * _positive_int("step", step) + 1


def clip_indices(
    num_frames: int,
    *,
    clip_len: int = 16,
    step: int = 1,
    training: bool,
    num_clips: int = 15,
    rng=None,
) -> list[list[int]]:
    """Frame indices of LGD-3D clips: one random clip in training, ``num_clips`` evenly spaced at test.

    Returns ``[clip][clip_len]`` indices, all in ``[0, num_frames)``; see the module docstring for the rules.
    """
    num_frames = _frame_count(num_frames)
    span = clip_span(clip_len, step)
    num_clips = _positive_int("num_clips", num_clips)
    max_start = num_frames - span
    if max_start < 0:  # short video: loop from frame 0
        clip = [(j * step) % num_frames for j in range(clip_len)]
        return [clip] if training else [list(clip) for _ in range(num_clips)]
    if training:
        starts = [_randint(rng, 0, max_start)]
    elif num_clips == 1:
        starts = [max_start // 2]
    else:
        starts = [_spread(i, num_clips, max_start) for i in range(num_clips)]
    return [[start + j * step for j in range(clip_len)] for start in starts]


def segment_indices(
    num_frames: int,
    *,
    num_segments: int = 3,
    training: bool,
    num_views: int = 10,
    rng=None,
) -> list[list[int]]:
    """Frame indices of LGD-2D (TSN) segments: one frame per segment, one set in training, ``num_views`` at test.

    Returns ``[view][num_segments]`` indices, all in ``[0, num_frames)``; see the module docstring for the rules.
    """
    num_frames = _frame_count(num_frames)
    num_segments = _positive_int("num_segments", num_segments)
    num_views = _positive_int("num_views", num_views)
    if num_frames < num_segments:  # short video: loop
        frames = [k % num_frames for k in range(num_segments)]
        return [frames] if training else [list(frames) for _ in range(num_views)]
    bounds = [k * num_frames // num_segments for k in range(num_segments + 1)]
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    if training:
        return [[_randint(rng, start, end - 1) for start, end in segments]]
    return [
        [start + (2 * v + 1) * (end - start) // (2 * num_views) for start, end in segments] for v in range(num_views)
    ]


def crop_offsets(
    height: int,
    width: int,
    crop: int | tuple[int, int],
    *,
    num_crops: int = 1,
    training: bool = False,
    rng=None,
) -> list[tuple[int, int]]:
    """``(top, left)`` of crop windows in a ``height x width`` frame; ``crop`` is a side or ``(crop_h, crop_w)``.

    Training returns one random window (``num_crops`` is ignored); test returns ``num_crops`` (1 or 3) windows.
    """
    height = _positive_int("height", height)
    width = _positive_int("width", width)
    crop_h, crop_w = (crop, crop) if not isinstance(crop, (tuple, list)) else crop
    crop_h = _positive_int("crop height", crop_h)
    crop_w = _positive_int("crop width", crop_w)
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"crop {crop_h}x{crop_w} does not fit in a {height}x{width} frame; resize the frame to at least the crop"
        )
    slack_h, slack_w = height - crop_h, width - crop_w
    if training:
        return [(_randint(rng, 0, slack_h), _randint(rng, 0, slack_w))]
    num_crops = _positive_int("num_crops", num_crops)
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    top, left = -(-slack_h // 2), -(-slack_w // 2)
    if num_crops == 1:
        return [(top, left)]
    if height > width:  # portrait: top / centre / bottom
        return [(0, left), (top, left), (slack_h, left)]
    return [(top, 0), (top, left), (top, slack_w)]
