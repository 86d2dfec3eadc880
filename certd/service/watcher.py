"""Notice blob rotations when they happen, not at the next request.

Correctness does not depend on this: every new hold re-checks the inode under the lock.
The watcher makes certd validate and log a new blob (and show it in STATUS) as soon as
an updater renames it into place, so an operator sees a bad rotation at once.
The inotify details (and pyinotify's quirks) live in :mod:`certd.inotify`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import structlog

from certd import inotify

log = structlog.get_logger("certd.watcher")

MASK = inotify.CLOSE_WRITE | inotify.MOVED_TO


class BlobWatcher:
    """Calls ``changed(path)`` when one of ``paths`` is written or renamed into place
    (``changed(None)`` after an event overflow)."""

    def __init__(self, paths: Iterable[str], changed: Callable[[str | None], None]):
        self.paths = {os.path.abspath(p) for p in paths}
        self.changed = changed
        self.watcher = inotify.Watcher(self._event)
        for d in {os.path.dirname(p) for p in self.paths}:
            try:
                self.watcher.add(d, MASK)
            except inotify.WatchError as e:
                log.warning("cannot watch blob directory; rotations are noticed at the next "
                            "request", directory=d, error=str(e))

    def _event(self, event: inotify.Event) -> None:
        if event.overflow:
            self.changed(None)  # events were lost: look at every blob
        elif event.path in self.paths:
            self.changed(event.path)

    def close(self) -> None:
        self.watcher.close()
