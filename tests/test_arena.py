"""The activation arena (lgd_fast.arena): reuse inside a scope only, best fit, release, idle trimming, and the fast
models' outputs unchanged when every reused block is poisoned."""

import threading

import pytest
import torch

import lgd_fast
from lgd_fast import _C
from lgd_fast.arena import (
    ArenaUnavailableError,
    activation_arena,
    arena_stats,
    configure_arena,
    release_arena,
    use_arena,
)
from lgd_fast.models import create_model

BIG = 1 << 18  # float32 elements: 1 MiB, over min_bytes


@pytest.fixture(autouse=True)
def empty_pool():
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
    assert stats.owned_bytes - stats.cached_bytes == in_use
    del too_small, fits, larger


def test_release_frees_free_blocks_and_keeps_live_ones():
    with activation_arena():
        live, dead = torch.randn(BIG), torch.empty(BIG * 2)
    del dead
    freed = release_arena()
    assert freed == BIG * 2 * 4
    stats = arena_stats()
    assert stats.cached_bytes == 0 and stats.owned_bytes == BIG * 4
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
    assert not isinstance(use_arena(model, x), type(activation_arena()))  # autograd on


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
    x = torch.randn(2, 3, 8, 32, 32, generator=gen) if arch.startswith("lgd3d") else torch.randn(
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


def test_training_forward_does_not_use_the_arena(gen):
    fast = create_model("lgd3d_tiny", num_classes=7, fast=True).train()
    before = arena_stats()
    fast(torch.randn(2, 3, 8, 32, 32, generator=gen))
    after = arena_stats()
    assert (after.hits, after.misses, after.scopes) == (before.hits, before.misses, before.scopes)


def test_public_names():
    assert lgd_fast.activation_arena is activation_arena and lgd_fast.release_arena is release_arena
