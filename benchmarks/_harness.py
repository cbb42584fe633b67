"""Shared helpers for the benchmarks in this folder: timing, roofline, machine info, result files, plots.

Method (see PERF.md): candidates are timed side by side in one run, interleaved round by round so drift and
neighbours' load hit all of them alike; every timed call takes the next input set from one rotation shared by
all candidates, so no candidate reads data another one just pulled into cache; each reports the median of many
repeats after a warm-up. Floors come from the bytes an op must move over the measured copy bandwidth.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lgd_fast import bench as _bench

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ---- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one candidate: median and spread over ``repeats`` timed calls."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        """The summary of ``samples`` (seconds per call), from lgd_fast.bench.percentiles."""
        p = _bench.percentiles(samples, points=(10, 90))
        return cls(median_s=p["median_s"], p10_s=p["p10_s"], p90_s=p["p90_s"], min_s=p["min_s"], repeats=p["calls"])

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def input_set_count(bytes_per_set: int, *, min_sets: int = 3, cache_multiple: float = 3.0) -> int:
    """How many input sets to rotate so that together they exceed ``cache_multiple`` x the last-level cache."""
    want = int(cache_multiple * last_level_cache_bytes() / max(bytes_per_set, 1)) + 1
    return max(min_sets, want)


steady_malloc = _bench.steady_malloc  # (lgd_fast.bench, for the isolated processes)


# ---- floors ----------------------------------------------------------------------------------------


def copy_bandwidth(
    nbytes: int = 256 * 2**20, repeats: int = 20, warmup: int = 3, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Measured memory bandwidth of ``dst.copy_(src)`` on float32 tensors of ``nbytes`` each on ``device``
    (a CUDA device: device memory to device memory, synchronised around each copy).

    Returns:
        ``bytes_per_s`` (read + write bytes, i.e. 2 * nbytes, over the median time), ``median_s``, ``nbytes``.
    """
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        samples.append(time.perf_counter() - t0)
    median = statistics.median(samples)
    return {"bytes_per_s": 2 * src.numel() * 4 / median, "median_s": median, "nbytes": float(src.numel() * 4)}


def median_ms(fn: Callable[[], Any], calls: int, *, warmup: int = 3) -> float:
    """``fn()`` called ``warmup`` times, then ``calls`` timed calls: their median in milliseconds (CPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def roofline_seconds(bytes_moved: float, bytes_per_s: float) -> float:
    """The memory floor: the time to move ``bytes_moved`` at ``bytes_per_s``."""
    return bytes_moved / bytes_per_s


# ---- the machine -----------------------------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from sysfs), 32 MiB if unknown."""
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 32 * 2**20


def git_commit() -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of this checkout (lgd_fast.bench.git_commit: results files aside)."""
    return _bench.git_commit(REPO_ROOT)


def machine_info() -> dict[str, Any]:
    """Device, core count, threads, versions, git commit and date, for the top of every result file."""
    info: dict[str, Any] = {
        "device": _bench.cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["tf32"] = _bench.tf32_settings()
    return info


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def _own_jiffies() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


class ForeignLoad:
    """Measures how many cores other processes kept busy during a ``with`` block (Linux; else None).

    A shared machine's neighbours skew timings; recording their load next to the timings says how much.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> ForeignLoad:
        try:
            self._start = (*_cpu_jiffies(), _own_jiffies())
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        busy0, total0, own0 = self._start
        busy1, total1 = _cpu_jiffies()
        own1 = _own_jiffies()
        if total1 > total0:
            ncpu = os.cpu_count() or 1
            self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / (total1 - total0) * ncpu


def wait_until_quiet(max_wait_s: float = 120.0, threshold_cores: float = 0.25, window_s: float = 1.0) -> float | None:
    """Waits (up to ``max_wait_s``) until other processes use less than ``threshold_cores``; returns the last load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.cores is None or load.cores < threshold_cores or time.monotonic() > deadline:
            return load.cores


# ---- one measured configuration of an op ----------------------------------------------------------------


def measure_op_row(
    candidates: Mapping[str, Callable[[Any], Any]],
    inputs: Sequence[Any],
    args,
    *,
    describe: Mapping[str, Any],
    nbytes: int,
    bytes_per_s: float,
    fast: str = "cpp",
    others: Sequence[str] = ("reference", "compiled"),
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Compiles/warms every candidate, waits for a quiet machine, times them interleaved and returns the result
    row: ``describe`` (shape, dtype, ...), bytes, roofline, timings, ``speedup_vs_<other>`` (other's median /
    ``fast``'s), ``copy_bw_fraction`` per candidate and the load other processes put on the machine. Prints it."""
    for fn in candidates.values():  # compile first, then let the machine settle
        fn(inputs[0])
    if not args.no_wait:
        wait_until_quiet(max_wait_s=10.0, window_s=0.3)
    with ForeignLoad() as load:
        samples, _ = _bench.time_interleaved(
            candidates, inputs=inputs, warmup=args.warmup, repeats=args.repeats, device=device
        )
    timings = {name: Timing.from_samples(values) for name, values in samples.items()}
    floor = roofline_seconds(nbytes, bytes_per_s)
    med = {name: t.median_s for name, t in timings.items()}
    row = {
        **describe,
        "bytes_moved": nbytes,
        "input_sets": len(inputs),
        "roofline_s": floor,
        "timings": {name: t.to_dict() for name, t in timings.items()},
        **{f"speedup_vs_{other}": med[other] / med[fast] for other in others},
        "copy_bw_fraction": {name: floor / m for name, m in med.items()},
        "foreign_load_cores": load.cores,
    }
    print(
        " ".join(str(v) for k, v in describe.items() if k != "shape")
        + " | " + " ".join(f"{n} {m * 1e3:7.3f} ms" for n, m in med.items())
        + " | " + ", ".join(f"x{row[f'speedup_vs_{o}']:.2f} vs {o}" for o in others)
        + f", {row['copy_bw_fraction'][fast]:.0%} of copy bw"
        + (f" (others' load {load.cores:.2f} cores)" if load.cores is not None else "")
    )
    return row


# ---- candidates in processes of their own ----------------------------------------------------------

time_isolated = _bench.time_isolated  # (lgd_fast.bench: lgd-fast bench --isolated uses it too)


# ---- a benchmark script's command line and set-up ---------------------------------------------------


def add_common_arguments(parser, *, default_out: Path | None, repeats: tuple[int, int] = (60, 10)) -> None:
    """The flags every run_*.py script takes: --quick, --repeats, --warmup, --threads, --out, --plot, malloc, waits."""
    full, quick = repeats
    parser.add_argument("--quick", action="store_true", help=f"fewer shapes, {quick} repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed calls per candidate (default {full}, quick {quick})"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON path")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON path, .png)")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc behaviour")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other processes to go quiet")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.set_defaults(_repeats_default=repeats)


compile_in_process = _bench.compile_in_process  # (lgd_fast.bench, for the isolated processes)


def prepare_run(args, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Applies the common flags before timing: threads, in-process compiles, malloc, a quiet machine, bandwidth.

    Returns ``{"steady_malloc", "foreign_load_before_cores", "copy_bandwidth"}`` for the result file.
    """
    if args.repeats is None:
        args.repeats = args._repeats_default[1 if args.quick else 0]
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_in_process()
    steady = False if args.system_malloc else steady_malloc()
    quiet = None if args.no_wait else wait_until_quiet(max_wait_s=args.max_wait)
    bandwidth = copy_bandwidth(device=device)
    return {"steady_malloc": steady, "foreign_load_before_cores": quiet, "copy_bandwidth": bandwidth}


def start_op_run(args) -> dict[str, Any]:
    """The start of an op script's run: exits with the reason if lgd_fast._C is not built, applies the common
    flags (:func:`prepare_run`) and prints the copy bandwidth and the CPU kernels' SIMD path. Returns
    prepare_run's dict."""
    from lgd_fast.ops import extension_available, extension_error

    if not extension_available():
        raise SystemExit(f"lgd_fast._C is not built: {extension_error()}")
    from lgd_fast import _C

    setup = prepare_run(args)
    print(f"copy bandwidth: {setup['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
          f"cpu path {_C.cpu_isa()}")  # fmt: skip
    return setup


def op_script_main(argv: list[str] | None, doc: str, run: Callable, *, out: str, repeats: tuple[int, int] = (60, 10),
                   plot: Callable[[dict, Path], Path] | None = None) -> dict[str, Any]:  # fmt: skip
    """An op script's ``main``: the common flags (:func:`add_common_arguments`, the description from ``doc``'s
    first paragraph, results to ``RESULTS_DIR / out``), then ``run(args)``'s payload written as JSON and drawn by
    ``plot(payload, path)`` (to ``--plot``, else the JSON's path with .png) where given. Returns the payload."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_arguments(parser, default_out=RESULTS_DIR / out, repeats=repeats)
    args = parser.parse_args(argv)
    payload = run(args)
    print("wrote", _bench.write_json(args.out, payload))
    if plot is not None:
        print("wrote", plot(payload, args.plot or args.out.with_suffix(".png")))
    return payload


# ---- result files ----------------------------------------------------------------------------------


def op_payload(benchmark: str, args, setup: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """An op script's result file: its name, the machine (with the CPU kernels' SIMD path), the common flags'
    settings, the copy bandwidth and other processes' load before timing (from :func:`start_op_run`), then
    ``fields`` (notes, results, ...)."""
    from lgd_fast import _C

    return {
        "benchmark": benchmark,
        "machine": {**machine_info(), "lgd_fast_cpu_isa": _C.cpu_isa()},
        "settings": {"quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
                     "steady_malloc": setup["steady_malloc"]},  # fmt: skip
        "copy_bandwidth": setup["copy_bandwidth"],
        "foreign_load_before_cores": setup["foreign_load_before_cores"],
        **fields,
    }


def grouped_barh(
    ax,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    colors: Mapping[str, str] | None = None,
    value_format: str = "{:.2f}",
    reference_line: float | None = None,
    log: bool = False,
) -> None:
    """Horizontal grouped bars on ``ax``: one group per label, one bar per series, values written at the bar ends."""
    n = len(series)
    height = 0.8 / max(n, 1)
    for i, (name, values) in enumerate(series.items()):
        ys = [g + (i - (n - 1) / 2) * height for g in range(len(labels))]
        bars = ax.barh(ys, values, height=height, label=name, color=(colors or {}).get(name))
        for bar, v in zip(bars, values, strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                " " + value_format.format(v),
                va="center",
                ha="left",
                fontsize=7,
            )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    if log:
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if reference_line is not None:
        ax.axvline(reference_line, color="black", linewidth=0.8, linestyle="--")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)


def plot_op_benchmark(
    payload: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    op: str,
    fast: str,
    impls: Sequence[str],
    colors: Mapping[str, str],
    extra_speedups: Sequence[str] = (),
    bandwidth_line: float = 1.0,
) -> Path:
    """The two-panel PNG of an op benchmark's ``results`` rows (shape_name, dtype, memory_format, pass,
    timings, copy_bw_fraction): speedups over the eager ``reference`` (``fast`` and the compiled reference,
    plus ``extra_speedups`` candidates), and every candidate's fraction of copy bandwidth."""
    rows = payload["results"]
    labels = [
        f"{r['shape_name']} {r['dtype']} {'CL3d' if r['memory_format'] == 'channels_last_3d' else 'contig'} "
        f"{'fwd' if r['pass'] == 'forward' else 'fwd+bwd'}"
        for r in rows
    ]

    def speedup(name):
        return [r["timings"]["reference"]["median_s"] / r["timings"][name]["median_s"] for r in rows]

    fig, (ax_speed, ax_bw) = new_figure(1, 2, figsize=(14, 0.42 * len(rows) + 2.0))
    series = {fast: speedup(fast), "compiled reference": speedup("compiled")}
    series.update({name: speedup(name) for name in extra_speedups})
    speed_colors = {**colors, "compiled reference": colors["compiled"]}
    grouped_barh(ax_speed, labels, series, colors=speed_colors, value_format="{:.2f}x", reference_line=1.0, log=True)
    ax_speed.set_title("speedup over the eager reference, log scale (>1: faster)")
    grouped_barh(
        ax_bw,
        labels,
        {name: [r["copy_bw_fraction"][name] for r in rows] for name in impls},
        colors=colors,
        value_format="{:.0%}",
        reference_line=bandwidth_line,
    )
    ax_bw.set_title(f"share of copy bandwidth (floor / median); dashed: {bandwidth_line:.0%}")
    m = payload["machine"]
    where = m.get("cuda_device") if fast in ("cuda", "triton") else None
    where = where or f"{m['device']} ({m['torch_threads']} threads, {m['lgd_fast_cpu_isa']})"
    fig.suptitle(
        f"{op}, {where}, torch {m['torch']}, "
        f"copy bw {payload['copy_bandwidth']['bytes_per_s'] / 1e9:.0f} GB/s, commit {(m['commit'] or 'unknown')[:10]}",
        fontsize=10,
    )
    return save_figure(fig, path)


def new_figure(nrows: int, ncols: int, *, figsize: tuple[float, float]):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, constrained_layout=True)


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- A/B runs of two fast models in one process ------------------------------------------------------------


def ab_arguments(description: str, *, batch: int, size: int, rounds: int, control: str):
    """The command line every model A/B script here shares: --model, --batch, --size (H = W of 16-frame clips),
    --rounds, --control (the A/A run, ``control`` says what it is) and --out; the script adds its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="lgd3d_tiny")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--size", type=int, default=size, help="H = W of the 16-frame clips")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--control", action="store_true", help=control)
    parser.add_argument("--out")
    return parser


def ab_training_inputs(args) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """:func:`ab_reference_and_clips` in float32 and the clips' labels (of 400 classes, seed 1): what a training A/B
    gives both models, the same in every run."""
    reference, clips = ab_reference_and_clips(args)
    return reference, clips, torch.randint(0, 400, (args.batch,), generator=torch.Generator().manual_seed(1))


def ab_reference_and_clips(args, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The weights both models load (``trained_like`` of ``args.model`` with 400 classes and both heads, seed 0) and
    two random clips (N, 3, 16, S, S) in ``dtype`` (never zeros), the same in every run."""
    from lgd_fast.models import create_model

    torch.manual_seed(0)
    reference = _bench.trained_like(create_model(args.model, 400, classifier="two_heads"))
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(args.batch, 3, 16, args.size, args.size, generator=gen).to(dtype) for _ in range(2)]
    return reference, clips


def ab_fast_calls(args, reference: torch.nn.Module, clips: Sequence[torch.Tensor], names: tuple[str, str], *,
                  plan: str, dtype: torch.dtype = torch.float32, autocast=None, second=None):
    """(name -> a call, name -> its model) for two fast ``args.model``s with ``reference``'s weights in ``dtype`` and
    plan ``plan``: each call is ``lgd_fast.bench.pass_call``'s inference (as ``lgd-fast bench`` times it) on
    ``clips`` under ``autocast`` (None: off), each model planned and recorded by four calls; the second's under
    ``second()`` (a context manager: what makes it differ) unless ``args.control`` (the A/A run)."""
    import contextlib

    from lgd_fast.models import create_model

    calls, models = {}, {}
    for name in names:
        model = models[name] = create_model(args.model, 400, classifier="two_heads", fast=True, plan=plan)
        model.load_state_dict(reference.state_dict())
        model.to(dtype)
        call = _bench.pass_call("inference", model, model, clips, None, autocast or contextlib.nullcontext())
        differs = name == names[1] and second is not None and not args.control
        with second() if differs else contextlib.nullcontext():
            for _ in range(4):  # plans, records (second call), runs the program
                call()
        calls[name] = call
    return calls, models


def ab_first_step_loss(model: torch.nn.Module, runner: Callable, clip: torch.Tensor, labels: torch.Tensor) -> float:
    """An A/B training script's first step's loss (both heads' cross-entropy, model in train mode, ``runner`` its
    call, eager or compiled), under the same dropout draws for every model (seed 2): the two models' first losses,
    recorded, are equal up to rounding where they compute the same."""
    import torch.nn.functional as F

    model.train()
    torch.manual_seed(2)
    local, global_ = runner(clip)
    return (F.cross_entropy(local, labels) + F.cross_entropy(global_, labels)).item()


def ab_medians(calls: Mapping[str, Callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The calls alternating for ``rounds`` rounds, the order flipped every round: (seconds per call, median ms)."""
    times, _ = _bench.time_interleaved(calls, repeats=rounds)
    return times, {k: statistics.median(v) * 1e3 for k, v in times.items()}


def ab_command(script: str, args, names: Sequence[str]) -> str:
    """The command line that made a run: ``python benchmarks/<script>`` with ``args``' options ``names`` (a flag, a
    bool, as itself where set), then ``--control`` where set."""
    words = [f"--{n}" if getattr(args, n) is True else f"--{n} {getattr(args, n)}" for n in names
             if getattr(args, n) is not False]  # fmt: skip
    return " ".join([f"python benchmarks/{script}", *words, *(["--control"] if args.control else [])])


def ab_payload(benchmark: str, script: str, args, median: Mapping[str, float], names: tuple[str, str], *,
               options: Sequence[str] = ("model", "batch", "size", "rounds"),
               **fields: Any) -> dict[str, Any]:  # fmt: skip
    """An A/B script's result file: the run's model, clip shape, rounds and ``--control``, then ``fields``, the
    medians, ``speedup_<first>_vs_<second>`` of ``names``, the machine with the commit, and the command line (the
    options ``options`` of ``benchmarks/<script>``)."""
    first, second = names
    return {
        "benchmark": benchmark,
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "control": args.control,  # (then names[1] names the second model, which runs what the first runs)
        **fields,
        "median_ms": dict(median),
        f"speedup_{first}_vs_{second}": median[second] / median[first],
        # (the commit of the lgd_fast that ran, as the scripts recorded it before: an editable install may point
        # at another checkout than this folder's)
        "machine": {**_bench.machine_info(torch.device("cpu")), **_bench.git_commit()},
        "command": ab_command(script, args, options),
    }


def write_ab(payload: Mapping[str, Any], out: str | None) -> None:
    """Writes an A/B run's payload where ``--out`` says (nothing without it)."""
    if out:
        import json

        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {out}")
