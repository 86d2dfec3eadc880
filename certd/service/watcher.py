"""Notice blob rotations when they happen, not at the next request.

Correctness does not depend on this: every new hold re-checks the inode under the lock.
The watcher makes certd validate and log a new blob (and show it in STATUS) as soon as
an updater renames it into place, so an operator sees a bad rotation at once.

pyinotify quirks handled here (python-platform-notes §2): its import warns about
asyncore, it attaches its own log handler, its fd is inheritable, a handler that raises
stalls the queue, and IN_Q_OVERFLOW needs its own method.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from typing import Callable, Iterable

import structlog

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

logging.getLogger("pyinotify").handlers.clear()
log = structlog.get_logger("certd.watcher")

MASK = pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO | pyinotify.IN_Q_OVERFLOW


class _Handler(pyinotify.ProcessEvent):
    def my_init(self, on_path: Callable[[str | None], None]) -> None:
        self.on_path = on_path

    def process_IN_Q_OVERFLOW(self, event) -> None:
        self._call(None)  # events were lost: look at every blob

    def process_default(self, event) -> None:
        self._call(event.pathname)

    def _call(self, path: str | None) -> None:
        try:
            self.on_path(path)
        except Exception:  # never raise into pyinotify: it would hold back queued events
            log.exception("watcher callback failed")


class BlobWatcher:
    """Calls ``changed(path)`` when one of ``paths`` is written or renamed into place
    (``changed(None)`` after an event overflow)."""

    def __init__(self, paths: Iterable[str], changed: Callable[[str | None], None]):
        self.paths = {os.path.abspath(p) for p in paths}
        self.changed = changed
        self.wm = pyinotify.WatchManager()
        os.set_inheritable(self.wm.get_fd(), False)
        for d in {os.path.dirname(p) for p in self.paths}:
            try:
                self.wm.add_watch(d, MASK, quiet=False)
            except pyinotify.WatchManagerError as e:
                log.warning("cannot watch blob directory; rotations are noticed at the next "
                            "request", directory=d, error=str(e))
        self.notifier = pyinotify.AsyncioNotifier(
            self.wm, asyncio.get_running_loop(), default_proc_fun=_Handler(on_path=self._event))

    def _event(self, path: str | None) -> None:
        if path is None or path in self.paths:
            self.changed(path)

    def close(self) -> None:
        self.notifier.stop()
