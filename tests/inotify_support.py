"""Helpers for tests that overflow a real inotify queue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def max_queued() -> int:
    """The kernel's per-instance event queue limit (skip if too large to fill quickly)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow")
    return limit


def flood(directory: Path, n: int, names: tuple[str, str] = (".flood-a.tmp", ".flood-b.tmp")) -> None:
    """``n`` + 1 events in ``directory``: one IN_CLOSE_WRITE, then ``n`` IN_MOVED_TO by
    renaming one file back and forth (one cheap syscall per event; two names, because the
    kernel merges an event identical to the last one queued)."""
    a, b = (os.path.join(directory, x) for x in names)
    with open(a, "wb") as f:
        f.write(b"x")
    for _ in range(n):
        os.rename(a, b)
        a, b = b, a
