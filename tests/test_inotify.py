"""certd.inotify on real inotify: events, overflow, failed reads, lost watches, and the
pyinotify quirks it hides (negative controls show each quirk on bare pyinotify)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import warnings
from pathlib import Path

import pytest
import structlog

from certd import inotify
from certd.service.watcher import BlobWatcher
from tests.inotify_support import flood, max_queued

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

BOUND = 60
MASK = inotify.CLOSE_WRITE | inotify.MOVED_TO


class Recorder:
    """Collects events; ``await until(pred)`` waits (bounded) for one matching."""

    def __init__(self) -> None:
        self.events: list[inotify.Event] = []
        self.changed = asyncio.Event()

    def __call__(self, ev: inotify.Event) -> None:
        self.events.append(ev)
        self.changed.set()

    async def until(self, pred) -> inotify.Event:
        async with asyncio.timeout(BOUND):
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                self.changed.clear()
                await self.changed.wait()

    def names(self, directory: Path | None = None) -> list[str]:
        return [e.name for e in self.events
                if directory is None or e.directory == str(directory)]


@pytest.fixture
async def rec_watcher():
    rec = Recorder()
    w = inotify.Watcher(rec)
    yield rec, w
    w.close()


async def barrier(rec: Recorder, w: inotify.Watcher, scratch: Path, tag: str) -> None:
    """Events of one inotify instance arrive in order: once a fresh event on ``scratch``
    is seen, everything queued before it has been delivered."""
    scratch.mkdir(exist_ok=True)
    w.add(str(scratch), MASK)
    (scratch / tag).write_bytes(b"x")
    await rec.until(lambda e: e.directory == str(scratch) and e.name == tag)


async def test_close_write_and_moved_to(rec_watcher, tmp_path):
    rec, w = rec_watcher
    w.add(str(tmp_path) + "/", MASK)  # normalised
    assert w.watching(str(tmp_path))
    (tmp_path / "inplace").write_bytes(b"1")
    (tmp_path / ".tmp").write_bytes(b"2")
    os.replace(tmp_path / ".tmp", tmp_path / "renamed")
    await rec.until(lambda e: e.name == "renamed")
    got = [(e.name, e.mask & MASK, e.directory, e.path) for e in rec.events]
    assert got == [("inplace", inotify.CLOSE_WRITE, str(tmp_path), str(tmp_path / "inplace")),
                   (".tmp", inotify.CLOSE_WRITE, str(tmp_path), str(tmp_path / ".tmp")),
                   ("renamed", inotify.MOVED_TO, str(tmp_path), str(tmp_path / "renamed"))]
    assert not any(e.overflow or e.gone or e.is_dir for e in rec.events)


async def test_fd_not_inheritable():
    w = inotify.Watcher(lambda e: None)
    try:
        assert os.get_inheritable(w.fd) is False
    finally:
        w.close()
    # Negative control: bare pyinotify's fd is inheritable (a child would keep it open).
    wm = pyinotify.WatchManager()
    try:
        assert os.get_inheritable(wm.get_fd()) is True
    finally:
        wm.close()


async def test_raising_callback_does_not_stall(tmp_path):
    seen: list[str] = []
    arrived = asyncio.Event()

    def cb(ev):
        if ev.name == "boom":
            raise RuntimeError("callback failed")
        seen.append(ev.name)
        if ev.name == "after2":
            arrived.set()

    structlog.reset_defaults()
    w = inotify.Watcher(cb)
    try:
        w.add(str(tmp_path), MASK)
        with structlog.testing.capture_logs() as logs:
            for name in ("boom", "after1", "after2"):
                (tmp_path / name).write_bytes(b"x")
            async with asyncio.timeout(BOUND):
                await arrived.wait()
        assert seen == ["after1", "after2"]
        assert [e["event"] for e in logs] == ["inotify callback failed"]
        assert "boom" in logs[0]["inotify_event"]
    finally:
        w.close()


async def test_negative_control_bare_pyinotify_stalls(tmp_path):
    """The quirk the wrapper hides: a handler that raises holds back the queued events
    until another event arrives."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    raised, later = asyncio.Event(), asyncio.Event()
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, ctx: raised.set())

    class Handler(pyinotify.ProcessEvent):
        def process_default(self, ev):
            if ev.name == "boom":
                raise RuntimeError("handler failed")
            seen.append(ev.name)
            if ev.name == "later":
                later.set()

    wm = pyinotify.WatchManager()
    notifier = pyinotify.AsyncioNotifier(wm, loop, default_proc_fun=Handler())
    try:
        wm.add_watch(str(tmp_path), MASK, quiet=False)
        for name in ("boom", "after1", "after2"):
            (tmp_path / name).write_bytes(b"x")
        async with asyncio.timeout(BOUND):
            await raised.wait()
        await asyncio.sleep(0)  # let any further ready callbacks run: none deliver them
        assert seen == []
        (tmp_path / "later").write_bytes(b"x")
        async with asyncio.timeout(BOUND):
            await later.wait()
        assert seen == ["after1", "after2", "later"]
    finally:
        notifier.stop()
        loop.set_exception_handler(old_handler)


async def test_queue_overflow_is_reported(rec_watcher, tmp_path):
    rec, w = rec_watcher
    limit = max_queued()
    w.add(str(tmp_path), MASK)
    w.pause()
    await asyncio.to_thread(flood, tmp_path, limit + 50)
    w.resume()
    await rec.until(lambda e: e.overflow)
    assert sum(e.overflow for e in rec.events) == 1
    overflow = next(e for e in rec.events if e.overflow)
    assert overflow.directory is None and overflow.path is None
    # Delivery goes on afterwards.
    (tmp_path / "next").write_bytes(b"x")
    await rec.until(lambda e: e.name == "next")
    assert len(rec.events) == limit + 2  # the queue's worth, the overflow, "next"


async def test_negative_control_bare_pyinotify_hides_overflow(tmp_path):
    """Without its own process_IN_Q_OVERFLOW, a pyinotify handler never hears of it."""
    limit = max_queued()
    seen: list[int] = []

    class Handler(pyinotify.ProcessEvent):
        def process_default(self, ev):
            seen.append(ev.mask)

    wm = pyinotify.WatchManager()
    notifier = pyinotify.Notifier(wm, default_proc_fun=Handler())
    try:
        wm.add_watch(str(tmp_path), MASK, quiet=False)
        await asyncio.to_thread(flood, tmp_path, limit + 50)
        notifier.read_events()
        notifier.process_events()
        assert len(seen) == limit and not any(m & inotify.Q_OVERFLOW for m in seen)
    finally:
        notifier.stop()


async def test_unreadable_name_is_reported_as_lost_events(rec_watcher, tmp_path):
    """pyinotify cannot decode a non-UTF-8 name and drops the rest of that read; the
    watcher says so (an overflow: rescan) and keeps delivering."""
    rec, w = rec_watcher
    bad = os.path.join(os.fsencode(tmp_path), b"\xff.pem")
    # Precondition: bare pyinotify does fail on that name.
    wm = pyinotify.WatchManager()
    bare = pyinotify.Notifier(wm, default_proc_fun=pyinotify.ProcessEvent())
    try:
        wm.add_watch(str(tmp_path), MASK, quiet=False)
        with open(bad, "wb") as f:
            f.write(b"x")
        with pytest.raises(UnicodeDecodeError):
            bare.read_events()
    finally:
        bare.stop()
    os.unlink(bad)

    w.add(str(tmp_path), MASK)
    with open(bad, "wb") as f:
        f.write(b"x")
    await rec.until(lambda e: e.overflow)
    (tmp_path / "next").write_bytes(b"x")
    await rec.until(lambda e: e.name == "next")


async def test_deleted_directory_reported_once(rec_watcher, tmp_path):
    rec, w = rec_watcher
    d = tmp_path / "d"
    d.mkdir()
    w.add(str(d), MASK)
    shutil.rmtree(d)
    gone = await rec.until(lambda e: e.gone)
    assert gone.directory == str(d) and gone.name == "" and not w.watching(str(d))
    await barrier(rec, w, tmp_path / "scratch", "ping1")
    assert sum(e.gone for e in rec.events) == 1  # IN_DELETE_SELF and IN_IGNORED: one report
    # The same name, a new directory: watched afresh, its events carry the same directory.
    d.mkdir()
    w.add(str(d), MASK)
    (d / "f").write_bytes(b"x")
    ev = await rec.until(lambda e: e.name == "f")
    assert ev.directory == str(d)


async def test_moved_directory_is_dropped(rec_watcher, tmp_path):
    rec, w = rec_watcher
    d = tmp_path / "d"
    d.mkdir()
    w.add(str(d), MASK)
    os.rename(d, tmp_path / "elsewhere")
    gone = await rec.until(lambda e: e.gone)
    assert gone.directory == str(d) and gone.mask & inotify.MOVE_SELF
    assert not w.watching(str(d))
    (tmp_path / "elsewhere" / "stray").write_bytes(b"x")  # no longer watched
    await barrier(rec, w, tmp_path / "scratch", "ping")
    assert "stray" not in rec.names()


async def test_add_missing_directory_raises(rec_watcher, tmp_path):
    _, w = rec_watcher
    with pytest.raises(inotify.WatchError, match="cannot watch"):
        w.add(str(tmp_path / "missing"), MASK)
    assert not w.watching(str(tmp_path / "missing"))
    w.remove(str(tmp_path / "missing"))  # no-op


async def test_close_releases_the_fd(tmp_path):
    w = inotify.Watcher(lambda e: None)
    w.add(str(tmp_path), MASK)
    fd = w.fd
    w.close()
    w.close()  # idempotent
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF
    assert not w.watching(str(tmp_path))


async def test_blob_watcher_calls_changed_for_its_paths(tmp_path):
    seen: list[str | None] = []
    changed = asyncio.Event()

    def cb(path):
        seen.append(path)
        changed.set()

    blob = tmp_path / "certs.blob"
    bw = BlobWatcher([str(blob)], cb)
    try:
        (tmp_path / "other").write_bytes(b"x")
        (tmp_path / ".new").write_bytes(b"blob")
        os.replace(tmp_path / ".new", blob)
        async with asyncio.timeout(BOUND):
            await changed.wait()
        assert seen == [str(blob)]
    finally:
        bw.close()
