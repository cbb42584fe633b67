"""lgd_fast.ops.bn_relu_max_pool: the stem's training BatchNorm + ReLU + max-pool op against plain PyTorch.

Fresh random inputs every run (seed printed on failure; LGD_FAST_TEST_SEED replays one), every SIMD path, both
layouts, odd shapes (channels off every vector width, odd and even frames, 1-pixel frames), float32 and bfloat16,
training and eval, poisoned (every fresh allocation NaN, so an unwritten element shows). STYLE.md's rule: each
output (the pooled output, the gradients of y, weight and bias, the running statistics) within 2x of plain
PyTorch's own error against float64 at the same dtype.

y lies on a grid of 1/64 steps: two values of a window are then equal (equal in every precision, and both pick the
first) or a step apart, far over rounding, so which tap a window picks is the same in float64 and float32. Off a
grid, two values within rounding of each other are picked by rounding, and the gradient lands a tap away (a whole
upstream value off float64: not an error the comparison could judge). The BatchNorm's bias puts zero half-way
between two grid values' normalised levels, for the same reason at the ReLU.
"""

from __future__ import annotations

import pytest
import torch

from lgd_fast.ops import bn_relu_max_pool, bn_relu_max_pool_reference
from lgd_fast.ops.bn_relu_max_pool import kernel_applies, pooled_size
from op_testing import assert_layout, on_thread_counts, usable_isas

CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ISAS = usable_isas()
STEP = 1 / 64
# lgd3d_tiny's stem channels (16) and R50's (64) at small frames; channels off the vector widths (5, 19, 21: the
# scalar tails), odd and even frames, a 1x1 and a 2x3 frame (windows past every edge), one frame, one video
SHAPES = [(2, 16, 3, 8, 8), (1, 64, 2, 9, 7), (2, 5, 3, 9, 7), (3, 19, 1, 1, 1), (2, 21, 2, 2, 3), (1, 24, 1, 14, 15)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _case(shape, dtype, fmt, training: bool, gen):
    """(y, running_mean, running_var, weight, bias, upstream): y on the 1/64 grid (module docstring) and exact in
    ``dtype``, as is the upstream gradient; the bias moved so that no grid value normalises to within half a step of
    zero."""
    C = shape[1]
    y64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 48).round().clamp(-255, 255) * STEP
    weight = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)) * torch.where(
        torch.rand(C, generator=gen) < 0.25, -1.0, 1.0).double()  # fmt: skip
    bias = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
    running_mean = 0.2 * torch.randn(C, generator=gen, dtype=torch.float64)
    running_var = 0.5 + torch.rand(C, generator=gen, dtype=torch.float64)
    if training:
        mean, var = y64.mean((0, 2, 3, 4)), y64.var((0, 2, 3, 4), correction=0)
    else:
        mean, var = running_mean, running_var
    scale = weight * torch.rsqrt(var + 1e-5)
    offset = (bias - mean * scale) / (scale * STEP)  # z / (scale * STEP) = k + offset on the grid's k
    bias = bias + (0.5 - (offset - offset.floor())) * scale * STEP
    y = y64.to(dtype).contiguous(memory_format=FORMATS[fmt])
    assert torch.equal(y.double(), y64)
    N, C, T, H, W = shape
    # (in dtype's values: the float64 run then differentiates what the others do; an unrounded upstream in it alone
    # made the bfloat16 weight gradients' errors the upstream's rounding, whose ratio is a coin toss)
    upstream = torch.randn((N, C, T, *pooled_size(H, W)), generator=gen, dtype=torch.float64).to(dtype).double()
    return y, running_mean.float(), running_var.float(), weight.float(), bias.float(), upstream


def _run(fn, case, dtype, training: bool):
    """out, grad_y, grad_weight, grad_bias, running_mean, running_var of ``fn`` on the case in ``dtype``."""
    y, running_mean, running_var, weight, bias, upstream = case
    y = y.to(dtype).detach().requires_grad_()
    weight, bias = (t.to(torch.float64 if dtype == torch.float64 else torch.float32).detach().requires_grad_()
                    for t in (weight, bias))  # fmt: skip
    stats = [t.to(weight.dtype).clone() for t in (running_mean, running_var)]
    out = fn(y, *stats, weight, bias, training, 0.1, 1e-5)
    grads = torch.autograd.grad(out, (y, weight, bias), upstream.to(out.dtype).contiguous(memory_format=_format(y)))
    return {"out": out, "grad_y": grads[0], "grad_weight": grads[1], "grad_bias": grads[2],
            "running_mean": stats[0], "running_var": stats[1]}  # fmt: skip


def _format(t: torch.Tensor):
    return CL if (t.is_contiguous(memory_format=CL) and not t.is_contiguous()) else torch.contiguous_format


def _cpp(*args):
    return bn_relu_max_pool(*args, backend="cpp")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_float64_within_twice_the_reference(shape, fmt, dtype, isa, gen, poisoned):
    for training in (True, False):
        case = _case(shape, dtype, fmt, training, gen)
        ours = _run(_cpp, case, dtype, training)
        plain = _run(bn_relu_max_pool_reference, case, dtype, training)
        exact = _run(bn_relu_max_pool_reference, case, torch.float64, training)
        for name, value in ours.items():
            assert value.dtype == plain[name].dtype and value.shape == plain[name].shape, name
            if name in ("out", "grad_y"):
                assert_layout(value, FORMATS[fmt])
            if not training and name.startswith("running"):
                assert torch.equal(value, plain[name]), name  # eval leaves them as they were
                continue
            err, ref_err = _rel(value, exact[name]), _rel(plain[name], exact[name])
            slack = 1e-6 if value.dtype == torch.float32 else 1e-3
            assert err <= 2 * ref_err + slack, (name, training, err, ref_err)


def test_the_tap_bytes_and_ties_follow_atens_max_pool(gen):
    """Equal values in a window: the first one takes the gradient, as ATen's pool routes it (bit for bit in
    float32 on a grid, where both compute the same normalised values' order)."""
    y = (torch.randint(-3, 4, (2, 16, 2, 7, 9), generator=gen).float() * 0.25).contiguous(memory_format=CL)
    weight, bias = torch.full((16,), 1.5), torch.full((16,), 0.1)
    rm, rv = torch.zeros(16), torch.ones(16)
    out, arg = torch.ops.lgd_fast.bn_relu_max_pool(y, weight / (1 + 1e-5) ** 0.5, bias)
    z = torch.relu(torch.nn.functional.batch_norm(y, rm, rv, weight, bias, False, 0.1, 1e-5))
    pooled, index = torch.nn.functional.max_pool3d(z, (1, 3, 3), (1, 2, 2), (0, 1, 1), return_indices=True)
    assert torch.allclose(out, pooled, rtol=1e-6, atol=0)
    live = pooled > 0
    assert torch.equal(arg == 255, ~live)
    H, W = y.shape[3:]
    ho = torch.arange(pooled.shape[3]).view(1, 1, 1, -1, 1)
    wo = torch.arange(pooled.shape[4]).view(1, 1, 1, 1, -1)
    h, w = (index % (H * W)) // W, index % W  # ATen's flat index within the frame
    tap = (h - 2 * ho + 1) * 3 + (w - 2 * wo + 1)
    assert torch.equal(arg.long()[live], tap[live])


def test_sums_do_not_depend_on_the_thread_count(gen):
    case = _case((3, 70, 4, 11, 13), torch.float32, "channels_last_3d", True, gen)
    y, scale = case[0], case[3]
    out, arg = torch.ops.lgd_fast.bn_relu_max_pool(y, scale, case[4])
    grad = case[5].float().contiguous(memory_format=CL)
    mean = torch.randn(70, generator=gen)
    one, two = on_thread_counts(lambda: torch.ops.lgd_fast.bn_relu_max_pool_backward_sums(grad, arg, y, mean))
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_fake_kernels_give_the_real_sizes_and_strides(fmt, dtype, gen):
    y, _, _, weight, bias, upstream = _case((2, 9, 3, 5, 8), dtype, fmt, True, gen)
    out, arg = torch.ops.lgd_fast.bn_relu_max_pool(y, weight, bias)
    grad = upstream.to(dtype).contiguous(memory_format=FORMATS[fmt])
    mean, k = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    calls = [
        (torch.ops.lgd_fast.bn_relu_max_pool.default, (y, weight, bias)),
        (torch.ops.lgd_fast.bn_relu_max_pool_backward_sums.default, (grad, arg, y, mean)),
        (torch.ops.lgd_fast.bn_relu_max_pool_backward_apply.default, (grad, arg, y, mean, k, k, k)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_under_torch_compile_the_op_gives_the_eager_results(gen):
    """Traced by dynamo (the autograd.Function with the ops' fake kernels), forward and every gradient."""
    torch._dynamo.reset()
    case = _case((2, 16, 2, 9, 8), torch.float32, "channels_last_3d", True, gen)
    eager = _run(_cpp, case, torch.float32, True)
    compiled = _run(torch.compile(_cpp, backend="aot_eager", fullgraph=True), case, torch.float32, True)
    for name, value in eager.items():
        assert torch.equal(compiled[name], value), name


def test_auto_sends_what_the_kernel_does_not_take_to_the_reference(gen):
    y, rm, rv, weight, bias, _ = _case((2, 5, 2, 6, 6), torch.float32, "contiguous", True, gen)
    assert kernel_applies(y.contiguous(memory_format=CL))
    assert not any(kernel_applies(t) for t in (y, y.double(), y.transpose(3, 4)))  # contiguous: slower than ATen
    for odd in (y, y.double(), y.transpose(3, 4)):
        params = [t.to(odd.dtype) for t in (rm, rv, weight, bias)]
        want = bn_relu_max_pool_reference(odd, *(t.clone() for t in params), True)
        assert torch.equal(bn_relu_max_pool(odd, *(t.clone() for t in params), True, backend="auto"), want)
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot take y: dtype torch.float64 is not float32 or "):
        bn_relu_max_pool(y.double(), rm, rv, weight, bias, True, backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot take y: y is neither contiguous nor channels_last"):
        bn_relu_max_pool(y.transpose(3, 4), rm, rv, weight, bias, True, backend="cpp")


def test_bad_inputs_are_errors_that_name_them(gen):
    y, rm, rv, weight, bias, upstream = _case((2, 5, 3, 4, 4), torch.float32, "channels_last_3d", True, gen)
    with pytest.raises(TypeError, match="bn_relu_max_pool: y must be a tensor, got list"):
        bn_relu_max_pool([1.0], rm, rv)
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        bn_relu_max_pool(y.long(), rm, rv)
    with pytest.raises(ValueError, match=r"y must be a 5-D tensor \(N, C, T, H, W\), got shape \(5, 3, 4, 4\)"):
        bn_relu_max_pool(y[0], rm, rv)
    with pytest.raises(ValueError, match="y is empty"):
        bn_relu_max_pool(y[:, :, :, :0], rm, rv, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\) for y with 5 channels, got \(4,\)"):
        bn_relu_max_pool(y, rm, rv, weight[:4], bias, True)
    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        bn_relu_max_pool(y, rm, None, weight, bias, True)
    with pytest.raises(ValueError, match="training=False normalises with the running statistics"):
        bn_relu_max_pool(y, None, None, weight, bias, False)
    with pytest.raises(TypeError, match="training must be a bool, got str 'yes'"):
        bn_relu_max_pool(y, rm, rv, weight, bias, "yes")
    with pytest.raises(TypeError, match="momentum must be a real number, got NoneType"):
        bn_relu_max_pool(y, rm, rv, weight, bias, True, None)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn_relu_max_pool(y, rm, rv, weight, bias, True, 0.1, 0.0)
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training, got 1"):
        bn_relu_max_pool(y[:1, :, :1, :1, :1], rm, rv, weight, bias, True)
    out, arg = torch.ops.lgd_fast.bn_relu_max_pool(y, weight, bias)
    grad = upstream.float().contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.lgd_fast.bn_relu_max_pool_backward_sums(grad[:1], arg, y, rm)
    with pytest.raises(RuntimeError, match="arg must be the forward's uint8 taps"):
        torch.ops.lgd_fast.bn_relu_max_pool_backward_sums(grad, arg.float(), y, rm)
    with pytest.raises(RuntimeError, match=r"mean must have shape \(5\)"):
        torch.ops.lgd_fast.bn_relu_max_pool_backward_apply(grad, arg, y, rm[:2], rm, rm, rm)
