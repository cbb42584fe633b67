"""``lgd-fast bench``: end-to-end speed of the fast LGD-3D against what PyTorch alone gives, and the conv peak.

For one model and input shape, candidates with the same weights (:data:`CANDIDATES`; one reference's, made
:func:`trained_like`: BatchNorm statistics and the diffusion path as a trained model has them): the reference in eager
mode, contiguous and channels_last_3d; ``torch.compile`` of each; ``torch.compile`` with inductor's freezing of
the channels-last reference (inference: what a CPU user deploying a model picks); the fast model, eager,
compiled and compiled with freezing, eager without its activation arena (``fast_no_arena``: what the arena gains,
inference and training) and eager with every call through its layers' Python (``fast_not_recorded``, inference:
what its recorded program gains, :mod:`lgd_fast.recorded`). Three passes: inference (eval,
``torch.inference_mode``), a training step (forward, loss, backward, SGD step; freezing is for inference only) and
latency (inference at batch 1).
Calls of the candidates alternate (each round calls every candidate once, in a rotating order), so that all
of them see the same machine load. Per candidate and pass: latency median and percentiles, clips/s, the share
of the measured convolution peak it reaches (the model's FLOPs over its median time, against oneDNN's or
cuDNN's own channels-last 1x3x3 conv at an R50 res2 shape, measured at the start and end of the same run), the
share of its time that the model's own convolutions alone take (:func:`conv_floor`: each conv of the model timed on
its own; a speedup target gets the bound these convs set), and peak memory (CUDA:
``torch.cuda.max_memory_allocated`` over one call; CPU, Linux/glibc: the growth of the process's peak resident
memory during one call, freed memory given back and the high-water mark reset just before it). The result holds
the device, versions and commit, and the targets with their measured values.

    lgd-fast bench                                   # LGD-3D R50, batch 4, 16x112x112, fp32, CPU
    lgd-fast bench --dtype bf16                      # the same under bf16 autocast
    lgd-fast bench --dtype bf16-weights --passes inference,latency   # every model and clip in bfloat16
    lgd-fast bench --model lgd3d_tiny --size 32 --no-compile
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
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
from .arena import arena_stats, release_arena
from .ops._backend import extension_available

__all__ = [
    "CANDIDATES",
    "PASSES",
    "TARGETS",
    "conv_floor",
    "device_slug",
    "model_convs",
    "percentiles",
    "plot_bench",
    "run_bench",
    "tf32_settings",
    "time_interleaved",
    "trained_like",
    "write_json",
]

CANDIDATES = (
    "reference",
    "reference_channels_last",
    "reference_compiled",
    "reference_channels_last_compiled",
    "reference_compiled_freezing",
    "fast",
    "fast_no_arena",
    "fast_not_recorded",
    "fast_compiled",
    "fast_compiled_freezing",
)
FREEZING = frozenset(c for c in CANDIDATES if c.endswith("_freezing"))  # inference only
# fast_no_arena: the fast model eager without its activation arena (lgd_fast.arena; inference, and training's
# forward and backward): what the arena gains, measured in the same run.
# The fast model eager with every call through its layers' Python (no recorded program: lgd_fast.recorded), which
# only inference records: what recording gains, measured in the same run.
INFERENCE_ONLY = FREEZING | {"fast_not_recorded"}
PASSES = ("inference", "training", "latency")  # latency: inference at batch 1
# The end-to-end targets (PERF.md; LGD-3D R50, 16x112x112, batch 4, CPU), per dtype: the fast model against the
# named candidate (speedups, peak memory) and its share of the measured conv peak.
TARGETS = {
    "fp32": {
        "inference": {"speedup_vs_reference_compiled_freezing": 1.2, "conv_peak_share": 0.75},
        "training": {"speedup_vs_reference_channels_last_compiled": 1.15, "peak_memory_vs_reference": 1.0},
    },
    "bf16": {
        "inference": {"speedup_vs_reference_channels_last": 1.3, "conv_peak_share": 0.6,
                      "logits_max_error_vs_fp32": 2e-2},  # fmt: skip
    },
}
# bf16 weights (every model cast to bfloat16, clips in bfloat16, no autocast): PERF.md's bf16 targets, each against
# the candidate with bf16 weights; the logits against the float32 model the bf16 one was cast from.
TARGETS["bf16-weights"] = TARGETS["bf16"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16 autocast", "bf16-weights": "bfloat16 weights and clips, no autocast"}


def _status_bytes(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (steady_malloc)


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


@functools.cache
def _glibc():
    """glibc, for ``malloc_trim``; no setting changed (the process runs on as it was). Loaded once."""
    return glibc_mallopt({})


def steady_malloc() -> bool:
    """Makes glibc keep freed memory for reuse: no mmap for big blocks, no trimming of the heap (Linux/glibc).

    By default glibc maps blocks above its (at most 32 MiB) mmap threshold fresh from the kernel and unmaps
    them on free, so every call that allocates a big output pays page faults (tens of ms for 50 MB), and
    whether a call does depends on what ran before it. Caching allocators (PyTorch's CUDA one, jemalloc,
    tcmalloc) do not; with this the timings measure the kernels. Returns False where it cannot apply.
    """
    return glibc_mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}) is not None


def compile_in_process() -> None:
    """Inductor compiles in this process (no pool of compile workers competing with the timed calls), and no graph
    compiled under an older op is reused (the compile cache keyed by the ops' sources)."""
    import torch._inductor.config

    from .ops._common import compile_cache_tag

    torch._inductor.config.compile_threads = 1
    torch.compiler.config.cache_key_tag = compile_cache_tag()


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes one call of ``fn`` needs at its peak beyond what was held before it (None where not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    libc = _glibc()
    if not libc:
        return None
    # Freed memory back to the system first (glibc unmaps big blocks itself; malloc_trim releases the free
    # parts of its heap; the activation arena frees its free blocks), so that the resident size is what is live
    # and every page the call touches counts.
    release_arena()
    libc.malloc_trim(0)
    rss = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux)
    except OSError:
        return None
    fn()
    peak = _status_bytes("VmHWM")
    return None if rss is None or peak is None else max(peak - rss, 0)


def _compiled(model, *, freezing: bool, compile_mode: str | None):
    """torch.compile of ``model`` (static shapes: each input shape compiles once, weights stay packable) with
    inductor's freezing on or off, through a backend of its own that compiles under
    ``inductor.config.patch(freezing=...)``. Dynamo caches graphs by code object and guards on the backend but
    not on inductor's global config: two instances of one class compiled with the stock backend under a patched
    config share whichever graph was compiled first (measured: the frozen candidate ran the unfrozen graph), and
    ``torch.compile(options={"freezing": True})`` did not pack the conv weights (R50's convs stayed
    ``aten::mkldnn_convolution``)."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {} if compile_mode is None else list_mode_options(compile_mode)

    def backend(gm, example_inputs):  # every compile, recompiles for a new shape included, under its setting
        with inductor_config.patch(freezing=freezing):
            return compile_fx(gm, example_inputs, config_patches=patches)

    compiled = torch.compile(model, backend=backend, dynamic=False)

    def run(x):  # dynamo reads the setting too while it traces (torch._dynamo.utils.is_parameter_freezing):
        with inductor_config.patch(freezing=freezing):  # without it here the weights were not packed
            return compiled(x)

    return run


def trained_like(model: torch.nn.Module, seed: int = 0, *, generator: torch.Generator | None = None) -> torch.nn.Module:
    """``model`` (in place) with the statistics a trained model has where a fresh one has identities: every
    BatchNorm's weight in [0.5, 1.5), bias and running mean about N(0, 0.1^2), running variance in [0.5, 1.5);
    every LGD block's fc6 weight (the global path's diffusion into the local map, zero at initialisation) about
    N(0, 0.05^2) (its bias stays zero). Convolution and linear weights keep their initialisation. Seeded: the
    same values each call (``generator``, where given, draws them instead of a fresh one seeded with ``seed``).

    A fresh model's BatchNorms in eval are the identity up to 1/sqrt(1 + eps), which a model in use never has,
    and in bfloat16 that measures something else than the model's accuracy: a fused block end computing
    ``r * 0.999995 + s`` from bfloat16 ``r`` and ``s`` and rounding once breaks each exact tie between two
    bfloat16 values the same way (``benchmarks/run_bf16_error.py``), where the unfused sum rounds ties to even.
    The bench's accuracy figures are taken on this model; its timings do not depend on the values."""
    from .models.blocks import LGDBlock

    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
                shape = m.weight.shape
                m.weight.copy_(0.5 + torch.rand(shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(shape, generator=gen))
            elif isinstance(m, LGDBlock):
                m.fc6.weight.copy_(0.05 * torch.randn(m.fc6.weight.shape, generator=gen))
    return model


def _models(name: str, num_classes: int, device: torch.device, candidates: Sequence[str], compile_mode: str | None):
    """candidate -> (module, runner, the memory format its clips come in), every candidate with the weights of one
    :func:`trained_like` reference, itself made under a fixed seed (the same weights in every run and call; the
    global generator is left as it was)."""
    from .models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = trained_like(create_model(name, num_classes, classifier="two_heads")).to(device)
        made = [create_model(name, num_classes, classifier="two_heads", fast=c.startswith("fast")) for c in candidates]
    out = {}
    for candidate, model in zip(candidates, made, strict=True):
        model = model.to(device)
        model.load_state_dict(reference.state_dict())
        if candidate == "fast_no_arena":
            model.activation_arena = False
        if candidate == "fast_not_recorded":
            model.recorded_inference = False
        layout = torch.contiguous_format
        if "channels_last" in candidate or candidate == "reference_compiled_freezing":
            model.to(memory_format=torch.channels_last_3d)  # the deployed reference: channels-last end to end
            layout = torch.channels_last_3d
        runner = model
        if "_compiled" in candidate:
            runner = _compiled(model, freezing=candidate in FREEZING, compile_mode=compile_mode)
        out[candidate] = (model, runner, layout)
    return out


def model_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of the convolutions and linear layers in one inference of ``x``
    (counted with forward hooks; the elementwise work is left out, as a roofline against the conv peak does)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total += 2 * output.numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear)]  # fmt: skip
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


# The conv peak's shape (PERF.md): an R50 res2 1x3x3 conv, 64 -> 64 channels, on 4x64x4x28x28, channels_last_3d.
PEAK_SHAPE, PEAK_KERNEL = (4, 64, 4, 28, 28), (64, 64, 1, 3, 3)


def model_convs(model: torch.nn.Module, x: torch.Tensor, autocast: torch.autocast) -> list[dict[str, Any]]:
    """Every convolution one forward of ``x`` runs (forward pre-hooks on the model's conv modules, transposed ones
    left out; eval, the model's mode restored after, with autograd on, so that an input that needs no gradient, the
    clip, is seen as such): per distinct call its
    input shape, compute dtype (autocast's where it is on), weight shape, settings, whether its input needs a
    gradient, and how many times it runs."""
    seen: dict[tuple, dict[str, Any]] = {}

    def hook(module, inputs):
        x_in = inputs[0]
        dtype = x_in.dtype
        if torch.is_autocast_enabled(x_in.device.type) and x_in.is_floating_point():
            dtype = torch.get_autocast_dtype(x_in.device.type)
        call = {"input": tuple(x_in.shape), "dtype": dtype, "weight": tuple(module.weight.shape),
                "bias": module.bias is not None, "stride": tuple(module.stride), "padding": module.padding,
                "dilation": tuple(module.dilation), "groups": module.groups,
                "input_grad": x_in.requires_grad}  # fmt: skip
        key = tuple((k, str(v)) for k, v in call.items())
        seen.setdefault(key, {**call, "count": 0})["count"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd) and not m.transposed]  # fmt: skip
    training = model.training
    try:
        with torch.enable_grad(), autocast:
            model.eval()(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return list(seen.values())


def conv_floor(
    model: torch.nn.Module, x: torch.Tensor, *, training: bool, autocast: torch.autocast, repeats: int = 5
) -> dict[str, Any]:
    """The model's convolutions alone (:func:`model_convs`), each timed on its own on random data in the
    channels-last layout, and summed over the calls one forward makes: what a pass of the model would take if
    nothing but its convolutions ran. Inference: the forward, on the CPU with the weight packed once into
    oneDNN's layout (``mkldnn._reorder_convolution_weight``, as the fast model and inductor's freezing run it),
    elsewhere ATen's conv; training: forward and backward as autograd runs them (the input's gradient only where
    the model needs it). Each call's median over ``repeats`` (after one warm-up) counts: ``seconds``; the sum of
    each call's fastest is ``seconds_min``.

    An estimate, not a proof: each conv runs alone with its data warm in the caches, and the machine's load moves
    it as it moves every timing. The fast model and the compiled graphs run their convolutions as these primitives
    (fused post-ops aside), so a speedup target over a candidate that takes ``t`` is within reach of less overhead
    only if ``t / target`` is at least about this floor."""
    from .ops.p3d_conv import _mkldnn_conv, onednn_takes

    calls = model_convs(model, x, autocast)
    gen = torch.Generator().manual_seed(2)
    total, fastest, flops, rows = 0.0, 0.0, 0, []
    for call in calls:
        shape, dtype, kernel = call["input"], call["dtype"], call["weight"]
        fmt = {5: torch.channels_last_3d, 4: torch.channels_last}.get(len(shape), torch.contiguous_format)
        x_c = torch.randn(shape, generator=gen).to(x.device, dtype).contiguous(memory_format=fmt)
        fan_in = kernel[1] * int(torch.tensor(kernel[2:]).prod())
        w = (torch.randn(kernel, generator=gen) / fan_in**0.5).to(x.device, dtype).contiguous(memory_format=fmt)
        b = torch.randn(kernel[0], generator=gen).to(x.device, dtype) if call["bias"] else None
        conv = {5: F.conv3d, 4: F.conv2d, 3: F.conv1d}[len(shape)]
        settings = (call["stride"], call["padding"], call["dilation"], call["groups"])
        with torch.no_grad():
            out_shape = conv(x_c, w, b, *settings).shape
        if training:
            x_c.requires_grad_(call["input_grad"])
            params = [t.requires_grad_() for t in (w, b) if t is not None]
            wrt = ([x_c] if call["input_grad"] else []) + params
            grad_out = torch.randn(out_shape, generator=gen).to(x.device, dtype).contiguous(memory_format=fmt)

            def run(x_c=x_c, w=w, b=b, conv=conv, settings=settings, wrt=wrt, grad_out=grad_out):
                torch.autograd.grad(conv(x_c, w, b, *settings), wrt, grad_out)

        else:
            run = None
            if (x.device.type == "cpu" and torch.backends.mkldnn.is_available() and onednn_takes(dtype)
                    and len(shape) in (4, 5) and not isinstance(call["padding"], str)):  # fmt: skip
                geometry = [list(call[k]) for k in ("padding", "stride", "dilation")]
                packed = torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, call["groups"], list(shape))

                def run(x_c=x_c, packed=packed, b=b, geometry=geometry, groups=call["groups"]):
                    with torch.inference_mode():
                        _mkldnn_conv(x_c, packed, b, None, *geometry, groups, False)

            if run is None:

                def run(x_c=x_c, w=w, b=b, conv=conv, settings=settings):
                    with torch.inference_mode():
                        conv(x_c, w, b, *settings)

        samples, _ = time_interleaved({"conv": run}, repeats=repeats, warmup=1, device=x.device)
        median = statistics.median(samples["conv"])
        # forward: 2 per multiply-add; backward: twice that (input and weight gradients; the clip's input gradient
        # is not computed, so the stem's backward counts once)
        passes = 1 if not training else (3 if call["input_grad"] else 2)
        call_flops = 2 * out_shape.numel() * fan_in * passes
        total += median * call["count"]
        fastest += min(samples["conv"]) * call["count"]
        flops += call_flops * call["count"]
        rows.append({**{k: (str(v) if k == "dtype" else v) for k, v in call.items()}, "median_s": median})
    return {"seconds": total, "seconds_min": fastest, "gflop": flops / 1e9, "calls": sum(c["count"] for c in calls),
            "distinct": len(calls), "training": training, "per_call": rows}  # fmt: skip


def _conv_floors(model, device, clips, passes, autocast, repeats) -> dict[str, dict[str, Any]]:
    """:func:`conv_floor` per pass, on ``model``, a plain reference (the fast model's convs are the same), moved here
    to ``device`` in channels_last_3d."""
    model.to(device, memory_format=torch.channels_last_3d)
    model.to(next(iter(clips.values()))[0].dtype)  # bf16-weights: the model in bfloat16 too
    return {p: conv_floor(model, clips[p][0], training=p == "training", autocast=autocast, repeats=max(repeats, 3))
            for p in passes}  # fmt: skip


def conv_peak(device: torch.device, dtype: str, *, repeats: int = 30) -> dict[str, Any]:
    """The device's own channels-last 1x3x3 conv (oneDNN on the CPU, cuDNN on CUDA) at :data:`PEAK_SHAPE`, in the
    bench's dtype (bf16: the conv in bfloat16): GFLOP/s of its median call over ``repeats`` (random inputs)."""
    gen = torch.Generator().manual_seed(1)
    torch_dtype = torch.bfloat16 if dtype.startswith("bf16") else torch.float32
    cl = torch.channels_last_3d
    x = torch.randn(PEAK_SHAPE, generator=gen).to(device, torch_dtype).contiguous(memory_format=cl)
    w = (torch.randn(PEAK_KERNEL, generator=gen) / 24).to(device, torch_dtype).contiguous(memory_format=cl)
    flops = 2 * x.numel() * PEAK_KERNEL[0] * 9

    def call():
        with torch.inference_mode():
            F.conv3d(x, w, padding=(0, 1, 1))

    samples, _ = time_interleaved({"conv": call}, repeats=repeats, warmup=3, device=device)
    median = statistics.median(samples["conv"])
    return {"gflops_per_s": flops / median / 1e9, "median_s": median, "shape": list(PEAK_SHAPE),
            "kernel": list(PEAK_KERNEL), "dtype": dtype, "layout": "channels_last_3d"}  # fmt: skip


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


def _isolated_worker(conn, build, args: tuple, threads: int, steady: bool) -> None:
    """A candidate's process: the coordinator's threads, in-process compiles and malloc setting, then builds its
    call (``build(*args)`` -> (call, info)), sends ``("ready", info)`` and answers each ``("time", n)`` with the
    seconds of n calls until ``("stop", 0)``."""
    import traceback

    torch.set_num_threads(threads)
    compile_in_process()
    if steady:
        steady_malloc()
    try:
        call, info = build(*args)
    except BaseException:  # the coordinator names the candidate and shows this
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", info))
    while True:
        command, n = conn.recv()
        if command == "stop":
            return
        seconds = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - t0)
        conn.send(seconds)


def _answer(name: str, process, conn) -> Any:
    """The next message from candidate ``name``'s process; a clear error naming it when the process has died."""
    try:
        while not conn.poll(1.0):
            if not process.is_alive():
                break
        return conn.recv()
    except (EOFError, OSError):
        pass
    process.join(timeout=5)
    raise RuntimeError(f"candidate {name!r}: its process ended with exit code {process.exitcode} (a negative code is "
                       "the signal that killed it; any traceback is in the output above)")  # fmt: skip


def time_isolated(
    builders: Mapping[str, tuple[Callable[..., tuple[Callable[[], Any], dict]], tuple]],
    *,
    repeats: int,
    warmup: int,
    burst: int = 2,
    steady: bool = False,
    gap_s: float = 0.05,
    progress: Callable[[str], Any] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Times each candidate in a process of its own, as one model per process is deployed: nothing another
    candidate built (oneDNN's primitive and weight caches, compiled graphs, the heap's state) is there with it.

    ``builders``: name -> (build, args), ``build`` a module-level function (processes are spawned) returning
    (call, info): ``call()`` runs the candidate once, ``info`` is sent back. The processes are built one after
    another (no two compile at once), warmed up ``warmup`` calls each, then timed in ``repeats`` rounds that hand
    each process ``burst`` back-to-back calls in turn, the order shifting by one every round; the first call of
    each burst (the process's threads waking up) is left out unless ``burst`` is 1. Only one process runs at a
    time, and ``gap_s`` passes between turns, a precaution: libgomp's threads wait busy for a while after their
    last parallel region. (Its effect is not established: a run without the gap had the eager X3D at 45 ms and the
    next, with it, at 22 ms, but a later run with the gap measured 45 ms again in a slow phase of the machine; a
    /proc sample of an R(2+1)D run with the gap found one process busy at a time.) ``steady``: each process runs
    :func:`steady_malloc` first (pass what :func:`prepare_run` returned). Returns name -> the seconds of its timed
    calls, and name -> its ``info``."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads()
    workers: dict[str, tuple[Any, Any]] = {}
    infos: dict[str, dict] = {}
    try:
        for name, (build, args) in builders.items():
            if progress is not None:
                progress(f"building {name}")
            parent, child = context.Pipe()
            process = context.Process(target=_isolated_worker, args=(child, build, args, threads, steady), daemon=True)
            process.start()
            child.close()
            workers[name] = (process, parent)
            status, info = _answer(name, process, parent)
            if status == "error":
                raise RuntimeError(f"candidate {name!r} failed to build in its process:\n{info}")
            infos[name] = info
        for name, (process, conn) in workers.items():
            conn.send(("time", warmup))
            _answer(name, process, conn)
        names = list(workers)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                process, conn = workers[name]
                time.sleep(gap_s)  # the last process's threads stop spinning (libgomp may wait busy)
                conn.send(("time", burst))
                seconds = _answer(name, process, conn)
                samples[name].extend(seconds[1:] if burst > 1 else seconds)
            if progress is not None:
                progress(f"round {r + 1}/{repeats}")
        return samples, infos
    finally:
        for process, conn in workers.values():
            try:
                conn.send(("stop", 0))
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def pass_call(pass_: str, module: torch.nn.Module, runner: Callable, inputs: Sequence[torch.Tensor],
              labels: torch.Tensor, autocast) -> Callable[[], Any]:  # fmt: skip
    """One timed call of a candidate in ``pass_``, each call on the next of ``inputs`` in turn: inference (and
    latency) in eval under ``torch.inference_mode`` and ``autocast``, returning the logits; training, a step: train
    mode, the forward under ``autocast``, cross-entropy of both heads in float32, backward, SGD (lr 1e-4, momentum
    0.9, its own optimizer). ``runner`` is ``module`` or its compiled form."""
    k = [0]

    def clip() -> torch.Tensor:
        k[0] += 1
        return inputs[k[0] % len(inputs)]

    if pass_ != "training":

        def call():
            module.eval()
            with torch.inference_mode(), autocast:
                return runner(clip())

        return call
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step():
        module.train()
        with autocast:
            local, global_ = runner(clip())
            loss = F.cross_entropy(local.float(), labels) + F.cross_entropy(global_.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _isolated_candidate(spec: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Candidate ``spec["candidate"]`` of pass ``spec["pass"]`` built in this (spawned) process as :func:`run_bench`
    builds it in its own (:func:`_models`, the same seeded weights; :func:`pass_call`), warmed up and its peak
    memory measured: (its call, ``{"warmup_s", "peak_memory_bytes"}``) for :func:`time_isolated`."""
    dev = torch.device(spec["device"])
    name, pass_ = spec["candidate"], spec["pass"]
    module, runner, layout = _models(spec["model"], spec["num_classes"], dev, [name], spec["compile_mode"])[name]
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(spec["shape"], generator=gen) for _ in range(2)]  # not zeros
    labels = torch.randint(0, spec["num_classes"], (spec["shape"][0],), generator=gen).to(dev)
    if spec["dtype"] == "bf16-weights":
        module.to(torch.bfloat16)
        clips = [c.to(torch.bfloat16) for c in clips]
    if spec["channels_last"]:
        module.to(memory_format=torch.channels_last_3d)
        layout = torch.channels_last_3d
    inputs = [c.to(dev).contiguous(memory_format=layout) for c in clips]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
    call = pass_call(pass_, module, runner, inputs, labels, autocast)
    if dev.type == "cuda":  # time_isolated times each call on the host clock: each ends when the device is done
        run = call

        def call():
            out = run()
            torch.cuda.synchronize(dev)
            return out

    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):  # compiles, records, warms the allocator
        call()
    warmup_s = time.perf_counter() - t0
    return call, {"warmup_s": warmup_s, "peak_memory_bytes": _peak_memory(call, dev)}


def _time_passes_isolated(spec, shapes, per_pass, repeats, warmup, bar) -> tuple[dict, dict]:
    """pass -> (samples, warm-up seconds) and pass -> peak memory per candidate, each candidate of each pass built
    and timed in a process of its own (:func:`time_isolated`), one pass after another."""
    timings, memory = {}, {}
    for pass_, names in per_pass.items():
        args = {**spec, "pass": pass_, "shape": shapes[pass_], "warmup": warmup}
        builders = {n: (_isolated_candidate, ({**args, "candidate": n},)) for n in names}

        def progress(message: str, pass_=pass_) -> None:
            bar.set_description(f"bench {pass_}: {message}")
            if message.startswith("round"):
                bar.update(1)

        samples, infos = time_isolated(builders, repeats=repeats, warmup=1, progress=progress)
        timings[pass_] = (samples, {n: info["warmup_s"] for n, info in infos.items()})
        memory[pass_] = {n: info["peak_memory_bytes"] for n, info in infos.items()}
    return timings, memory


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
    warmup: int = 2,
    compile_mode: str | None = None,
    channels_last: bool = False,
    progress: bool = True,
    isolated: bool = False,
) -> dict[str, Any]:
    """Times ``candidates`` on ``passes``; returns the result dict (see the module docstring). ``channels_last``:
    every clip (not only the channels-last candidates') and every model in channels_last_3d. ``isolated``: each
    candidate of each pass built, warmed up, measured for memory and timed in a process of its own, the
    processes taking turns (:func:`time_isolated`); otherwise every candidate in this process, interleaved."""
    from tqdm.auto import tqdm

    unknown = [c for c in candidates if c not in CANDIDATES] + [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown candidates/passes {unknown}; candidates: {CANDIDATES}, passes: {PASSES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(f'{k} ({v})' for k, v in DTYPES.items())}, got {dtype!r}")
    if dtype == "bf16-weights" and "training" in passes:
        raise ValueError("dtype bf16-weights (--dtype bf16-weights) times inference only, not the training pass (a "
                         "training step keeps float32 master weights: --dtype bf16 trains under autocast); pass "
                         "--passes inference,latency")  # fmt: skip
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"repeats >= 1, warmup >= 0 and batch >= 1 are needed (got {repeats}, {warmup}, {batch})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    gen = torch.Generator().manual_seed(0)
    shapes = {"inference": (batch, 3, frames, size, size), "training": (batch, 3, frames, size, size),
              "latency": (1, 3, frames, size, size)}  # fmt: skip
    clips = {p: [torch.randn(shapes[p], generator=gen).to(dev) for _ in range(2)] for p in passes}  # not zeros
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    names = list(dict.fromkeys(candidates))
    models = _models(model, num_classes, dev, _built_here(names, dtype, passes, isolated), compile_mode)
    float32_model = None
    if dtype == "bf16-weights":  # (torch.compile traces on the first call, so the compiled runners see bfloat16)
        ref_name = _accuracy_reference(models)
        float32_model = copy.deepcopy(models[ref_name][0]) if ref_name else None  # what _bf16_logits_error compares
        clips = {p: [c.to(torch.bfloat16) for c in cs] for p, cs in clips.items()}
        for module, _, _ in models.values():
            module.to(torch.bfloat16)
    if channels_last:
        for module, _, _ in models.values():
            module.to(memory_format=torch.channels_last_3d)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    peaks = [conv_peak(dev, dtype)]
    flops = {}
    if names:  # counted on a plain reference: a fast model's first call at a shape measures its plan, every trial
        from .models import create_model  # through its modules' hooks

        plain = create_model(model, num_classes, classifier="two_heads")
        flops = {p: model_flops(plain, clips[p][0][:1].float().cpu()) * shapes[p][0] for p in passes}
    results: dict[str, Any] = {}
    memory_calls: dict[str, dict] = {}
    timings: dict[str, tuple] = {}
    per_pass = {p: [c for c in names if not (p == "training" and c in INFERENCE_ONLY)] for p in passes}
    if isolated:
        spec = {"model": model, "num_classes": num_classes, "device": str(dev), "compile_mode": compile_mode,
                "dtype": dtype, "channels_last": channels_last}  # fmt: skip
        bar = tqdm(total=len(passes) * repeats, desc="bench", unit="round", disable=not progress)
        timings, isolated_memory = _time_passes_isolated(spec, shapes, per_pass, repeats, max(warmup, 1), bar)
    else:
        total = sum(len(names) * (repeats + max(warmup, 1) + 1) for names in per_pass.values())
        bar = tqdm(total=total, desc="bench", unit="call", disable=not progress)
        for pass_ in passes:
            calls: dict[str, Callable[[], Any]] = {}
            for name in per_pass[pass_]:
                module, runner, layout = models[name]
                fmt = torch.channels_last_3d if channels_last else layout
                inputs = [c.contiguous(memory_format=fmt) for c in clips[pass_]]
                calls[name] = pass_call(pass_, module, runner, inputs, labels, autocast)
            samples, first_call = time_interleaved(  # the warm-up compiles and warms the allocator
                calls, repeats=repeats, warmup=max(warmup, 1), device=dev, progress=bar.update
            )
            memory_calls[pass_] = calls
            timings[pass_] = (samples, first_call)
    peaks.append(conv_peak(dev, dtype))  # again at the end: the machine's load may have changed
    peak = max(p["gflops_per_s"] for p in peaks)
    floors = _conv_floors(plain, dev, clips, passes, autocast, repeats) if names else {}  # (the FLOPs' reference)
    for pass_ in passes:  # peak memory after the timings (malloc_trim makes the next call fault its pages in)
        if isolated:  # measured in each candidate's own process, before its timings
            memory = isolated_memory[pass_]
        else:
            calls = memory_calls[pass_]
            memory = {name: _peak_memory(call, dev) for name, call in calls.items()}
            bar.update(len(calls))
        samples, first_call = timings[pass_]
        rows = {}
        for name in per_pass[pass_]:
            timing = percentiles(samples[name])
            share = flops[pass_] / timing["median_s"] / 1e9 / peak if pass_ != "training" else None
            floor = floors.get(pass_, {}).get("seconds")
            floor_share = None if floor is None else floor / timing["median_s"]
            rows[name] = {**timing, "clips_per_s": shapes[pass_][0] / timing["median_s"],
                          "conv_peak_share": share, "conv_floor_share": floor_share,
                          "peak_memory_bytes": memory[name], "warmup_s": first_call[name]}  # fmt: skip
        results[pass_] = rows
    bar.close()
    accuracy = None
    if dtype != "fp32":
        accuracy = _bf16_logits_error(models, clips, passes, autocast, float32_model)
    return {
        "benchmark": "lgd-fast bench",
        "model": model,
        "input": list(shapes["inference"]),
        "dtype": dtype,
        "device": dev.type,
        "machine": machine_info(dev),
        "settings": {"repeats": repeats, "warmup": warmup, "compile_mode": compile_mode, "channels_last": channels_last,
                     "threads": torch.get_num_threads(), "candidates": list(candidates),
                     "passes": list(passes), "isolated": isolated},  # fmt: skip
        "conv_peak": {"gflops_per_s": peak, "measurements": peaks},
        "conv_floor": floors,
        "model_gflops": {p: f / 1e9 for p, f in flops.items()},
        "accuracy": accuracy,
        "activation_arena": arena_stats().as_dict() if dev.type == "cpu" and extension_available() else None,
        "results": results,
        "target_check": check_targets(results, model, shapes["inference"], dtype, dev.type, channels_last, accuracy,
                                      floors),
        "notes": [
            "candidates share the reference's weights; compiled = torch.compile(model, dynamic=False) (inductor); "
            "_freezing: with torch._inductor.config.freezing = True (inference passes only); reference_compiled_"
            "freezing compiles the channels-last reference",
            "channels-last candidates get channels_last_3d clips (converted before timing); the others contiguous "
            "ones, unless settings.channels_last",
            "inference: eval, torch.inference_mode; latency: the same at batch 1; training: forward, cross-entropy "
            "of both heads, backward, SGD step (momentum 0.9); bf16: torch.autocast; bf16-weights: every model cast "
            "to bfloat16 and its clips in bfloat16, no autocast (inference passes only)",
            "weights: one reference made under seed 0 and trained_like (BatchNorm statistics and affine as a trained "
            "model has them, fc6's weight non-zero), loaded into every candidate",
            "accuracy (bf16 runs): the fast model's and the reference's logits in bf16 against the float32 reference "
            "(bf16-weights: the float32 model the weights were cast from), max error over the largest logit, and "
            "both against its float64 copy by relative error",
            "latency percentiles over interleaved calls (a round calls every candidate once, rotating order)"
            if not isolated else "isolated: each candidate of each pass built, warmed up, measured for memory and "
            "timed in a process of its own (time_isolated); the processes take turns of 2 back-to-back calls, the "
            "first left out, 50 ms apart, the order rotating each round",
            "fast: eager CPU work in the activation arena (lgd_fast.arena; training: forward and backward), "
            "inference as its recorded program (lgd_fast.recorded: recorded on its second call, a warm-up call); "
            "fast_not_recorded: every call through its layers' Python; fast_no_arena: without the arena; "
            "activation_arena: the pool's counters after the timings; peak memory: the arena's free blocks "
            "released before each measured call, so it counts the blocks the call takes",
            "conv_peak_share: model_gflops / median_s / conv_peak.gflops_per_s (the larger of two measurements of "
            "the device's own channels-last 1x3x3 conv, before and after the timings)",
            "conv_floor: per pass, the model's own convolutions alone (each distinct call timed on its own on random "
            "channels-last data, oneDNN with a packed weight for CPU inference; training: forward and backward), "
            "summed over one forward's calls; conv_floor_share: conv_floor.seconds / median_s; a speedup target's "
            "bound: the other candidate's median over the floor (what a model of nothing but these convs would reach)",
            "peak_memory_bytes: CUDA max_memory_allocated over one call minus what was allocated before it; "
            "CPU: the process's peak resident memory during one call (VmHWM, reset just before, after "
            "malloc_trim gave freed heap memory back) minus the resident memory before it",
        ],
    }


def _built_here(names: list[str], dtype: str, passes: Sequence[str], isolated: bool) -> list[str]:
    """The candidates :func:`run_bench` builds in its own process: all of them, or with ``isolated`` (each timed
    candidate built in a process of its own) only what the bf16 accuracy compares, the fast model and its eager
    reference (:func:`_bf16_logits_error`: bf16 runs with an inference pass)."""
    if not isolated:
        return names
    if dtype == "fp32" or "fast" not in names or "inference" not in passes:
        return []
    return [c for c in ("fast", _accuracy_reference(names)) if c is not None]


def _accuracy_reference(models) -> str | None:
    """The candidate whose logits the bf16 accuracy is measured against: the eager reference, contiguous or
    channels-last (None if neither runs)."""
    return next((c for c in ("reference", "reference_channels_last") if c in models), None)


@contextlib.contextmanager
def _exact_float32():
    """float32 convolutions and matmuls without tf32 inside (CUDA's defaults allow it in cuDNN's convs); the
    switches are restored after. No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _bf16_logits_error(models, clips, passes, autocast, float32_model=None) -> dict[str, Any] | None:
    """The fast model's logits in bf16 (under autocast, or with bf16 weights: then ``float32_model`` is the float32
    model they were cast from) against the float32 reference's on the same clip: the largest absolute difference
    over the largest float32 logit, per head; the reference's own in bf16 by the same measure; and both against
    the float64 reference by relative error (norm), with their ratio: STYLE.md's rule is at most 2x plain
    PyTorch's error at the same dtype."""
    if "fast" not in models or "inference" not in passes:
        return None
    ref_name = _accuracy_reference(models)
    if ref_name is None:
        return None
    fast, ref = models["fast"][0].eval(), models[ref_name][0].eval()
    x = clips["inference"][0]
    float32_ref = ref if float32_model is None else float32_model.eval()
    x32 = x.float()  # bf16-weights: the bfloat16 clip, exactly, in float32
    heads_of = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731  (eval: one or both heads)
    with torch.inference_mode():
        with _exact_float32():  # the float32 yardstick in float32, not tf32 (cuDNN's default on CUDA)
            want = heads_of(float32_ref(x32))
        with autocast:
            got, ref_bf16 = heads_of(fast(x)), heads_of(ref(x))
        exact = heads_of(copy.deepcopy(float32_ref).double()(x32.double()))
    heads = ("local", "global") if len(want) == 2 else ("logits",)

    def max_error(outs):
        pairs = zip(heads, outs, want, strict=True)
        return {h: ((o.float() - w).abs().max() / w.abs().max()).item() for h, o, w in pairs}

    def relative(outs):
        return {h: ((o.double() - e).norm() / e.norm()).item() for h, o, e in zip(heads, outs, exact, strict=True)}

    errors, ref_errors = max_error(got), max_error(ref_bf16)
    fast_rel, ref_rel = relative(got), relative(ref_bf16)
    ratio = {h: fast_rel[h] / ref_rel[h] for h in heads}
    vs_fp64 = {"fast": fast_rel, "reference": ref_rel, "fast_over_reference": ratio}
    return {"logits_max_error_vs_fp32": max(errors.values()), "per_head": errors, "against": ref_name,
            "reference_bf16_max_error_vs_fp32": max(ref_errors.values()), "reference_per_head": ref_errors,
            "relative_error_vs_fp64": vs_fp64}  # fmt: skip


def check_targets(
    results: dict,
    model: str,
    shape: Sequence[int],
    dtype: str,
    device: str,
    channels_last: bool = False,
    accuracy: dict | None = None,
    floors: dict | None = None,
) -> list[dict]:
    """The targets (:data:`TARGETS`: R50, 16x112x112, batch 4 on the CPU, per dtype) and the measured values;
    ``met`` is True or False where the target applies to this setting, None (not judged) elsewhere. With the
    passes' conv ``floors`` (:func:`conv_floor`), a speedup target also gets its ``bound``: the other candidate's
    median over the floor, the speedup a model that ran nothing but its convolutions would reach (a target above
    it needs faster convolutions, not less overhead)."""
    applies = model == "lgd3d_r50" and list(shape) == [4, 3, 16, 112, 112] and device == "cpu"
    applies = applies and not channels_last
    checks = []
    for pass_, targets in TARGETS.get(dtype, {}).items():
        rows = results.get(pass_, {})
        if "fast" not in rows:
            continue
        for metric, target in targets.items():
            extra = {}
            if metric == "conv_peak_share":
                value = rows["fast"].get("conv_peak_share")
                met = value is not None and value >= target
            elif metric == "logits_max_error_vs_fp32":
                value = None if accuracy is None else accuracy[metric]
                met = value is not None and value <= target
            elif metric.startswith("speedup_vs_"):
                other = metric.removeprefix("speedup_vs_")
                if other not in rows:
                    continue
                value = rows[other]["median_s"] / rows["fast"]["median_s"]
                met = value >= target
                floor = (floors or {}).get(pass_, {}).get("seconds")
                if floor:
                    extra = {"bound": rows[other]["median_s"] / floor}
                    if floors[pass_].get("seconds_min"):  # every conv at its fastest call
                        extra["bound_max"] = rows[other]["median_s"] / floors[pass_]["seconds_min"]
            else:
                other = metric.removeprefix("peak_memory_vs_")
                a, b = rows["fast"].get("peak_memory_bytes"), rows.get(other, {}).get("peak_memory_bytes")
                if not a or not b:
                    continue
                value = a / b
                met = value <= target
            if value is None:
                continue
            checks.append({"pass": pass_, "metric": metric, "target": target, "measured": value,
                           "met": met if applies else None,
                           "target_applies_to_this_setting": applies, **extra})  # fmt: skip
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
    what a run writes, not what it runs). Where there is no git checkout (a copy of the working tree without
    ``.git``, as the GPU machine gets), ``$LGD_FAST_COMMIT`` names the commit the copy was made from, recorded as
    said (``"commit_from": "LGD_FAST_COMMIT"``, dirty unknown); else the commit is None."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    unknown = {"commit": None, "dirty": None}
    if os.environ.get("LGD_FAST_COMMIT"):
        unknown = {"commit": os.environ["LGD_FAST_COMMIT"], "dirty": None, "commit_from": "LGD_FAST_COMMIT"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], cwd=root,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return unknown
    if commit.returncode != 0:
        return unknown
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def plot_bench(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """A bar chart per pass: clips/s of every candidate (higher is faster), each bar labelled with its share of the
    measured conv peak, a dashed line where the conv peak would put the model (its FLOPs at that rate) and a dotted
    one where its convolutions alone would (the conv floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(payload["results"])
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.4), squeeze=False)
    colors = {"reference": "tab:gray", "reference_channels_last": "silver", "reference_compiled": "tab:orange",
              "reference_channels_last_compiled": "gold", "reference_compiled_freezing": "tab:red",
              "fast": "tab:blue", "fast_no_arena": "lightsteelblue", "fast_not_recorded": "tab:cyan",
              "fast_compiled": "tab:green", "fast_compiled_freezing": "tab:olive"}  # fmt: skip
    peak = payload.get("conv_peak", {}).get("gflops_per_s")
    for ax, pass_ in zip(axes[0], passes, strict=True):
        rows = payload["results"][pass_]
        names = list(rows)
        values = [rows[n]["clips_per_s"] for n in names]
        bars = ax.bar(range(len(names)), values, color=[colors.get(n, "tab:purple") for n in names])
        for bar_, name, v in zip(bars, names, values, strict=True):
            share = rows[name].get("conv_peak_share")
            label = f"{v:.2f}" + ("" if share is None else f"\n{share:.0%}")
            ax.annotate(label, (bar_.get_x() + bar_.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        clips = payload["input"][0] if pass_ != "latency" else 1  # latency: batch 1
        floor = payload.get("conv_floor", {}).get(pass_)
        if floor:  # what the model's convolutions alone would allow
            ax.axhline(clips / floor["seconds"], color="tab:red", linestyle=":", linewidth=0.8)
            ax.annotate(f"convs alone {floor['seconds'] * 1e3:.0f} ms", (len(names) - 1, clips / floor["seconds"]),
                        fontsize=7, va="bottom", ha="right")  # fmt: skip
        gflops = payload.get("model_gflops", {}).get(pass_)
        if peak and gflops and pass_ != "training":
            ax.axhline(peak / gflops * clips, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(f"conv peak {peak:.0f} GFLOP/s", (0, peak / gflops * clips), fontsize=7, va="bottom")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
        ax.set_title(f"{pass_}: clips/s (higher is faster)" + ("" if pass_ == "training" else "; % of conv peak"),
                     fontsize=9)  # fmt: skip
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
