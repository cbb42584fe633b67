"""``lgd-fast bench``: end-to-end speed of the fast LGD-3D against the reference, eager and compiled.

For one model and input shape, four candidates with the same weights: the reference in eager mode, the
reference under ``torch.compile``, the fast model, the fast model under ``torch.compile``; two passes:
inference (eval, ``torch.inference_mode``) and a training step (forward, loss, backward, SGD step). Calls of
the candidates alternate (each round calls every candidate once, in a rotating order), so that all of them
see the same machine load. Per candidate and pass: latency median and percentiles, clips/s, and peak memory
(CUDA: ``torch.cuda.max_memory_allocated`` over one call; CPU, Linux/glibc: the growth of the process's peak
resident memory during one call, freed memory given back and the high-water mark reset just before it).
The result holds the device, versions and commit, and the issue's targets with their measured values.

    lgd-fast bench                                   # LGD-3D R50, batch 4, 16x112x112, fp32, CPU: minutes
    lgd-fast bench --model lgd3d_tiny --size 32 --no-compile
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__

__all__ = [
    "CANDIDATES",
    "PASSES",
    "TARGETS",
    "device_slug",
    "percentiles",
    "plot_bench",
    "run_bench",
    "tf32_settings",
    "time_interleaved",
    "write_json",
]

CANDIDATES = ("reference", "reference_compiled", "fast", "fast_compiled")
PASSES = ("inference", "training")
# The end-to-end targets (LGD-3D R50, 16x112x112, batch 4, fp32, CPU): fast vs the named candidate.
TARGETS = {
    "inference": {"speedup_vs_reference": 3.0, "speedup_vs_reference_compiled": 1.2},
    "training": {"speedup_vs_reference": 1.5, "peak_memory_vs_reference": 0.8},
}


def _status_bytes(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (benchmarks/_harness.steady_malloc)


def glibc_mallopt(settings: dict[int, int]):
    """glibc (a ctypes handle) after ``mallopt(param, value)`` for each setting; None where the process does not
    run on glibc (not Linux) or a setting is refused."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if all(libc.mallopt(param, value) for param, value in settings.items()) else None
    except (OSError, AttributeError):
        return None


def _glibc():
    """glibc, for ``malloc_trim``; no setting changed (the process runs on as it was)."""
    return glibc_mallopt({})


_LIBC = None


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes one call of ``fn`` needs at its peak beyond what was held before it (None where not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _LIBC:
        return None
    # Freed memory back to the system first (glibc unmaps big blocks itself; malloc_trim releases the free
    # parts of its heap), so that the resident size is what is live and every page the call touches counts.
    _LIBC.malloc_trim(0)
    rss = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux)
    except OSError:
        return None
    fn()
    peak = _status_bytes("VmHWM")
    return None if rss is None or peak is None else max(peak - rss, 0)


def _models(name: str, num_classes: int, device: torch.device, candidates: Sequence[str], compile_mode: str | None):
    from .models import create_model

    reference = create_model(name, num_classes, classifier="two_heads").to(device)
    out = {}
    for candidate in candidates:
        fast = candidate.startswith("fast")
        model = create_model(name, num_classes, classifier="two_heads", fast=fast).to(device)
        model.load_state_dict(reference.state_dict())
        runner = torch.compile(model, mode=compile_mode) if candidate.endswith("_compiled") else model
        out[candidate] = (model, runner)
    return out


def percentiles(samples: Sequence[float], points: Sequence[int] = (5, 25, 75, 95)) -> dict[str, float]:
    """``median_s``, ``p<point>_s`` for each of ``points`` (multiples of 5 up to 95), ``min_s``, ``max_s`` and
    ``calls`` of ``samples``."""
    if any(p % 5 or not 5 <= p <= 95 for p in points):
        raise ValueError(f"points must be multiples of 5 from 5 to 95, got {list(points)}")
    s = sorted(samples)
    q = statistics.quantiles(s, n=20) if len(s) >= 2 else [s[0]] * 19
    return {
        "median_s": statistics.median(s),
        **{f"p{p}_s": q[p // 5 - 1] for p in points},
        "min_s": s[0],
        "max_s": s[-1],
        "calls": len(s),
    }


def time_interleaved(
    calls: Mapping[str, Callable[..., Any]],
    *,
    repeats: int,
    warmup: int = 0,
    inputs: Sequence[Any] | None = None,
    device: torch.device | str | None = None,
    rotate: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Times ``calls`` side by side: ``warmup`` untimed calls of each in turn, then ``repeats`` rounds that call each
    once, the order shifting by one every round with ``rotate``, synchronising around each call on a CUDA ``device``.

    With ``inputs``, every call (warm-up too) takes the next input set from one rotation shared by all calls; without,
    calls take no argument. ``progress`` (e.g. a tqdm bar's ``update``) gets 1 after every call. Returns name -> the
    seconds of each timed call, and name -> the seconds of its warm-up calls together.
    """
    names = list(calls)
    sync = device is not None and torch.device(device).type == "cuda"
    k = 0

    def call(name: str) -> None:
        nonlocal k
        if inputs is None:
            calls[name]()
        else:
            calls[name](inputs[k % len(inputs)])
            k += 1

    warmup_s: dict[str, float] = {}
    for name in names:  # compiles, allocator and caches
        t0 = time.perf_counter()
        for _ in range(warmup):
            call(name)
            if progress is not None:
                progress(1)
        warmup_s[name] = time.perf_counter() - t0
    if sync:
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names) if rotate else j]
            if sync:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            call(name)
            if sync:
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress(1)
    return samples, warmup_s


def run_bench(
    model: str = "lgd3d_r50",
    *,
    batch: int = 4,
    frames: int = 16,
    size: int = 112,
    num_classes: int = 400,
    device: str = "cpu",
    dtype: str = "fp32",
    passes: Sequence[str] = PASSES,
    candidates: Sequence[str] = CANDIDATES,
    repeats: int = 5,
    warmup: int = 1,
    compile_mode: str | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Times ``candidates`` on ``passes``; returns the result dict (see the module docstring)."""
    from tqdm.auto import tqdm

    unknown = [c for c in candidates if c not in CANDIDATES] + [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown candidates/passes {unknown}; candidates: {CANDIDATES}, passes: {PASSES}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16 (bf16: autocast), got {dtype!r}")
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"repeats >= 1, warmup >= 0 and batch >= 1 are needed (got {repeats}, {warmup}, {batch})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 3, frames, size, size)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    clips = [torch.randn(shape, generator=gen).to(dev).contiguous(memory_format=fmt) for _ in range(2)]  # not zeros
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    models = _models(model, num_classes, dev, candidates, compile_mode)
    if channels_last:
        for module, _ in models.values():
            module.to(memory_format=torch.channels_last_3d)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    results: dict[str, Any] = {}
    memory_calls: dict[str, dict] = {}
    timings: dict[str, tuple] = {}
    total = len(passes) * len(candidates) * (repeats + max(warmup, 1) + 1)
    bar = tqdm(total=total, desc="bench", unit="call", disable=not progress)
    for pass_ in passes:
        calls: dict[str, Callable[[], Any]] = {}
        for name, (module, runner) in models.items():
            k = [0]

            def clip(k=k):
                k[0] += 1
                return clips[k[0] % 2]

            if pass_ == "inference":

                def call(module=module, runner=runner, clip=clip):
                    module.eval()
                    with torch.inference_mode(), autocast:
                        runner(clip())
            else:
                optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

                def call(module=module, runner=runner, clip=clip, optimizer=optimizer):
                    module.train()
                    with autocast:
                        local, global_ = runner(clip())
                        loss = F.cross_entropy(local.float(), labels) + F.cross_entropy(global_.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

            calls[name] = call
        samples, first_call = time_interleaved(  # the warm-up compiles and warms the allocator
            calls, repeats=repeats, warmup=max(warmup, 1), device=dev, progress=bar.update
        )
        memory_calls[pass_] = calls
        timings[pass_] = (samples, first_call)
    global _LIBC
    if dev.type == "cpu" and _LIBC is None:
        _LIBC = _glibc()
    for pass_ in passes:  # peak memory after the timings (malloc_trim makes the next call fault its pages in)
        calls = memory_calls[pass_]
        memory = {name: _peak_memory(call, dev) for name, call in calls.items()}
        bar.update(len(calls))
        samples, first_call = timings[pass_]
        rows = {}
        for name in calls:
            timing = percentiles(samples[name])
            rows[name] = {**timing, "clips_per_s": batch / timing["median_s"], "peak_memory_bytes": memory[name],
                          "warmup_s": first_call[name]}  # fmt: skip
        results[pass_] = rows
    bar.close()
    return {
        "benchmark": "lgd-fast bench",
        "model": model,
        "input": list(shape),
        "dtype": dtype,
        "device": dev.type,
        "machine": machine_info(dev),
        "settings": {"repeats": repeats, "warmup": warmup, "compile_mode": compile_mode, "channels_last": channels_last,
                     "threads": torch.get_num_threads(), "candidates": list(candidates)},  # fmt: skip
        "results": results,
        "target_check": check_targets(results, model, shape, dtype, dev.type, channels_last),
        "notes": [
            "candidates share the reference's weights; compiled = torch.compile(model) (inductor)",
            "inference: eval, torch.inference_mode; training: forward, cross-entropy of both heads, backward, "
            "SGD step (momentum 0.9)",
            "latency percentiles over interleaved calls (a round calls every candidate once, rotating order)",
            "peak_memory_bytes: CUDA max_memory_allocated over one call minus what was allocated before it; "
            "CPU: the process's peak resident memory during one call (VmHWM, reset just before, after "
            "malloc_trim gave freed heap memory back) minus the resident memory before it",
        ],
    }


def check_targets(
    results: dict, model: str, shape: Sequence[int], dtype: str, device: str, channels_last: bool = False
) -> list[dict]:
    """The issue's targets (defined for R50, 16x112x112, batch 4, fp32 on the CPU) and the measured values;
    ``met`` is True or False where the target applies to this setting, None (not judged) elsewhere."""
    applies = model == "lgd3d_r50" and list(shape) == [4, 3, 16, 112, 112] and dtype == "fp32" and device == "cpu"
    applies = applies and not channels_last
    checks = []
    for pass_, targets in TARGETS.items():
        rows = results.get(pass_, {})
        if "fast" not in rows:
            continue
        for metric, target in targets.items():
            other = metric.removeprefix("speedup_vs_").removeprefix("peak_memory_vs_")
            if other not in rows:
                continue
            if metric.startswith("speedup"):
                value = rows[other]["median_s"] / rows["fast"]["median_s"]
                met = value >= target
            else:
                a, b = rows["fast"]["peak_memory_bytes"], rows[other]["peak_memory_bytes"]
                if not a or not b:
                    continue
                value = a / b
                met = value <= target
            checks.append({"pass": pass_, "metric": metric, "target": target, "measured": value,
                           "met": met if applies else None,
                           "target_applies_to_this_setting": applies})  # fmt: skip
    return checks


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "lgd_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = tf32_settings()
    return info


def tf32_settings() -> dict[str, Any]:
    """Which float32 products ran as tf32 on CUDA: torch's two switches as they were, and what follows from them
    (cuDNN's convs and the fast model's Triton convs follow ``cudnn.allow_tf32``; cuBLAS matmuls the other)."""
    convs = bool(torch.backends.cudnn.allow_tf32)
    return {
        "cudnn.allow_tf32": convs,
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "fp32_convs": "tf32" if convs else "fp32",
    }


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool}`` of the checkout at ``root`` (default: this package's): dirty
    when a tracked file differs from the commit or a new one is added, benchmarks/results/ aside (results are
    what a run writes, not what it runs)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], cwd=root,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def plot_bench(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """A bar chart of clips/s per candidate and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(payload["results"])
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 3.6), squeeze=False)
    colors = {"reference": "tab:gray", "reference_compiled": "tab:orange", "fast": "tab:blue",
              "fast_compiled": "tab:green"}  # fmt: skip
    for ax, pass_ in zip(axes[0], passes, strict=True):
        rows = payload["results"][pass_]
        names = list(rows)
        values = [rows[n]["clips_per_s"] for n in names]
        bars = ax.bar(names, values, color=[colors.get(n, "tab:purple") for n in names])
        for bar_, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.2f}", (bar_.get_x() + bar_.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{pass_}: clips/s (higher is faster)")
        ax.tick_params(axis="x", labelrotation=20)
    m = payload["machine"]
    where = m.get("cuda_device") or f"{m['cpu']} ({payload['settings']['threads']} threads)"
    fig.suptitle(f"{payload['model']} {'x'.join(map(str, payload['input']))} {payload['dtype']}, {where}, "
                 f"torch {m['torch']}, {m['date'][:10]}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def device_slug(device: torch.device | str, *, name: str | None = None) -> str:
    """``cpu`` for a non-CUDA device, else the GPU's name (``name``, default the device's) for file names:
    ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    if torch.device(device).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device) if name is None else name
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON (through a temporary file, then renamed), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
