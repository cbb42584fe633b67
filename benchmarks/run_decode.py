"""Video decoding on the CPU: DALI vs PyAV on the same files, the loaders, and the training step they feed.

Three measurements in one run, on VP9 files written by ``make_dataset`` (the built-in dataset's generator):
1. ``read_clip``: 16-frame clips at random starts, the same clips for both backends, interleaved, clips/s.
2. ``VideoClipLoader``: a training epoch (sampling, decoding, resize, crop, flip, normalise, batching) for
   each backend, clips/s.
3. the training step the loader feeds: ``lgd3d_tiny`` forward + backward + SGD step on batches of the
   same shape (reference and fast model), clips/s; the loader must not be slower.
Writes benchmarks/results/decode_cpu.{json,png}.

    python benchmarks/run_decode.py              # large frames (128 px) and the demo's (48 px)
    python benchmarks/run_decode.py --quick

Target (PERF.md): DALI >= 1.5x PyAV clips/s on the same files; the loader never slower than training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import create_model  # noqa: E402
from lgd_fast.bench import write_json  # noqa: E402
from lgd_fast.data import ClipSpec, VideoClipLoader, probe, read_annotations, read_clip  # noqa: E402
from lgd_fast.data.synthetic import make_dataset  # noqa: E402

# name -> (frame size, frames per video, the ClipSpec a model trains on at that size, that model, its batch)
SETS = {
    "large-128px": (128, 64, ClipSpec(clip_len=16, resize_shorter=128, crop=112), "lgd3d_r18", 4),
    "demo-48px": (48, 32, ClipSpec(clip_len=16, resize_shorter=40, crop=32), "lgd3d_tiny", 16),
}


def dataset(root: Path, size: int, frames: int) -> list:
    make_dataset(root, classes=8, videos_per_class=6, seed=0, codec="vp9", frames=frames, size=size, progress=False)
    return read_annotations(root / "train.txt") + read_annotations(root / "val.txt")


def time_read_clip(records, clip_len: int, rounds: int) -> dict[str, dict[str, float]]:
    """clips/s of read_clip per backend over the same (file, start) pairs, backends alternating per round."""
    infos = [probe(r.path) for r in records]
    rng = np.random.default_rng(0)
    plans = [(info, int(rng.integers(0, info.num_frames - clip_len + 1))) for info in infos]
    for backend in ("dali", "pyav"):  # warm up (DALI builds its pipeline)
        read_clip(plans[0][0].path, range(clip_len), backend, info=plans[0][0])
    samples: dict[str, list[float]] = {"dali": [], "pyav": []}
    for r in range(rounds):
        for backend in (("dali", "pyav") if r % 2 == 0 else ("pyav", "dali")):
            t0 = time.perf_counter()
            for info, start in plans:
                read_clip(info.path, range(start, start + clip_len), backend, info=info)
            samples[backend].append(len(plans) / (time.perf_counter() - t0))
    return {b: {"clips_per_s": statistics.median(v), "min": min(v), "max": max(v)} for b, v in samples.items()}


def time_loader(records, spec: ClipSpec, backend: str, batch: int, epochs: int) -> dict[str, float]:
    loader = VideoClipLoader(records, spec=spec, batch_size=batch, backend=backend, num_workers=2, seed=0)
    rates = []
    for _ in range(epochs + 1):
        t0 = time.perf_counter()
        n = sum(len(b.labels) for b in loader)
        rates.append(n / (time.perf_counter() - t0))
    rates = rates[1:]  # the first epoch warms up (worker start, DALI pipeline build)
    return {"clips_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "epochs": epochs}


def time_train_step(name: str, spec: ClipSpec, batch: int, fast: bool, steps: int) -> dict[str, float]:
    model = create_model(name, 8, classifier="two_heads", fast=fast).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(batch, 3, spec.frames, spec.crop, spec.crop, generator=gen) for _ in range(3)]
    labels = torch.randint(0, 8, (batch,), generator=gen)

    def step(x):
        local, glob = model(x)
        loss = torch.nn.functional.cross_entropy(local, labels) + torch.nn.functional.cross_entropy(glob, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(clips[i % 3])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(clips[i % 3])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"model": name, "batch": batch, "clips_per_s": batch / med, "step_s": med}


def run(args) -> dict[str, Any]:
    setup = h.prepare_run(args)
    import av
    import nvidia.dali

    rows = []
    sets = {"demo-48px": SETS["demo-48px"]} if args.quick else SETS
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, frames, spec, model, model_batch) in sets.items():
            records = dataset(Path(tmp) / name, size, frames)
            with h.ForeignLoad() as load:
                reads = time_read_clip(records, spec.clip_len, rounds=max(3, args.repeats // 10))
                loaders = {b: time_loader(records, spec, b, args.batch, epochs=2 if args.quick else 3)
                           for b in ("dali", "pyav")}
            row = {
                "set": name,
                "videos": len(records),
                "frame_size": size,
                "frames_per_video": frames,
                "clip": {"frames": spec.frames, "resize_shorter": spec.resize_shorter, "crop": spec.crop},
                "read_clip": reads,
                "dali_vs_pyav_read_clip": reads["dali"]["clips_per_s"] / reads["pyav"]["clips_per_s"],
                "loader": loaders,
                "dali_vs_pyav_loader": loaders["dali"]["clips_per_s"] / loaders["pyav"]["clips_per_s"],
                "foreign_load_cores": load.cores,
            }
            steps = max(3, args.repeats // (3 if model == "lgd3d_tiny" else 10))
            row["train_step"] = {
                "reference": time_train_step(model, spec, model_batch, fast=False, steps=steps),
                "fast": time_train_step(model, spec, model_batch, fast=True, steps=steps),
            }
            rows.append(row)
            print(
                f"{name}: read_clip dali {reads['dali']['clips_per_s']:.0f} clips/s, pyav "
                f"{reads['pyav']['clips_per_s']:.0f} (x{row['dali_vs_pyav_read_clip']:.2f}); loader dali "
                f"{loaders['dali']['clips_per_s']:.0f}, pyav {loaders['pyav']['clips_per_s']:.0f} "
                f"(x{row['dali_vs_pyav_loader']:.2f})"
                + f"; {model} train step reference {row['train_step']['reference']['clips_per_s']:.1f} clips/s, fast "
                f"{row['train_step']['fast']['clips_per_s']:.1f}"
            )
    return {
        "benchmark": "decode",
        "machine": {**h.machine_info(), "dali": nvidia.dali.__version__, "pyav": av.__version__},
        "settings": {"quick": args.quick, "repeats": args.repeats, "batch": args.batch,
                     "steady_malloc": setup["steady_malloc"]},
        "foreign_load_before_cores": setup["foreign_load_before_cores"],
        "notes": [
            "read_clip: each round decodes one 16-frame clip from every video, at the same random starts for both "
            "backends; median over rounds of clips/s. DALI: CPU backend (fn.decoders.video), batch 1; PyAV decodes "
            "from the start of the file up to the clip (exact frame numbers, no seeking)",
            "loader: VideoClipLoader training epochs, batch as in settings, 2 decoding threads/workers, first "
            "epoch not counted; clips/s includes resize, crop, flip, normalisation and batching",
            "train_step: the model named per set (two_heads) forward + backward + SGD step on random clips of the "
            "loader's shape, median step; the loader and the step are measured separately (on 2 cores they share "
            "the CPU)",
        ],
        "results": rows,
    }


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows = payload["results"]
    fig, (ax_read, ax_loop) = h.new_figure(1, 2, figsize=(13, 1.2 * len(rows) + 2.5))
    labels = [r["set"] for r in rows]
    h_labels = [f"{r['set']}\n({r['train_step']['fast']['model']})" for r in rows]
    h.grouped_barh(
        ax_read, labels,
        {b: [r["read_clip"][b]["clips_per_s"] for r in rows] for b in ("dali", "pyav")},
        colors={"dali": "tab:green", "pyav": "tab:gray"}, value_format="{:.0f}",
    )
    ax_read.set_title("read_clip, 16-frame clips/s (higher is better)")
    series = {f"loader {b}": [r["loader"][b]["clips_per_s"] for r in rows] for b in ("dali", "pyav")}
    series["train step (fast)"] = [r["train_step"]["fast"]["clips_per_s"] for r in rows]
    series["train step (reference)"] = [r["train_step"]["reference"]["clips_per_s"] for r in rows]
    h.grouped_barh(ax_loop, h_labels, series, value_format="{:.1f}")
    ax_loop.set_title("loader vs the training step it feeds (128 px: lgd3d_r18, 48 px: lgd3d_tiny), clips/s")
    m = payload["machine"]
    fig.suptitle(
        f"video decoding, {m['device']} ({m['cores']} cores), DALI {m['dali']}, PyAV {m['pyav']}, "
        f"commit {(m['commit'] or 'unknown')[:10]}", fontsize=10,
    )
    return h.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_arguments(parser, default_out=h.RESULTS_DIR / "decode_cpu.json", repeats=(30, 10))
    parser.add_argument("--batch", type=int, default=16, help="clips per batch (loader and training step)")
    args = parser.parse_args(argv)
    payload = run(args)
    print("wrote", write_json(args.out, payload))
    print("wrote", plot(payload, args.plot or args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
