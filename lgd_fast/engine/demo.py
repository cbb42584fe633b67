"""``lgd-fast demo``: the built-in dataset, LGD-3D tiny trained through both stages, tested, and timed.

Steps (each is skipped when its output is already there, so a second run resumes or reuses):
1. ``DIR/data``: the built-in motion dataset (``make_dataset`` defaults: 8 classes in time-reversal twin
   pairs, 40 videos each, VP9), decoded by DALI's CPU pipeline (or its GPU one on a CUDA machine).
2. ``DIR/run``: ``lgd3d_tiny`` trained with the LGD recipe: stage 1 (two heads), stage 2 (the kernelized
   combination classifier).
3. Video-level accuracy on the held-out videos, and on the same videos played backwards: a model that
   uses temporal order predicts each reversed video's twin, so its reversed top-1 is near zero, while a
   model that only looks at frames would score the same on both.
4. The fast model (fused diffusion epilogue) against the reference: inference and training-step clips/s.
``DIR/metrics.json`` holds ``num_classes``, ``val_top1``, ``reversed_top1`` and the speed figures.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_SETTINGS", "run_demo"]

logger = logging.getLogger(__name__)

# The recipe the demo trains with (on top of TrainConfig's defaults): 16 x 32 x 32 clips of the 48 px videos.
DEMO_SETTINGS = [
    "model.name=lgd3d_tiny",
    "model.sketch_dim=512",
    "data.resize_shorter=40",
    "data.crop=32",
    "data.clip_len=16",
    "data.test_clips=5",
    "optim.batch_size=16",
    "optim.lr=0.02",
    "optim.warmup_epochs=1",
    "epochs=14",
    "stage2_epochs=3",
]


def benchmark_fast_vs_reference(state_dict, num_classes: int, *, batch: int = 16, repeats: int = 20) -> dict:
    """Clips/s of the trained tiny model, reference vs fast (same weights): inference and a training step,
    the two models timed in alternation (median of ``repeats`` calls each)."""
    from ..bench import time_interleaved
    from ..models import create_model

    shape = (batch, 3, 16, 32, 32)
    clips = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % num_classes
    out: dict[str, Any] = {"input": list(shape), "repeats": repeats, "threads": torch.get_num_threads()}
    models = {}
    for name, fast in (("reference", False), ("fast", True)):
        model = create_model("lgd3d_tiny", num_classes, classifier="two_heads", fast=fast)
        model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("kernel_head.")})
        models[name] = model

    def infer(model):
        def run():
            with torch.inference_mode():
                model(clips)

        return run

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            local, glob = model(clips)
            loss = torch.nn.functional.cross_entropy(local, labels) + torch.nn.functional.cross_entropy(glob, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    def median_s(fns):  # 2 warm-up calls each, then the models in turn
        samples, _ = time_interleaved(fns, repeats=repeats, warmup=2, rotate=False)
        return {name: statistics.median(values) for name, values in samples.items()}

    for model in models.values():
        model.eval()
    inference = median_s({name: infer(m) for name, m in models.items()})
    for model in models.values():
        model.train()
    training = median_s({name: step(m) for name, m in models.items()})
    for name in models:
        out[name] = {"inference_clips_per_s": batch / inference[name], "train_step_clips_per_s": batch / training[name]}
    for key, metric in (("inference", "inference_clips_per_s"), ("train", "train_step_clips_per_s")):
        out[f"fast_vs_reference_{key}"] = out["fast"][metric] / out["reference"][metric]
    return out


def run_demo(out: str | Path = "lgd_demo", *, extra: list[str] | None = None, progress: bool = True) -> dict:
    """Runs the demo into ``out``; returns (and writes to ``out/metrics.json``) the summary."""
    from ..data import read_annotations
    from ..data.loader import VideoClipLoader
    from ..data.synthetic import make_dataset
    from .config import load_config
    from .evaluate import evaluate, write_eval
    from .predict import load_trained
    from .train import clip_spec, train

    out = Path(out)
    start = time.perf_counter()
    info = make_dataset(out / "data", progress=progress)
    data_seconds = time.perf_counter() - start
    config = load_config(None, [*DEMO_SETTINGS, f"data.root={out / 'data'}", f"out={out / 'run'}", *(extra or [])])
    config.progress = progress
    t0 = time.perf_counter()
    train(config)
    train_seconds = time.perf_counter() - t0

    model, _, class_names = load_trained(out / "run" / "checkpoints" / "last.pt")
    records = read_annotations(out / "data" / config.data.val_list, class_index=class_names)
    results = {}
    for reverse in (False, True):
        loader = VideoClipLoader(records, spec=clip_spec(config, config.model.name, reverse=reverse),
                                 batch_size=config.optim.batch_size, training=False, backend=config.data.backend,
                                 num_workers=config.data.workers)
        result = evaluate(model, loader, num_classes=len(class_names), class_names=class_names, progress=progress)
        write_eval(result, out, class_names=class_names, prefix="eval_reversed" if reverse else "eval")
        results[reverse] = result
    reversed_result = results[True]
    pairs = zip(reversed_result.labels, reversed_result.predictions, strict=True)
    as_twin = sum(info.twins[label] == pred for label, pred in pairs) / reversed_result.num_videos
    speed = benchmark_fast_vs_reference(model.state_dict(), len(class_names))
    metrics = {
        "num_classes": len(class_names),
        "val_videos": results[False].num_videos,
        "val_top1": results[False].top1,
        "val_top5": results[False].top5,
        "reversed_top1": reversed_result.top1,
        "reversed_predicted_as_twin": as_twin,
        "speed": speed,
        "seconds": {"dataset": data_seconds, "train": train_seconds, "total": time.perf_counter() - start},
        "backend": loader.backend_used,
        "config": [*DEMO_SETTINGS, *(extra or [])],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_summary(metrics: dict, out: str | Path) -> str:
    s = metrics["speed"]
    rows = [
        ("classes", f"{metrics['num_classes']} (time-reversal twin pairs)"),
        ("held-out videos", str(metrics["val_videos"])),
        ("val top-1", f"{metrics['val_top1']:.1%}"),
        ("reversed top-1", f"{metrics['reversed_top1']:.1%}  (control: lower means the model uses time order)"),
        ("reversed -> twin", f"{metrics['reversed_predicted_as_twin']:.1%}  (reversed videos predicted as their twin)"),
        ("inference clips/s", f"reference {s['reference']['inference_clips_per_s']:.0f}, fast "
                              f"{s['fast']['inference_clips_per_s']:.0f} (x{s['fast_vs_reference_inference']:.2f})"),
        ("train step clips/s", f"reference {s['reference']['train_step_clips_per_s']:.0f}, fast "
                               f"{s['fast']['train_step_clips_per_s']:.0f} (x{s['fast_vs_reference_train']:.2f})"),
        ("time", f"{metrics['seconds']['total']:.0f} s (training {metrics['seconds']['train']:.0f} s), "
                 f"decoding with {metrics['backend']}"),
        ("results", f"{Path(out) / 'metrics.json'}, eval.json, eval_confusion.png, run/curves.png"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
