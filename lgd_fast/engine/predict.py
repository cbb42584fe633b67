"""Class predictions for video files from a trained checkpoint (``lgd-fast predict``).

A video's prediction is exactly what ``lgd-fast eval`` scores it with: the checkpoint's model (the kernel
classifier once stage 2 has run), the run's test-time views (``test_clips`` x ``test_crops`` clips for
LGD-3D, ``test_views`` x ``test_crops`` frames sets for LGD-2D) and the mean of the views' softmax
probabilities (:func:`lgd_fast.engine.evaluate.video_scores`). Class names come from the class index saved
in the checkpoint. A file that is missing, empty, truncated or undecodable gets an error naming the file and
the reason; the other files are still predicted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Prediction", "format_predictions", "load_trained", "predict"]


@dataclass
class Prediction:
    """One video: its ``top`` (class name, probability) pairs, best first, over ``views`` views; or ``error``."""

    video: str
    top: list[tuple[str, float]] = field(default_factory=list)
    views: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"video": self.video}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["top"] = [{"class": name, "probability": p} for name, p in self.top]
            out["views"] = self.views
        return out


def load_trained(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, its TrainConfig, class names) from a checkpoint of ``lgd-fast train``.

    The model is the one the run trained (fast or reference, as configured), with the kernel classifier
    switched on where the run reached stage 2.
    """
    from .checkpoint import load_checkpoint
    from .config import config_from_dict
    from .train import build_model

    state = load_checkpoint(checkpoint)
    for key in ("config", "class_names"):
        if key not in state:
            raise ValueError(f"{checkpoint}: not a checkpoint of lgd-fast train (no {key!r} entry)")
    config = config_from_dict(state["config"])
    class_names = [str(c) for c in state["class_names"]]
    model = build_model(config, len(class_names))
    model.load_state_dict(state["model"])
    if hasattr(model, "kernel_head"):
        model.stage = 2 if state.get("stage") == 2 else 1
    return model.to(device).eval(), config, class_names


def predict(
    checkpoint: str | os.PathLike,
    videos: Sequence[str | os.PathLike],
    *,
    top_k: int = 5,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[Prediction]:
    """Top-``top_k`` classes of each of ``videos`` (any codec PyAV or DALI decodes), in the order given.

    ``backend``: the decoder (``auto``, ``dali``, ``pyav``; default: the run's ``data.backend``). Returns one
    :class:`Prediction` per video; unreadable files carry ``error`` instead of ``top``.
    """
    from ..data.annotations import VideoRecord
    from ..data.loader import NoUsableVideoError, VideoClipLoader
    from .evaluate import video_scores
    from .train import clip_spec

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not videos:
        raise ValueError("no videos to predict")
    model, config, class_names = load_trained(checkpoint, device=device)
    paths = [str(v) for v in videos]
    records = [VideoRecord(os.path.abspath(p), 0) for p in paths]  # the label is not used
    try:
        loader = VideoClipLoader(
            records, spec=clip_spec(config, config.model.name), batch_size=config.optim.batch_size, training=False,
            backend=backend or config.data.backend, num_workers=config.data.workers, progress=progress,
        )  # fmt: skip
    except NoUsableVideoError as err:  # no usable video at all: every file's reason, as probing found it
        dropped = {os.path.abspath(p): reason for p, reason in err.dropped}
        return [Prediction(path, error=dropped[r.path]) for path, r in zip(paths, records, strict=True)]
    dropped = {os.path.abspath(p): reason for p, reason in loader.dropped}
    ids, scores, views, skipped = video_scores(model, loader, num_classes=len(class_names), device=device,
                                               progress=progress)  # fmt: skip
    reasons = {os.path.abspath(p): r for p, r in skipped}
    k = min(top_k, len(class_names))
    found = {int(v): (row, int(n)) for v, row, n in zip(ids.tolist(), scores, views.tolist(), strict=True)}
    out = []
    for i, path in enumerate(paths):
        if i in found:
            row, n = found[i]
            probs, classes = row.topk(k)
            out.append(Prediction(path, [(class_names[c], float(p)) for p, c in zip(probs, classes, strict=True)], n))
        else:
            reason = dropped.get(records[i].path) or reasons.get(records[i].path, "no view of it could be decoded")
            out.append(Prediction(path, error=reason))
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One block per video: its name, then ``rank. class  probability`` lines (or its error)."""
    lines = []
    for p in predictions:
        if p.error is not None:
            lines.append(f"{p.video}: error: {p.error}")
            continue
        lines.append(f"{p.video} ({p.views} views)")
        width = max(len(name) for name, _ in p.top)
        lines += [f"  {r}. {name:<{width}}  {prob:.3f}" for r, (name, prob) in enumerate(p.top, 1)]
    return "\n".join(lines)
