"""Tensor Sketch tested as the mathematics it is: <phi(a), phi(b)> estimates <a, b>^2."""

import pytest
import torch

from lgd_fast.models import KernelClassifier, TensorSketch
from lgd_fast.models.heads import positions


def _pairs(n, dim, gen):
    """Correlated random pairs, so <a, b>^2 is of the order of |a|^2 |b|^2 rather than near zero."""
    a = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    b = 0.7 * a + 0.7 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return a, b


def _relative_error(sketch_dim, dim=64, pairs=200, sketches=8, seed=None):
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())) if seed is None else seed)
    a, b = _pairs(pairs, dim, gen)
    exact = (a * b).sum(-1) ** 2
    errors = []
    for s in range(sketches):
        ts = TensorSketch(dim, sketch_dim, seed=int(torch.randint(1 << 30, (), generator=gen)) + s)
        approx = (ts(a).double() * ts(b).double()).sum(-1)
        errors.append(((approx - exact).abs() / exact.abs().clamp_min(1e-3)).median())
    return torch.stack(errors).mean().item()


def test_sketch_approximates_the_second_order_kernel_and_improves_with_dimension():
    errors = {d: _relative_error(d) for d in (64, 512, 4096)}
    assert errors[4096] < 0.08, errors
    # Error of a count-sketch estimate falls like 1/sqrt(D): 8x the dimension should cut it by about sqrt(8).
    assert errors[512] < errors[64] / 1.8 and errors[4096] < errors[512] / 1.8, errors


def test_sketch_is_unbiased_over_random_hashes():
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    a, b = _pairs(1, 16, gen)
    exact = ((a * b).sum() ** 2).item()
    estimates = []
    for seed in range(400):
        ts = TensorSketch(16, 32, seed=seed)
        estimates.append((ts(a) * ts(b)).sum().item())
    mean = torch.tensor(estimates, dtype=torch.float64).mean().item()
    stderr = torch.tensor(estimates, dtype=torch.float64).std().item() / 20
    assert abs(mean - exact) < 4 * stderr + 1e-6 * abs(exact)


def test_local_feature_realises_the_mean_pairwise_kernel():
    """<mean_i phi(x_i), mean_j phi(y_j)> ~= mean_{i,j} <x_i, y_j>^2 (the local half of the LGD kernel)."""
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    x = torch.randn(12, 32, generator=gen, dtype=torch.float64).abs()  # ReLU features are non-negative
    y = (x + 0.5 * torch.randn(15, 32, generator=gen, dtype=torch.float64)[:12]).abs()
    exact = ((x @ y.T) ** 2).mean()
    ts = TensorSketch(32, 8192, seed=3)
    approx = (ts(x).double().mean(0) * ts(y).double().mean(0)).sum()
    assert abs(approx - exact) / exact < 0.05


def test_sketch_hashes_are_saved_and_reproducible():
    a, b = TensorSketch(10, 20, seed=5), TensorSketch(10, 20, seed=5)
    assert set(a.state_dict()) == {"hash1", "sign1", "hash2", "sign2"}
    x = torch.randn(3, 10)
    assert torch.equal(a(x), b(x))
    c = TensorSketch(10, 20, seed=6)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(x), a(x))
    with pytest.raises(ValueError, match="last dimension 10"):
        a(torch.randn(3, 11))


def test_positions_layouts_agree():
    video = torch.randn(2, 5, 3, 4, 4)  # N, C, T, H, W
    frames = video.transpose(1, 2).reshape(6, 5, 4, 4)  # N * T, C, H, W
    p3d, p2d = positions(video, 2), positions(frames, 2)
    assert p3d.shape == p2d.shape == (2, 48, 5)
    torch.testing.assert_close(p3d, p2d)


def test_kernel_classifier_shapes_and_gradients():
    head = KernelClassifier(8, 6, num_classes=4, sketch_dim=64)
    local, g = torch.randn(3, 8, 2, 3, 3, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    features = head.features(local, g)
    assert features.shape == (3, 128)
    # each path scaled to unit L2 norm; the raw sketches otherwise
    torch.testing.assert_close(features[:, :64].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(features[:, 64:].norm(dim=1), torch.ones(3))
    raw = KernelClassifier(8, 6, num_classes=4, sketch_dim=64, normalize=False).features(local, g)
    torch.testing.assert_close(raw[:, 64:], head.sketch_global(g))
    torch.testing.assert_close(features[:, 64:], raw[:, 64:] / raw[:, 64:].norm(dim=1, keepdim=True))
    logits = head(local, g)
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert local.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
