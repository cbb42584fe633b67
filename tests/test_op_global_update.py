"""lgd_fast.ops.global_update: the one-call global path against six nn.Linear calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lgd_fast.models import P3DBasicBlock, P3DBottleneck
from lgd_fast.ops import global_update, global_update_reference
from lgd_fast.ops.global_update import block_weights
from op_testing import SEED, usable_isas


def _draw(block, n, gen, dtype):
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    weights = [w.detach().to(dtype).requires_grad_() for w in block_weights(block)]
    m = torch.randn(n, block.in_channels, generator=gen).abs().to(dtype).requires_grad_()  # a GAP of ReLU output
    g = torch.randn(n, block.in_channels, generator=gen).abs().to(dtype).requires_grad_()
    return [m, g, *weights]


def _near_the_kink(case) -> bool:
    """Whether a ReLU input of the path, ``a + b`` (a from m through fc1, fc2; b from g through fc3, fc4), lies within
    1e-4 of |a| + |b| of zero, or within 1e-6 of its terms' magnitudes (the same sums on absolute values, as
    _magnitudes: where a and b themselves cancel, float32's error scales with those), in float64: there float32 and
    float64 can fall on either side of the kink, and the gradient through that element flips between 0 and its full
    value (the same hazard as test_op_diffusion_epilogue's inputs move away from)."""
    exact = [t.detach().double() for t in case]
    a, b = _relu_input_terms(exact)
    size = sum(_relu_input_terms([t.abs() for t in exact]))
    return bool(((a + b).abs() <= torch.maximum(1e-4 * (a.abs() + b.abs()), 1e-6 * size)).any())


def _relu_input_terms(inputs):
    """(a, b), the two terms of the path's ReLU input a + b, of global_update's inputs (m, g, w1, b1, ..., w6, b6):
    a = fc2(fc1(m)), b = fc4(fc3(g)), as global_update_reference computes them."""
    m, g, w1, b1, w2, b2, w3, b3, w4, b4 = inputs[:10]
    return F.linear(F.linear(m, w1, b1), w2, b2), F.linear(F.linear(g, w3, b3), w4, b4)


def _case(block, n, gen, dtype=torch.float32):
    """Random inputs and weights (drawn again while a ReLU input is within rounding of zero: _near_the_kink)."""
    case = _draw(block, n, gen, dtype)
    while _near_the_kink(case):
        case = _draw(block, n, gen, dtype)
    return case


def _rel(a, b):
    return _error_against(a, b, b.double())


def _magnitudes(inputs, up):
    """The float64 scales that summation's error bound holds float32 errors to: (g', d) and every gradient of
    (g', d) . up, computed as the reference computes them but on the magnitudes of the inputs, weights and ``up``, the
    ReLU passing where the exact input is positive (_case keeps it away from zero). A linear's output is then
    |W| |x| + |b| and its input gradient |W|^T |gy|: the sums of the terms' magnitudes, where the values themselves
    can cancel to almost nothing. (Judged against the values, PyTorch's own float32 d was 1.5e-6 off at hidden width 2,
    and the kernel's, at 1.18e-6, failed a 1e-6 threshold at LGD_FAST_TEST_SEED=619: 3.2x PyTorch's error in that
    draw, 1.05-1.12x its median over 32.)"""
    exact = [t.detach().double() for t in inputs]
    passes = sum(_relu_input_terms(exact)) > 0
    sizes = [t.abs().requires_grad_() for t in exact]
    g_new = sum(_relu_input_terms(sizes)) * passes
    w5, b5, w6, b6 = sizes[10:]
    outputs = (g_new, F.linear(F.linear(g_new, w5, b5), w6, b6))
    return [o.detach() for o in outputs], list(_grads(outputs, sizes, [u.double().abs() for u in up]))


def _error_against(a, exact, scale) -> float:
    return ((a.double() - exact.double()).norm() / scale.norm().clamp_min(1e-30)).item()


GRAD_NAMES = ["m", "g"] + [f"{k}{i}" for i in range(1, 7) for k in ("w", "b")]  # global_update's inputs, in order


def _grads(outputs, wrt, up):
    """The gradients of (g', d) . up with respect to ``wrt``."""
    return torch.autograd.grad(sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, up, strict=True)), wrt)


def _assert_pooled_within_twice(draws, names, context: str) -> None:
    """STYLE.md's 2x rule over several draws: ``draws`` holds per draw (ours, PyTorch's, float64) lists in ``names``'
    order; each tensor's relative errors against float64 are pooled (root of the summed squares over the draws), ours
    within 2x PyTorch's."""
    for i, name in enumerate(names):
        err = sum(_rel(ours[i], exact[i]) ** 2 for ours, _, exact in draws) ** 0.5
        torch_err = sum(_rel(plain[i], exact[i]) ** 2 for _, plain, exact in draws) ** 0.5
        assert err <= 2 * torch_err, f"{name}{context}: {err:.2e} vs PyTorch's {torch_err:.2e} (seed {SEED})"


@pytest.mark.parametrize("block", [P3DBottleneck(65, 16, variant="A"), P3DBasicBlock(48, 32, variant="B", stride=2)])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_reference_forward_and_every_gradient(block, n, gen):
    """Outputs and gradients against float64, the error measured against the sums of the terms' magnitudes
    (_magnitudes: the scale of summation's error bound). The thresholds are set from a study, not from the bound's
    constant (about n * 6e-8 per element at depth n): over 3000 seeds of these four cases (/tmp) ours was at most
    3.4e-8 on the outputs and 6.9e-8 on the gradients, PyTorch's float32 3.8e-8 and 1.5e-7."""
    inputs = _case(block, n, gen)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ours = global_update(*inputs, backend="cpp")
    ref = global_update_reference(*ref_inputs)
    up = [torch.randn(t.shape, generator=gen) for t in ref]
    grads = _grads(ours, inputs, up)
    ref_grads = _grads(ref, ref_inputs, up)
    out_scales, grad_scales = _magnitudes(inputs, up)
    for name, a, b, scale in zip(("g_new", "d"), ours, ref, out_scales, strict=True):
        err = _error_against(a, b, scale)
        assert err < 2e-7, f"{name}: {err:.2e} of its terms' magnitudes (seed {SEED})"
    for name, a, b, scale in zip(GRAD_NAMES, grads, ref_grads, grad_scales, strict=True):
        err = _error_against(a, b, scale)
        assert err < 4e-7, f"grad of {name}: {err:.2e} of its terms' magnitudes (seed {SEED})"


@pytest.mark.parametrize("isa", usable_isas(), indirect=True)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
def test_cpu_float32_few_rows_kernel_on_every_simd_path(isa, n, gen):
    """CPU float32 with at most 8 rows runs csrc/cpu/small_linear.cpp's kernel (9 rows: ATen's addmm): every SIMD
    path, 1 to 4 rows of x per pass over W and the leftover 1-3, an odd number of W rows (a single one after the
    pairs) and inputs shorter than a vector, with a tail past the vectors, or a whole number of them (in 65, hidden
    5, out 80). The forward within 2x PyTorch's float32 error against float64 (or 1e-6); the backward's kernels:
    test_cpu_float32_few_rows_backward_kernel_on_every_simd_path."""
    block = P3DBottleneck(65, 20, variant="A")  # global path: fc1 (5, 65), fc2 (80, 5), fc5 (5, 80), ...
    inputs = _case(block, n, gen)
    exact = global_update_reference(*[t.detach().double() for t in inputs])
    plain = global_update_reference(*[t.detach() for t in inputs])
    with torch.no_grad():
        ours = global_update(*[t.detach() for t in inputs], backend="cpp")
    for name, a, p, e in zip(("g_new", "d"), ours, plain, exact, strict=True):
        assert torch.isfinite(a).all() and a.shape == e.shape
        err, torch_err = _rel(a, e), _rel(p, e)
        assert err <= max(2 * torch_err, 1e-6), f"{name} on {isa}, {n} rows: {err:.2e} vs {torch_err:.2e} (seed {SEED})"


_BLOCKS = {"odd": lambda: P3DBottleneck(65, 20, variant="A"), "threaded": lambda: P3DBottleneck(1000, 250, variant="B")}


@pytest.mark.parametrize("isa", usable_isas(), indirect=True)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("size", ["odd", "threaded"])
def test_cpu_float32_few_rows_backward_kernel_on_every_simd_path(isa, n, size, gen, poisoned):
    """CPU float32 with at most 8 rows: the backward (global_update_backward) runs small_linear.cpp's small_matmul
    and small_outer (9 rows: ATen's GEMMs). Every gradient within 2x PyTorch's float32 error against float64. "odd"
    (in 65, hidden 5, out 80): 4-vector and single-vector column blocks, columns past the last vector, products
    narrower than a vector; "threaded" (in 1000, hidden 62, out 1000): the column blocks and weight-gradient rows
    split over threads. Uninitialised memory is NaN (poisoned), so a column or row no task wrote shows.

    The odd size's gradients have 5 to 400 elements, and over so few the ratio of two error norms is mostly luck
    (one draw each: the kernel's median ratio to PyTorch 0.78, yet 7 of 840 over 2x, the worst 3.4x; a /tmp study):
    there each gradient's relative errors are pooled over 8 draws (root of the summed squares; the worst of 14
    gradients over 40 such tests: 1.00-1.40x). The threaded size's too: its w6 gradient (1000 x 62) is grad_d^T h5,
    and at 1 or 2 rows its error is that of h5's 62 or 124 float32 values, spread over the rows; in one draw the
    ratio to PyTorch's was as much luck (7 of 30 seeds had a case over 2x, LGD_FAST_TEST_SEED=3613413288 4.72e-7
    against 2.14e-7; pooled over 8 draws, 0 of 30: a /tmp study)."""
    block = _BLOCKS[size]()
    count = 8
    draws = []
    for _ in range(count):
        inputs = _case(block, n, gen)
        exact_in = [t.detach().double().requires_grad_() for t in inputs]
        plain_in = [t.detach().requires_grad_() for t in inputs]
        c_out = inputs[4].shape[0]  # fc2 (w2) gives g' and d their C_out
        up = [torch.randn(n, c_out, generator=gen, dtype=torch.float64) for _ in range(2)]
        ours = _grads(global_update(*inputs, backend="cpp"), inputs, up)
        for name, a, e in zip(GRAD_NAMES, ours, exact_in, strict=True):
            assert a.shape == e.shape and a.is_contiguous() and torch.isfinite(a).all(), f"grad of {name} (seed {SEED})"
        draws.append((ours, _grads(global_update_reference(*plain_in), plain_in, up),
                      _grads(global_update_reference(*exact_in), exact_in, up)))  # fmt: skip
    _assert_pooled_within_twice(draws, [f"grad of {name}" for name in GRAD_NAMES],
                                f" on {isa}, {n} rows, {size}, {count} draws")  # fmt: skip


def test_backward_op_names_bad_inputs(gen):
    """global_update_backward called directly: the forward's checks, and the upstream gradients and g' checked
    against (N, C_out) and m's dtype, each named."""
    m, g, *w = [t.detach() for t in _case(P3DBottleneck(65, 20, variant="A"), 3, gen)]
    g_new, _ = global_update(m, g, *w, backend="cpp")
    up = torch.randn(g_new.shape, generator=gen)
    backward = torch.ops.lgd_fast.global_update_backward
    with pytest.raises(RuntimeError, match=r"grad_g must be \(N, C_out\)"):
        backward(up[:, :5], up, m, g, *w, g_new)
    with pytest.raises(RuntimeError, match="grad_d is torch.float64|grad_d is Double"):
        backward(up, up.double(), m, g, *w, g_new)
    with pytest.raises(RuntimeError, match=r"g_new must be \(N, C_out\)"):
        backward(up, up, m, g, *w, g_new[:1])
    with pytest.raises(RuntimeError, match="fc1 weight must have shape"):
        backward(up, up, m[:, :5], g[:, :5], *w, g_new)


def test_backward_op_opcheck_and_double_backward(gen):
    """The C++ backward's fake kernel (sizes and strides) against the op, both paths (4 rows: the kernels; 9:
    ATen); and a double backward (create_graph) still differentiates the gradient, through the PyTorch formula."""
    for n in (4, 9):
        m, g, *w = [t.detach() for t in _case(P3DBottleneck(65, 20, variant="A"), n, gen)]
        g_new, _ = global_update(m, g, *w, backend="cpp")
        grad_g, grad_d = (torch.randn(g_new.shape, generator=gen) for _ in range(2))
        torch.library.opcheck(torch.ops.lgd_fast.global_update_backward.default, [grad_g, grad_d, m, g, *w, g_new])
    inputs = [t.detach().double().requires_grad_() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    assert torch.autograd.gradgradcheck(lambda *a: global_update(*a, backend="cpp"), inputs)


def test_bf16_within_twice_pytorch_error(gen):
    """bfloat16: the forward and every gradient of the C++ backward (its ATen path) within 2x PyTorch's own bfloat16
    error against float64, pooled over 4 draws per tensor (as the few-row kernel test pools its small gradients).
    The backward is given PyTorch's bfloat16 g' (whose ReLU mask it differentiates through): in bfloat16 a ReLU
    input within a few units of rounding of zero lands on either side in two implementations, and a flipped mask
    moves a gradient by its whole value (seen: 21% on one draw), which is the forward's rounding, not the
    backward's; _case keeps such inputs only 1e-4 away, float32's margin."""
    block = P3DBottleneck(64, 16, variant="A")
    draws = []
    for _ in range(4):
        inputs = [t.detach() for t in _case(block, 3, gen, torch.bfloat16)]
        exact_in = [t.double().requires_grad_() for t in inputs]
        plain_in = [t.clone().requires_grad_() for t in inputs]
        up = [torch.randn(3, inputs[4].shape[0], generator=gen, dtype=torch.float64) for _ in range(2)]
        exact = global_update_reference(*exact_in)
        plain = global_update_reference(*plain_in)
        with torch.no_grad():
            ours = [*global_update(*inputs, backend="cpp"), *torch.ops.lgd_fast.global_update_backward(
                *(u.to(torch.bfloat16) for u in up), *inputs, plain[0].detach())]  # fmt: skip
        assert all(t.dtype == torch.bfloat16 for t in ours)
        draws.append((ours, [*plain, *_grads(plain, plain_in, up)], [*exact, *_grads(exact, exact_in, up)]))
    _assert_pooled_within_twice(draws, ["g_new", "d", *GRAD_NAMES], "")


def test_gradcheck_and_opcheck(gen):
    inputs = [t.detach().double().requires_grad_() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    assert torch.autograd.gradcheck(torch.ops.lgd_fast.global_update, inputs)
    torch.library.opcheck(torch.ops.lgd_fast.global_update.default, [t.float() for t in inputs])


@pytest.mark.parametrize("n", [4, 9])  # the few-row kernels, ATen's GEMMs
def test_bf16_fake_kernels_give_the_real_sizes_and_strides(n, gen):
    """bfloat16 through the forward and backward ops: the fakes' sizes, strides and dtypes are the real ones."""
    m, g, *w = [t.detach() for t in _case(P3DBottleneck(65, 20, variant="A"), n, gen, torch.bfloat16)]
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lgd_fast.global_update.default, [m, g, *w], test_utils=checks)
    g_new, _ = torch.ops.lgd_fast.global_update(m, g, *w)
    grads = [torch.randn(g_new.shape, generator=gen).to(torch.bfloat16) for _ in range(2)]
    torch.library.opcheck(torch.ops.lgd_fast.global_update_backward.default, [*grads, m, g, *w, g_new],
                          test_utils=checks)  # fmt: skip


def test_compiles_to_one_call(gen):
    from torch._inductor.utils import run_and_get_code

    inputs = [t.detach() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    compiled = torch.compile(lambda *a: global_update(*a), backend="inductor", fullgraph=True)
    out, code = run_and_get_code(compiled, *inputs)
    assert any("lgd_fast.global_update" in c for c in code)
    for a, b in zip(out, global_update_reference(*inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_near_the_kink_finds_a_relu_input_at_zero(gen):
    block = P3DBasicBlock(16, 32, variant="A")
    case = _case(block, 2, gen)
    assert not _near_the_kink(case)
    m, g, w1, b1, w2, b2, w3, b3, w4, b4 = (t.detach().double() for t in case[:10])
    pre = F.linear(F.linear(m, w1, b1), w2, b2) + F.linear(F.linear(g, w3, b3), w4, b4)
    with torch.no_grad():
        case[9][0] -= pre[0, 0].float()  # fc4's bias moves sample 0's first ReLU input to zero
    assert _near_the_kink(case)


def test_bad_inputs_are_named(gen):
    m, g, *w = [t.detach() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    with pytest.raises(ValueError, match="expected 12 weight tensors"):
        global_update(m, g, *w[:-1])
    # the compiled op checks them itself (global_update checks the same first, test_every_backend_checks_its_inputs)
    with pytest.raises(RuntimeError, match="fc1 weight must have shape"):
        torch.ops.lgd_fast.global_update(m[:, :5], g[:, :5], *w)
    with pytest.raises(RuntimeError, match="g must have m's shape"):
        torch.ops.lgd_fast.global_update(m, g[:1], *w)
    with pytest.raises(RuntimeError, match="fc3 has dtype"):
        torch.ops.lgd_fast.global_update(m, g, *w[:4], w[4].double(), *w[5:])
    with pytest.raises(ValueError, match="nonsense"):
        global_update(m, g, *w, backend="nonsense")


def _replace(i, value):
    """A change of global_update's arguments (m, g, w1, b1, ..., w6, b6): argument i replaced by value(it)."""
    return lambda args: [value(t) if j == i else t for j, t in enumerate(args)]


@pytest.mark.parametrize("backend", ["reference", "cpp", "auto", "$LGD_FAST_BACKEND=reference"])
@pytest.mark.parametrize(
    "change,error,match",
    [
        (_replace(1, lambda g: g[:1]), ValueError, r"g must have m's shape \(2, 16\), got \(1, 16\)"),
        (_replace(1, lambda g: g[0]), ValueError, r"g must have m's shape \(2, 16\), got \(16,\)"),
        (_replace(3, lambda b1: b1[:1]), ValueError, r"fc1 weight must have shape \(2, 16\) and bias \(2,\), got "
         r"\(2, 16\) and \(1,\)"),
        (_replace(2, lambda w1: w1[:, :15]), ValueError, r"fc1 weight must have shape \(2, 16\) and bias \(2,\), got "
         r"\(2, 15\)"),
        (lambda a: [a[0].double(), a[1].double(), *a[2:]], ValueError, "fc1 is torch.float32 on cpu but m is "
         "torch.float64"),
        (_replace(0, lambda m: m.tolist()), TypeError, "global_update: m must be a tensor, got list"),
        (_replace(0, lambda m: m.int()), TypeError, "global_update: m must be a floating-point tensor"),
        (lambda a: [*a[:2], *[1.0] * 12], TypeError, "global_update: w1 must be a tensor, got float"),
        (_replace(5, lambda b2: None), TypeError, "global_update: b2 must be a tensor, got NoneType"),
    ],
    ids=["g-one-row", "g-1d", "b1-one", "w1-columns", "m-float64", "m-list", "m-int", "float-weights", "b2-None"],
)  # fmt: skip
def test_every_backend_checks_its_inputs(change, error, match, backend, gen, monkeypatch):
    """The C++ op's checks, on every backend: the reference would broadcast g (1, C_in) or a (1,) bias into a
    wrong (N, C_out) result, or fail inside a matmul."""
    if backend.startswith("$"):
        monkeypatch.setenv("LGD_FAST_BACKEND", backend.split("=")[1])
        backend = None
    args = [t.detach() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    with pytest.raises(error, match=match):
        global_update(*change(args), backend=backend)


def test_backend_choice(monkeypatch, gen):
    """auto: triton for CUDA tensors where the Triton op registered, cpp otherwise; triton refuses CPU tensors."""
    import importlib
    import types

    module = importlib.import_module("lgd_fast.ops.global_update")  # the package re-exports the function

    monkeypatch.delenv("LGD_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = torch.zeros(2, 3)
    assert module._choose(None, m) == "cpp"
    assert module._choose("reference", m) == "reference"
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run.*CUDA tensors"):
        module._choose("triton", m)
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    monkeypatch.setattr(module, "_TRITON_REGISTERED", True)
    assert module._choose(None, cuda_like) == "triton"
    assert module._choose("cpp", cuda_like) == "cpp"  # ATen GEMMs run on any device
    cuda_like.dtype = torch.float64
    assert module._choose(None, cuda_like) == "cpp"
    monkeypatch.setattr(module, "_TRITON_REGISTERED", False)
    cuda_like.dtype = torch.float32
    assert module._choose(None, cuda_like) == "cpp"


def test_triton_path_checks_name_the_argument(gen):
    from lgd_fast.ops.global_update import _check_for_triton

    m, g, *w = [t.detach() for t in _case(P3DBasicBlock(16, 32, variant="A"), 2, gen)]
    _check_for_triton(m, g, w)  # a valid case passes
    with pytest.raises(ValueError, match="m must be"):
        _check_for_triton(m[0], g, w)
    with pytest.raises(ValueError, match="g must have m's shape"):
        _check_for_triton(m, g[:1], w)
    with pytest.raises(ValueError, match=r"fc2 weight must have shape \(32, 2\)"):
        _check_for_triton(m, g, [*w[:2], w[2][:, :1], *w[3:]])
    with pytest.raises(ValueError, match="fc5 is torch.float64"):
        _check_for_triton(m, g, [*w[:8], w[8].double(), *w[9:]])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        _check_for_triton(m.double(), g.double(), [t.double() for t in w])
