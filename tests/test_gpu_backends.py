"""The GPU backends of diffusion_epilogue, checked on a machine without a GPU.

(a) The Triton kernels under ``TRITON_INTERPRET=1`` on the CPU, through the registered op and its autograd:
    forward (out, mean) and all five gradients against an fp64 reference, fp32 tight, bf16/fp16 within 2x
    the error of the plain PyTorch composite at that dtype, poisoned allocations. The interpreter must be on
    before triton is imported, so these run in a subprocess (this file run as a script) and the test
    functions here check its results; other test modules keep the compiled kernels.
(b) Every Triton kernel compiles ahead of time for sm_80 and sm_90a, as the JIT builds it, with no register
    spills, its GEMMs on wgmma / mma.sync / FMA as meant, and the JIT's divisibility hints in effect.
(c) Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90a with no spills (started first, in the
    background, since it is the slowest check).
Plus the backend choice that needs no GPU: what ``auto`` and explicit requests do on CPU tensors.
"""

from __future__ import annotations

import copy
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

# (N, C, T, H, W): batch 1 and 2, T = 1, 3, 5, 7, odd H/W, odd channel counts (65 > every channel tile), and
# L = 1125 > the 1024-value stretch, so that the forward and backward sum partials of two stretches.
SHAPES = [(1, 3, 1, 7, 7), (2, 5, 3, 9, 9), (1, 65, 1, 9, 9), (1, 3, 5, 15, 15), (2, 3, 7, 7, 7)]
FORMATS = ("contiguous", "channels_last_3d")
DTYPES = ("float32", "bfloat16", "float16")
NAMES = ["out", "mean", "grad_r", "grad_s", "grad_d", "grad_scale", "grad_shift"]
CASES = [(s, f, d) for s in SHAPES for f in FORMATS for d in DTYPES]
# global_update: (N, C_in, C_out) with hidden = C_out // 4: batch 1, 17 (two programs of 16 samples), odd
# widths that no tile divides.
GU_SHAPES = [(1, 65, 64), (17, 48, 96), (3, 16, 132)]
GU_NAMES = ["g_new", "d", *(f"grad_{n}" for n in ("m", "g")), *(f"grad_{p}{i}" for i in range(1, 7) for p in "wb")]
GU_CASES = [(s, d) for s in GU_SHAPES for d in DTYPES]


def _case_id(shape, fmt, dtype) -> str:
    return f"{'x'.join(map(str, shape))}-{fmt}-{dtype}"


# ---- (a) the interpreter run (this file as a script, TRITON_INTERPRET=1) ------------------------------


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _row(name, a, plain, ref, layout_ok=True) -> dict:
    return {
        "name": name,
        "finite": bool(torch.isfinite(a).all()),
        "shape_ok": a.shape == ref.shape,
        "dtype": str(a.dtype).removeprefix("torch."),
        "layout_ok": bool(layout_ok),
        "err": _rel(a, ref),
        "torch_err": _rel(plain, ref),
    }


def _run_with_grads(fn, inputs, upstream):
    outs = fn(*inputs)
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream, strict=True))
    return [*outs, *torch.autograd.grad(loss, inputs)]


def diffusion_rows(backend: str, device: str) -> dict:
    """Every CASES case through ``diffusion_epilogue(backend=...)`` on ``device``: {case id: per-output rows}."""
    from lgd_fast.ops import diffusion_epilogue, diffusion_epilogue_reference
    from op_testing import SEED, diffusion_inputs

    fmts = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}

    def composite(r, s, d, scale, shift):  # what a user writes at r's dtype: the yardstick
        dt = r.dtype
        out = torch.relu(
            r * scale.to(dt)[:, None, None, None]
            + shift.to(dt)[:, None, None, None]
            + s
            + d.to(dt)[:, :, None, None, None]
        )
        return out, out.mean(dim=(2, 3, 4))

    results = {}
    for i, (shape, fmt, dtype_name) in enumerate(CASES):
        gen = torch.Generator().manual_seed(SEED + i)
        dtype = getattr(torch, dtype_name)
        # no ReLU input within rounding of zero (there the side is rounding's choice, in the kernel as in PyTorch)
        inputs = [t.detach().to(device).requires_grad_(True) for t in diffusion_inputs(shape, dtype, fmts[fmt], gen)]
        upstream = [torch.randn(shape, generator=gen).to(dtype), torch.randn(shape[:2], generator=gen).to(dtype)]
        upstream = [u.to(device) for u in upstream]
        ours = _run_with_grads(lambda *a: diffusion_epilogue(*a, backend=backend), inputs, upstream)
        plain = _run_with_grads(composite, [t.detach().clone().requires_grad_() for t in inputs], upstream)
        exact = [t.detach().double().requires_grad_() for t in inputs]
        ref = _run_with_grads(diffusion_epilogue_reference, exact, upstream)
        rows = []
        for name, a, p, b in zip(NAMES, ours, plain, ref, strict=True):
            layout_ok = name not in ("out", "grad_r", "grad_s") or a.is_contiguous(memory_format=fmts[fmt])
            rows.append(_row(name, a, p, b, layout_ok))
        results[_case_id(shape, fmt, dtype_name)] = rows
    return results


def global_update_rows(backend: str, device: str) -> dict:
    """Every GU_CASES case through ``global_update(backend=...)`` on ``device``: {case id: per-output rows}."""
    from lgd_fast.ops import global_update, global_update_reference
    from op_testing import SEED

    results = {}
    for i, ((n, c_in, c_out), dtype_name) in enumerate(GU_CASES):
        gen = torch.Generator().manual_seed(SEED + 1000 + i)
        dtype = getattr(torch, dtype_name)
        hidden = c_out // 4
        shapes = [(hidden, c_in), (c_out, hidden), (hidden, c_in), (c_out, hidden), (hidden, c_out), (c_out, hidden)]
        weights = [torch.randn(o, k, generator=gen) / k**0.5 if i == 0 else torch.randn(o, generator=gen)
                   for o, k in shapes for i in range(2)]  # fmt: skip
        m, g = (torch.rand(n, c_in, generator=gen) for _ in range(2))  # a GAP of ReLU output, a global vector
        weights[3] = relu_clear_bias(m, g, weights, dtype, gen)
        inputs = [t.to(dtype).to(device).requires_grad_() for t in (m, g, *weights)]
        upstream = [torch.randn(n, c_out, generator=gen).to(dtype).to(device) for _ in range(2)]
        ours = _run_with_grads(lambda *a: global_update(*a, backend=backend), inputs, upstream)
        copies = [t.detach().clone().requires_grad_() for t in inputs]
        plain = _run_with_grads(global_update_reference, copies, upstream)
        exact = [t.detach().double().requires_grad_() for t in inputs]
        ref = _run_with_grads(global_update_reference, exact, upstream)
        rows = [_row(name, a, p, b) for name, a, p, b in zip(GU_NAMES, ours, plain, ref, strict=True)]
        results[_gu_case_id((n, c_in, c_out), dtype_name)] = rows
    return results


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def relu_clear_bias(m, g, weights, dtype, gen, tries: int = 200) -> torch.Tensor:
    """b2, redrawn output by output until no pre-activation of g's ReLU is within its rounding error of zero.

    A pre-activation a = W2 h1 + b2 + W4 h3 + b4 computed at ``dtype`` (h1, h3 rounded to it, as both the
    kernel and six nn.Linear calls do) is off by at most about 3u * S, S = |W2||h1| + |W4||h3| + |b2| + |b4|
    (u the unit roundoff). Within that of zero its sign, and so the ReLU's gradient, is not determined at
    ``dtype``: the kernel and PyTorch each pick one, and one flipped position moves grad_m by a few percent
    (1 in 7 seeds failed the 2x rule that way, never with a flip outside the band). Every sample's a must be
    farther than 4u * S from zero, for each output; the forward check still covers the ReLU everywhere.
    """
    u = _UNIT_ROUNDOFF[dtype]
    m, g, w1, b1, w2, _, w3, b3, w4, b4 = (t.to(dtype).double() for t in (m, g, *weights[:8]))
    h1, h3 = m @ w1.T + b1, g @ w3.T + b3
    rest = h1 @ w2.T + h3 @ w4.T + b4  # (N, C_out): a without b2
    size = h1.abs() @ w2.abs().T + h3.abs() @ w4.abs().T + b4.abs()
    b2 = weights[3].clone()
    for o in range(b2.numel()):
        for _ in range(tries):
            bias = b2[o].to(dtype).double()
            if ((rest[:, o] + bias).abs() > 4 * u * (size[:, o] + bias.abs())).all():
                break
            b2[o] = torch.randn((), generator=gen)
        else:
            raise AssertionError(f"no b2[{o}] in {tries} draws keeps the ReLU clear of its rounding band")
    return b2


def _gu_case_id(shape, dtype) -> str:
    return f"global_update-{'x'.join(map(str, shape))}-{dtype}"


def check_rows(rows: list[dict], dtype: str, seed, same_dtype: tuple[str, ...], tol: float = 2e-6) -> None:
    """fp32 within ``tol`` of fp64, or within 2x plain PyTorch's own fp32 error where that is larger (an output
    that cancels: grad_d of a (1, 3, 5, 15, 15) clip sums 1125 values of both signs per channel, and PyTorch's
    float32 composite was 2.70e-6 off fp64 there, the kernel 2.78e-6, seed 469166457); 16-bit within 2x the plain
    PyTorch error at that dtype (floored at fp32's)."""
    for row in rows:
        name = row["name"]
        assert row["finite"], f"{name}: unwritten or non-finite elements (seed {seed})"
        assert row["shape_ok"] and row["layout_ok"], f"{name}: wrong shape or memory format"
        expected_dtype = dtype if name in same_dtype else "float32"
        assert row["dtype"] == expected_dtype, f"{name}: dtype {row['dtype']}"
        if dtype == "float32":
            assert row["err"] < max(tol, 2 * row["torch_err"]), (
                f"{name}: relative error {row['err']:.2e}, PyTorch float32 {row['torch_err']:.2e} (seed {seed})"
            )
        else:
            assert row["err"] <= 2 * row["torch_err"] + 2.0**-23, (
                f"{name}: error {row['err']:.2e} vs PyTorch {dtype} {row['torch_err']:.2e} (seed {seed})"
            )


DIFFUSION_SAME_DTYPE = ("out", "mean", "grad_r", "grad_s")


def _interpreted_checks() -> dict:
    """The Triton kernels on CPU tensors (TRITON_INTERPRET=1): diffusion_epilogue and global_update rows."""
    from lgd_fast.ops.diffusion_epilogue import _TRITON_REGISTERED
    from lgd_fast.ops.global_update import _TRITON_REGISTERED as _GU_REGISTERED
    from op_testing import SEED

    assert _TRITON_REGISTERED and _GU_REGISTERED, "a triton op did not register"
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # fresh allocations are NaN: unwritten shows
    results = {**diffusion_rows("triton", "cpu"), **global_update_rows("triton", "cpu")}
    gen = torch.Generator().manual_seed(SEED)
    shape = CASES[-1][0]
    inputs = [torch.randn(shape, generator=gen) for _ in range(2)]
    inputs += [torch.randn(shape[:2], generator=gen), torch.rand(shape[1], generator=gen)]
    inputs += [torch.randn(shape[1], generator=gen)]
    # The op's registration (schema, autograd, fake kernel); the AOT-dispatch part of opcheck needs real
    # kernels, which the interpreter's launches are not.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lgd_fast.diffusion_epilogue_triton.default, inputs, test_utils=utils)
    c_in, hidden, c_out = 5, 4, 6
    shapes = [(hidden, c_in), (c_out, hidden), (hidden, c_in), (c_out, hidden), (hidden, c_out), (c_out, hidden)]
    gu_inputs = [torch.randn(2, c_in, generator=gen), torch.rand(2, c_in, generator=gen)]
    gu_inputs += [t for o, k in shapes for t in (torch.randn(o, k, generator=gen), torch.randn(o, generator=gen))]
    torch.library.opcheck(torch.ops.lgd_fast.global_update_triton.default, gu_inputs, test_utils=utils)
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
    check_rows(interpreted[_case_id(shape, fmt, dtype)], dtype, interpreted["seed"], DIFFUSION_SAME_DTYPE)


@needs_triton
@pytest.mark.parametrize("shape,dtype", GU_CASES, ids=[_gu_case_id(*c) for c in GU_CASES])
def test_global_update_triton_interpreted_matches_reference(interpreted, shape, dtype):
    """One kernel launch: (g', d) and all 14 gradients (through the op's autograd, in the inputs' dtype) vs fp64."""
    check_rows(interpreted[_gu_case_id(shape, dtype)], dtype, interpreted["seed"], GU_NAMES)


# ---- (b) ahead-of-time compilation of the Triton kernels ------------------------------------------------


@needs_triton
def test_triton_kernels_compile_for_sm80_and_sm90a_as_the_jit_does_without_spills():
    """Every kernel, config, dtype (fp32 exact and tf32) and target, built as the JIT builds it: no spills, the
    GEMMs on the units they are meant for, and the JIT's divisibility hints in effect."""
    from lgd_fast import doctor
    from lgd_fast.kernels import diffusion_epilogue, global_update, p3d_conv

    rows = doctor.aot_compile(targets=("sm_90a", "sm_80"), dtypes=("bf16", "fp32"))
    print(doctor.format_rows(rows))
    kernels = {**diffusion_epilogue.AOT_KERNELS, **global_update.AOT_KERNELS, **p3d_conv.AOT_KERNELS}
    assert any(name.startswith("p3d_conv_") for name in kernels) and "global_update" in kernels
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in kernels for t in ("sm_90a", "sm_80")}
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills:\n{doctor.format_rows(spilled)}"
    assert all(0 < r["registers"] <= 255 for r in rows)

    conv = [r for r in rows if r["kernel"].startswith("p3d_conv_")]
    assert {r["dtype"] for r in conv} == {"bf16", "fp32"}
    assert {r["tf32"] for r in conv if r["dtype"] == "fp32"} == {True, False}
    by_kind = {}
    for r in conv:
        kind = (r["target"], "tf32" if r["tf32"] else r["dtype"])
        by_kind.setdefault(kind, set()).add(r["mma"])
    assert by_kind[("sm_90a", "bf16")] == {"wgmma"}, [r for r in conv if r["target"] == "sm_90a"]
    assert by_kind[("sm_80", "bf16")] == {"mma"}
    assert by_kind[("sm_90a", "fp32")] == by_kind[("sm_80", "fp32")] == {"fma"}  # exact fp32: no tensor cores
    assert by_kind[("sm_90a", "tf32")] <= {"wgmma", "mma"} and "wgmma" in by_kind[("sm_90a", "tf32")]
    assert by_kind[("sm_80", "tf32")] == {"mma"}
    assert all(r["mma"] == "-" for r in rows if r["kernel"].startswith(("forward_", "backward_")))  # no GEMM

    # The JIT's specialisation: every pointer and the multiples of 16 (M, channels) marked, the spatial sizes
    # (28, 14) not; with the marks, the bf16 forward reads its operands in 16-byte loads.
    for r in conv:
        pointers = {name for name in r["divisible"] if name.endswith("_ptr")}
        assert len(pointers) == (7 if "forward" in r["kernel"] else 3), r
        assert {"M", "Ci", "Co"} <= set(r["divisible"]) and not {"T", "H", "W", "Ho", "Wo"} & set(r["divisible"])
    forward_bf16 = [r for r in conv if "forward" in r["kernel"] and r["dtype"] == "bf16"]
    assert forward_bf16 and all(128 in r["load_bits"] and 16 not in r["load_bits"] for r in forward_bf16)


@needs_triton
def test_aot_compile_names_the_build_that_failed(monkeypatch):
    """A build that raises is named with its kernel, config, dtype and target."""
    from lgd_fast import doctor

    def fail(kernel, args, constexprs, num_warps, num_stages, dtype, target):
        raise ValueError("no build today")

    monkeypatch.setattr(doctor, "_compile", fail)
    with pytest.raises(RuntimeError, match=r"aot_compile: forward_rows \[BLOCK_R=.*, 4 warps, bf16\] failed for "
                                           r"sm_90a: no build today"):  # fmt: skip
        doctor.aot_compile(targets=("sm_90a",), dtypes=("bf16",))


@needs_triton
def test_aot_build_without_the_hints_reads_scalars():
    """The control for the test above: the bf16 forward with a misaligned tensor and channel counts that are
    not multiples of 16 (what the old doctor compiled) loads 2-byte scalars; the load widths tell them apart."""
    from lgd_fast import doctor
    from lgd_fast.kernels import p3d_conv

    class Misaligned:  # a tensor as the JIT's specialisation sees it, at an address 2 bytes past 16
        dtype = torch.bfloat16

        @staticmethod
        def data_ptr():
            return 2

    kernel, args, configs, _ = p3d_conv.AOT_KERNELS["p3d_conv_forward_spatial[16bit]"]
    constexprs, warps, stages = configs[0]
    hinted = doctor._build(kernel, args, constexprs, warps, stages, "bf16", "sm_90a")
    odd = {
        name: (Misaligned() if value == "*{t}" else value + 1 if isinstance(value, int) else value)
        for name, value in args.items()
    }
    plain = doctor._build(kernel, odd, constexprs, warps, stages, "bf16", "sm_90a")
    assert not {"x_ptr", "w_ptr", "Ci", "Co", "M"} & set(plain["divisible"]), plain["divisible"]
    assert 16 in plain["load_bits"] and 128 not in plain["load_bits"], plain
    assert 128 in hinted["load_bits"] and 16 not in hinted["load_bits"], hinted


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
def _start_nvcc_first(request):
    """Starts the nvcc compiles with the module's first test, where their test is selected (not under -m cuda)."""
    if any(item.name == "test_cuda_sources_compile_with_nvcc_for_sm80_and_sm90a" for item in request.session.items):
        request.getfixturevalue("nvcc_jobs")


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
    monkeypatch.setattr(
        _backend, "backend_unavailable_reason", lambda b, d, **_: reasons.get(b) if d == "cuda" else "cpu"
    )
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


# ---- (d) on a CUDA device (the GPU suite; skipped where there is none) -----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_diffusion_epilogue_on_gpu_matches_reference(backend):
    """The compiled kernels (not the interpreter) on every CASES case: the same checks as (a)."""
    from op_testing import SEED

    if backend == "cuda":
        from lgd_fast.ops import _backend

        assert _backend.cuda_extension_available(), _backend.cuda_extension_error()
    rows = diffusion_rows(backend, "cuda")
    for shape, fmt, dtype in CASES:
        check_rows(rows[_case_id(shape, fmt, dtype)], dtype, SEED, DIFFUSION_SAME_DTYPE)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_global_update_on_gpu_matches_reference(backend, monkeypatch):
    from op_testing import SEED

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the yardstick's fp32 GEMMs in full
    rows = global_update_rows(backend, "cuda")
    for shape, dtype in GU_CASES:
        check_rows(rows[_gu_case_id(shape, dtype)], dtype, SEED, GU_NAMES, tol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "tf32", "bfloat16"])
def test_fast_model_on_gpu_matches_reference(dtype, monkeypatch):
    """The fast LGD-3D on CUDA (Triton P3D convs, the CUDA/Triton epilogue, the Triton global path) against the
    reference on CUDA and a float64 reference: eval outputs, and a training step's outputs and gradients.

    "tf32": float32 with torch's tf32 switches on (cudnn's is on by default), which the fast model's convs follow
    (p3d_conv's ``uses_tf32``) as the reference's cuDNN convs do; "float32": both off, full-precision products.
    """
    from lgd_fast import create_model
    from lgd_fast.ops.p3d_conv import uses_tf32

    tf32 = dtype == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    assert uses_tf32(torch.ones(1, device="cuda")) == tf32
    dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    gen = torch.Generator().manual_seed(0)
    ref = create_model("lgd3d_r18", 7, classifier="two_heads", dropout=0.0)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if hasattr(m, "fc6"):
                m.fc6.weight.copy_(0.05 * torch.randn(m.fc6.weight.shape, generator=gen))
    fast = create_model("lgd3d_r18", 7, classifier="two_heads", dropout=0.0, fast=True)
    fast.load_state_dict(ref.state_dict())
    exact = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 8, 64, 64, generator=gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run(model, device, inp, train):
        model = model.to(device).train(train)
        inp = inp.to(device)
        with autocast if device == "cuda" else torch.autocast("cpu", enabled=False):
            out = model(inp)
        if not train:  # eval: the two heads' fused logits, one tensor
            assert torch.is_tensor(out) and out.shape == (2, 7), type(out)
            return [out.float().cpu()], {}
        local, glob = out
        (local.float().square().mean() + glob.float().mean()).backward()
        grads = {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.grad is not None}
        return [local.float().cpu(), glob.float().cpu()], grads

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    for train in (False, True):
        ours, ours_g = run(fast, "cuda", x, train)
        plain, plain_g = run(ref, "cuda", x, train)
        best, best_g = run(exact, "cpu", x.double(), train)
        for a, p, b in zip(ours, plain, best, strict=True):
            assert rel(a, b) <= max(2 * rel(p, b), 1e-4), (train, rel(a, b), rel(p, b))
        for key, g in best_g.items():
            assert rel(ours_g[key], g) <= max(4 * rel(plain_g[key], g), 5e-2), (key, rel(ours_g[key], g))
        for model in (fast, ref, exact):
            model.zero_grad(set_to_none=True)


# p3d_conv's compiled Triton kernels on the GPU, on every conv kind and stride of tests/test_p3d_triton.py's
# geometries (odd channel counts, T = 1 to 7, H = W = 7 to 15), each shape's first call a training call with the
# statistics (Triton's real autotuner, over at most $LGD_FAST_AUTOTUNE_CONFIGS configs, benchmarks every config
# into the per-tile partials first: the stale-partials defect of issue 16 showed exactly there), float32 (tf32 off),
# bfloat16 (and float16 once), both layouts. Last in the file: when the GPU suite's time runs out, the whole-model
# test above matters more.
def _gpu_conv_cases() -> list[tuple]:
    from p3d_cases import CONV_GEOMETRIES

    layouts = ["channels_last_3d", "contiguous"] * len(CONV_GEOMETRIES)
    cases = [(*geo, epilogue, dtype, layout) for geo, layout in zip(CONV_GEOMETRIES, layouts, strict=False)
             for epilogue, dtype in (("affine_stats", "float32"), ("residual_stats", "bfloat16"))]  # fmt: skip
    return cases + [(*CONV_GEOMETRIES[0], "affine_residual_relu", "float16", "channels_last_3d")]


GPU_CONV_CASES = _gpu_conv_cases()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", GPU_CONV_CASES, ids=[f"{c[0]}-s{c[1]}-{c[4]}-{c[5]}-{c[6]}" for c in GPU_CONV_CASES])
def test_p3d_conv_triton_on_gpu_matches_reference(case, monkeypatch):
    """The same checks as tests/test_p3d_triton.py's interpreter run (float32 within 5e-6 of float64, 16 bits
    within 2x cuDNN's own error, statistics within 1e-5 of the output's float64 sums), on the real kernels."""
    import p3d_cases

    from op_testing import SEED

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 products, ours and cuDNN's
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    seed = SEED + GPU_CONV_CASES.index(case)
    rows = p3d_cases.run_conv_case(*case, backend="triton", gen=torch.Generator().manual_seed(seed), device="cuda")
    names = {r["name"] for r in rows}
    assert {"out", "grad_x", "grad_weight"} <= names and ("stats_of_out" in names) == case[4].endswith("stats")
    p3d_cases.check_rows(rows, case[5], f"{p3d_cases.conv_case_id(*case)} (seed {seed})", fp32_tol=5e-6)

if __name__ == "__main__":  # the interpreter run of (a): TRITON_INTERPRET=1 is set by the fixture above
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_interpreted_checks()))
