"""The fused training path of the fast LGD-3D meets the 2x rule against float64, on R50 and R101.

The weights are the author-parity fixture's (``author_fixture.deterministic_weights``: random BatchNorm
statistics and affine parameters; ``test_author_parity.py`` checks that the reference built from them equals the
first author's module). Every draw takes a fresh input and fresh upstream gradients. One training step gives the
gradient of every parameter and of the input three ways: the fast model in float32 with every layer forced onto
its fused code (P3D units, block ends, statistics from the convs' epilogues), the reference in float32 (plain
PyTorch: the yardstick), and the reference in float64. Per gradient, the fast model's relative error summed over
the draws is at most 2x the reference's (``p3d_cases.check_pooled_ratio``, which sets the worst quarter of draws
aside: one ReLU position within float32 rounding of zero lands on either side in two implementations and moves
a gradient near the head by one position's share. Seen here: single draws at 47x-6966x on a block-end bias,
while the pooled ratio stays at 1.1-1.5). Where ours jumps over 10x in a draw, the reference also runs from inputs
moved by one rounding, and a gradient it flips there is excused in that draw (the test's docstring).

Before the convs' statistics were taken about the mean (they were the sum of squares, the variance then
E[z^2] - E[z]^2), R101's layer4 gradients at this input (2x2x2 maps, BatchNorms over 8 values) were 700x plain
PyTorch's error in every draw: layer4.2.conv3.weight 0.62 against 8.4e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from p3d_cases import check_pooled_ratio, rel

import author_fixture
from lgd_fast import create_model
from lgd_fast.plan import forced

CASES = {  # arch: (input shape, draws); small inputs keep layer4's BatchNorms at 8-16 values per channel
    "lgd3d_r50": ((2, 3, 8, 64, 64), 16),
    "lgd3d_r101": ((1, 3, 8, 64, 64), 16),
}


def _gradients(model, x, upstream) -> dict[str, torch.Tensor]:
    model.train()
    x = x.clone().requires_grad_()
    outs = model(x)
    sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream, strict=True)).backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def author_models(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The reference with the author-parity fixture's weights, and the fast model loaded from it."""
    reference = create_model(arch, author_fixture.NUM_CLASSES, classifier="two_heads", dropout=0.0)
    reference.load_state_dict(author_fixture.deterministic_weights(reference))
    fast = create_model(arch, author_fixture.NUM_CLASSES, classifier="two_heads", dropout=0.0, fast=True)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def channels_last_gradients(reference, x, upstream) -> dict[str, torch.Tensor]:
    """The float32 reference's gradients with its weights and the input in channels_last_3d."""
    cl = torch.channels_last_3d
    return _gradients(copy.deepcopy(reference).to(memory_format=cl), x.contiguous(memory_format=cl), upstream)


def draw_gradients(reference, fast, shape, gen, *, channels_last_reference=False, candidate="fast"):
    """One fresh input and upstream gradients: (float64, yardstick, candidate) gradients. The yardstick is the
    float32 reference, contiguous or (``channels_last_reference``) in channels_last_3d, weights and input. The
    candidate is the fast model with every layer on its fused code, or with ``candidate="reference_channels_last"``
    the float32 reference in channels_last_3d (judged against the contiguous yardstick: the rule's calibration)."""
    x, upstream = draw_inputs(shape, gen)
    return gradients_three_ways(
        reference, fast, x, upstream, channels_last_reference=channels_last_reference, candidate=candidate
    )


def draw_inputs(shape, gen) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A fresh input and upstream gradients for both heads."""
    x = torch.randn(shape, generator=gen)
    return x, [torch.randn(shape[0], author_fixture.NUM_CLASSES, generator=gen) for _ in range(2)]


def gradients_three_ways(reference, fast, x, upstream, *, channels_last_reference=False, candidate="fast"):
    """(float64, yardstick, candidate) gradients at ``x`` and ``upstream`` (``draw_gradients``)."""
    want = _gradients(copy.deepcopy(reference).double(), x.double(), upstream)
    if channels_last_reference:
        plain = channels_last_gradients(reference, x, upstream)
    else:
        plain = _gradients(copy.deepcopy(reference), x, upstream)
    if candidate == "reference_channels_last":
        ours = channels_last_gradients(reference, x, upstream)
    else:
        with forced():
            ours = _gradients(copy.deepcopy(fast), x, upstream)
    assert want.keys() == ours.keys()
    return want, plain, ours


def other_rounding_luck(reference, x, upstream, gen: torch.Generator, runs: int = 8) -> list[dict[str, torch.Tensor]]:
    """The float32 reference's gradients from ``runs`` copies of ``x``, each element moved by at most one float32
    rounding (a relative 2^-23): plain PyTorch again, with other rounding luck. Where a ReLU input lies within the
    float32 run's error of zero, some of these runs put it on the other side, as another implementation may."""
    moved = []
    for _ in range(runs):
        u = 2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1
        moved.append(_gradients(copy.deepcopy(reference), (x.double() * (1 + 2.0**-23 * u)).float(), upstream))
    return moved


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CASES))
def test_fused_training_gradients_meet_the_2x_rule(arch, gen):
    """Per draw and gradient, PyTorch's error is the float32 reference's. Where ours jumped over 10x it on some
    gradient (a flipped ReLU position, not rounding noise), the reference is run 8 times more from the input
    moved by at most one rounding (``other_rounding_luck``), and a gradient that jumped over 10x in one of those
    runs is excused in that draw: a flip PyTorch makes too, so that draw cannot judge it (at most half of a
    gradient's draws; ``check_pooled_ratio``). Seen at LGD_FAST_TEST_SEED=2925068468 (R50): the fast model
    flipped a position in 7 of 16 draws, the reference in 3, and layer4.1.fc1.weight failed the pooled rule at
    3.2x (single draws 107-374x); of the 5 such draws rerun with four moved inputs (/tmp), 4 had one to three
    runs jump exactly as far. Excused draws leave both sums, so a systematic excess is still judged in the rest."""
    shape, draws = CASES[arch]
    reference, fast = author_models(arch)
    rows = []
    for _ in range(draws):
        x, upstream = draw_inputs(shape, gen)
        luck = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # drawn every draw
        want, plain, ours = gradients_three_ways(reference, fast, x, upstream)
        err, torch_err = ({k: rel(grads[k], w) for k, w in want.items()} for grads in (ours, plain))
        excused = set()
        if any(err[k] > 10 * torch_err[k] for k in want):  # a jump, not 2-8x noise
            for other in other_rounding_luck(reference, x, upstream, luck):
                excused |= {k for k, w in want.items() if rel(other[k], w) > 10 * torch_err[k]}
        rows.append([
            {"name": k, "err": err[k], "torch_err": torch_err[k], "excused": k in excused,
             "finite": bool(torch.isfinite(ours[k]).all()), "shape_ok": ours[k].shape == w.shape}
            for k, w in want.items()
        ])  # fmt: skip
    check_pooled_ratio(rows, f"{arch} {shape} fused training")
