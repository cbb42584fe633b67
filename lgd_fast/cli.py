"""The ``lgd-fast`` command line.

lgd-fast models                      list the registered models
lgd-fast info MODEL [options]        parameters, FLOPs and output shapes of a model
lgd-fast doctor [--aot sm_90a,sm_80] which backends run here and why not; compile the Triton kernels ahead
                                     of time and print registers, spills and shared memory per kernel
lgd-fast make-dataset OUT [options]  write the built-in motion dataset (real video files + annotation lists)
lgd-fast check-data LIST_OR_DIR      decode every video as training would; table of failures, exit 1 if any
lgd-fast train --data DIR --model NAME --epochs N --out RUN [--config FILE.yaml] [--set key=value ...]
                                     two-stage LGD training; the same --out again resumes from its last.pt
lgd-fast demo [--out DIR]            the built-in dataset, lgd3d_tiny trained (both stages) and tested, played
                                     backwards as a control, fast vs reference timed; DIR/metrics.json
lgd-fast eval --data DIR --checkpoint PATH [--out DIR]
                                     video-level multi-view accuracy, per class, confusion matrix (PNG, JSON)
lgd-fast extract --data DIR --checkpoint PATH --out FILE
                                     per-video local (pooled) and global representations (.npz / .safetensors)
lgd-fast predict --checkpoint PATH VIDEO [VIDEO ...] [--top-k 5] [--json]
                                     top-k class names and probabilities of each video (eval's test views)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .bench import CANDIDATES as BENCH_CANDIDATES
from .models import create_model, list_models, model_entry
from .models.networks import CLASSIFIERS


def _count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: backbone, global path (fc1..fc6 of every block), heads, total."""
    groups = {"backbone": 0, "global_path": 0, "heads": 0}
    for key, p in model.named_parameters():
        if key.startswith(("fc.", "fc_g.", "kernel_head.")):
            groups["heads"] += p.numel()
        elif key.split(".")[-2] in {f"fc{i}" for i in range(1, 7)}:
            groups["global_path"] += p.numel()
        else:
            groups["backbone"] += p.numel()
    groups["total"] = _count(model.parameters())
    groups["trainable"] = _count(p for p in model.parameters() if p.requires_grad)
    return groups


def model_info(name: str, *, num_classes: int, classifier: str, batch: int, input_size=None, **options) -> dict:
    """Everything ``lgd-fast info`` prints, as a dict (eval mode, one forward pass on random input)."""
    model = create_model(name, num_classes, classifier=classifier, **options).eval()
    c, t, h, w = input_size or model_entry(name).input_size
    x = torch.randn(batch, c, t, h, w)
    flops = FlopCounterMode(display=False)
    start = time.perf_counter()
    with torch.no_grad(), flops:
        local_map, g = model.forward_features(x)
        logits = model.forward_head(local_map, g)
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "description": model_entry(name).description,
        "classifier": classifier,
        "num_classes": num_classes,
        "input_shape": list(x.shape),
        "parameters": parameter_breakdown(model),
        "gflops_per_clip": flops.get_total_flops() / batch / 1e9,
        "outputs": {
            "local_map": list(local_map.shape),
            "global_vector": list(g.shape),
            "logits": list(logits.shape),
        },
        "forward_seconds": seconds,
    }


def _print_info(info: dict) -> None:
    p = info["parameters"]
    rows = [
        ("model", f"{info['model']}: {info['description']}"),
        ("classifier", f"{info['classifier']} ({info['num_classes']} classes)"),
        ("input", "x".join(map(str, info["input_shape"])) + "  (N, C, T, H, W)"),
        ("parameters", f"{p['total']:,} total, {p['trainable']:,} trainable"),
        ("  backbone", f"{p['backbone']:,}"),
        ("  global path", f"{p['global_path']:,}  (fc1..fc6 of every LGD block)"),
        ("  heads", f"{p['heads']:,}"),
        ("FLOPs", f"{info['gflops_per_clip']:.2f} GFLOPs per clip (multiply-add = 2 FLOPs)"),
        ("local map x_L", str(tuple(info["outputs"]["local_map"]))),
        ("global vector g_L", str(tuple(info["outputs"]["global_vector"]))),
        ("logits (eval)", str(tuple(info["outputs"]["logits"]))),
        ("forward time", f"{info['forward_seconds'] * 1e3:.0f} ms on {torch.get_num_threads()} CPU threads (one run)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgd-fast", description="LGD (Local and Global Diffusion) video networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered models")
    info = sub.add_parser("info", help="parameters, FLOPs and output shapes of a model")
    info.add_argument("model", help="a registered model name (see `lgd-fast models`)")
    info.add_argument("--num-classes", type=_positive, default=400, help="label set size (default: 400, Kinetics)")
    info.add_argument("--classifier", choices=CLASSIFIERS, default="kernel")
    info.add_argument("--batch", type=_positive, default=1)
    info.add_argument("--frames", type=_positive, help="T of the input (default: the model's, e.g. 16)")
    info.add_argument("--size", type=_positive, help="H = W of the input (default: the model's, e.g. 112)")
    info.add_argument("--early-stride", type=_positive, help="LGD-3D stem temporal stride (default: 4; tiny: 2)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doctor = sub.add_parser(
        "doctor",
        help="which backends are available here (and why not); --aot compiles the Triton kernels for GPU targets",
    )
    doctor.add_argument(
        "--aot",
        metavar="TARGETS",
        help="comma-separated GPU targets to compile every Triton kernel for as its JIT would, without a GPU (e.g. "
        "sm_90a,sm_80); prints registers, spills, shared memory, the GEMM's instructions (wgmma / mma / fma) and "
        "global load widths per build; exits 1 on a compile failure or a register spill",
    )
    doctor.add_argument(
        "--dtypes",
        default="bf16",
        help="element types of the large tensors for --aot (default: bf16; e.g. fp32,bf16; fp32 builds the "
        "tf32 variants too)",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")

    make = sub.add_parser("make-dataset", help="write the built-in dataset of time-reversal motion classes")
    make.add_argument("out", help="output folder (created; an existing identical dataset is reused)")
    make.add_argument("--classes", type=_positive, help="number of classes, even (twin pairs)")
    make.add_argument("--videos-per-class", type=_positive, help="videos per class (train + val)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same files")
    make.add_argument("--codec", choices=("vp9", "h264"), default="vp9", help="vp9 (.webm, default) or h264 (.mp4)")
    make.add_argument("--frames", type=_positive, help="frames per video")
    make.add_argument("--size", type=_positive, help="frame height = width in pixels")

    check = sub.add_parser("check-data", help="decode every video as training would and report failures")
    check.add_argument("source", help="annotation list (path label), Kinetics CSV, or a folder-per-class tree")
    check.add_argument("--root", help="folder the listed paths are relative to (default: the list's folder)")
    check.add_argument("--class-index", help="class-index file (one class name per line)")
    check.add_argument("--format", choices=("auto", "list", "kinetics_csv", "folder"), default="auto")
    check.add_argument("--backend", choices=("auto", "dali", "pyav"), default="auto")

    train = sub.add_parser("train", help="train (or resume) an LGD model on a dataset folder")
    train.add_argument("--data", help="dataset folder with train.txt, val.txt, classes.txt (make-dataset writes one)")
    train.add_argument("--model", help="model name (see `lgd-fast models`)")
    train.add_argument("--epochs", type=_positive,
                       help="stage-1 epochs (default 10); the kernel classifier then adds --stage2-epochs more")
    train.add_argument("--stage2-epochs", type=int,
                       help="stage-2 epochs after the stage-1 ones, kernel classifier only (default 2; 0: none), "
                            "so --epochs 4 runs 6 epochs by default")  # fmt: skip
    train.add_argument("--out", help="run folder; the same folder again resumes from checkpoints/last.pt")
    train.add_argument("--config", help="YAML file of config values (nested like lgd_fast.engine.TrainConfig)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config value, e.g. --set optim.lr=0.01 (repeatable)")
    train.add_argument("--batch-size", type=_positive, help="global batch size (clips)")
    train.add_argument("--lr", type=float, help="stage-1 peak learning rate")
    train.add_argument("--amp", choices=("none", "bf16", "fp16"),
                       help="autocast: bfloat16, or float16 with loss scaling (GradScaler)")
    train.add_argument("--fast", action="store_true", default=None, help="the fused model")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    train.add_argument("--channels-last", action="store_true", default=None, help="channels_last_3d")
    train.add_argument("--init-from", help="fine-tune from this checkpoint (heads of another label set replaced)")
    train.add_argument("--seed", type=int)
    train.add_argument("--checkpoint-every-steps", type=int, metavar="N",
                       help="also write checkpoints/last.pt every N steps within an epoch (default 0: epoch ends); "
                            "a killed run resumes from that step")  # fmt: skip
    train.add_argument("--quiet", action="store_true", help="log warnings only (default: what the run does)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="train and test lgd3d_tiny on the built-in dataset (the README's main job)")
    demo.add_argument("--out", default="lgd_demo",
                      help="folder for the dataset, the run and metrics.json (default: ./lgd_demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training setting")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = sub.add_parser("eval", help="video-level accuracy of a checkpoint on a dataset's val list")
    evaluate.add_argument("--data", required=True, help="dataset folder (its val list and classes.txt)")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint written by lgd-fast train")
    evaluate.add_argument("--list", help="annotation list to evaluate (default: the run's val list)")
    evaluate.add_argument("--out", help="folder for eval.json and eval_confusion.png (default: the checkpoint's run)")
    evaluate.add_argument("--reverse", action="store_true", help="play every clip backwards (time-order control)")
    evaluate.add_argument("--backend", choices=("auto", "dali", "pyav"), help="decoding backend")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars (probing, evaluating)")

    extract = sub.add_parser("extract", help="per-video local and global representations of a checkpoint")
    extract.add_argument("--data", required=True, help="dataset folder (its val list and classes.txt)")
    extract.add_argument("--checkpoint", required=True, help="a checkpoint written by lgd-fast train")
    extract.add_argument("--list", help="annotation list to extract (default: the run's val list)")
    extract.add_argument("--out", required=True,
                         help="output file, .npz or .safetensors: local, global, video_ids (line in the list), "
                              "paths, labels, views")  # fmt: skip
    extract.add_argument("--backend", choices=("auto", "dali", "pyav"), help="decoding backend")
    extract.add_argument("--no-progress", action="store_true", help="no progress bars (probing, extracting)")

    pred = sub.add_parser("predict", help="top-k classes of video files from a trained checkpoint")
    pred.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (any codec PyAV or DALI decodes)")
    pred.add_argument("--checkpoint", required=True, help="a checkpoint written by lgd-fast train")
    pred.add_argument("--top-k", type=_positive, default=5, help="classes per video (default 5)")
    pred.add_argument("--json", action="store_true", help="print JSON (one object per video) instead of text")
    pred.add_argument("--backend", choices=("auto", "dali", "pyav"), help="decoding backend (default: the run's)")
    pred.add_argument("--no-progress", action="store_true", help="no progress bars (probing, predicting)")

    plan = sub.add_parser(
        "plan", help="the fast model's execution plan: how each layer runs for an input size (fused, layout, why)"
    )
    plan.add_argument("model", help="an LGD-3D model (see `lgd-fast models`)")
    plan.add_argument("--batch", type=_positive, default=4)
    plan.add_argument("--frames", type=_positive, help="T of the input (default: the model's, e.g. 16)")
    plan.add_argument("--size", type=_positive, help="H = W of the input (default: the model's, e.g. 112)")
    plan.add_argument("--train", action="store_true", help="the plan of a training step (default: inference)")
    plan.add_argument("--mode", choices=("measure", "default", "fused"), default="measure",
                      help="measure every candidate on this machine (default), the deterministic default rule, "
                      "or fused everywhere")
    plan.add_argument("--backend", help="conv backend to plan for (default: $LGD_FAST_BACKEND, else auto)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    bench = sub.add_parser(
        "bench", help="end-to-end speed: the fast model vs the reference, eager and torch.compile (JSON and PNG)"
    )
    bench.add_argument("--model", default="lgd3d_r50", help="an LGD-3D model (default: lgd3d_r50)")
    bench.add_argument("--batch", type=_positive, default=4)
    bench.add_argument("--frames", type=_positive, default=16)
    bench.add_argument("--size", type=_positive, default=112, help="H = W of the clips")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bench.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "bf16-weights"),
                       help="bf16: autocast; bf16-weights: every model and clip in bfloat16 (inference passes)")
    bench.add_argument("--channels-last", action="store_true", help="models and clips in channels_last_3d")
    bench.add_argument("--passes", default="inference,training,latency",
                       help="comma-separated: inference, training, latency (inference at batch 1)")
    bench.add_argument("--candidates", help="comma-separated subset of: " + ", ".join(BENCH_CANDIDATES)
                       + " (default: all; fast_no_arena: the fast model without its activation arena, "
                       "fast_not_recorded: without its recorded program, inference only)")  # fmt: skip
    bench.add_argument("--repeats", type=_positive, default=5, help="timed calls per candidate and pass")
    bench.add_argument("--warmup", type=int, default=2,
                       help="untimed calls first (compilation; the fast model records its inference on its second)")
    bench.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates")
    bench.add_argument("--out-dir", default="lgd_bench",
                       help="folder for the results (default: ./lgd_bench): bench_<model>_<dtype>_<device>.json")
    bench.add_argument("--out", help="JSON path instead (e.g. benchmarks/results/....json); a PNG is written beside it")
    bench.add_argument("--isolated", action="store_true",
                       help="each candidate built and timed in a process of its own, the processes taking turns (as "
                            "one model per process is deployed; default: all in this process, interleaved)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _plan(args) -> int:
    try:
        entry = model_entry(args.model)
        channels, frames, size, _ = entry.input_size  # (C, T, H, W)
        model = create_model(args.model, 10, fast=True, backend=args.backend, plan=args.mode)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        print(f"lgd-fast plan: error: {err}", file=sys.stderr)
        return 2
    shape = (args.batch, channels, args.frames or frames, args.size or size, args.size or size)
    clip = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        plan = model.execution_plan.resolve(clip, training=args.train)
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. a backend that cannot run here
        print(f"lgd-fast plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "input": list(shape), "training": args.train, "layers": plan.to_dict()},
                         indent=2))  # fmt: skip
    else:
        print(f"{args.model}, input {'x'.join(map(str, shape))}, {'training' if args.train else 'inference'}")
        print(plan)
    return 0


def _bench(args) -> int:
    from . import bench

    chosen = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else bench.CANDIDATES
    candidates = [c for c in chosen if not (args.no_compile and "_compiled" in c)]
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    try:
        payload = bench.run_bench(
            args.model, batch=args.batch, frames=args.frames, size=args.size, device=args.device, dtype=args.dtype,
            passes=passes, candidates=candidates, repeats=args.repeats, warmup=args.warmup,
            channels_last=args.channels_last, progress=not args.no_progress, isolated=args.isolated,
        )  # fmt: skip
    except (ValueError, RuntimeError) as err:
        print(f"lgd-fast bench: error: {err}", file=sys.stderr)
        return 2
    where = bench.device_slug(payload["device"], name=payload["machine"].get("cuda_device", "cuda"))
    layout = ("_cl3d" if args.channels_last else "") + ("_isolated" if args.isolated else "")
    out = args.out or os.path.join(args.out_dir, f"bench_{args.model}_{args.dtype}{layout}_{where}.json")
    path = bench.write_json(out, payload)
    png = bench.plot_bench(payload, path.with_suffix(".png"))
    peak = payload["conv_peak"]["gflops_per_s"]
    print(f"{payload['model']} {'x'.join(map(str, payload['input']))} {payload['dtype']} on {payload['device']}; "
          f"conv peak {peak:.0f} GFLOP/s (the device's own channels-last 1x3x3 conv, measured in this run)")
    for pass_, floor in payload.get("conv_floor", {}).items():
        print(f"  conv floor {pass_}: {floor['seconds'] * 1e3:.1f} ms (the model's {floor['calls']} convolutions alone"
              f"{', forward and backward' if floor['training'] else ''}: {floor['gflop']:.3g} GFLOP at "
              f"{floor['gflop'] / floor['seconds']:.0f} GFLOP/s)")  # fmt: skip
    for pass_, rows in payload["results"].items():
        for name, row in rows.items():
            memory, share = row["peak_memory_bytes"], row["conv_peak_share"]
            floor_share = row.get("conv_floor_share")
            print(f"  {pass_:<9} {name:<32} {row['median_s'] * 1e3:9.1f} ms  p95 {row['p95_s'] * 1e3:9.1f} ms  "
                  f"{row['clips_per_s']:8.2f} clips/s  {'' if share is None else f'{share:4.0%} of peak  '}"
                  f"{'' if floor_share is None else f'{floor_share:4.0%} convs  '}peak memory "
                  f"{'n/a' if memory is None else f'{memory / 2**20:.0f} MiB'}")  # fmt: skip
    if payload["accuracy"]:
        accuracy = payload["accuracy"]
        ratio = max(accuracy["relative_error_vs_fp64"]["fast_over_reference"].values())
        print(f"  bf16 logits vs fp32: max error {accuracy['logits_max_error_vs_fp32']:.2e} (the reference's "
              f"{accuracy['reference_bf16_max_error_vs_fp32']:.2e}); against float64 the fast model's error is "
              f"{ratio:.2f}x the reference's")  # fmt: skip
    for check in payload["target_check"]:
        if check["met"] is None:  # the targets are set for one setting: not judged elsewhere
            verdict = "not judged (the targets are set for lgd3d_r50 4x3x16x112x112 on the CPU)"
        else:
            verdict = "met" if check["met"] else "NOT met"
        bound = ""
        if "bound" in check:  # what the convolutions alone would allow (an estimate: lgd_fast.bench.conv_floor)
            fastest = f", {check['bound_max']:.3g} with each at its fastest" if "bound_max" in check else ""
            bound = f" (bound {check['bound']:.3g}{fastest}: the convs alone, an estimate)"
        print(f"  target {check['pass']} {check['metric']}: {check['measured']:.3g} vs {check['target']} {verdict}"
              f"{bound}")  # fmt: skip
    print(f"wrote {path} and {png}")
    return 0


def _checkpoint_and_loader(args, *, reverse: bool = False):
    """(model, class names, test loader over --list or the run's val list) for eval and extract."""
    from pathlib import Path

    from .data import read_annotations, read_class_index
    from .data.loader import VideoClipLoader
    from .engine import clip_spec, load_trained

    model, config, class_names = load_trained(args.checkpoint)
    index = Path(args.data) / config.data.class_index if args.data else None
    if index is not None and index.is_file():  # the list's labels are numbers into this index
        data_names = read_class_index(index)
        if data_names != list(class_names):
            pairs = zip(data_names, class_names, strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(data_names), len(class_names)))
            raise ValueError(f"{index} ({len(data_names)} classes) differs from the checkpoint's class names "
                             f"({len(class_names)}) from label {first} on: the list's labels would be read as other "
                             "classes")  # fmt: skip
    listing = args.list or str(Path(args.data) / config.data.val_list)
    records = read_annotations(listing, class_index=class_names)
    loader = VideoClipLoader(records, spec=clip_spec(config, config.model.name, reverse=reverse),
                             batch_size=config.optim.batch_size, training=False,
                             backend=args.backend or config.data.backend, num_workers=config.data.workers,
                             progress=not args.no_progress)  # fmt: skip
    return model, class_names, loader


def _train(args) -> int:
    from .engine import ConfigError, TrainingDiverged, load_config, train
    from .engine.config import TrainConfig

    flags = {
        "data__root": args.data, "model__name": args.model, "epochs": args.epochs,
        "stage2_epochs": args.stage2_epochs, "out": args.out, "optim__batch_size": args.batch_size,
        "optim__lr": args.lr, "amp": args.amp, "model__fast": args.fast, "model__compile": args.compile,
        "model__channels_last": args.channels_last, "model__init_from": args.init_from, "seed": args.seed,
        "progress": False if args.no_progress else None, "checkpoint_every_steps": args.checkpoint_every_steps,
    }
    _setup_logging(quiet=args.quiet)
    try:
        config: TrainConfig = load_config(args.config, args.set, **flags)
        if not config.out or not config.data.root:
            raise ConfigError("--data and --out (or data.root and out in the config file) are required")
        metrics = train(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"lgd-fast train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"lgd-fast train: {err}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: epoch {metrics['epoch']}, val top-1 {metrics['val_top1']:.3f}, best "
              f"{metrics['best_val_top1']:.3f}; run folder {config.out}")
    return 0


def _setup_logging(*, quiet: bool = False) -> None:
    """The CLI's log on stderr: INFO from lgd_fast (what a run does), warnings from everything else.

    Records still propagate (a host application's or pytest's handlers see them); the stderr handler is added
    only where nothing above lgd_fast's logger handles records already, and once.
    """
    import logging

    package = logging.getLogger("lgd_fast")
    quiet = quiet or int(os.environ.get("RANK", 0)) != 0  # one log for a distributed run: rank 0's
    package.setLevel(logging.WARNING if quiet else logging.INFO)
    if logging.getLogger().handlers or any(getattr(h, "_lgd_fast_cli", False) for h in package.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._lgd_fast_cli = True
    package.addHandler(handler)


def _demo(args) -> int:
    import logging

    from .engine import ConfigError, TrainingDiverged
    from .engine.demo import format_summary, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = run_demo(args.out, extra=args.set, progress=not args.no_progress)
    except (ConfigError, ValueError, FileExistsError, TrainingDiverged) as err:
        print(f"lgd-fast demo: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(metrics, args.out))
    return 0


def _extract(args) -> int:
    from .engine.evaluate import extract_features, feature_path, save_features

    try:
        feature_path(args.out)  # before any work
        model, _, loader = _checkpoint_and_loader(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"lgd-fast extract: error: {err}", file=sys.stderr)
        return 2
    features = extract_features(model, loader, progress=not args.no_progress)
    try:
        path = save_features(features, args.out)
    except ImportError as err:
        print(f"lgd-fast extract: error: {err}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items())
    print(f"wrote {path}: {shapes}")
    return 0


def _predict(args) -> int:
    from .engine.predict import format_predictions, predict

    _setup_logging(quiet=True)  # a bad file is reported with its prediction row, not as a log line
    try:
        predictions = predict(args.checkpoint, args.videos, top_k=args.top_k, backend=args.backend,
                              progress=not args.no_progress)  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"lgd-fast predict: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
    else:
        print(format_predictions(predictions))
    failed = [p for p in predictions if p.error is not None]
    if failed:
        print(f"lgd-fast predict: {len(failed)} of {len(predictions)} file(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def _eval(args) -> int:
    from pathlib import Path

    from .engine.evaluate import evaluate, format_eval, write_eval

    try:
        model, class_names, loader = _checkpoint_and_loader(args, reverse=args.reverse)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"lgd-fast eval: error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate(model, loader, num_classes=len(class_names), class_names=class_names,
                          progress=not args.no_progress)  # fmt: skip
    except ValueError as err:  # e.g. no video could be evaluated
        print(f"lgd-fast eval: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent
    paths = write_eval(result, out, class_names=class_names, prefix="eval_reversed" if args.reverse else "eval")
    print(format_eval(result, class_names))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


def _make_dataset(args) -> int:
    from .data.synthetic import make_dataset

    options = {
        k: v
        for k, v in (("classes", args.classes), ("videos_per_class", args.videos_per_class),
                     ("frames", args.frames), ("size", args.size))
        if v is not None
    }
    try:
        info = make_dataset(args.out, seed=args.seed, codec=args.codec, **options)
    except (ValueError, FileExistsError) as err:
        print(f"lgd-fast make-dataset: error: {err}", file=sys.stderr)
        return 2
    print(info.summary())
    return 0


def _check_data(args) -> int:
    from .data.annotations import AnnotationError, detect_format, read_annotations, read_class_index
    from .data.check import check_videos, format_failures
    from .engine.config import DataConfig

    class_index = args.class_index
    try:
        fmt = detect_format(args.source) if args.format == "auto" else args.format
        beside = os.path.join(os.path.dirname(os.path.abspath(args.source)), DataConfig.class_index)
        if class_index is None and fmt != "folder" and os.path.isfile(beside):
            class_index = beside  # what training reads: the dataset folder's classes.txt
        names = None if class_index is None else read_class_index(class_index)
        records = read_annotations(args.source, root=args.root, class_index=names, fmt=args.format)
    except (AnnotationError, OSError, ValueError) as err:
        print(f"lgd-fast check-data: error: {err}", file=sys.stderr)
        return 2
    if names is not None:
        print(f"labels checked against {class_index} ({len(names)} classes)")
    elif fmt == "list":
        print(f"labels not checked against a class count: no {DataConfig.class_index} beside the list (training "
              "reads DATA/classes.txt); --class-index FILE checks them")  # fmt: skip
    result = check_videos(records, backend=args.backend)
    print(format_failures(result))
    return 0 if result.ok else 1


def _doctor(args) -> int:
    from . import doctor

    info = doctor.report()
    rows = None
    status = 0
    if args.aot:
        targets = [t.strip() for t in args.aot.split(",") if t.strip()]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        try:
            rows = doctor.aot_compile(targets=targets, dtypes=dtypes)
        except (RuntimeError, ValueError) as err:
            print(f"lgd-fast doctor: error: {err}", file=sys.stderr)
            return 1
        spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
        status = 1 if spilled else 0
    if args.json:
        print(json.dumps({**info, "aot": rows}, indent=2))
    else:
        print(doctor.format_report(info))
        if rows is not None:
            print(f"\nahead-of-time compilation ({len(rows)} kernel builds):")
            print(doctor.format_rows(rows))
    if status:
        print(f"lgd-fast doctor: error: register spills in {len(spilled)} of the kernel builds:", file=sys.stderr)
        for r in spilled:
            print(
                f"  {r['kernel']} [{r['config']}, {r['num_warps']} warps, {r['num_stages']} stages, {r['dtype']}] "
                f"on {r['target']}: {r['spill_stores']} bytes spill stores, {r['spill_loads']} bytes spill loads",
                file=sys.stderr,
            )
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "extract":
        return _extract(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "make-dataset":
        return _make_dataset(args)
    if args.command == "check-data":
        return _check_data(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "models":
        for name in list_models():
            print(f"{name:<12} {model_entry(name).description}")
        return 0
    try:
        entry = model_entry(args.model)
    except ValueError as err:
        print(f"lgd-fast: error: {err}", file=sys.stderr)
        return 2
    c, t, h, w = entry.input_size
    options = {}
    if args.early_stride is not None:
        if args.model.startswith("lgd2d"):
            print("lgd-fast: error: --early-stride applies to LGD-3D models only", file=sys.stderr)
            return 2
        options["early_stride"] = args.early_stride
    try:
        info = model_info(
            args.model,
            num_classes=args.num_classes,
            classifier=args.classifier,
            batch=args.batch,
            input_size=(c, args.frames or t, args.size or h, args.size or w),
            **options,
        )
    except ValueError as err:
        print(f"lgd-fast: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
