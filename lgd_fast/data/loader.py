"""Batches of clips for training and testing: DALI pipelines, or PyAV with a multi-worker DataLoader.

One sampling plan for both backends: Python decides, per sample, which frames (``sampling.py``), the resize
size, the crop offsets and the flip, from a generator seeded by (seed, epoch); the backend then
decodes those frames and applies resize, crop, flip and normalisation (DALI inside its pipeline, PyAV in
the worker with torch). So the two backends give the same clips up to resampling round-off.

Every batch is a ``ClipBatch``: ``clips`` (N, 3, T, H, W) float32 normalised, ``labels`` (N,) int64 and
``video_ids`` (N,) int64 (the record's position in the annotation list, for multi-view test averaging).

Bad videos never stop a run: ``VideoClipLoader`` probes every file when it is built (missing, empty,
truncated or unreadable files are dropped with one warning each), and a file that fails later, while
decoding, is skipped with one warning; ``loader.skipped`` lists (path, reason) of the current epoch and
the count is logged at the epoch's end.

Backend choice (``backend="auto"``): DALI where it decodes every file's codec on this device (GPU: H.264,
HEVC, VP8, VP9, AV1; CPU: VP8, VP9, MJPEG), else PyAV, said once in the log; ``strict=True`` makes that an
error instead.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import sampling
from .annotations import VideoRecord, shard
from .decode import (
    VideoError,
    VideoInfo,
    _read_pyav,
    build_dali_pipeline,
    dali_codec_reason,
    dali_device,
    decode_fed_frames,
    probe,
)

__all__ = ["ClipBatch", "ClipSpec", "NoUsableVideoError", "SamplePlan", "VideoClipLoader", "plan_samples"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClipSpec:
    """What a clip is: the sampler, the spatial pipeline and the test-time views.

    ``kind="3d"``: ``clip_len`` consecutive frames ``step`` apart (LGD-3D; test: ``test_clips`` clips).
    ``kind="2d"``: one frame from each of ``num_segments`` TSN segments (LGD-2D; test: ``test_views``).
    Frames are resized so that the shorter side is ``resize_shorter``, then cropped to ``crop`` x ``crop``
    (random in training, ``test_crops`` = 1 centre or 3 along the long side at test), flipped at random in
    training if ``flip``, scaled to [0, 1] and normalised with ``mean`` and ``std``.
    """

    kind: str = "3d"
    clip_len: int = 16
    step: int = 1
    num_segments: int = 3
    test_clips: int = 15
    test_views: int = 10
    test_crops: int = 1
    resize_shorter: int = 128
    crop: int = 112
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    reverse: bool = False  # play every clip backwards (the demo's time-reversal control)

    def __post_init__(self):
        if self.kind not in ("3d", "2d"):
            raise ValueError(f"ClipSpec.kind must be '3d' or '2d', got {self.kind!r}")
        for name in ("clip_len", "step", "num_segments", "test_clips", "test_views", "resize_shorter", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.test_crops not in (1, 3):
            raise ValueError(f"ClipSpec.test_crops must be 1 or 3, got {self.test_crops}")
        if self.crop > self.resize_shorter:
            raise ValueError(f"ClipSpec.crop ({self.crop}) is larger than resize_shorter ({self.resize_shorter})")

    @property
    def frames(self) -> int:
        """T of a clip."""
        return self.clip_len if self.kind == "3d" else self.num_segments


class SamplePlan(NamedTuple):
    """One clip to make: which video, which frames, resize to (h, w), crop at (y, x), flip or not."""

    video_id: int
    path: str
    label: int
    frames: tuple[int, ...]
    resize: tuple[int, int]
    offset: tuple[int, int]
    flip: bool


class NoUsableVideoError(ValueError):
    """No record of a loader could be used; ``dropped`` holds (path, reason) for each, as probing found them."""

    def __init__(self, message: str, dropped: list[tuple[str, str]]):
        super().__init__(message)
        self.dropped = dropped


class ClipBatch(NamedTuple):
    clips: torch.Tensor  # (N, 3, T, H, W) float32
    labels: torch.Tensor  # (N,) int64
    video_ids: torch.Tensor  # (N,) int64


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``shorter`` and the aspect ratio kept (rounded)."""
    scale = shorter / min(height, width)
    return max(shorter, round(height * scale)), max(shorter, round(width * scale))


def plan_samples(
    videos: Sequence[tuple[int, VideoRecord, VideoInfo]], spec: ClipSpec, *, training: bool, rng: np.random.Generator
) -> list[SamplePlan]:
    """The clips of one epoch: one per video in training (in the given order), every view at test."""
    plans = []
    for video_id, record, info in videos:
        size = resized_size(info.height, info.width, spec.resize_shorter)
        if spec.kind == "3d":
            frame_sets = sampling.clip_indices(
                info.num_frames, clip_len=spec.clip_len, step=spec.step, training=training,
                num_clips=spec.test_clips, rng=rng,
            )
        else:
            frame_sets = sampling.segment_indices(
                info.num_frames, num_segments=spec.num_segments, training=training, num_views=spec.test_views,
                rng=rng,
            )
        offsets = sampling.crop_offsets(
            size[0], size[1], spec.crop, num_crops=1 if training else spec.test_crops, training=training, rng=rng
        )
        for frames in frame_sets:
            if spec.reverse:
                frames = list(frames)[::-1]
            for offset in offsets:
                flip = bool(training and spec.flip and rng.random() < 0.5)
                plans.append(
                    SamplePlan(video_id, record.path, record.label, tuple(int(i) for i in frames), size,
                               tuple(int(v) for v in offset), flip)
                )
    return plans


def _normalise_torch(frames: torch.Tensor, plan: SamplePlan, spec: ClipSpec) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, crop, crop): resize, crop, flip, normalise (the PyAV path)."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if tuple(x.shape[-2:]) != plan.resize:
        x = F.interpolate(x, size=plan.resize, mode="bilinear", align_corners=False, antialias=True)
    y0, x0 = plan.offset
    x = x[:, :, y0 : y0 + spec.crop, x0 : x0 + spec.crop]
    if plan.flip:
        x = x.flip(-1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


class _PyAVClips(torch.utils.data.Dataset):
    """The PyAV path: item i decodes plan i; a bad file gives (None, path, reason) instead of a clip."""

    def __init__(self, plans: list[SamplePlan], spec: ClipSpec):
        self.plans, self.spec = plans, spec

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):
        plan = self.plans[i]
        try:
            frames = _read_pyav(plan.path, np.asarray(plan.frames))
        except VideoError as err:
            return None, plan.path, err.reason
        return _normalise_torch(frames, plan, self.spec), plan.label, plan.video_id


def _collate(items):
    good = [item for item in items if item[0] is not None]
    bad = [(path, reason) for clip, path, reason in items if clip is None]
    if not good:
        return None, bad
    clips, labels, ids = zip(*good, strict=True)
    return ClipBatch(torch.stack(clips), torch.tensor(labels), torch.tensor(ids)), bad


@dataclass
class VideoClipLoader:
    """Iterates over batches of clips of ``records``, one epoch per ``iter()``.

    Args:
        records: the videos (``annotations.read_annotations``).
        spec: the clip definition.
        batch_size: clips per batch (the last batch of an epoch may be smaller; ``drop_last`` drops it).
        training: random frames, crops and flips, shuffled order; else every test view in order.
        backend: ``"dali"``, ``"pyav"`` or ``"auto"``.
        strict: with ``auto``, raise instead of falling back to PyAV when DALI cannot decode the files.
        shard_id, num_shards: this process's part (distributed training). In training every process plans the
            whole epoch from the same generator and takes clips ``shard_id::num_shards`` (the plan padded by
            wrapping to a multiple of ``num_shards``), so with ``batch_size`` = global batch / ``num_shards`` the
            processes' k-th batches together are exactly the single-process k-th batch of the global size. At
            test, videos are split ``shard_id::num_shards`` (a video's views stay together).
        num_workers: PyAV DataLoader workers; DALI decoding threads.
        seed: with the epoch number, decides every random choice.
        progress: a progress bar while probing the files.
        yield_empty: a batch whose every clip was unreadable comes as ``None`` (counted in ``skipped`` as ever)
            instead of being left out, so that processes taking one step per batch stay in step: distributed
            training skips such a step on every process.
    """

    records: Sequence[VideoRecord]
    spec: ClipSpec = field(default_factory=ClipSpec)
    batch_size: int = 8
    training: bool = True
    backend: str = "auto"
    strict: bool = False
    shard_id: int = 0
    num_shards: int = 1
    num_workers: int = 2
    seed: int = 0
    drop_last: bool = False
    progress: bool = False
    yield_empty: bool = False

    def __post_init__(self):
        if self.backend not in ("auto", "dali", "pyav"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'pyav', got {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.epoch = 0
        self.position = 0  # plan batches of the current epoch handed out so far (the resume point)
        self._start_batch = 0
        self._carried_skips: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []  # files found unusable when probing
        self.pyav_batches: list[tuple[str, str]] = []  # (files, DALI's error): batches DALI failed and PyAV decoded
        shard(range(1), 0, self.num_shards)  # validates num_shards
        shard(range(self.num_shards), self.shard_id, self.num_shards)  # validates shard_id
        ids = list(range(len(self.records)))
        if not self.training:
            ids = shard(ids, self.shard_id, self.num_shards)
        self.videos = self._probe([(i, self.records[i]) for i in ids])
        if not self.videos:
            raise NoUsableVideoError(f"no usable video among {len(ids)} records (see the warnings above)",
                                     self.dropped)  # fmt: skip
        self.backend_used = self._choose_backend()
        self._pipeline = None

    # ---- set-up ---------------------------------------------------------------------------------------

    def _probe(self, items: list[tuple[int, VideoRecord]]) -> list[tuple[int, VideoRecord, VideoInfo]]:
        from tqdm.auto import tqdm

        usable = []
        for video_id, record in tqdm(items, desc="probing videos", unit="video", disable=not self.progress):
            try:
                usable.append((video_id, record, probe(record.path)))
            except VideoError as err:
                if self.shard_id == 0 or not self.training:  # in training every process probes every file
                    logger.warning("skipping %s: %s", err.path, err.reason)
                self.dropped.append((err.path, err.reason))
        return usable

    def _choose_backend(self) -> str:
        if self.backend == "pyav":
            return "pyav"
        reasons = sorted({r for _, _, info in self.videos if (r := dali_codec_reason(info.codec)) is not None})
        if not reasons:
            return "dali"
        message = "; ".join(reasons)
        if self.backend == "dali" or self.strict:
            raise RuntimeError(f"the DALI backend cannot decode these videos here: {message}")
        logger.warning("decoding with PyAV instead of DALI: %s", message)
        return "pyav"

    # ---- iteration ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.training:
            n = math.ceil(len(self.videos) / self.num_shards)
        else:
            n = len(self.videos) * self._views_per_video()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _views_per_video(self) -> int:
        per = self.spec.test_clips if self.spec.kind == "3d" else self.spec.test_views
        return per * self.spec.test_crops

    def set_epoch(self, epoch: int, *, start_batch: int = 0, skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Chooses the epoch whose random order and crops the next ``iter()`` uses (resuming, DDP).

        ``start_batch``: the next ``iter()`` starts at that batch of the epoch's plan (``loader.position`` of
        an interrupted epoch), so that a resumed epoch yields exactly the batches the interrupted one had not;
        ``skipped``: the (path, reason) pairs of that epoch's first part, kept in ``loader.skipped``.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = epoch
        self._start_batch = start_batch
        self._carried_skips = [(str(p), str(r)) for p, r in skipped]

    def _plans(self) -> list[SamplePlan]:
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}/{self.epoch}".encode()))
        videos = list(self.videos)
        if not self.training:
            return plan_samples(videos, self.spec, training=False, rng=rng)
        videos = [videos[i] for i in rng.permutation(len(videos))]
        plans = plan_samples(videos, self.spec, training=True, rng=rng)
        if self.num_shards > 1:
            padded = math.ceil(len(plans) / self.num_shards) * self.num_shards
            plans = [plans[i % len(plans)] for i in range(padded)]
            plans = plans[self.shard_id :: self.num_shards]
        return plans

    def __iter__(self) -> Iterator[ClipBatch | None]:
        start = self._start_batch
        plans = self._plans()[start * self.batch_size :]
        self.skipped, self._carried_skips, self._start_batch = self._carried_skips, [], 0
        self.position = start
        batches = self._iter_dali(plans) if self.backend_used == "dali" else self._iter_pyav(plans)
        for batch, bad in batches:  # one item per batch_size plans, in order
            self.position += 1
            for path, reason in bad:
                logger.warning("skipping %s: %s", path, reason)
            self.skipped.extend(bad)
            if batch is not None and not (self.drop_last and len(batch.labels) < self.batch_size):
                yield batch
            elif self.yield_empty:  # (a batch dropped for being short too: every process yields one item a batch)
                yield None
        if self.skipped or self.dropped:
            logger.warning(
                "epoch %d: %d clip(s) skipped (unreadable during the epoch), %d file(s) left out (unusable when "
                "probed); %d video(s) used",
                self.epoch + 1, len(self.skipped), len(self.dropped), len(self.videos),
            )  # fmt: skip
        self.epoch += 1

    def _iter_pyav(self, plans):
        dataset = _PyAVClips(plans, self.spec)
        # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from the global torch
        # generator, which would put that draw where an epoch starts, and a resumed epoch starts mid-way.
        seeds = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.epoch}/workers".encode()))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=_collate,
            persistent_workers=False, generator=seeds,
        )
        yield from loader

    def _iter_dali(self, plans):
        for start in range(0, len(plans), self.batch_size):
            chunk = plans[start : start + self.batch_size]
            good, bad = [], []
            encoded = []
            for plan in chunk:
                try:
                    with open(plan.path, "rb") as f:
                        encoded.append(np.frombuffer(f.read(), dtype=np.uint8))
                    good.append(plan)
                except OSError as exc:
                    bad.append((plan.path, f"cannot read ({exc})"))
            if not good:
                yield None, bad
                continue
            if self._pipeline is None:  # (outside the try: a pipeline that cannot be built is no bad file)
                self._pipeline = self._build_dali()
            try:
                clips = self._run_dali(good, encoded)
            except RuntimeError as exc:  # a file broken since probing: find it with PyAV, keep the rest
                self._pipeline = None
                batch, more_bad = _collate([_PyAVClips(good, self.spec)[i] for i in range(len(good))])
                if not more_bad:  # every file decodes: DALI itself failed on one (a profile NVDEC lacks, ...)
                    files = ", ".join(p.path for p in good)
                    if self.backend == "dali" or self.strict:  # asked for by name, or no fallback: no stand-in
                        raise RuntimeError(
                            f"DALI failed on a batch whose every file PyAV decodes ({files}): {exc}. No file is bad, "
                            "so none is skipped; backend='auto' lets PyAV decode such a batch (lgd-fast train --set "
                            "data.backend=auto), backend='pyav' every batch") from exc
                    self.pyav_batches.append((files, str(exc)))  # backend='auto': PyAV stands in, said each time
                    logger.warning("DALI failed on a batch (%s); PyAV decoded it (backend 'auto'): %s", exc, files)
                else:
                    logger.info("DALI failed on a batch (%s); PyAV found the unreadable file(s), the rest kept", exc)
                yield batch, bad + more_bad
                continue
            labels = torch.tensor([p.label for p in good])
            ids = torch.tensor([p.video_id for p in good])
            yield ClipBatch(clips, labels, ids), bad

    def _build_dali(self):
        spec = self.spec

        def graph(fn, types, device):
            video = decode_fed_frames(fn, types, device)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (h, w)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)  # (y, x) as fractions
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            video = fn.resize(video, size=size, antialias=True, interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(
                video,
                crop=(spec.crop, spec.crop),
                crop_pos_y=anchor[0],
                crop_pos_x=anchor[1],
                mirror=flip,
                mean=[255.0 * m for m in spec.mean],
                std=[255.0 * s for s in spec.std],
                output_layout="CFHW",
                dtype=types.FLOAT,
            )

        return build_dali_pipeline(graph, batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                                   device=dali_device())

    def _run_dali(self, plans: list[SamplePlan], encoded: list[np.ndarray]) -> torch.Tensor:
        if self._pipeline is None:
            self._pipeline = self._build_dali()
        pipe = self._pipeline
        crop = self.spec.crop

        def rel(offset, extent):  # crop_pos is the crop's anchor as a fraction of (extent - crop)
            return offset / (extent - crop) if extent > crop else 0.0

        pipe.feed_input("encoded", encoded)
        pipe.feed_input("frames", [np.asarray(p.frames, dtype=np.int32) for p in plans])
        pipe.feed_input("size", [np.asarray(p.resize, dtype=np.float32) for p in plans])
        pipe.feed_input(
            "anchor",
            [np.asarray([rel(p.offset[0], p.resize[0]), rel(p.offset[1], p.resize[1])], np.float32) for p in plans],
        )
        pipe.feed_input("flip", [np.asarray(int(p.flip), dtype=np.int32) for p in plans])
        (out,) = pipe.run()
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        return torch.from_numpy(np.stack([np.array(out[i]) for i in range(len(plans))]))
