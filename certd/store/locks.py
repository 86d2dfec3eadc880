"""OFD whole-file locks on the certificate blob, plus the gate that keeps updaters from starving.

Facts this module is built on (docs/locking.md has the details and the measurements):

* Locks are Linux open-file-description locks taken with ``fcntl(F_OFD_SETLK)`` over the
  whole file (start 0, length 0): shared for readers, exclusive for updaters. They conflict
  with QEMU's locks (OFD or classic POSIX). ``flock()`` is invisible to QEMU and ``lockf()``
  takes per-process locks, so neither is ever used here.
* The lock belongs to the open file description: two ``open()`` calls in one process
  conflict, a ``dup()`` shares the lock, and closing the last descriptor drops it.
* Updaters replace the blob by ``rename()``, so a reader must check after locking that the
  inode it locked is still the one at the path (``(st_dev, st_ino)`` equal, ``st_nlink > 0``)
  and otherwise close and retry.
* The kernel grants a shared lock whenever no *held* lock conflicts, so back-to-back readers
  can starve a waiting writer for ever. certd's readers therefore pass through a *gate*:
  a separate file ``<dir>/.<name>.gate`` (never the blob itself: stock QEMU locks every byte
  of the blob). A reader takes the gate shared, locks the blob, and drops the gate at once;
  an updater takes the gate exclusive first, which stops new certd readers, then waits for
  the blob's readers to drain.
* Waiting never blocks: every wait is a non-blocking ``F_OFD_SETLK`` retried with a short
  backoff (200 µs doubling to 2 ms) until an absolute deadline. The async forms sleep with
  ``asyncio.sleep`` and so are cancellable at every step; nothing here blocks an event loop
  for longer than a few system calls.

Deadlines are absolute ``time.monotonic()`` values (see :func:`deadline_in`). ``None`` means
"try once, do not wait".
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat as stat_mod
import struct
import time
from typing import Callable

#: ``struct flock`` on x86_64 (and every 64-bit Linux ABI): type, whence, start, len, pid, pad.
FLOCK = struct.Struct("hhqqi4x")
_SHARED = FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
_EXCLUSIVE = FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK = FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
_SETLK = fcntl.F_OFD_SETLK
_GETLK = fcntl.F_OFD_GETLK
_CONFLICT = (errno.EAGAIN, errno.EACCES)  # POSIX allows either for a conflicting lock

#: Backoff between attempts: first delay, growth factor, ceiling. 2 ms keeps the hand-off
#: after a release short (QEMU itself polls every 1 ms) at negligible CPU cost.
BACKOFF_FIRST = 0.0002
BACKOFF_CAP = 0.002
#: A blob replaced between open and lock is retried at once this many times in a row,
#: then the retries fall back to the backoff (a file replaced in a tight loop must not spin).
_FAST_RETRIES = 3
#: How often a long-lived reader re-checks that its cached gate descriptor is still the
#: file at the gate path (someone may have deleted it by hand).
_GATE_RECHECK_S = 1.0

#: Environment variable ``certctl lock`` sets for its command, so that a nested
#: ``certctl install`` reuses the lock it already holds instead of deadlocking on it.
#: Value: ``<mode>:<gate fd>:<blob fd or ->:<absolute blob path>``.
HELD_ENV = "CERTD_LOCK_HELD"


class LockBusy(TimeoutError):
    """The lock was not obtained before the deadline.

    ``what`` is ``"gate"`` (an updater holds or is taking the gate) or ``"blob"`` (another
    open file description holds a conflicting lock on the blob itself).
    """

    def __init__(self, path: str, what: str, waited: float, exclusive: bool):
        self.path = path
        self.what = what
        self.waited = waited
        self.exclusive = exclusive
        kind = "exclusive" if exclusive else "shared"
        if what == "gate":
            why = ("another updater holds the update gate" if exclusive
                   else "an updater holds the update gate")
            target = gate_path(path)
        else:
            why = ("readers or another updater hold the blob" if exclusive
                   else "an updater holds the blob exclusively")
            target = path
        super().__init__(f"{kind} lock on {target} not obtained after {waited:.3f} s: {why}")


class BlobMissing(FileNotFoundError):
    """The blob file does not exist: the host is unconfigured (no certificate table yet)."""

    def __init__(self, path: str):
        super().__init__(errno.ENOENT, "certificate blob does not exist (unconfigured)", path)


# --- primitives ---------------------------------------------------------------------------

def try_lock(fd: int, exclusive: bool = False) -> bool:
    """Take a whole-file OFD lock without waiting. False if a conflicting lock is held."""
    try:
        fcntl.fcntl(fd, _SETLK, _EXCLUSIVE if exclusive else _SHARED)
        return True
    except OSError as e:
        if e.errno in _CONFLICT:
            return False
        raise


def unlock(fd: int) -> None:
    """Drop this open file description's lock on the whole file."""
    fcntl.fcntl(fd, _SETLK, _UNLOCK)


def conflicting_lock(fd: int, exclusive: bool = False) -> int:
    """``F_OFD_GETLK``: the type of a lock held through *another* description that would
    block ours (``F_RDLCK``/``F_WRLCK``), or ``F_UNLCK`` if ours would be granted now."""
    res = fcntl.fcntl(fd, _GETLK, _EXCLUSIVE if exclusive else _SHARED)
    return FLOCK.unpack(res)[0]


def deadline_in(seconds: float | None) -> float | None:
    """An absolute deadline ``seconds`` from now (None stays None: try once)."""
    return None if seconds is None else time.monotonic() + seconds


def gate_path(path: str) -> str:
    """The gate file of a blob: ``<dir>/.<name>.gate``, created on demand, never replaced."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.gate")


def same_file(fd: int, path: str) -> os.stat_result | None:
    """fstat of ``fd`` if it is the file now at ``path`` and still linked, else None."""
    st = os.fstat(fd)
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_ino == at.st_ino and st.st_dev == at.st_dev and st.st_nlink > 0:
        return st
    return None


class _Backoff:
    """Delays between attempts, bounded by an absolute deadline."""

    __slots__ = ("deadline", "delay", "start")

    def __init__(self, deadline: float | None):
        self.start = time.monotonic()
        self.deadline = deadline
        self.delay = BACKOFF_FIRST

    def next(self) -> float | None:
        """Seconds to sleep before the next attempt, or None if the deadline has passed."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        d = min(self.delay, left)
        self.delay = min(self.delay * 2, BACKOFF_CAP)
        return d

    def waited(self) -> float:
        return time.monotonic() - self.start


# --- holds --------------------------------------------------------------------------------

class Hold:
    """A lock held on the blob at ``path``; release it with :meth:`release` (or ``with``).

    ``fd`` is a read-only (shared) or read-write (exclusive) descriptor on the locked inode,
    or None for an exclusive hold taken while the blob did not exist yet (gate only).
    ``stat`` is the ``fstat`` taken right after the inode check; :attr:`key` is
    ``(st_dev, st_ino, st_size, st_mtime_ns)``, a cache key for the bytes: the file is
    replaced by rename, never rewritten in place by certd, so an unchanged key means
    unchanged bytes.
    """

    __slots__ = ("path", "fd", "stat", "exclusive", "gate_fd", "adopted_gate", "adopted_blob",
                 "acquired_ns", "waited", "gate_waited")

    def __init__(self, path: str, fd: int | None, st: os.stat_result | None, exclusive: bool,
                 gate_fd: int | None = None, waited: float = 0.0, gate_waited: float = 0.0):
        self.path = path
        self.fd = fd
        self.stat = st
        self.exclusive = exclusive
        #: Exclusive holds keep the gate until release; shared holds never hold it.
        self.gate_fd = gate_fd
        #: True when that lock belongs to a parent ``certctl lock``: release must only close
        #: our duplicate descriptor, never unlock (an OFD lock is shared by all dups).
        self.adopted_gate = False
        self.adopted_blob = False
        #: CLOCK_MONOTONIC nanoseconds when the lock was obtained and verified.
        self.acquired_ns = time.monotonic_ns()
        #: Seconds spent waiting in total, and for the gate alone (exclusive holds).
        self.waited = waited
        self.gate_waited = gate_waited

    @property
    def ident(self) -> tuple[int, int] | None:
        return None if self.stat is None else (self.stat.st_dev, self.stat.st_ino)

    @property
    def key(self) -> tuple[int, int, int, int] | None:
        s = self.stat
        return None if s is None else (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)

    @property
    def held(self) -> bool:
        return self.fd is not None or self.gate_fd is not None

    def read(self) -> bytes:
        """The whole file, read with ``pread`` from offset 0 (the file position is untouched)."""
        if self.fd is None:
            raise BlobMissing(self.path)
        size = self.stat.st_size if self.stat is not None else 0
        data = os.pread(self.fd, size + 1, 0)
        if len(data) <= size:  # short read of a regular file: that was all of it
            return data
        parts, off = [data], len(data)
        while chunk := os.pread(self.fd, 65536, off):
            parts.append(chunk)
            off += len(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Unlock and close. Idempotent. Exclusive holds drop the blob first, then the gate."""
        fd, self.fd = self.fd, None
        gate, self.gate_fd = self.gate_fd, None
        for d, adopted in ((fd, self.adopted_blob), (gate, self.adopted_gate)):
            if d is None:
                continue
            try:
                if not adopted:
                    unlock(d)  # explicit: a forked child may still hold a dup of d
            finally:
                os.close(d)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # A dropped Hold must not keep the lock (and block updaters) until process exit.
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"<Hold {kind} {self.path} ident={self.ident} fd={self.fd}>"


# --- the lock of one blob path ----------------------------------------------------------

class BlobLock:
    """Locks on one blob path. Keep one per path for the life of a process: it caches the
    gate descriptor readers use, so a shared acquisition costs a few system calls
    (gate lock, open, lock, gate unlock, fstat, stat).

    Not meant for sharing between threads that acquire concurrently; asyncio tasks in one
    loop are fine (an attempt never awaits between its system calls).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        self.gate = gate_path(self.path)
        self._rgate: int | None = None   # cached O_RDONLY gate descriptor (readers)
        self._rgate_checked = 0.0

    # -- gate descriptor for readers

    def _reader_gate(self) -> int | None:
        """The cached read-only gate descriptor, opened (and created) on demand.

        None if the gate cannot be opened (directory read-only and no gate yet): readers
        then proceed without it, which is safe, only not starvation-proof.
        """
        fd = self._rgate
        now = time.monotonic()
        if fd is not None and now - self._rgate_checked < _GATE_RECHECK_S:
            return fd
        if fd is not None:
            if same_file(fd, self.gate) is not None:
                self._rgate_checked = now
                return fd
            self._rgate = None  # the gate was deleted or replaced behind our back
            os.close(fd)
        for flags in (os.O_RDONLY | os.O_CREAT, os.O_RDONLY):
            try:
                fd = os.open(self.gate, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except (PermissionError, FileNotFoundError, OSError):
                continue
            self._rgate, self._rgate_checked = fd, now
            return fd
        return None

    def updater_waiting(self) -> bool:
        """True if an updater holds (or is taking) the gate exclusively. One ``F_OFD_GETLK``
        (about 2 µs): the daemon checks this before granting a lease and stops granting
        while it is true, so its shared locks drain and the updater gets in."""
        fd = self._reader_gate()
        return fd is not None and conflicting_lock(fd, False) != fcntl.F_UNLCK

    def close(self) -> None:
        """Close the cached gate descriptor (holds already given out stay valid)."""
        fd, self._rgate = self._rgate, None
        if fd is not None:
            os.close(fd)

    # -- shared (readers)

    def _attempt_shared(self) -> Hold | str:
        """One non-blocking attempt: a Hold, or why to wait ("gate", "blob", "replaced")."""
        gate = self._reader_gate()
        if gate is not None and not try_lock(gate, False):
            return "gate"
        try:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise BlobMissing(self.path) from None
            try:
                locked = try_lock(fd, False)
            except BaseException:
                os.close(fd)
                raise
        finally:
            if gate is not None:
                unlock(gate)
        if not locked:
            os.close(fd)
            return "blob"
        try:
            st = same_file(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        if st is None:
            os.close(fd)  # closing drops the lock on the stale inode
            return "replaced"
        return Hold(self.path, fd, st, False)

    def _retry_steps(self, attempt: Callable[[], object], backoff: _Backoff, exclusive: bool):
        """Generator: call ``attempt()`` until it returns a result rather than a reason to
        wait ("gate", "blob", "replaced"), yielding the delays to sleep in between; raises
        LockBusy at the deadline. A file replaced under us is retried at once a few times."""
        fast = 0
        while True:
            r = attempt()
            if not isinstance(r, str):
                return r
            if r == "replaced" and fast < _FAST_RETRIES:
                fast += 1
                continue
            fast = 0
            delay = backoff.next()
            if delay is None:
                raise LockBusy(self.path, "gate" if r == "gate" else "blob", backoff.waited(),
                               exclusive)
            yield delay

    def _shared_steps(self, deadline: float | None):
        """The shared acquisition as a generator of sleep requests (see :func:`_sleep_sync`
        and :func:`_sleep_async`): yields a delay, returns the Hold."""
        backoff = _Backoff(deadline)
        hold = yield from self._retry_steps(self._attempt_shared, backoff, False)
        hold.waited = backoff.waited()
        return hold

    def acquire_shared_sync(self, deadline: float | None) -> Hold:
        """Shared lock on the current blob, waiting (sleeping) until ``deadline``.

        Raises :class:`BlobMissing` if there is no blob, :class:`LockBusy` at the deadline.
        """
        return _sleep_sync(self._shared_steps(deadline))

    async def acquire_shared(self, deadline: float | None) -> Hold:
        """Async form of :meth:`acquire_shared_sync`; cancellable at every wait."""
        return await _sleep_async(self._shared_steps(deadline))

    # -- exclusive (updaters)

    def _open_gate_rw(self) -> int:
        return os.open(self.gate, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)

    def _attempt_blob_exclusive(self, missing_ok: bool) -> tuple[int | None, os.stat_result | None] | str:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing_ok:
                return (None, None)
            raise BlobMissing(self.path) from None
        try:
            if not try_lock(fd, True):
                os.close(fd)
                return "blob"
            st = same_file(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        if st is None:
            os.close(fd)
            return "replaced"
        return (fd, st)

    def _blob_exclusive_steps(self, backoff: _Backoff, missing_ok: bool):
        """Generator: yields delays to sleep; returns (fd, stat) of the verified, exclusively
        locked current blob, or (None, None) if it is missing and ``missing_ok``."""
        return (yield from self._retry_steps(lambda: self._attempt_blob_exclusive(missing_ok),
                                             backoff, True))

    def _exclusive_steps(self, deadline: float | None, missing_ok: bool, hold: Hold | None):
        """The exclusive acquisition as a generator of sleep requests, shared by the sync
        and async forms: yields a delay to sleep, returns the Hold. ``hold`` is an adopted
        gate-only Hold (from :func:`inherited_hold`) to complete with the blob lock."""
        backoff = _Backoff(deadline)
        if hold is not None:
            fd, st = yield from self._blob_exclusive_steps(backoff, missing_ok)
            hold.fd, hold.stat, hold.adopted_blob = fd, st, False
            hold.waited, hold.acquired_ns = backoff.waited(), time.monotonic_ns()
            return hold
        gate = self._open_gate_rw()
        try:
            while not try_lock(gate, True):
                delay = backoff.next()
                if delay is None:
                    raise LockBusy(self.path, "gate", backoff.waited(), True)
                yield delay
            gate_waited = backoff.waited()
            fd, st = yield from self._blob_exclusive_steps(backoff, missing_ok)
        except BaseException:
            os.close(gate)  # drops the gate lock too
            raise
        return Hold(self.path, fd, st, True, gate_fd=gate, waited=backoff.waited(),
                    gate_waited=gate_waited)

    def acquire_exclusive_sync(self, deadline: float | None, missing_ok: bool = False,
                               hold: Hold | None = None) -> Hold:
        """Updater lock: the gate exclusive (stops new certd readers), then the blob
        exclusive on the verified current inode. Both stay held until ``release()``.

        With ``missing_ok`` a missing blob gives a gate-only Hold (``fd`` None): a first
        install. ``hold``: complete an adopted gate-only Hold with the blob lock instead of
        taking the gate. Raises :class:`LockBusy` at the deadline.
        """
        return _sleep_sync(self._exclusive_steps(deadline, missing_ok, hold))

    async def acquire_exclusive(self, deadline: float | None, missing_ok: bool = False,
                                hold: Hold | None = None) -> Hold:
        """Async form of :meth:`acquire_exclusive_sync`; cancellable."""
        return await _sleep_async(self._exclusive_steps(deadline, missing_ok, hold))


def _sleep_sync(steps) -> Hold:
    """Drive an acquisition generator, sleeping for each delay it yields."""
    try:
        while True:
            time.sleep(next(steps))
    except StopIteration as done:
        return done.value
    finally:
        steps.close()


async def _sleep_async(steps) -> Hold:
    """Drive an acquisition generator on the event loop; cancellable at every sleep."""
    try:
        while True:
            await asyncio.sleep(next(steps))
    except StopIteration as done:
        return done.value
    finally:
        steps.close()  # on cancel: runs the generator's cleanup (an exclusive gate closes)


# --- module-level conveniences for the daemon -------------------------------------------

_LOCKS: dict[str, BlobLock] = {}


def blob_lock(path: str | os.PathLike[str]) -> BlobLock:
    """The process-wide :class:`BlobLock` for ``path`` (one cached gate descriptor each)."""
    key = os.path.abspath(os.fspath(path))
    lk = _LOCKS.get(key)
    if lk is None:
        lk = _LOCKS.setdefault(key, BlobLock(key))
    return lk


async def acquire_shared(path: str | os.PathLike[str], deadline: float | None) -> Hold:
    """Shared, gate-aware, inode-verified lock on the blob at ``path`` (async)."""
    return await blob_lock(path).acquire_shared(deadline)


def acquire_shared_sync(path: str | os.PathLike[str], deadline: float | None) -> Hold:
    """Shared, gate-aware, inode-verified lock on the blob at ``path`` (blocking)."""
    return blob_lock(path).acquire_shared_sync(deadline)


def updater_waiting(path: str | os.PathLike[str]) -> bool:
    """True while an updater holds the gate of ``path`` exclusively."""
    return blob_lock(path).updater_waiting()


# --- locks inherited from ``certctl lock`` ----------------------------------------------

def held_env(mode: str, gate_fd: int, blob_fd: int | None, path: str) -> str:
    return f"{mode}:{gate_fd}:{'-' if blob_fd is None else blob_fd}:{os.path.abspath(path)}"


def inherited_hold(path: str, environ: Callable[[str], str | None] = os.environ.get) -> Hold | None:
    """The exclusive lock a parent ``certctl lock --exclusive`` holds on ``path``, or None.

    Returns an *adopted* Hold built from duplicates of the inherited descriptors: the gate
    always, the blob only if it is still the file at ``path`` (an earlier nested install may
    have replaced it; then ``fd`` is None and the caller completes the hold with
    ``BlobLock.acquire_exclusive_sync(..., hold=h)``). Releasing it closes the duplicates
    and leaves the parent's locks.
    Raises RuntimeError if the parent holds only a shared lock on this path (an update
    under it could never get the exclusive lock).
    """
    raw = environ(HELD_ENV)
    if not raw:
        return None
    try:
        mode, g, b, held_path = raw.split(":", 3)
        gate_fd = int(g)
        blob_fd = None if b == "-" else int(b)
    except ValueError:
        return None
    if os.path.abspath(held_path) != os.path.abspath(path):
        return None
    try:
        gst = os.fstat(gate_fd)
        at = os.stat(gate_path(path))
    except OSError:
        return None
    if (gst.st_dev, gst.st_ino) != (at.st_dev, at.st_ino) or not stat_mod.S_ISREG(gst.st_mode):
        return None
    if mode != "exclusive":
        raise RuntimeError(
            f"{path} is locked shared by an enclosing 'certctl lock --shared'; "
            "an update needs 'certctl lock --exclusive'")
    # Check the inherited gate really is locked exclusively: a fresh description sees the
    # parent's lock as a conflict (our own description never conflicts with itself).
    probe = os.open(gate_path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if conflicting_lock(probe, False) != fcntl.F_WRLCK:
            return None
    finally:
        os.close(probe)
    gate_dup = os.dup(gate_fd)
    fd, st = None, None
    if blob_fd is not None:
        try:
            st = same_file(blob_fd, path)
        except OSError:
            st = None
        if st is not None:
            fd = os.dup(blob_fd)
    os.set_inheritable(gate_dup, False)
    if fd is not None:
        os.set_inheritable(fd, False)
    hold = Hold(os.path.abspath(path), fd, st, True, gate_fd=gate_dup)
    hold.adopted_gate, hold.adopted_blob = True, fd is not None
    return hold
