"""The activation arena: large CPU tensors made inside it reuse memory freed earlier instead of fresh pages.

glibc serves a large tensor by ``mmap`` (or from heap memory it has trimmed back to the system), so each fresh
page of a new activation faults, and arrives cold in the caches. An eager model allocates every activation anew
on each call; a frozen inductor graph too. Inside :func:`activation_arena` (a context manager, reentrant,
per thread) every CPU tensor of at least ``min_bytes`` (64 KiB by default) takes a block that an earlier tensor
freed (the smallest that holds it, at most twice its size), else a new one; freeing it, anywhere and later,
returns the block to the pool. So from the second call with the same shapes a model's forward allocates no new
memory. Outside a scope nothing changes: every allocation is the previous CPU allocator's own.

The fast LGD models run their eager CPU work inside it (``model.activation_arena = False`` turns that off for
one model, ``LGD_FAST_ARENA=0`` for all; not under torch.compile or ``torch.func`` transforms): inference, and
with autograd on the forward and the backward of its outputs: :func:`backward_in_arena` passes the outputs that
need a gradient through an identity (copies) whose backward opens a scope that the end of that backward pass
closes, so the gradients and the backward's temporaries take the blocks the forward's saved activations free.
The engine runs no end callback for a backward pass that raises: its scope stays open on that thread (large
allocations there served by the pool) until the next forward of a fast model closes it, with a warning. A forward
alone with autograd on (``forward_features``) stays out of the arena: its freed activations would wait in the
pool while its backward took fresh heap memory. :func:`lgd_fast.convert`-ed models do not enter it by
themselves: wrap them in :class:`lgd_fast.RecordedInference` (inference and training alike), or an inference
loop in the arena yourself::

    with torch.inference_mode(), lgd_fast.activation_arena():
        logits = model(clips)

Memory: the pool keeps the blocks of the largest call it served (R50 at batch 4, 16x112x112: about 80 MiB,
against 69 MiB that glibc's heap grew by for the same call; a /tmp measurement), until no scope has taken a
block for ``idle_scopes`` (256) outermost scopes, or :func:`release_arena`. :func:`arena_stats` says what it
holds.

The arena becomes the CPU allocator on first use (``c10::SetCPUAllocator``, wrapping the one it replaces). If
another library installed an allocator of higher priority (or ``lgd_fast._C`` did not import),
:func:`activation_arena` raises :class:`ArenaUnavailableError` with the reason, and a fast model warns once and
runs without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .ops._backend import extension_error, load_extension

__all__ = [
    "ArenaStats",
    "activation_arena",
    "arena_stats",
    "backward_in_arena",
    "configure_arena",
    "release_arena",
    "use_arena",
]

log = logging.getLogger(__name__)

ENV = "LGD_FAST_ARENA"


class ArenaUnavailableError(RuntimeError):
    """The arena could not become the CPU allocator (another allocator took precedence)."""


@dataclasses.dataclass(frozen=True)
class ArenaStats:
    """What the pool holds: ``owned_bytes`` in ``blocks`` (in use or free), ``cached_bytes`` free in
    ``free_blocks``; ``hits`` (requests served from a freed block), ``misses`` (new blocks), ``scopes`` (outermost
    scopes closed); the settings ``min_bytes`` and ``idle_scopes``; ``installed``: it is the CPU allocator."""

    installed: bool
    owned_bytes: int
    cached_bytes: int
    blocks: int
    free_blocks: int
    hits: int
    misses: int
    scopes: int
    min_bytes: int
    idle_scopes: int

    def as_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self)


def _ext():
    """``lgd_fast._C``, which holds the arena; raises :class:`ArenaUnavailableError` with the reason where it did
    not import."""
    ext = load_extension()
    if ext is None:
        raise ArenaUnavailableError(
            f"the activation arena is in lgd_fast._C, which did not import ({extension_error()})"
        )
    return ext


def _install() -> str | None:
    """Makes the arena the CPU allocator (the first time); None if it is now, else why not (another library may
    have replaced it, or the extension did not import)."""
    if load_extension() is None:
        return f"lgd_fast._C, which holds it, did not import ({extension_error()})"
    if not _ext()._arena_install():
        return "it is not torch's CPU allocator: another allocator of higher priority was installed"
    return None


@contextlib.contextmanager
def activation_arena():
    """Large CPU tensors made on this thread inside the block reuse the arena's freed memory (module docstring).
    Raises :class:`ArenaUnavailableError` if the arena cannot be the CPU allocator."""
    if (reason := _install()) is not None:
        raise ArenaUnavailableError(f"the activation arena cannot run: {reason}; run without it (LGD_FAST_ARENA=0 "
                                    "for the fast models)")  # fmt: skip
    ext = _ext()
    ext._arena_enter()
    try:
        yield
    finally:
        ext._arena_exit()


def arena_stats() -> ArenaStats:
    """The pool's counters now (:class:`ArenaStats`)."""
    stats = _ext()._arena_stats()
    return ArenaStats(**{k: bool(v) if k == "installed" else int(v) for k, v in stats.items()})


def release_arena() -> int:
    """Frees every free block of the pool (tensors still alive keep theirs); returns the bytes freed (0 where the
    extension did not import: there is no pool)."""
    ext = load_extension()
    return 0 if ext is None else int(ext._arena_release())


def configure_arena(*, min_bytes: int | None = None, idle_scopes: int | None = None) -> None:
    """Sets the smallest request the arena serves (bytes; smaller ones stay in the heap) and after how many idle
    outermost scopes an untaken block is freed."""
    now = arena_stats()
    _ext()._arena_configure(now.min_bytes if min_bytes is None else int(min_bytes),
                            now.idle_scopes if idle_scopes is None else int(idle_scopes))  # fmt: skip


_WARNED = False


def _applies(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Eager CPU work (not traced by torch.compile, no ``torch.func`` transform) where the module allows the arena
    (``module.activation_arena``, default True), ``LGD_FAST_ARENA`` is not 0 and the arena can be installed (else a
    warning, once)."""
    global _WARNED
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or not getattr(module, "activation_arena", True)
            or os.environ.get(ENV, "1") == "0" or torch._C._are_functorch_transforms_active()):  # fmt: skip
        return False
    if (reason := _install()) is not None:
        if not _WARNED:
            log.warning("lgd_fast: the activation arena cannot run (%s); fast models run without it", reason)
            _WARNED = True
        return False
    return True


def use_arena(module: torch.nn.Module, x: torch.Tensor, *, backward: bool = False) -> contextlib.AbstractContextManager:
    """The scope a fast module's forward runs in: :func:`activation_arena` for eager CPU work where the module
    allows it (``module.activation_arena``, default True) and ``LGD_FAST_ARENA`` is not 0; otherwise a no-op. With
    autograd on, only where the caller also runs the backward of its outputs in the arena (``backward=True`` and
    :func:`backward_in_arena` on the outputs): a forward alone in the arena would leave the activations it frees
    in the pool while the backward takes fresh memory from the heap. If the arena cannot be installed, warns once
    and runs without it."""
    _close_unfinished_backward_scopes()
    if torch.is_grad_enabled() and not backward:
        return contextlib.nullcontext()
    return activation_arena() if _applies(module, x) else contextlib.nullcontext()


class _Pending(threading.local):
    scopes = 0  # backward scopes entered on this thread whose backward pass has not ended


_PENDING = _Pending()


def _end_backward_scope(thread: int) -> None:
    if threading.get_ident() != thread:  # the pass ended on another thread (a device's): the opener's next forward
        return  # closes the scope (_close_unfinished_backward_scopes)
    _PENDING.scopes -= 1
    _ext()._arena_exit()


class _BackwardInArena(torch.autograd.Function):
    """Identity on the outputs that need a gradient; their backward opens an arena scope that the end of the
    backward pass closes."""

    @staticmethod
    def forward(ctx, *outputs):
        ctx.set_materialize_grads(False)  # an unused head's gradient stays None: nothing allocated for it
        # copies, not views: a caller may change the outputs in place (logits.div_(T)), which autograd forbids on a
        # custom Function's views (the fast models' outputs are logits, (N, classes): small)
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        if torch.compiler.is_compiling():  # traced by compiled autograd: no scope to open at run time
            return grads
        _ext()._arena_enter()
        _PENDING.scopes += 1
        # runs when this backward pass ends, on the thread that runs the pass (the caller's, for a CPU graph)
        thread = threading.get_ident()
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _end_backward_scope(thread))
        return grads


def _close_unfinished_backward_scopes() -> None:
    """Scopes of backward passes that raised before their end (the engine runs no end callback then), closed at
    the next fast forward on the thread, outside any backward pass (a forward inside one, as activation
    checkpointing runs, leaves them)."""
    if _PENDING.scopes > 0 and torch._C._current_graph_task_id() == -1:
        log.warning("lgd_fast: %d backward pass(es) in the activation arena did not finish; their scopes are closed "
                    "now", _PENDING.scopes)  # fmt: skip
        while _PENDING.scopes > 0:
            _PENDING.scopes -= 1
            _ext()._arena_exit()


def backward_in_arena(module: torch.nn.Module, x: torch.Tensor, outputs: Any) -> Any:
    """``outputs`` (a tensor or any nesting of tuples, lists and dicts of them) with the backward of the tensors
    that need a gradient, from the point autograd reaches them to the end of that backward pass, in the arena
    (gradients and the backward's temporaries take the blocks the forward's activations free), where
    :func:`use_arena` with ``backward=True`` put the forward in it: eager CPU work with autograd on, not under
    ``torch.func`` transforms. Elsewhere ``outputs`` unchanged. Those tensors come back as copies (autograd forbids
    changing a custom Function's views in place)."""
    _close_unfinished_backward_scopes()
    if not torch.is_grad_enabled() or not _applies(module, x):
        return outputs
    leaves, spec = tree_flatten(outputs)
    chosen = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not chosen:
        return outputs
    for i, t in zip(chosen, _BackwardInArena.apply(*(leaves[i] for i in chosen)), strict=True):
        leaves[i] = t
    return tree_unflatten(leaves, spec)
