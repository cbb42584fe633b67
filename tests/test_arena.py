"""The activation arena (lgd_fast.arena): reuse inside a scope only, best fit, release, idle trimming, and the fast
models' outputs unchanged when every reused block is poisoned."""

import gc
import threading

import pytest
import torch

import lgd_fast
from lgd_fast import _C
from lgd_fast.arena import (
    ArenaUnavailableError,
    activation_arena,
    arena_stats,
    backward_in_arena,
    configure_arena,
    release_arena,
    use_arena,
)
from lgd_fast.models import create_model

BIG = 1 << 18  # float32 elements: 1 MiB, over min_bytes


@pytest.fixture(autouse=True)
def empty_pool():
    gc.collect()  # earlier tests' models (their cached weights, gradients) freed now, not in the middle of a test
    release_arena()
    yield
    release_arena()


def test_reuses_a_freed_block_inside_a_scope_only():
    with activation_arena():
        a = torch.empty(BIG)
        ptr = a.data_ptr()
        del a
        before = arena_stats()
        b = torch.empty(BIG)
        assert b.data_ptr() == ptr and arena_stats().hits == before.hits + 1
    misses = arena_stats().misses
    c = torch.empty(BIG)  # outside: the previous allocator's own, the pool untouched
    assert c.data_ptr() != ptr and arena_stats().misses == misses
    small_before = arena_stats().blocks
    with activation_arena():
        d = torch.empty(100)  # under min_bytes: the heap's
    assert arena_stats().blocks == small_before
    del b, c, d


def test_best_fit_within_twice_the_request_and_freed_anywhere_returns():
    before = arena_stats()  # blocks other tests' tensors still hold (a model's cached weights, gradients)
    held = before.owned_bytes - before.cached_bytes
    with activation_arena():
        a = torch.empty(BIG)
    ptr = a.data_ptr()
    del a  # freed outside the scope: back to the pool
    assert arena_stats().free_blocks == 1
    with activation_arena():
        too_small = torch.empty(BIG // 3)  # the free block is over twice this: a new one
        assert too_small.data_ptr() != ptr
        fits = torch.empty(BIG * 3 // 4)
        assert fits.data_ptr() == ptr
        larger = torch.empty(BIG + 16)
        assert larger.data_ptr() != ptr
    stats = arena_stats()
    in_use = BIG * 4 + sum(t.untyped_storage().nbytes() for t in (too_small, larger))  # fits holds the whole block
    assert stats.owned_bytes - stats.cached_bytes == held + in_use
    del too_small, fits, larger


def test_release_frees_free_blocks_and_keeps_live_ones():
    held = arena_stats().owned_bytes  # blocks other tests' tensors still hold (the fixture freed the free ones)
    with activation_arena():
        live, dead = torch.randn(BIG), torch.empty(BIG * 2)
    del dead
    freed = release_arena()
    assert freed == BIG * 2 * 4
    stats = arena_stats()
    assert stats.cached_bytes == 0 and stats.owned_bytes == held + BIG * 4
    assert torch.isfinite(live).all()


def test_idle_blocks_are_freed_after_idle_scopes():
    configure_arena(idle_scopes=2)
    try:
        with activation_arena():
            torch.empty(BIG)
        assert arena_stats().free_blocks == 1
        for _ in range(3):
            with activation_arena():
                pass
        assert arena_stats().free_blocks == 0
    finally:
        configure_arena(idle_scopes=256)


def test_scope_is_per_thread_and_reentrant():
    out = {}

    def other():
        out["ptr"] = torch.empty(BIG).data_ptr()
        out["misses"] = arena_stats().misses

    with activation_arena():
        with activation_arena():
            pass
        misses = arena_stats().misses
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert out["misses"] == misses  # the other thread is outside any scope
        x = torch.empty(BIG)
    assert arena_stats().misses == misses + 1
    del x
    with pytest.raises(RuntimeError, match="without a matching enter"):
        _C._arena_exit()


def test_use_arena_only_at_eager_cpu_inference(monkeypatch):
    model = torch.nn.Identity()
    x = torch.zeros(1)
    with torch.no_grad():
        assert isinstance(use_arena(model, x), type(activation_arena()))
        model.activation_arena = False
        assert not isinstance(use_arena(model, x), type(activation_arena()))
        model.activation_arena = True
        monkeypatch.setenv("LGD_FAST_ARENA", "0")
        assert not isinstance(use_arena(model, x), type(activation_arena()))
    monkeypatch.delenv("LGD_FAST_ARENA")
    assert not isinstance(use_arena(model, x), type(activation_arena()))  # autograd on: only with the backward
    assert isinstance(use_arena(model, x, backward=True), type(activation_arena()))
    assert backward_in_arena(model, x, x) is x  # nothing to differentiate


def test_unavailable_arena_raises_and_fast_models_warn_once(monkeypatch, caplog):
    import lgd_fast.arena as arena

    monkeypatch.setattr(arena, "_install", lambda: "it is not torch's CPU allocator")
    monkeypatch.setattr(arena, "_WARNED", False)
    with pytest.raises(ArenaUnavailableError, match="cannot run: it is not torch's CPU allocator"):
        with activation_arena():
            pass
    with torch.no_grad(), caplog.at_level("WARNING", logger="lgd_fast.arena"):
        for _ in range(2):
            with use_arena(torch.nn.Identity(), torch.ones(1)):
                pass
    assert sum("activation arena" in r.message for r in caplog.records) == 1


def test_without_the_extension_the_arena_says_why(monkeypatch):
    import lgd_fast.arena as arena

    monkeypatch.setattr(arena, "load_extension", lambda: None)
    monkeypatch.setattr(arena, "extension_error", lambda: "ImportError: not built")
    with pytest.raises(ArenaUnavailableError, match=r"lgd_fast\._C.*did not import \(ImportError: not built\)"):
        with activation_arena():
            pass
    with pytest.raises(ArenaUnavailableError, match="not built"):
        arena_stats()
    assert release_arena() == 0


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
def test_fast_model_in_the_arena_equals_without_and_writes_every_reused_block(arch, gen):
    fast = create_model(arch, num_classes=7, fast=True).eval()
    # (lgd3d at 64x64: its stem output, 128 KiB, and the blocks' reach the arena's 64 KiB minimum; at 32x32 none)
    x = torch.randn(2, 3, 8, 64, 64, generator=gen) if arch.startswith("lgd3d") else torch.randn(
        2, 3, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        fast.activation_arena = False
        expected = fast(x)
        fast.activation_arena = True
        first = fast(x)
        hits = arena_stats().hits
        _C._arena_poison()  # every block the next call takes holds NaN until the call writes it
        second = fast(x)
    assert arena_stats().hits > hits  # the second call ran on reused blocks
    for got in (first, second):
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def _step(model, x, seed):
    """Forward (dropout drawn from ``seed``), both heads' loss, backward: (outputs, loss, every gradient)."""
    torch.manual_seed(seed)
    local, global_ = model(x)
    loss = local.square().mean() + global_.square().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [local.detach(), global_.detach(), loss.detach()], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", ["lgd3d_tiny", "lgd2d_r18"])
def test_training_step_in_the_arena_equals_without_and_writes_every_reused_block(arch, gen):
    """A training step: the forward and the backward of the outputs run in the arena (two outermost scopes, the
    backward's closed when the backward pass ends), with outputs and gradients bit for bit those of a step
    without it, also after every free block was poisoned."""
    import lgd_fast.arena as arena

    fast = create_model(arch, num_classes=7, classifier="two_heads", fast=True).train()
    x = torch.randn(2, 3, 8, 32, 32, generator=gen) if arch.startswith("lgd3d") else torch.randn(
        2, 3, 3, 64, 64, generator=gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    fast.activation_arena = False
    before = arena_stats()
    expected = _step(fast, x, seed)
    assert arena_stats().scopes == before.scopes  # switched off: no scope
    fast.activation_arena = True
    first = _step(fast, x, seed)
    after_first = arena_stats()
    assert after_first.scopes == before.scopes + 2 and arena._PENDING.scopes == 0
    _C._arena_poison()  # every block the next step takes holds NaN until the step writes it
    second = _step(fast, x, seed)
    assert arena_stats().hits > after_first.hits
    for outputs, grads in (first, second):
        for a, b in zip(outputs + grads, expected[0] + expected[1], strict=True):
            assert torch.equal(a, b), f"seed {seed}"
    with pytest.raises(RuntimeError, match="without a matching enter"):
        _C._arena_exit()  # every scope was closed
    local, global_ = fast(x)
    local.div_(2)  # outputs a caller may change in place
    (local.sum() + global_.sum()).backward()
    assert arena._PENDING.scopes == 0


def test_forward_features_with_autograd_stays_out_of_the_arena(gen):
    """A forward alone (its backward not in a scope) would keep freed activations in the pool while the backward
    takes fresh memory: with autograd on only forward(), whose outputs carry the backward's scope, uses the arena."""
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).train()
    before = arena_stats()
    local_map, g = fast.forward_features(torch.randn(2, 3, 8, 32, 32, generator=gen))
    (local_map.sum() + g.sum()).backward()
    after = arena_stats()
    assert (after.hits, after.misses, after.scopes) == (before.hits, before.misses, before.scopes)


def test_backward_that_raises_leaves_no_scope_open(gen, caplog):
    """A backward pass that raises after its arena scope opened never reaches its end callback: the next forward
    closes that scope (with a warning) before it opens its own."""
    import lgd_fast.arena as arena

    fast = create_model("lgd3d_tiny", num_classes=7, classifier="two_heads", fast=True).train()
    x = torch.randn(2, 3, 8, 32, 32, generator=gen)
    local, global_ = fast(x)

    def fail(grad):
        raise RuntimeError("a hook failed")

    fast.conv1.weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="a hook failed"):
        (local.sum() + global_.sum()).backward()
    assert arena._PENDING.scopes == 1
    fast.activation_arena = False  # switched off since: the scope is closed all the same
    with caplog.at_level("WARNING", logger="lgd_fast.arena"), torch.no_grad():
        fast.eval()(x)
    assert arena._PENDING.scopes == 0
    assert any("did not finish" in r.message for r in caplog.records)
    with pytest.raises(RuntimeError, match="without a matching enter"):
        _C._arena_exit()


def test_backward_scopes_balance_under_retain_graph_and_checkpointing(gen):
    """Each backward pass that reaches the outputs opens one scope and closes it (a second pass over a retained
    graph, a checkpointed model whose forward reruns inside the backward); outputs that need no gradient come back
    as they are, in any nesting."""
    from torch.utils.checkpoint import checkpoint

    import lgd_fast.arena as arena

    fast = create_model("lgd3d_tiny", num_classes=7, classifier="two_heads", fast=True).train()
    x = torch.randn(2, 3, 8, 32, 32, generator=gen)
    scopes = arena_stats().scopes
    local, global_ = fast(x)  # forward: one scope
    loss = local.sum() + global_.sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert arena_stats().scopes == scopes + 3 and arena._PENDING.scopes == 0
    local, global_ = checkpoint(fast, x, use_reentrant=False)
    (local.sum() + global_.sum()).backward()
    assert arena._PENDING.scopes == 0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        _C._arena_exit()

    detached, leaf = torch.randn(3), torch.randn(3, requires_grad=True)
    out = backward_in_arena(fast, x, {"a": detached, "b": [leaf]})
    assert out["a"] is detached and not out["a"].requires_grad
    assert torch.equal(out["b"][0], leaf) and type(out["b"][0].grad_fn).__name__ == "_BackwardInArenaBackward"


def test_public_names():
    assert lgd_fast.activation_arena is activation_arena and lgd_fast.release_arena is release_arena
