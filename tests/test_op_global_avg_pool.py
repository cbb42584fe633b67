"""lgd_fast.ops.global_avg_pool: the cpp backend against the plain PyTorch reference, and the op's contract.

Inputs are fresh random numbers every run (seed printed on failure; set LGD_FAST_TEST_SEED to replay one).
Outputs are poisoned: the parity tests run with torch's deterministic mode, in which every ``at::empty``
(the op's own output allocations included) is filled with NaN, so an element the kernel forgets to write
shows up as NaN. Every SIMD path the CPU has (avx512 / avx2 / baseline) is checked.
"""

from __future__ import annotations

import importlib
import logging
from itertools import product

import pytest
import torch

from lgd_fast.ops import _backend
from lgd_fast.ops.global_avg_pool import BACKENDS, global_avg_pool, global_avg_pool_reference
from op_testing import SEED, assert_layout, max_err, random_input, usable_isas

# The module itself (the package attribute of the same name is the function).
gap_module = importlib.import_module("lgd_fast.ops.global_avg_pool")


CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}

# (N, C, T, H, W): every T in (1, 7, 13) with every H = W in (7, 9, 15), C in (3, 65), N in (1, 3); then
# shapes that reach the kernels' other paths: rows longer than one float32 block (8192) and than one task
# chunk (32768), channels_last with many position chunks.
SHAPES = [
    ((1, 3)[(i // 2) % 2], (3, 65)[i % 2], t, s, s) for i, (t, s) in enumerate(product((1, 7, 13), (7, 9, 15)))
] + [(1, 3, 13, 45, 57), (2, 17, 16, 32, 33)]


def _shape_id(shape):
    return "x".join(map(str, shape))


ISAS = usable_isas()


@pytest.fixture
def fresh_backend_state(monkeypatch):
    """Forgets which fallback warnings were already logged."""
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


# ---- parity: forward and gradient, fp32, bf16, fp64 -------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_fp32_matches_fp64_reference(shape, fmt, isa, gen, poisoned):
    x = random_input(shape, torch.float32, FORMATS[fmt], gen, requires_grad=True)
    g = torch.randn(shape[:2], generator=gen)
    y = global_avg_pool(x, backend="cpp")
    (gx,) = torch.autograd.grad(y, x, g)

    x64 = x.detach().double().requires_grad_(True)
    y64 = global_avg_pool_reference(x64)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())

    assert y.dtype == torch.float32 and y.shape == shape[:2] and y.is_contiguous()
    assert torch.isfinite(y).all(), f"unwritten outputs (seed {SEED})"
    # Tight: at most ~8 float32 ulps of the largest output (the reductions fold into float64 every 128
    # values per lane; what remains is mostly the final rounding to float32).
    rel = max_err(y, y64) / y64.abs().max().item()
    assert rel <= 1e-6, f"forward relative error {rel:.3g} (seed {SEED})"
    assert gx.dtype == torch.float32 and gx.shape == x.shape
    assert_layout(gx, FORMATS[fmt])
    assert torch.isfinite(gx).all(), f"unwritten gradient elements (seed {SEED})"
    # Each element is g / (T*H*W) rounded once to float32: within an ulp.
    torch.testing.assert_close(gx.double(), gx64, rtol=2.4e-7, atol=0, msg=lambda m: f"{m} (seed {SEED})")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_bf16_within_twice_pytorch_error(shape, fmt, isa, gen, poisoned):
    x = random_input(shape, torch.bfloat16, FORMATS[fmt], gen, requires_grad=True)
    g = torch.randn(shape[:2], generator=gen).bfloat16()
    y = global_avg_pool(x, backend="cpp")
    (gx,) = torch.autograd.grad(y, x, g)

    # fp64 reference on the very same bf16 values; plain PyTorch in bf16 as the yardstick.
    x64 = x.detach().double().requires_grad_(True)
    (gx64,) = torch.autograd.grad(x64.mean(dim=(2, 3, 4)), x64, g.double())
    y64 = x64.detach().mean(dim=(2, 3, 4))
    xt = x.detach().clone().requires_grad_(True)
    yt = xt.mean(dim=(2, 3, 4))
    (gxt,) = torch.autograd.grad(yt, xt, g)

    assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert_layout(gx, FORMATS[fmt])
    assert torch.isfinite(y).all() and torch.isfinite(gx).all(), f"unwritten elements (seed {SEED})"
    # Floor: one float32 ulp of the largest value, the float32 accumulation noise both sides carry before
    # rounding to bf16. It matters only if PyTorch's error were ~0, i.e. every output happened to sit on a
    # bf16 value; without it such a draw could fail a correct kernel.
    floor = 2.0**-23 * y64.abs().max().item()
    err, err_torch = max_err(y, y64), max_err(yt, y64)
    assert err <= 2 * err_torch + floor, f"forward error {err:.3g} vs PyTorch bf16 {err_torch:.3g} (seed {SEED})"
    floor = 2.0**-23 * gx64.abs().max().item()
    err, err_torch = max_err(gx, gx64), max_err(gxt, gx64)
    assert err <= 2 * err_torch + floor, f"grad error {err:.3g} vs PyTorch bf16 {err_torch:.3g} (seed {SEED})"


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_fp64_gradcheck_and_gradgradcheck(fmt, gen):
    x = random_input((2, 3, 3, 5, 4), torch.float64, FORMATS[fmt], gen, requires_grad=True)
    torch.testing.assert_close(global_avg_pool(x, backend="cpp"), global_avg_pool_reference(x), rtol=1e-13, atol=0)
    assert torch.autograd.gradcheck(lambda t: global_avg_pool(t, backend="cpp"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: global_avg_pool(t, backend="cpp"), (x,))


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_bitwise_reproducible_across_thread_counts(fmt, gen):
    x = random_input((3, 65, 13, 15, 15), torch.float32, FORMATS[fmt], gen)
    threads = torch.get_num_threads()
    first = global_avg_pool(x, backend="cpp")
    try:
        torch.set_num_threads(1)
        single = global_avg_pool(x, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first, global_avg_pool(x, backend="cpp"))


def test_degenerate_shapes(gen):
    assert global_avg_pool(torch.randn(0, 3, 2, 2, 2), backend="cpp").shape == (0, 3)
    # C == 1 makes a tensor both contiguous and channels_last_3d: served as contiguous.
    one_c = random_input((2, 1, 3, 5, 5), torch.float32, CL, gen)
    torch.testing.assert_close(global_avg_pool(one_c, backend="cpp"), global_avg_pool_reference(one_c))


# ---- torch.library contract and torch.compile -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_opcheck(fmt, dtype, gen):
    x = random_input((2, 5, 3, 7, 9), dtype, FORMATS[fmt], gen, requires_grad=True)
    torch.library.opcheck(torch.ops.lgd_fast.global_avg_pool.default, (x,))
    g = torch.randn((2, 5), generator=gen).to(dtype).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.lgd_fast.global_avg_pool_backward.default, (g, [2, 5, 3, 7, 9], fmt != "contiguous")
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_torch_compile_calls_the_op(fmt, gen):
    from torch._inductor.utils import run_and_get_code

    def fn(x):
        return global_avg_pool(x).square() + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    x = random_input((2, 5, 3, 7, 9), torch.float32, FORMATS[fmt], gen, requires_grad=True)
    g = torch.randn((2, 5), generator=gen)
    (y, code) = run_and_get_code(compiled, x)
    (gx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = global_avg_pool_reference(x_ref).square() + 1.0
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)

    assert "lgd_fast.global_avg_pool" in "\n".join(code), "the compiled graph does not call the custom op"
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-7)
    assert_layout(gx, FORMATS[fmt])


# ---- bad inputs -------------------------------------------------------------------------------------


def test_rejects_4d():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="5-D tensor"):
        torch.ops.lgd_fast.global_avg_pool(x)
    with pytest.raises(ValueError, match="5-D tensor"):
        global_avg_pool(x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16])
def test_rejects_dtype(dtype):
    x = torch.randint(1, 9, (2, 3, 2, 3, 3)).to(dtype)
    with pytest.raises(RuntimeError, match="dtype float32, bfloat16 or float64"):
        torch.ops.lgd_fast.global_avg_pool(x)
    if dtype.is_floating_point:  # (an integer x is a TypeError first: test_rejects_what_has_no_floating_mean)
        with pytest.raises(RuntimeError, match="dtype float32, bfloat16 or float64"):
            global_avg_pool(x, backend="cpp")


@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda gen: [[1.0]], TypeError, "global_avg_pool: x must be a tensor, got list"),
        (lambda gen: torch.randint(0, 9, (2, 3, 2, 3, 3), generator=gen, dtype=torch.int32), TypeError,
         "global_avg_pool: x must be a floating-point tensor, got dtype torch.int32"),
        (lambda gen: torch.randn(2, 3, 2, 3, 3, generator=gen) > 0, TypeError, "x must be a floating-point tensor"),
        (lambda gen: torch.randn(2, 3, 0, 5, 6, generator=gen), ValueError, r"x has T\*H\*W = 0 positions"),
        (lambda gen: torch.randn(2, 3, 4, 5, 0, generator=gen), ValueError, r"x has T\*H\*W = 0 positions"),
    ],
    ids=["list", "int32", "bool", "T=0", "W=0"],
)  # fmt: skip
def test_rejects_what_has_no_floating_mean(make, error, match, backend, gen, fresh_backend_state):
    """A non-tensor or an integer x is a TypeError naming x, on every backend (not a fallback warning and then
    torch's "could not infer output dtype"); no positions (T*H*W = 0) a ValueError, not a mean of NaN."""
    with pytest.raises(error, match=match):
        global_avg_pool(make(gen), backend=backend)


@pytest.mark.parametrize("backend", [3, b"cpp", ["cpp"]])
def test_backend_must_be_a_string(backend, fresh_backend_state):
    x = torch.randn(1, 2, 2, 2, 2)
    with pytest.raises(TypeError, match="backend argument must be a str, one of: cpp, reference, auto"):
        global_avg_pool(x, backend=backend)
    with pytest.raises(TypeError, match="backend argument must be a str"):
        _backend.choose_backend("global_avg_pool", x, backend, backends=BACKENDS)


def test_rejects_strided_layout(gen):
    x = random_input((2, 3, 4, 5, 6), torch.float32, torch.contiguous_format, gen).transpose(2, 4)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="contiguous or channels_last_3d"):
        torch.ops.lgd_fast.global_avg_pool(x)
    with pytest.raises(RuntimeError, match="contiguous or channels_last_3d"):
        global_avg_pool(x, backend="cpp")
    # auto hands such a view to the reference instead
    torch.testing.assert_close(global_avg_pool(x, backend="auto"), x.mean(dim=(2, 3, 4)))


def test_backward_rejects_mismatched_grad():
    with pytest.raises(RuntimeError, match=r"grad must have shape \(N, C\) = \(2, 3\)"):
        torch.ops.lgd_fast.global_avg_pool_backward(torch.randn(3, 2), [2, 3, 4, 5, 6], False)
    with pytest.raises(RuntimeError, match="sizes must have 5 entries"):
        torch.ops.lgd_fast.global_avg_pool_backward(torch.randn(2, 3), [2, 3, 4], False)


# ---- backend choice ---------------------------------------------------------------------------------


def test_extension_is_built():
    """setup.py always builds lgd_fast._C: an install without it is broken, so this fails rather than skips."""
    assert _backend.extension_available(), f"lgd_fast._C did not import: {_backend.extension_error()}"


def test_auto_picks_cpp_on_cpu(fresh_backend_state, gen):
    x = random_input((1, 3, 2, 3, 3), torch.float32, torch.contiguous_format, gen)
    assert _backend.choose_backend("global_avg_pool", x) == "cpp"
    assert _backend.extension_error() is None


def test_env_var_overrides_auto(fresh_backend_state, monkeypatch, gen):
    x = random_input((1, 3, 2, 3, 3), torch.float32, torch.contiguous_format, gen)
    calls = []

    def spy(t):
        calls.append(t)
        return global_avg_pool_reference(t)

    monkeypatch.setattr(gap_module, "global_avg_pool_reference", spy)
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    global_avg_pool(x)
    assert len(calls) == 1
    monkeypatch.setenv(_backend.ENV_VAR, "CPP")
    global_avg_pool(x)
    assert len(calls) == 1
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.choose_backend("global_avg_pool", x) == "cpp"
    # the argument beats the environment
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    global_avg_pool(x, backend="cpp")
    assert len(calls) == 1
    monkeypatch.setenv(_backend.ENV_VAR, "turbo")
    with pytest.raises(ValueError, match="LGD_FAST_BACKEND"):
        global_avg_pool(x)


def test_unknown_backend_name_raises(fresh_backend_state):
    with pytest.raises(ValueError, match="expected one of"):
        global_avg_pool(torch.randn(1, 2, 2, 2, 2), backend="triton")


@pytest.fixture
def missing_extension(monkeypatch, fresh_backend_state):
    """Pretends lgd_fast._C failed to import."""
    monkeypatch.setattr(_backend, "_extension", None)
    monkeypatch.setattr(_backend, "_extension_tried", True)
    monkeypatch.setattr(_backend, "_extension_error", "ImportError: simulated for the test")


def test_explicit_request_for_missing_backend_raises(missing_extension, monkeypatch, gen):
    x = random_input((1, 3, 2, 3, 3), torch.float32, torch.contiguous_format, gen)
    assert not _backend.extension_available()
    assert _backend.extension_error() == "ImportError: simulated for the test"
    with pytest.raises(RuntimeError, match=r"backend 'cpp' was requested.*did not import.*simulated"):
        global_avg_pool(x, backend="cpp")
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested"):
        global_avg_pool(x)


def test_auto_falls_back_with_one_warning(missing_extension, caplog, gen):
    x = random_input((1, 3, 2, 3, 3), torch.float32, torch.contiguous_format, gen)
    with caplog.at_level(logging.WARNING, logger=_backend.__name__):
        for _ in range(3):
            torch.testing.assert_close(global_avg_pool(x), global_avg_pool_reference(x))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "using the reference implementation" in warnings[0].getMessage()


def test_fallback_compiles_without_graph_breaks(missing_extension, gen):
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: global_avg_pool(t) * 2.0, backend="inductor", fullgraph=True)
    x = random_input((1, 3, 2, 3, 3), torch.float32, torch.contiguous_format, gen)
    torch.testing.assert_close(compiled(x), global_avg_pool_reference(x) * 2.0)
    torch._dynamo.reset()


def test_cpp_backend_is_cpu_only(fresh_backend_state, caplog):
    x = torch.empty(1, 3, 2, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        global_avg_pool(x, backend="cpp")
    with caplog.at_level(logging.WARNING, logger=_backend.__name__):
        assert global_avg_pool(x).shape == (1, 3)
    assert "CPU tensors only" in caplog.text
