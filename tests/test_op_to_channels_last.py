"""lgd_fast.ops.to_channels_last_3d: bit for bit the reference (``x.contiguous(memory_format=channels_last_3d)``) in
every dtype and shape, its gradient, its fake kernel's sizes and strides, its errors, and the stem's use of it."""

from __future__ import annotations

import pytest
import torch

from lgd_fast import create_model
from lgd_fast import plan as planning
from lgd_fast.ops import to_channels_last_3d, to_channels_last_3d_reference
from lgd_fast.ops._backend import extension_available

CL = torch.channels_last_3d
needs_cpp = pytest.mark.skipif(not extension_available(), reason="lgd_fast._C did not build")
SHAPES = [(2, 3, 4, 5, 7), (1, 1, 3, 2, 2), (3, 2, 1, 1, 9), (1, 4, 2, 33, 17), (2, 5, 3, 4, 4), (1, 3, 16, 32, 32),
          (2, 16, 2, 3, 3), (0, 3, 2, 2, 2)]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.int32]


def _draw(shape, dtype, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 100
    return x.to(dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_the_reference_bit_for_bit(gen, shape, dtype):
    x = _draw(shape, dtype, gen)
    got = torch.ops.lgd_fast.to_channels_last_3d(x)
    want = to_channels_last_3d_reference(x)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL) and got.dtype == dtype
    assert torch.equal(got, want)
    public = to_channels_last_3d(x, backend="cpp")  # (x itself where it already is, as the reference)
    assert torch.equal(public, want) and public.stride() == want.stride()
    if not x.is_contiguous(memory_format=CL):
        assert got.stride() == want.stride()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gradient_is_the_gradient_made_contiguous(gen, dtype):
    x = _draw((2, 3, 3, 5, 6), dtype, gen).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = to_channels_last_3d(x, backend="cpp"), to_channels_last_3d_reference(xr)
    for grad_format in (CL, torch.contiguous_format):
        g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=grad_format)
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        (gxr,) = torch.autograd.grad(yr, xr, g, retain_graph=True)
        assert torch.equal(gx, gxr) and gx.is_contiguous()
    assert torch.autograd.gradcheck(lambda t: torch.ops.lgd_fast.to_channels_last_3d(t),
                                    (_draw((1, 3, 2, 2, 3), torch.float64, gen).requires_grad_(),))  # fmt: skip


@needs_cpp
def test_fake_kernel_sizes_and_strides_match_the_op(gen):
    for shape in SHAPES[:4]:
        x = _draw(shape, torch.float32, gen)
        torch.library.opcheck(torch.ops.lgd_fast.to_channels_last_3d.default, (x,))
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = torch.ops.lgd_fast.to_channels_last_3d(mode.from_tensor(x))
        real = torch.ops.lgd_fast.to_channels_last_3d(x)
        assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@needs_cpp
def test_compiles_without_a_graph_break(gen):
    x = _draw((2, 3, 4, 6, 6), torch.float32, gen)
    compiled = torch.compile(lambda t: to_channels_last_3d(t) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), to_channels_last_3d_reference(x) * 2)


def test_errors_and_inputs_it_leaves_to_the_reference(gen):
    with pytest.raises(ValueError, match="5-D"):
        to_channels_last_3d(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="to_channels_last_3d: x must be a tensor, got list"):
        to_channels_last_3d([1.0])
    x = _draw((2, 3, 4, 5, 6), torch.float32, gen)
    already = to_channels_last_3d_reference(x)
    assert to_channels_last_3d(already) is already, "channels-last input is returned as it is"
    view = x.transpose(3, 4)  # neither layout: the reference (auto)
    assert torch.equal(to_channels_last_3d(view), to_channels_last_3d_reference(view))
    with pytest.raises(ValueError):
        to_channels_last_3d(x, backend="nonsense")
    if extension_available():
        with pytest.raises(RuntimeError, match="contiguous"):
            torch.ops.lgd_fast.to_channels_last_3d(view)
        with pytest.raises(RuntimeError, match="5-D"):
            torch.ops.lgd_fast.to_channels_last_3d(torch.randn(2, 3, 4, 4))
        with pytest.raises(RuntimeError, match="dtype"):
            torch.ops.lgd_fast.to_channels_last_3d(torch.zeros(1, 3, 1, 2, 2, dtype=torch.bool))


@needs_cpp
def test_the_stem_converts_the_clip_with_it(gen, monkeypatch):
    """A fast model whose stem runs channels-last (in training: at inference its stem kernel reads the clip as it
    comes) converts its contiguous clip with the op (the plan's ``Choice.to``), and its output equals the reference
    model's."""
    calls = []
    real = planning.to_channels_last_3d
    monkeypatch.setattr(planning, "to_channels_last_3d", lambda t, **kw: calls.append(tuple(t.shape)) or real(t, **kw))
    ref = create_model("lgd3d_tiny", 5, dropout=0.0).train()
    fast = create_model("lgd3d_tiny", 5, dropout=0.0, fast=True, plan="default").train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)
    got, want = fast(x).detach(), ref(x).detach()
    assert calls == [(2, 3, 4, 32, 32)], calls
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    stem = [c for key, c in fast._lgd_plan.choices.items()]
    assert stem and all(c.layout == planning.CL for c in stem)


@pytest.mark.parametrize("env_backend", ["cpp", "reference"])
def test_the_stem_takes_any_clip_whatever_the_backend_setting(gen, monkeypatch, env_backend):
    """``LGD_FAST_BACKEND`` naming a backend (read when the model is made) never makes the stem's conversion
    refuse a clip: a clip in neither layout (an (N, T, C, H, W) loader's, permuted) or a negated view runs ATen's
    conversion, and the model's output equals the reference's."""
    monkeypatch.setenv("LGD_FAST_BACKEND", env_backend)
    ref = create_model("lgd3d_tiny", 5, dropout=0.0).eval()
    fast = create_model("lgd3d_tiny", 5, dropout=0.0, fast=True).eval()
    fast.load_state_dict(ref.state_dict())
    clips = torch.randn(2, 4, 3, 32, 32, generator=gen)
    for x in (clips.permute(0, 2, 1, 3, 4), torch.neg(clips.permute(0, 2, 1, 3, 4).contiguous()._neg_view())):
        with torch.no_grad():
            got, want = fast(x), ref(x.resolve_neg())
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_choice_to_leaves_what_the_op_does_not_take_to_aten(gen):
    choice = planning.Choice(False, False, planning.CL, "modules", "")
    x = torch.randn(1, 3, 2, 4, 4, generator=gen)
    cases = {"permuted": x.transpose(3, 4), "int": x.to(torch.int32), "negated": x._neg_view(), "4 channels+": None}
    cases["4 channels+"] = torch.randn(1, 5, 2, 4, 4, generator=gen)
    for name, t in cases.items():
        assert not planning._clip_op_takes(t), name
        assert torch.equal(choice.to(t), t.contiguous(memory_format=CL)), name
    assert planning._clip_op_takes(x)
