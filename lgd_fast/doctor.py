"""What can run here, and do the Triton kernels compile for the GPUs we target (no GPU needed).

``report()`` says which backends are available and, for each one that is not, why (extension import
error, triton missing, no CUDA device, no nvcc). ``aot_compile()`` compiles every Triton kernel in
``lgd_fast.kernels`` ahead of time for given targets (``sm_90a``, ``sm_80``) as the JIT would on that GPU: the
JIT's own specialisation of a typical launch's arguments (16-byte aligned pointers, integers divisible by 16
marked so), the autotuner's options, Triton's compiler with its own ptxas and ptxas options. It returns one row
per kernel, block config, element type (fp32 both exact and tf32) and target with what Triton's cubin holds,
read with Triton's cuobjdump: registers, spills (bytes of local stores/loads), stack and shared memory, whether
the GEMM runs on ``wgmma`` (Hopper), ``mma`` (mma.sync) or FMA units, and the widths of its global loads.
``format_report`` / ``format_rows`` turn both into text for ``lgd-fast doctor``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
import time

import torch

from lgd_fast.ops import _backend

__all__ = ["aot_compile", "format_report", "format_rows", "report"]


def _nvcc() -> tuple[str | None, str | None]:
    path = shutil.which("nvcc")
    if path is None:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
        candidate = os.path.join(home, "bin", "nvcc") if home else None
        path = candidate if candidate and os.path.exists(candidate) else None
    if path is None:
        return None, None
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"release ([\d.]+)", text)
        return path, match.group(1) if match else text.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError) as exc:
        return path, f"unknown ({exc})"


def report() -> dict:
    """Versions, devices and backends, as a flat-ish dict of strings/bools ready to print or dump to JSON.

    Keys: ``torch``, ``torch_cuda`` (CUDA version torch was built with, or None), ``cuda_device`` (name
    or None), ``triton`` (version or None), ``triton_interpret``, ``nvcc`` / ``nvcc_version``,
    ``extensions`` ({module: "ok" or the import error}), and ``backends``: {device: {backend: "ok" or why not}}.
    """
    import importlib.metadata

    try:
        triton_version = None if _backend.triton_error() else importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    has_cuda = torch.cuda.is_available()
    nvcc, nvcc_version = _nvcc()
    devices = ["cpu", "cuda"]
    backends = {}
    for device in devices:
        row = {}
        for backend in _backend.BACKENDS:
            reason = _backend.backend_unavailable_reason(backend, device)
            if reason is None and device == "cuda" and not has_cuda:
                reason = (
                    "no CUDA device is visible"
                    if torch.version.cuda is not None
                    else "this torch is a CPU-only build (torch.version.cuda is None)"
                )
            row[backend] = "ok" if reason is None else reason
        backends[device] = row
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if has_cuda else None,
        "triton": triton_version,
        "triton_interpret": _backend._interpreting_triton(),
        "nvcc": nvcc,
        "nvcc_version": nvcc_version,
        "extensions": {
            "lgd_fast._C": _backend.extension_error() or "ok",
            "lgd_fast._C_cuda": _backend.cuda_extension_error() or "ok",
        },
        "backends": backends,
    }


def format_report(info: dict | None = None) -> str:
    """``report()`` as aligned text lines."""
    info = report() if info is None else info
    lines = [
        f"torch            {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"CUDA device      {info['cuda_device'] or 'none'}",
        f"triton           {info['triton'] or 'not installed'}"
        + (" (interpreter)" if info["triton_interpret"] else ""),
        f"nvcc             {info['nvcc'] or 'not found'}" + (f" ({info['nvcc_version']})" if info["nvcc"] else ""),
    ]
    lines += [f"{name:<16} {state}" for name, state in info["extensions"].items()]
    for device, row in info["backends"].items():
        lines.append(f"backends on {device}:")
        lines += [f"  {backend:<10} {state}" for backend, state in row.items()]
    return "\n".join(lines)


def _capability(target: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", target.strip())
    if match is None:
        raise ValueError(f"target {target!r} is not of the form sm_80 / sm_90a")
    return int(match.group(1))


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _jit_source(kernel, args: dict, constexprs: dict, num_warps: int, num_stages, dtype: str, backend):
    """(ASTSource, options, attrs) as ``kernel[grid](...)`` makes them for a launch with these arguments.

    Runs the JIT's own binder (``create_function_from_signature``) and ``JITFunction._pack_args`` on the
    arguments, the tensors stood in by triton's ``MockTensor`` (a 16-byte aligned address, as every tensor the
    launchers pass): pointers and integers that are multiples of 16 get ``tt.divisibility = 16``, an integer 1
    becomes a constant, as on a GPU. The keyword arguments are those the autotuner and ``JITFunction.run`` add.
    """
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(kernel, "_pack_args"):
        raise RuntimeError(
            f"triton {triton.__version__} has no create_function_from_signature / JITFunction._pack_args to "
            "specialise the kernels as its JIT does (written against triton 3.6 and 3.9)"
        )
    values = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name not in args:
            raise RuntimeError(f"the AOT spec gives no launch value for argument {name!r}")
        value = args[name]
        if isinstance(value, str):  # a tensor: "*{t}" or "*fp32"
            values[name] = jit.MockTensor(_TORCH_DTYPES[value.format(t=dtype).lstrip("*")])
        else:
            values[name] = value
    stages = {} if num_stages is None else {"num_stages": num_stages}
    config = triton.Config(dict(constexprs), num_warps=num_warps, **stages)
    kwargs = {**config.all_kwargs(), "debug": kernel.debug or knobs.runtime.debug}
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (3.6: the first)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**values, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, attrs


# Bits a SASS global load / local store moves, by its size suffix (none: 32 bits).
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


def _bits(opcode: str) -> int:
    return next((_WIDTHS[part] for part in opcode.split(".")[1:] if part in _WIDTHS), 32)


def _cubin_usage(cubin: bytes, has_dot: bool) -> dict:
    """Registers, spills, stack, the GEMM's instructions and the global load widths of one kernel's cubin."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", "--dump-sass", path],
            capture_output=True,
            text=True,
            timeout=300,
        )
    text = done.stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if done.returncode != 0 or usage is None:
        raise RuntimeError(f"cuobjdump could not read the cubin:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ops = _OPCODE.findall(text)
    roots = {op.split(".")[0] for op in ops}
    if "HGMMA" in roots:
        mma = "wgmma"
    elif "HMMA" in roots:
        mma = "mma"
    else:
        mma = "fma" if has_dot else "-"
    return {
        "registers": int(usage.group(1)),
        "spill_stores": sum(_bits(op) for op in ops if op.split(".")[0] == "STL") // 8,
        "spill_loads": sum(_bits(op) for op in ops if op.split(".")[0] == "LDL") // 8,
        "stack_bytes": int(usage.group(2)),
        "mma": mma,
        "load_bits": sorted({_bits(op) for op in ops if op.split(".")[0] in ("LDG", "LDGSTS")}),
    }


def _compile(kernel, args: dict, constexprs: dict, num_warps: int, num_stages, dtype: str, target: str):
    """Compiles one kernel for ``target`` as its JIT would: (row fields known from the compile, cubin, has a dot)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    gpu = GPUTarget("cuda", _capability(target), 32)
    src, options, attrs = _jit_source(kernel, args, constexprs, num_warps, num_stages, dtype, make_backend(gpu))
    compiled = triton.compile(src, target=gpu, options=options.__dict__)
    fields = {
        "num_stages": options.num_stages,
        "arch": re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1),
        "shared_bytes": int(compiled.metadata.shared),
        "divisible": [kernel.arg_names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr],
    }
    return fields, compiled.asm["cubin"], "tt.dot" in compiled.asm["ttir"]


def _build(kernel, args: dict, constexprs: dict, num_warps: int, num_stages, dtype: str, target: str) -> dict:
    """One kernel built as its JIT would for ``target``, and what its cubin holds (the fields of a row)."""
    fields, cubin, has_dot = _compile(kernel, args, constexprs, num_warps, num_stages, dtype, target)
    return {**fields, **_cubin_usage(cubin, has_dot)}


def _aot_builds(targets, dtypes):
    """(target, name, kernel, args, constexprs, warps, stages or None, dtype) of every build ``aot_compile`` makes."""
    from lgd_fast.kernels import diffusion_epilogue, global_update, p3d_conv

    kernels = {**diffusion_epilogue.AOT_KERNELS, **global_update.AOT_KERNELS, **p3d_conv.AOT_KERNELS}
    for target in targets:
        for name, (kernel, args, configs, *for_dtypes) in kernels.items():
            for dtype in dtypes:
                if for_dtypes and dtype not in for_dtypes[0]:  # configs made for other element types
                    continue
                for constexprs, num_warps, *stages in configs:
                    yield target, name, kernel, args, constexprs, num_warps, stages[0] if stages else None, dtype


def aot_compile(targets=("sm_90a", "sm_80"), dtypes=("bf16",)) -> list[dict]:
    """Compiles every Triton kernel (every autotune config) for each target as its JIT would, without a GPU.

    Each build is the one ``kernel[grid](...)`` makes at a typical launch (the kernel module's ``AOT_KERNELS``
    gives the arguments: an lgd3d_r50 shape): the JIT's own specialisation (16-byte aligned pointers and
    integers divisible by 16 marked ``tt.divisibility``), the autotuner's options, then ``triton.compile`` with
    Triton's own ptxas and options. What is reported is read from that cubin with Triton's bundled cuobjdump.

    Args:
        targets: e.g. ``("sm_90a", "sm_80")``; Triton emits ``sm_90a`` for capability 90.
        dtypes: element types of the large tensors (``"fp32"``, ``"bf16"``, ``"fp16"``); ``"fp32"`` builds both
            the exact-fp32 kernels and, where a kernel has them, their tf32 variants (what runs under
            ``torch.backends.cudnn.allow_tf32``, on by default).

    Returns:
        One dict per kernel, config, dtype and target: ``kernel``, ``config`` (the tile), ``constexprs`` (all),
        ``num_warps``, ``num_stages``, ``dtype``, ``tf32`` (the GEMM on tf32 tensor cores), ``target``, ``arch``
        (the PTX target), ``registers``, ``spill_stores`` / ``spill_loads`` (bytes of STL / LDL in the SASS:
        ptxas' spills), ``stack_bytes``, ``shared_bytes`` (the shared memory the launch asks for), ``mma``
        (``"wgmma"``: Hopper warpgroup MMA, ``"mma"``: mma.sync, ``"fma"``: the dot on FMA units, ``"-"``: no
        dot), ``load_bits`` (widths of its global loads: 128 where vectorised), ``divisible`` (the arguments
        the JIT marked divisible by 16), ``seconds`` (the compile).

    Raises:
        RuntimeError: triton is missing, or a kernel fails to compile (names the kernel and target).
    """
    if _backend.triton_error() is not None:
        raise RuntimeError(f"aot_compile: {_backend.triton_error()}")
    for target in targets:
        _capability(target)  # a bad target fails before any compile
    builds = []  # (row so far, what failed if it fails, the cubin's usage being read)
    # Compiles run one after the other; reading each cubin's SASS (a third of a second) overlaps them.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for target, name, kernel, args, constexprs, num_warps, num_stages, dtype in _aot_builds(targets, dtypes):
            config = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
            what = f"{name} [{config}, {num_warps} warps, {dtype}] failed for {target}"
            start = time.perf_counter()
            try:
                fields, cubin, has_dot = _compile(kernel, args, constexprs, num_warps, num_stages, dtype, target)
            except Exception as exc:
                raise RuntimeError(f"aot_compile: {what}: {exc}") from exc
            row = {
                "kernel": name,
                "config": config,
                "constexprs": dict(constexprs),
                "num_warps": num_warps,
                "num_stages": fields.pop("num_stages"),
                "dtype": dtype,
                "tf32": dtype == "fp32" and bool(constexprs.get("TF32", False)),
                "target": target,
                "arch": fields.pop("arch"),
                **fields,
                "seconds": round(time.perf_counter() - start, 2),  # the compile
            }
            builds.append((row, what, pool.submit(_cubin_usage, cubin, has_dot)))
    rows = []
    for row, what, usage in builds:
        try:
            rows.append({**row, **usage.result()})
        except Exception as exc:
            raise RuntimeError(f"aot_compile: {what}: {exc}") from exc
    return rows


def format_rows(rows: list[dict]) -> str:
    """``aot_compile()`` rows as a fixed-width table."""
    cols = ["kernel", "config", "num_warps", "num_stages", "dtype", "target", "registers", "spill_stores"]
    cols += ["spill_loads", "shared_bytes", "mma", "load_bits"]
    text = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    table = [cols] + [[text(row[c]) for c in cols] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table)
