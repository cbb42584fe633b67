"""Video-level multi-view evaluation and feature extraction (``lgd-fast eval``, ``lgd-fast extract``).

A test loader (``VideoClipLoader(..., training=False)``) yields every view of every video: ``test_clips`` x
``test_crops`` for LGD-3D, ``test_views`` x ``test_crops`` for LGD-2D, in order and possibly split across
batches. The video's score is the **mean of its views' softmax probabilities** (the paper averages the
view scores; probabilities rather than raw logits so that one over-confident view cannot outvote the
others by the scale of its logits alone). The prediction is the arg-max of that mean (ties: the lowest
class index), top-5 asks whether the label is among the ``min(5, num_classes)`` highest scores.

Views are summed per video as batches arrive (float64, on the CPU), so memory grows with the number of
videos, not of views. Videos come out ordered by video id, whatever the batch order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import write_text_atomic

__all__ = [
    "EvalResult",
    "aggregate_views",
    "evaluate",
    "extract_features",
    "feature_path",
    "format_eval",
    "save_features",
    "video_scores",
    "write_eval",
]

logger = logging.getLogger(__name__)

TOPK = 5


@dataclass
class EvalResult:
    """Video-level results of one evaluation; accuracies are fractions in [0, 1].

    ``per_class[c]`` is the top-1 accuracy over the videos labelled ``c`` (None where there is none),
    ``confusion[true][pred]`` counts videos, ``scores[v]`` is video v's mean softmax over its views
    (``num_classes`` floats), ``skipped`` lists (path, reason) of files dropped when probing or skipped
    while decoding, ``seconds`` the wall time of the evaluation loop.
    """

    num_videos: int
    num_classes: int
    top1: float
    top5: float
    per_class: list[float | None]
    confusion: list[list[int]]
    video_ids: list[int]
    labels: list[int]
    predictions: list[int]
    scores: list[list[float]]
    views_per_video: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    class_names: list[str] | None = None

    @property
    def topk(self) -> int:
        """The k of ``top5``: ``min(5, num_classes)``."""
        return min(TOPK, self.num_classes)

    @classmethod
    def from_scores(
        cls,
        video_ids: Sequence[int] | torch.Tensor,
        labels: Sequence[int] | torch.Tensor,
        scores: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
        *,
        num_classes: int,
        views_per_video: Sequence[int] | torch.Tensor | None = None,
        skipped: Iterable[tuple[str, str]] = (),
        seconds: float = 0.0,
        class_names: Sequence[str] | None = None,
    ) -> EvalResult:
        """Metrics from per-video scores (V, num_classes), e.g. ``aggregate_views`` output or gathered ranks."""
        scores = torch.as_tensor(scores, dtype=torch.float64)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        ids = torch.as_tensor(video_ids, dtype=torch.int64).reshape(-1)
        _check_num_classes(num_classes, class_names)
        if scores.dim() != 2 or scores.shape[1] != num_classes:
            raise ValueError(
                f"scores must have shape (videos, {num_classes}) for num_classes={num_classes}, "
                f"got {tuple(scores.shape)}"
            )
        if not len(ids) == len(labels) == len(scores):
            raise ValueError(f"got {len(ids)} video ids, {len(labels)} labels and {len(scores)} score rows")
        bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
        if len(bad):
            v = int(bad[0])
            raise ValueError(
                f"label {int(labels[v])} of video {int(ids[v])} is outside 0..{num_classes - 1} "
                f"(num_classes={num_classes}); {len(bad)} video(s) have such labels"
            )
        views = [1] * len(ids) if views_per_video is None else [int(n) for n in views_per_video]
        if len(views) != len(ids):
            raise ValueError(f"got {len(views)} views_per_video entries for {len(ids)} videos")

        n = len(ids)
        predictions = scores.argmax(dim=1) if n else torch.zeros(0, dtype=torch.int64)
        k = min(TOPK, num_classes)
        in_topk = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1) if n else torch.zeros(0, dtype=bool)
        correct = predictions == labels
        confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
        confusion = confusion.reshape(num_classes, num_classes)
        totals = confusion.sum(dim=1)
        per_class = [float(confusion[c, c]) / int(totals[c]) if int(totals[c]) else None for c in range(num_classes)]
        return cls(
            num_videos=n,
            num_classes=num_classes,
            top1=float(correct.double().mean()) if n else 0.0,
            top5=float(in_topk.double().mean()) if n else 0.0,
            per_class=per_class,
            confusion=confusion.tolist(),
            video_ids=ids.tolist(),
            labels=labels.tolist(),
            predictions=predictions.tolist(),
            scores=scores.tolist(),
            views_per_video=views,
            skipped=[(str(p), str(r)) for p, r in skipped],
            seconds=float(seconds),
            class_names=None if class_names is None else [str(c) for c in class_names],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready types (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["skipped"] = [list(item) for item in self.skipped]
        out["topk"] = self.topk
        return out


def _check_num_classes(num_classes: int, class_names: Sequence[str] | None) -> None:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for num_classes={num_classes}")


class _VideoMeans:
    """Running per-video sums of per-view rows (float64, CPU), their view counts and their one label."""

    def __init__(self) -> None:
        self.sums: dict[int, list[torch.Tensor]] = {}
        self.counts: dict[int, int] = {}
        self.labels: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, video_ids: torch.Tensor, labels: torch.Tensor, *values: torch.Tensor) -> None:
        """video_ids, labels: (M,); each value: (M, D_i) rows of M views."""
        video_ids = torch.as_tensor(video_ids).reshape(-1).to("cpu", torch.int64)
        labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.int64)
        m = len(video_ids)
        if len(labels) != m:
            raise ValueError(f"got {m} video ids but {len(labels)} labels")
        for v in values:
            if v.dim() != 2 or v.shape[0] != m:
                raise ValueError(f"expected ({m}, D) rows for {m} views, got shape {tuple(v.shape)}")
        if m == 0:
            return
        ids, inverse, counts = torch.unique(video_ids, sorted=True, return_inverse=True, return_counts=True)
        sums = [
            torch.zeros(len(ids), v.shape[1], dtype=torch.float64).index_add_(0, inverse, v.detach().cpu().double())
            for v in values
        ]
        lo = torch.full((len(ids),), torch.iinfo(torch.int64).max).scatter_reduce(0, inverse, labels, "amin")
        hi = torch.full((len(ids),), torch.iinfo(torch.int64).min).scatter_reduce(0, inverse, labels, "amax")
        for j, (vid, a, b, n) in enumerate(zip(ids.tolist(), lo.tolist(), hi.tolist(), counts.tolist(), strict=True)):
            known = self.labels.setdefault(vid, a)
            if a != b or known != a:
                found = sorted({known, a, b})
                raise ValueError(f"video {vid} has views with different labels {found}: one label per video expected")
            self.counts[vid] = self.counts.get(vid, 0) + n
            if vid in self.sums:
                for total, s in zip(self.sums[vid], sums, strict=True):
                    total += s[j]
            else:
                self.sums[vid] = [s[j].clone() for s in sums]

    def means(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(ids (V,), labels (V,), [mean rows (V, D_i)], views (V,)), ordered by video id."""
        order = sorted(self.counts)
        ids = torch.tensor(order, dtype=torch.int64)
        labels = torch.tensor([self.labels[v] for v in order], dtype=torch.int64)
        views = torch.tensor([self.counts[v] for v in order], dtype=torch.int64)
        if not order:
            return ids, labels, [], views
        means = [torch.stack(rows) / views[:, None] for rows in zip(*(self.sums[v] for v in order), strict=True)]
        return ids, labels, means, views


def aggregate_views(
    logits: torch.Tensor, video_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-video scores from per-view logits: the mean of the views' softmax probabilities.

    logits (M, K), video_ids (M,), labels (M,) for M views in any order -> (ids (V,) int64 sorted ascending,
    labels (V,) int64, scores (V, K) float64). Every view of a video must carry the same label.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (views, num_classes), got {tuple(logits.shape)}")
    if video_ids.shape != (logits.shape[0],) or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"video_ids and labels must have shape ({logits.shape[0]},) for {logits.shape[0]} views, "
            f"got {tuple(video_ids.shape)} and {tuple(labels.shape)}"
        )
    acc = _VideoMeans()
    acc.add(video_ids, labels, logits.detach().float().softmax(dim=1))
    ids, labels, means, _ = acc.means()
    scores = means[0] if means else torch.zeros(0, logits.shape[1], dtype=torch.float64)
    return ids, labels, scores


def _check_test_loader(loader) -> None:
    if getattr(loader, "training", False):
        raise ValueError(
            "evaluation needs a test loader (training=False) that yields every view of every video; "
            "this loader is in training mode (one random clip per video)"
        )


def _expected_clips(loader) -> int | None:
    """Views in one test epoch of a VideoClipLoader (for the progress bar), None when unknown."""
    spec, videos = getattr(loader, "spec", None), getattr(loader, "videos", None)
    try:
        per = spec.test_clips if spec.kind == "3d" else spec.test_views
        return len(videos) * per * spec.test_crops
    except (AttributeError, TypeError):
        return None


def _skipped(loader) -> list[tuple[str, str]]:
    return [(str(p), str(r)) for p, r in [*getattr(loader, "dropped", ()), *getattr(loader, "skipped", ())]]


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextlib.contextmanager
def _inference(model: nn.Module, loader, device: torch.device, amp_dtype, progress: bool, desc: str):
    """Eval mode (restored after), inference mode, autocast and a progress bar; yields (bar, input dtype)."""
    from tqdm.auto import tqdm

    _check_test_loader(loader)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    cast = param.dtype if amp_dtype is None and param is not None else None  # e.g. a half model, no autocast
    was_training = model.training
    model.eval()
    bar = tqdm(total=_expected_clips(loader), desc=desc, unit="clips", disable=not progress)
    try:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            yield bar, cast
    finally:
        bar.close()
        model.train(was_training)


def _to_device(clips: torch.Tensor, device: torch.device, cast: torch.dtype | None) -> torch.Tensor:
    clips = clips.to(device, non_blocking=True)
    return clips if cast is None or clips.dtype == cast else clips.to(cast)


def _check_logits(logits, num_clips: int, num_classes: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned a {type(logits).__name__}, not a logits tensor (is it in eval mode?)")
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        got = logits.shape[1] if logits.dim() == 2 else f"a tensor of shape {tuple(logits.shape)} as"
        raise ValueError(
            f"the model returns {got} logits per clip but num_classes is {num_classes} "
            "(a checkpoint or head trained on another label set?)"
        )
    if logits.shape[0] != num_clips:
        raise ValueError(f"the model returned {logits.shape[0]} rows of logits for {num_clips} clips")


def _score_views(model, loader, num_classes: int, device: torch.device, amp_dtype, progress: bool, desc: str):
    """Every view of the test ``loader`` through ``model``; per-video sums of their softmax probabilities."""
    acc = _VideoMeans()
    with _inference(model, loader, device, amp_dtype, progress, desc) as (bar, cast):
        for batch in loader:
            logits = model(_to_device(batch.clips, device, cast))
            _check_logits(logits, len(batch.video_ids), num_classes)
            acc.add(batch.video_ids, batch.labels, logits.float().softmax(dim=1))
            bar.update(len(batch.video_ids))
    return acc


def video_scores(
    model: nn.Module,
    loader,
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(video ids (V,), scores (V, num_classes) float64, views (V,), skipped files): what :func:`evaluate`
    scores each video with (the mean softmax of its views), for loaders without labels (``lgd-fast predict``).
    Videos none of whose views decoded are absent; ``skipped`` lists (path, reason)."""
    acc = _score_views(model, loader, num_classes, torch.device(device), amp_dtype, progress, "predict")
    ids, _, means, views = acc.means()
    scores = means[0] if means else torch.zeros(0, num_classes, dtype=torch.float64)
    return ids, scores, views, _skipped(loader)


def evaluate(
    model: nn.Module,
    loader,
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Video-level top-1 / top-5, per-class accuracy and confusion of ``model`` over a test ``loader``.

    ``loader`` yields ``ClipBatch`` (clips (N, 3, T, H, W), labels (N,), video_ids (N,)) with every view of
    every video (``VideoClipLoader(..., training=False)``); ``model(clips)`` must return logits (N, num_classes).
    Runs in eval mode (the model's mode is restored afterwards) under ``torch.inference_mode()`` and, with
    ``amp_dtype``, ``torch.autocast``; the model must already be on ``device`` (and in channels_last if
    wanted). Files the loader dropped or skipped are listed in ``result.skipped``.
    """
    _check_num_classes(num_classes, class_names)
    start = time.perf_counter()
    acc = _score_views(model, loader, num_classes, torch.device(device), amp_dtype, progress, "eval")
    seconds = time.perf_counter() - start
    skipped = _skipped(loader)
    if not len(acc):
        raise ValueError(f"no video was evaluated: the loader yielded no clips ({len(skipped)} file(s) skipped)")
    ids, labels, (scores,), views = acc.means()
    if len(set(views.tolist())) > 1:
        counts = sorted(set(views.tolist()))
        logger.warning("videos have different numbers of views (%s); each is averaged over its own", counts)
    return EvalResult.from_scores(
        ids,
        labels,
        scores,
        num_classes=num_classes,
        views_per_video=views,
        skipped=skipped,
        seconds=seconds,
        class_names=class_names,
    )


def _names(result: EvalResult, class_names: Sequence[str] | None) -> list[str]:
    names = class_names if class_names is not None else result.class_names
    if names is None:
        return [str(c) for c in range(result.num_classes)]
    _check_num_classes(result.num_classes, names)
    return [str(n) for n in names]


def _per_class_table(result: EvalResult, names: list[str]) -> list[dict[str, Any]]:
    return [
        {"class": c, "name": names[c], "videos": sum(row), "correct": row[c], "accuracy": result.per_class[c]}
        for c, row in enumerate(result.confusion)
    ]


def write_eval(
    result: EvalResult, out_dir: str | Path, *, class_names: Sequence[str] | None = None, prefix: str = "eval"
) -> dict[str, Path]:
    """Writes ``{prefix}.json`` and ``{prefix}_confusion.png`` into ``out_dir``; returns {"json": ..., "png": ...}.

    The JSON holds ``result.to_dict()``, the class names and a per-class table (videos, correct, accuracy);
    the PNG the row-normalised confusion matrix. Without matplotlib the PNG is left out (one warning).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _names(result, class_names)
    payload = result.to_dict()
    payload["class_names"] = names
    payload["per_class_table"] = _per_class_table(result, names)
    paths = {"json": out_dir / f"{prefix}.json"}
    write_text_atomic(paths["json"], json.dumps(payload, indent=1) + "\n")
    try:
        png = _plot_confusion(result, names, out_dir / f"{prefix}_confusion.png")
    except ImportError as err:
        logger.warning("not writing the confusion matrix plot: %s (pip install matplotlib)", err)
    else:
        paths["png"] = png
    return paths


def _plot_confusion(result: EvalResult, names: list[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    k = result.num_classes
    counts = np.asarray(result.confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = min(20.0, max(4.5, 2.5 + 0.35 * k))
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 60:
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if counts[t, p]:
                    colour = "white" if norm[t, p] > 0.5 else "black"
                    ax.text(p, t, f"{norm[t, p]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {result.top1:.1%}, top-{result.topk} {result.top5:.1%} ({result.num_videos} videos)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_eval(result: EvalResult, class_names: Sequence[str] | None = None) -> str:
    """A short table: videos, top-1, top-k, then one line of accuracy per class."""
    names = _names(result, class_names)
    views = sorted(set(result.views_per_video))
    lines = [
        f"videos  {result.num_videos} ({'/'.join(map(str, views))} views each, {len(result.skipped)} file(s) "
        f"skipped, {result.seconds:.1f} s)",
        f"top-1   {100 * result.top1:6.2f} %",
        f"top-{result.topk}   {100 * result.top5:6.2f} %",
    ]
    width = max(12, *(len(n) for n in names))
    lines.append(f"{'class':<{width}}  videos  top-1")
    for row in _per_class_table(result, names):
        acc = "     -" if row["accuracy"] is None else f"{100 * row['accuracy']:6.2f} %"
        lines.append(f"{row['name']:<{width}}  {row['videos']:>6}  {acc}")
    return "\n".join(lines)


def _pooled_local(local_map: torch.Tensor, num_clips: int) -> torch.Tensor:
    """(N, C, T, H, W) or (N * T, C, H, W) (LGD-2D) -> (N, C), the mean over every position."""
    if local_map.dim() == 5:
        return local_map.float().mean(dim=(2, 3, 4))
    if local_map.dim() == 4:
        frames = local_map.reshape(num_clips, -1, *local_map.shape[1:])  # (N, T, C, H, W)
        return frames.float().mean(dim=(1, 3, 4))
    raise ValueError(f"expected a local map (N, C, T, H, W) or (N*T, C, H, W), got {tuple(local_map.shape)}")


def extract_features(
    model: nn.Module,
    loader,
    *,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Per-video features from ``model.forward_features`` over a test ``loader``, each averaged over the views.

    Returns ``local`` (V, C) float32, the local map averaged over T', H', W'; ``global`` (V, C) float32, the
    global vector g; ``video_ids`` (V,) int64 ascending (each video's line in the annotation list, from 0);
    ``labels`` (V,) int64; ``views`` (V,) int64; and, where the loader has ``records`` (a VideoClipLoader),
    ``paths`` (V,) str, each video's file.
    """
    device = torch.device(device)
    acc = _VideoMeans()
    with _inference(model, loader, device, amp_dtype, progress, "extract") as (bar, cast):
        for batch in loader:
            n = len(batch.video_ids)
            local_map, g = model.forward_features(_to_device(batch.clips, device, cast))
            acc.add(batch.video_ids, batch.labels, _pooled_local(local_map, n), g.float())
            bar.update(n)
    if not len(acc):
        skipped = _skipped(loader)
        raise ValueError(f"no video was processed: the loader yielded no clips ({len(skipped)} file(s) skipped)")
    ids, labels, (local, global_), views = acc.means()
    features = {
        "local": local.float().numpy(),
        "global": global_.float().numpy(),
        "video_ids": ids.numpy(),
        "labels": labels.numpy(),
        "views": views.numpy(),
    }
    records = getattr(loader, "records", None)
    if records is not None:
        features["paths"] = np.array([str(records[i].path) for i in ids.tolist()], dtype=np.str_)
    return features


def save_features(features: dict[str, np.ndarray], path: str | Path) -> Path:
    """Writes ``features`` to ``.safetensors`` (needs the safetensors package) or ``.npz``; returns the path.

    A path with no suffix gets ``.npz`` (as ``numpy.savez`` does); any other suffix is a ValueError. String
    arrays (``paths``) are arrays in a .npz file (loadable without pickle) and, since safetensors holds only
    numbers, a JSON list in the .safetensors file's metadata under their name.
    """
    path = feature_path(path)
    arrays = {name: np.ascontiguousarray(value) for name, value in features.items() if value.dtype.kind not in "US"}
    strings = {name: json.dumps(value.tolist()) for name, value in features.items() if value.dtype.kind in "US"}
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ImportError(
                f"writing {path.name} needs the safetensors package: pip install safetensors, "
                "or save to a .npz file instead"
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(path), metadata=strings or None)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: np.ascontiguousarray(value) for name, value in features.items()})
    return path


def feature_path(path: str | Path) -> Path:
    """The file :func:`save_features` writes for ``path``: ``.npz`` or ``.safetensors``, ``.npz`` added to a
    name without a suffix; a ValueError names any other suffix (``feats.pt`` would otherwise become
    ``feats.pt.npz`` unnoticed)."""
    path = Path(path)
    if path.suffix in (".npz", ".safetensors"):
        return path
    if not path.suffix:
        return path.with_name(path.name + ".npz")
    raise ValueError(f"features are written as .npz or .safetensors, not {path.suffix!r}: {path}")
