"""Training checkpoints: written atomically, read with ``weights_only=True`` (a checkpoint is untrusted input).

A checkpoint is a dict of tensors and plain values: ``model`` (state_dict), ``optimizer``, ``scheduler``,
``rng`` (torch CPU and CUDA generator states), ``epoch`` (the last finished epoch), ``step``, ``stage``,
``history`` (the metrics rows so far), ``best_top1``, ``config`` (the resolved TrainConfig as a dict),
``class_names`` and ``format``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "read_weights", "rng_state", "save_checkpoint", "set_rng_state",
           "write_text_atomic"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``payload`` to a temporary file in the same folder, flushes it to disk, then renames it over
    ``path``: a run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _replace(path, "wb", lambda f: torch.save({**payload, "format": CHECKPOINT_FORMAT}, f))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path``'s new text written as :func:`save_checkpoint` writes: a temporary file, flushed, renamed over it
    (a run killed meanwhile leaves the old text or the new, never half)."""
    return _replace(Path(path), "w", lambda f: f.write(text))


def _replace(path: Path, mode: str, write) -> Path:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk and renamed over ``path``, the folder
    synced after; on any failure the temporary file is removed and ``path`` is as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give (mkstemp makes it 0600)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and back: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """The rename itself to disk (a power cut after it keeps the new name), where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # (Windows: folders do not open)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file's own data is already synced
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by ``save_checkpoint`` (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable lgd_fast checkpoint (names the file and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding objects weights_only refuses
        raise ValueError(f"{path}: not an lgd_fast checkpoint: {_why_unreadable(path, exc)}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{path}: not an lgd_fast checkpoint (no 'model' entry)")
    if isinstance(payload.get("format"), int) and payload["format"] > CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: written by a newer lgd_fast (checkpoint format {payload['format']}; this version "
                         f"reads format {CHECKPOINT_FORMAT}): upgrade lgd_fast to read it")  # fmt: skip
    return payload


# where a weights file keeps its state dict: an lgd_fast checkpoint; mmaction2 and Lightning; PySlowFast
WEIGHTS_ENTRIES = ("model", "state_dict", "model_state")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors of a weights file to fine-tune from (``weights_only=True``): an lgd_fast checkpoint, a
    plain state dict, or one kept under ``"state_dict"`` (mmaction2, Lightning) or ``"model_state"``
    (PySlowFast); whatever its name ends with.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or no tensors by name in it (names the file and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read its weights: {_why_unreadable(path, exc)}") from None
    entry = next((k for k in WEIGHTS_ENTRIES if isinstance(payload, dict) and isinstance(payload.get(k), dict)), None)
    if entry is not None:
        payload = payload[entry]
    tensors = {k: v for k, v in payload.items() if torch.is_tensor(v)} if isinstance(payload, dict) else {}
    if not tensors:
        raise ValueError(f"{path}: no tensors by name in it (expected a state dict, or one under "
                         f"{', '.join(repr(k) for k in WEIGHTS_ENTRIES)})")  # fmt: skip
    return tensors


def _why_unreadable(path: Path, exc: Exception) -> str:
    """What is wrong with a file torch.load refused, in our words: PyTorch's own message advises loading
    untrusted files with ``weights_only=False``, which a checkpoint reader must never suggest."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    objects = "weights_only" in str(exc) and "Unsupported operand" not in str(exc)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip container, or a (legacy) pickle
        if objects:
            return ("it holds Python objects other than tensors and plain values (pickled classes), which lgd_fast "
                    "never loads: it was not written by lgd-fast train")  # fmt: skip
        if head[:2] == b"PK":
            return "its zip archive is damaged or truncated (an interrupted copy or download?)"
        return "it is a Python pickle but not a PyTorch file"
    return "it is not a PyTorch file (neither the zip container torch.save writes nor a legacy pickle)"


def rng_state() -> dict[str, Any]:
    """The CPU generator's state and, on a GPU, the current device's: each process trains on one device and every
    process seeds and draws alike, so rank 0's device state is every rank's own (rank 0 never drew on the other
    devices: their states in its process are their first ones, and reading them made a context on each)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state`'s generators, the GPU one on this process's current device. (Checkpoints
    written before kept every device's state as the saving process saw them: this device's is restored, right
    for one process; under DDP rank 0's view of the others was never drawn from, as before.)"""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list | tuple):  # every device's, as the saving process saw them: this device's
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)
