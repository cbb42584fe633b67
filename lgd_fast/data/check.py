"""``lgd-fast check-data``: decode every video of a dataset and list the ones training would skip."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .annotations import VideoRecord
from .decode import VideoError, probe, read_clip

__all__ = ["CheckResult", "check_videos", "format_failures"]


@dataclass(frozen=True)
class CheckResult:
    """Per-dataset outcome: how many videos decoded, and (path, reason) for each that did not."""

    total: int
    failures: list[tuple[str, str]]
    backends: dict[str, int]  # backend actually used -> videos

    @property
    def ok(self) -> bool:
        return not self.failures


def check_videos(records: Sequence[VideoRecord], *, backend: str = "auto", progress: bool = True) -> CheckResult:
    """Probes and fully decodes every video (every frame) with ``backend``, as training reads them.

    Returns the failures instead of raising: a missing, empty, truncated, corrupt file, or a codec the
    backend cannot decode, is one (path, reason) row.
    """
    from tqdm.auto import tqdm

    failures: list[tuple[str, str]] = []
    backends: dict[str, int] = {}
    for record in tqdm(records, desc="checking videos", unit="video", disable=not progress):
        try:
            info = probe(record.path)
            frames = read_clip(info.path, range(info.num_frames), backend, info=info)
            if frames.shape[0] != info.num_frames:
                raise VideoError(record.path, f"decoded {frames.shape[0]} of {info.num_frames} frames")
        except VideoError as err:
            failures.append((err.path, err.reason))
            continue
        used = backend if backend != "auto" else _auto_backend(info.codec)
        backends[used] = backends.get(used, 0) + 1
    return CheckResult(total=len(records), failures=failures, backends=backends)


def _auto_backend(codec: str) -> str:
    from .decode import dali_codec_reason

    return "dali" if dali_codec_reason(codec) is None else "pyav"


def format_failures(result: CheckResult, *, root: str | None = None) -> str:
    """A table of the failures (file, reason) and a summary line."""
    lines = []
    if result.failures:
        rows = [(os.path.relpath(p, root) if root else p, reason) for p, reason in result.failures]
        width = min(max(len(p) for p, _ in rows), 80)
        lines.append(f"{'file':<{width}}  reason")
        lines += [f"{p:<{width}}  {reason}" for p, reason in rows]
    used = ", ".join(f"{n} with {b}" for b, n in sorted(result.backends.items())) or "none"
    lines.append(
        f"{result.total - len(result.failures)} of {result.total} videos decoded ({used}); "
        f"{len(result.failures)} failed"
    )
    return "\n".join(lines)
