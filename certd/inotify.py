"""Directory watches on an asyncio loop: a small interface of our own over pyinotify.

One :class:`Watcher` is one inotify instance. Its fd is read from the event loop
(``loop.add_reader``; no threads) and every event is handed to one callback as an
:class:`Event`. The pyinotify quirks are handled here, once (python-platform-notes §2):

- its import warns about asyncore and it attaches its own stderr log handler;
- its fd is inheritable (we set it non-inheritable);
- a callback that raises stalls the queue until the next event (we never let one raise);
- ``IN_Q_OVERFLOW`` reaches the callback only through its own method (we deliver it as
  ``Event.overflow``); a read that fails (pyinotify cannot decode a non-UTF-8 file name)
  loses events too, so it is reported the same way: the consumer rescans;
- a watched directory that is deleted, moved away or unmounted loses its watch; the
  watcher drops it and reports it once (``Event.gone``); events still queued for the old
  watch are dropped so they cannot be mistaken for a re-added one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import structlog

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

# pyinotify logs through its own stderr handler (and, without one, root's last resort).
# What matters is reported by this module instead.
_pyinotify_log = logging.getLogger("pyinotify")
_pyinotify_log.handlers.clear()
_pyinotify_log.addHandler(logging.NullHandler())
_pyinotify_log.propagate = False

log = structlog.get_logger("certd.inotify")

# Kernel flag values (inotify(7)), for masks passed to Watcher.add.
ACCESS = pyinotify.IN_ACCESS
ATTRIB = pyinotify.IN_ATTRIB
CLOSE_WRITE = pyinotify.IN_CLOSE_WRITE
MOVED_TO = pyinotify.IN_MOVED_TO
MOVED_FROM = pyinotify.IN_MOVED_FROM
CREATE = pyinotify.IN_CREATE
DELETE = pyinotify.IN_DELETE
DELETE_SELF = pyinotify.IN_DELETE_SELF
MOVE_SELF = pyinotify.IN_MOVE_SELF
UNMOUNT = pyinotify.IN_UNMOUNT
IGNORED = pyinotify.IN_IGNORED
Q_OVERFLOW = pyinotify.IN_Q_OVERFLOW
ISDIR = pyinotify.IN_ISDIR
ONLYDIR = pyinotify.IN_ONLYDIR

#: Events that end a watch: the kernel has dropped it (or will, for a move).
GONE = DELETE_SELF | MOVE_SELF | UNMOUNT | IGNORED


class WatchError(OSError):
    """A watch could not be added (no such directory, permission, watch limit)."""


@dataclass(frozen=True)
class Event:
    """One inotify event on a watched directory, or an overflow (``directory`` None)."""

    mask: int
    directory: str | None = None  # the watched directory, as passed to Watcher.add
    name: str = ""  # the entry inside it; "" for events on the directory itself

    @property
    def path(self) -> str | None:
        if self.directory is None:
            return None
        return os.path.join(self.directory, self.name) if self.name else self.directory

    @property
    def overflow(self) -> bool:
        """Events were lost (queue overflow or a failed read): look at everything again."""
        return bool(self.mask & Q_OVERFLOW)

    @property
    def gone(self) -> bool:
        """The watched directory was deleted, moved away or unmounted; its watch is gone."""
        return bool(self.mask & GONE) and not self.name

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & ISDIR)


class _Dispatch(pyinotify.ProcessEvent):
    def my_init(self, deliver: Callable[[int, int, str], None]) -> None:
        self.deliver = deliver

    def process_IN_Q_OVERFLOW(self, event) -> None:  # the default would only log it
        self.deliver(-1, Q_OVERFLOW, "")

    def process_default(self, event) -> None:
        # event.path is not used: pyinotify renames a watch it saw moved ("-unknown-path").
        self.deliver(event.wd, event.mask, event.name or "")


class Watcher:
    """Calls ``callback(event)`` from the event loop for events on the added directories.

    The callback must not block; an exception it raises is logged and swallowed.
    """

    def __init__(self, callback: Callable[[Event], None], *,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.callback = callback
        self.loop = loop or asyncio.get_running_loop()
        self._wm = pyinotify.WatchManager()
        self.fd = self._wm.get_fd()
        os.set_inheritable(self.fd, False)
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=_Dispatch(deliver=self._deliver))
        self._wds: dict[str, int] = {}  # directory -> current watch descriptor
        self._dirs: dict[int, str] = {}  # and back
        self._reading = False
        self._closed = False
        self.resume()

    # --- watches ------------------------------------------------------------------------

    def add(self, directory: str, mask: int) -> None:
        """Watch ``directory`` for ``mask``; overflow and "gone" events always come.
        Adding a directory again replaces its mask. Raises :class:`WatchError`."""
        directory = os.path.normpath(directory)
        try:
            wds = self._wm.add_watch(directory, mask | ONLYDIR | DELETE_SELF | MOVE_SELF,
                                     quiet=False)
        except pyinotify.WatchManagerError as e:
            raise WatchError(f"cannot watch {directory}: {e}") from None
        old = self._wds.get(directory)
        if old is not None and old != wds[directory]:
            self._dirs.pop(old, None)  # a new directory under the old name
        self._wds[directory] = wds[directory]
        self._dirs[wds[directory]] = directory

    def remove(self, directory: str) -> None:
        """Stop watching ``directory`` (no-op if it is not watched)."""
        wd = self._wds.pop(os.path.normpath(directory), None)
        if wd is not None:
            self._dirs.pop(wd, None)
            self._wm.rm_watch(wd, quiet=True)  # fails harmlessly if the kernel dropped it

    def watching(self, directory: str) -> bool:
        return os.path.normpath(directory) in self._wds

    # --- reading ------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading events; the kernel keeps queueing them (up to
        ``fs.inotify.max_queued_events``, then one overflow)."""
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def resume(self) -> None:
        """Read events again (and at once, if some are queued)."""
        if not self._reading and not self._closed:
            self.loop.add_reader(self.fd, self._read)
            self._reading = True

    def close(self) -> None:
        """Remove every watch and close the inotify fd."""
        if self._closed:
            return
        self.pause()
        self._closed = True
        self._wds.clear()
        self._dirs.clear()
        self._notifier.stop()

    def _read(self) -> None:
        try:
            self._notifier.read_events()
        except Exception as e:  # e.g. a file name that is not UTF-8
            log.warning("inotify read failed; treating it as lost events", error=repr(e))
            self._call(Event(Q_OVERFLOW))
        self._notifier.process_events()  # delivers whatever was parsed; never raises (_call)

    def _deliver(self, wd: int, mask: int, name: str) -> None:
        if mask & Q_OVERFLOW:
            self._call(Event(Q_OVERFLOW))
            return
        directory = self._dirs.get(wd)
        if directory is None:
            return  # an event still queued for a watch we dropped or replaced
        if mask & GONE and not name:
            # Deleted (IN_DELETE_SELF, then IN_IGNORED), unmounted, or moved away (the
            # watch would follow the directory to its new name): drop it, report once.
            self.remove(directory)
        self._call(Event(mask, directory, name))

    def _call(self, event: Event) -> None:
        try:
            self.callback(event)
        except Exception:  # never raise into pyinotify: it would hold back queued events
            log.exception("inotify callback failed", inotify_event=repr(event))
