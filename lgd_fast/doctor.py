"""What can run here, and do the Triton kernels compile for the GPUs we target (no GPU needed).

``report()`` says which backends are available and, for each one that is not, why (extension import
error, triton missing, no CUDA device, no nvcc). ``aot_compile()`` compiles every Triton kernel in
``lgd_fast.kernels`` ahead of time for given targets (``sm_90a``, ``sm_80``) with triton's own compiler
and bundled ``ptxas``, and returns one row per kernel, block config and target with registers, spills
and shared memory. ``format_report`` / ``format_rows`` turn both into text for ``lgd-fast doctor``.
"""

from __future__ import annotations

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


def _ptxas(capability: int) -> str:
    # The ptxas triton itself uses for this capability (3.9 keeps a newer one for sm_90+; 3.6 has one).
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(capability)
    except TypeError:
        tool = compiler.get_ptxas()
    return tool.path


def _ptxas_usage(ptxas: str, ptx: str, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{text}")
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{text}")
    return {"registers": int(regs.group(1)), "spill_stores": int(stores.group(1)), "spill_loads": int(loads.group(1))}


def aot_compile(targets=("sm_90a", "sm_80"), dtypes=("bf16",)) -> list[dict]:
    """Compiles every Triton kernel (every autotune config) for each target, without a GPU.

    Args:
        targets: e.g. ``("sm_90a", "sm_80")``; Triton emits ``sm_90a`` for capability 90.
        dtypes: Triton element types of the large tensors (``"fp32"``, ``"bf16"``, ``"fp16"``).

    Returns:
        One dict per kernel, config, dtype and target: ``kernel``, ``config``, ``num_warps``, ``dtype``,
        ``target``, ``arch`` (the PTX target), ``registers``, ``spill_stores``, ``spill_loads`` (bytes, from
        ``ptxas -v`` on the kernel's PTX), ``shared_bytes`` (Triton's shared memory), ``seconds``.

    Raises:
        RuntimeError: triton is missing, or a kernel fails to compile (names the kernel and target).
    """
    if _backend.triton_error() is not None:
        raise RuntimeError(f"aot_compile: {_backend.triton_error()}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lgd_fast.kernels import diffusion_epilogue, global_update, p3d_conv

    kernels = {**diffusion_epilogue.AOT_KERNELS, **global_update.AOT_KERNELS, **p3d_conv.AOT_KERNELS}
    rows = []
    for target in targets:
        gpu = GPUTarget("cuda", _capability(target), 32)
        ptxas = _ptxas(_capability(target))
        for name, (kernel, args, configs, *for_dtypes) in kernels.items():
            for dtype in dtypes:
                if for_dtypes and dtype not in for_dtypes[0]:  # configs made for other element types
                    continue
                for constexprs, num_warps, *stages in configs:
                    signature = {}
                    for arg in kernel.arg_names:
                        if arg in args:
                            signature[arg] = args[arg].format(t=dtype)
                        else:
                            signature[arg] = "constexpr" if arg in constexprs else "i32"
                    config = ",".join(f"{k}={v}" for k, v in constexprs.items())
                    start = time.perf_counter()
                    try:
                        compiled = triton.compile(
                            ASTSource(kernel, signature, constexprs=dict(constexprs)),
                            target=gpu,
                            options={
                                "num_warps": num_warps,
                                "num_stages": stages[0] if stages else 3,
                                "enable_fp_fusion": True,
                            },
                        )
                        arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
                        usage = _ptxas_usage(ptxas, compiled.asm["ptx"], arch)
                    except Exception as exc:
                        raise RuntimeError(
                            f"aot_compile: {name} [{config}, {num_warps} warps, {dtype}] failed for {target}: {exc}"
                        ) from exc
                    rows.append(
                        {
                            "kernel": name,
                            "config": config,
                            "num_warps": num_warps,
                            "dtype": dtype,
                            "target": target,
                            "arch": arch,
                            **usage,
                            "shared_bytes": int(compiled.metadata.shared),
                            "seconds": round(time.perf_counter() - start, 2),
                        }
                    )
    return rows


def format_rows(rows: list[dict]) -> str:
    """``aot_compile()`` rows as a fixed-width table."""
    cols = ["kernel", "config", "num_warps", "dtype", "target", "registers", "spill_stores", "spill_loads"]
    cols.append("shared_bytes")
    table = [cols] + [[str(row[c]) for c in cols] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table)
