"""The GPU backends of diffusion_epilogue, checked on a machine without a GPU.

(a) The Triton kernels under ``TRITON_INTERPRET=1`` on the CPU, through the registered op and its autograd:
    forward (out, mean) and all five gradients against an fp64 reference, fp32 tight, bf16/fp16 within 2x
    the error of the plain PyTorch composite at that dtype, poisoned allocations. The interpreter must be on
    before triton is imported, so these run in a subprocess (this file run as a script) and the test
    functions here check its results; other test modules keep the compiled kernels.
(b) Every Triton kernel compiles ahead of time for sm_80 and sm_90a with no register spills.
(c) Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90a with no spills (started first, in the
    background, since it is the slowest check).
Plus the backend choice that needs no GPU: what ``auto`` and explicit requests do on CPU tensors.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_TRITON = importlib.util.find_spec("triton") is not None
NVCC = shutil.which("nvcc")
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (N, C, T, H, W): batch 1 and 2, odd T/H/W, odd channel counts (65 > every channel tile), and L = 1125 > the
# 1024-value stretch, so that the forward and backward sum partials of two stretches.
SHAPES = [(1, 3, 1, 7, 7), (2, 5, 3, 9, 9), (1, 65, 1, 9, 9), (1, 3, 5, 15, 15)]
FORMATS = ("contiguous", "channels_last_3d")
DTYPES = ("float32", "bfloat16", "float16")
NAMES = ["out", "mean", "grad_r", "grad_s", "grad_d", "grad_scale", "grad_shift"]
CASES = [(s, f, d) for s in SHAPES for f in FORMATS for d in DTYPES]


def _case_id(shape, fmt, dtype) -> str:
    return f"{'x'.join(map(str, shape))}-{fmt}-{dtype}"


# ---- (a) the interpreter run (this file as a script, TRITON_INTERPRET=1) ------------------------------


def _interpreted_checks() -> dict:
    """Runs every case through ``diffusion_epilogue(backend="triton")``; returns {case id: per-output rows}."""
    from lgd_fast.ops import diffusion_epilogue, diffusion_epilogue_reference
    from lgd_fast.ops.diffusion_epilogue import _TRITON_REGISTERED
    from op_testing import SEED, random_input

    assert _TRITON_REGISTERED, "the triton op did not register"
    fmts = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # fresh allocations are NaN: unwritten shows

    def run(fn, inputs, gout, gmean):
        out, mean = fn(*inputs)
        grads = torch.autograd.grad((out * gout.to(out.dtype)).sum() + (mean * gmean.to(mean.dtype)).sum(), inputs)
        return [out, mean, *grads]

    def composite(r, s, d, scale, shift):  # what a user writes at r's dtype: the yardstick
        dt = r.dtype
        out = torch.relu(
            r * scale.to(dt)[:, None, None, None]
            + shift.to(dt)[:, None, None, None]
            + s
            + d.to(dt)[:, :, None, None, None]
        )
        return out, out.mean(dim=(2, 3, 4))

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    results = {}
    for i, (shape, fmt, dtype_name) in enumerate(CASES):
        gen = torch.Generator().manual_seed(SEED + i)
        dtype = getattr(torch, dtype_name)
        n, c = shape[:2]
        r = random_input(shape, dtype, fmts[fmt], gen) - 1.0
        s = random_input(shape, dtype, fmts[fmt], gen) - 1.0
        small = [0.5 * torch.randn(n, c, generator=gen), 0.5 + torch.rand(c, generator=gen)]
        small.append(0.2 * torch.randn(c, generator=gen))
        inputs = [t.detach().requires_grad_(True) for t in (r, s, *small)]
        gout = torch.randn(shape, generator=gen).to(dtype)
        gmean = torch.randn(shape[:2], generator=gen).to(dtype)
        ours = run(lambda *a: diffusion_epilogue(*a, backend="triton"), inputs, gout, gmean)
        plain = run(composite, [t.detach().clone().requires_grad_() for t in inputs], gout, gmean)
        ref = run(diffusion_epilogue_reference, [t.detach().double().requires_grad_() for t in inputs], gout, gmean)
        rows = []
        for name, a, p, b in zip(NAMES, ours, plain, ref, strict=True):
            layout_ok = name not in ("out", "grad_r", "grad_s") or a.is_contiguous(memory_format=fmts[fmt])
            rows.append(
                {
                    "name": name,
                    "finite": bool(torch.isfinite(a).all()),
                    "shape_ok": a.shape == b.shape,
                    "dtype": str(a.dtype).removeprefix("torch."),
                    "layout_ok": bool(layout_ok),
                    "err": rel(a, b),
                    "torch_err": rel(p, b),
                }
            )
        results[_case_id(shape, fmt, dtype_name)] = rows
    # The op's registration (schema, autograd, fake kernel); the AOT-dispatch part of opcheck needs real
    # kernels, which the interpreter's launches are not.
    r, s, *small = [t.detach() for t in inputs]
    torch.library.opcheck(
        torch.ops.lgd_fast.diffusion_epilogue_triton.default,
        (r, s, *small),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    results["seed"] = SEED
    return results


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
    from op_testing import SEED

    env["LGD_FAST_TEST_SEED"] = str(SEED)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("shape,fmt,dtype", CASES, ids=[_case_id(*c) for c in CASES])
def test_triton_interpreted_matches_reference(interpreted, shape, fmt, dtype):
    seed = interpreted["seed"]
    for row in interpreted[_case_id(shape, fmt, dtype)]:
        name = row["name"]
        assert row["finite"], f"{name}: unwritten or non-finite elements (seed {seed})"
        assert row["shape_ok"] and row["layout_ok"], f"{name}: wrong shape or memory format"
        expected_dtype = dtype if name in ("out", "mean", "grad_r", "grad_s") else "float32"
        assert row["dtype"] == expected_dtype, f"{name}: dtype {row['dtype']}"
        if dtype == "float32":
            assert row["err"] < 2e-6, f"{name}: relative error {row['err']:.2e} (seed {seed})"
        else:  # 2x the plain composite's error at this dtype, floored at float32 rounding
            assert row["err"] <= 2 * row["torch_err"] + 2.0**-23, (
                f"{name}: error {row['err']:.2e} vs PyTorch {dtype} {row['torch_err']:.2e} (seed {seed})"
            )


# ---- (b) ahead-of-time compilation of the Triton kernels ------------------------------------------------


@needs_triton
def test_triton_kernels_compile_for_sm80_and_sm90a_without_spills():
    from lgd_fast import doctor
    from lgd_fast.kernels import diffusion_epilogue, p3d_conv

    rows = doctor.aot_compile(targets=("sm_90a", "sm_80"), dtypes=("bf16", "fp32"))
    print(doctor.format_rows(rows))
    kernels = {**diffusion_epilogue.AOT_KERNELS, **p3d_conv.AOT_KERNELS}
    assert any(name.startswith("p3d_conv_") for name in kernels)
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in kernels for t in ("sm_90a", "sm_80")}
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills:\n{doctor.format_rows(spilled)}"
    assert all(0 < r["registers"] <= 255 for r in rows)


# ---- (c) nvcc --------------------------------------------------------------------------------------------


def _nvcc_command(source: str, obj: str, stub_dir: str) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # A CPU build of torch ships c10/cuda headers but not the CMake-generated cuda_cmake_macros.h they
    # include; a one-line stand-in (what a CUDA build generates) lets nvcc check the file against them.
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(p, macros)) for p in cpp_extension.include_paths()):
        os.makedirs(os.path.join(stub_dir, "c10/cuda/impl"), exist_ok=True)
        with open(os.path.join(stub_dir, "c10/cuda/impl/cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{stub_dir}")
    arches = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
    flags = ["-std=c++20", "-O3", "-Xptxas", "-v", *cpp_extension.COMMON_NVCC_FLAGS]
    return [NVCC, "-c", *flags, *arches, *includes, source, "-o", obj]


@pytest.fixture(scope="module")
def nvcc_jobs(tmp_path_factory):
    """Starts nvcc on every .cu file at once (the slowest check) so the other tests run meanwhile."""
    if NVCC is None or not CUDA_SOURCES:
        yield {}
        return
    tmp = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for source in CUDA_SOURCES:
        obj = str(tmp / (os.path.basename(source) + ".o"))
        command = _nvcc_command(source, obj, str(tmp / "stub"))
        jobs[source] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
    yield jobs
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module", autouse=True)
def _start_nvcc_first(nvcc_jobs):
    return nvcc_jobs


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_with_nvcc_for_sm80_and_sm90a(nvcc_jobs):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files"
    for source, (proc, obj) in nvcc_jobs.items():
        output, _ = proc.communicate(timeout=600)
        name = os.path.basename(source)
        assert proc.returncode == 0, f"nvcc failed on {name}:\n{output[-6000:]}"
        assert os.path.getsize(obj) > 0
        assert "error" not in output.lower(), f"{name}:\n{output[-6000:]}"
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
        assert spills and not any(spills), f"{name}: ptxas reports spills:\n{output[-6000:]}"
        for arch in ("sm_80", "sm_90a"):
            assert f"for '{arch}'" in output, f"{name}: no ptxas run for {arch}:\n{output[-3000:]}"


# ---- backend choice on this (GPU-less) machine ---------------------------------------------------------


@pytest.fixture
def fresh_backend_state(monkeypatch):
    from lgd_fast.ops import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return _backend


def _small_inputs():
    gen = torch.Generator().manual_seed(0)
    r, s = torch.randn(2, 5, 3, 7, 7, generator=gen), torch.randn(2, 5, 3, 7, 7, generator=gen)
    return r, s, torch.randn(2, 5, generator=gen), torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)


def test_auto_on_cpu_is_unchanged(fresh_backend_state, monkeypatch):
    _backend = fresh_backend_state
    r = _small_inputs()[0]
    assert _backend.choose_backend("diffusion_epilogue", r, backends=("cuda", "cpp", "triton", "reference")) == "cpp"
    # $LGD_FAST_BACKEND naming a backend an op lacks leaves that op on auto; by argument it is an error.
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert _backend.choose_backend("global_avg_pool", r, backends=("cpp", "reference")) == "cpp"
    with pytest.raises(ValueError, match="expected one of: cpp, reference, auto"):
        _backend.choose_backend("global_avg_pool", r, "triton", backends=("cpp", "reference"))


@pytest.mark.parametrize("backend,match", [("cuda", "CUDA tensors only"), ("triton", "CUDA tensors")])
def test_gpu_backends_refuse_cpu_tensors(fresh_backend_state, backend, match):
    from lgd_fast.ops import diffusion_epilogue

    with pytest.raises(RuntimeError, match=f"backend '{backend}' was requested but cannot run.*{match}"):
        diffusion_epilogue(*_small_inputs(), backend=backend)


def test_auto_on_cuda_order(fresh_backend_state, monkeypatch):
    """On CUDA tensors: cuda if lgd_fast._C_cuda imported, else triton, else the reference with one warning."""
    _backend = fresh_backend_state
    fake_cuda = types.SimpleNamespace(device=torch.device("cuda"))  # all choose_backend reads of a tensor
    backends = ("cuda", "cpp", "triton", "reference")
    reasons = {"cuda": "no _C_cuda", "triton": "no triton"}
    monkeypatch.setattr(_backend, "backend_unavailable_reason", lambda b, d: reasons.get(b) if d == "cuda" else "cpu")
    assert _backend.choose_backend("diffusion_epilogue", fake_cuda, backends=backends) == "reference"
    reasons.pop("triton")
    assert _backend.choose_backend("diffusion_epilogue", fake_cuda, backends=backends) == "triton"
    reasons.pop("cuda")
    assert _backend.choose_backend("diffusion_epilogue", fake_cuda, backends=backends) == "cuda"


def test_triton_op_registered_where_triton_imports():
    import importlib

    from lgd_fast.kernels import diffusion_epilogue as kernels

    op_module = importlib.import_module("lgd_fast.ops.diffusion_epilogue")  # the package re-exports the function
    assert kernels.available() == HAS_TRITON == op_module._TRITON_REGISTERED
    assert hasattr(torch.ops.lgd_fast, "diffusion_epilogue_triton") == HAS_TRITON


def test_imports_and_doctor_without_triton():
    """With triton hidden, the kernels module, the ops and doctor.report() still import and say why."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton fails, importlib.util.find_spec('triton') is None\n"
        "from lgd_fast.kernels import diffusion_epilogue as k\n"
        "import importlib\nop = importlib.import_module('lgd_fast.ops.diffusion_epilogue')\n"
        "from lgd_fast import doctor\n"
        "assert not k.available() and not op._TRITON_REGISTERED and k.AOT_KERNELS == {}\n"
        "info = doctor.report()\n"
        "assert 'triton package is not installed' in info['backends']['cuda']['triton'], info\n"
        "print(doctor.format_report(info))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def test_doctor_report_is_printable():
    from lgd_fast import doctor

    info = doctor.report()
    json.dumps(info)
    assert info["extensions"]["lgd_fast._C"] == "ok"
    assert info["backends"]["cpu"]["cpp"] == "ok" and info["backends"]["cpu"]["reference"] == "ok"
    if NVCC is not None:
        assert info["nvcc"] and info["nvcc_version"]
    text = doctor.format_report(info)
    assert "backends on cuda:" in text and "lgd_fast._C_cuda" in text


if __name__ == "__main__":  # the interpreter run of (a): TRITON_INTERPRET=1 is set by the fixture above
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_interpreted_checks()))
