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

* Reading is bounded: the blob is opened with ``O_NONBLOCK`` (a FIFO at the path must not
  block the opener) and :meth:`Hold.read` refuses anything that is not a regular file or is
  larger than the protocol can carry (:data:`certd.abi.wire.MAX_TABLE`), without reading it.

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
from typing import Callable, Protocol

from certd import faults
from certd.abi import wire

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

#: Largest blob :meth:`Hold.read` accepts: the largest table a GET_REPLY can carry.
MAX_BLOB = wire.MAX_TABLE


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


class BlobUnusable(OSError):
    """The file at the blob path cannot be a certificate table: not a regular file, or
    larger than :data:`MAX_BLOB`. Detected without reading it."""

    def __init__(self, path: str, why: str):
        super().__init__(errno.EINVAL, why, path)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return f"certificate blob {self.path} {self.why}"


_KINDS = ((stat_mod.S_ISFIFO, "a FIFO"), (stat_mod.S_ISDIR, "a directory"),
          (stat_mod.S_ISCHR, "a character device"), (stat_mod.S_ISBLK, "a block device"),
          (stat_mod.S_ISSOCK, "a socket"), (stat_mod.S_ISLNK, "a symbolic link"))


def _bounded() -> bool:
    return not faults.unsafe("bounded-read")


def _open_flags(base: int) -> int:
    """Flags for opening the blob: O_NONBLOCK so that opening a FIFO never blocks (it has
    no effect on regular files)."""
    return base | os.O_CLOEXEC | (os.O_NONBLOCK if _bounded() else 0)


def read_blob(fd: int, path: str) -> bytes:
    """The whole file behind ``fd``, read with ``pread`` from offset 0, or
    :class:`BlobUnusable` (checked with ``fstat`` first, so nothing big is ever read)."""
    if _bounded():
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
            raise BlobUnusable(path, f"is {kind}, not a regular file")
        if st.st_size > MAX_BLOB:
            raise BlobUnusable(path, f"is {st.st_size} bytes; a certificate table is at most "
                                     f"{MAX_BLOB}")
        limit = MAX_BLOB + 1
    else:
        limit = None  # test-only: the unbounded read of old
    parts, off = [], 0
    while limit is None or off < limit:
        chunk = os.pread(fd, 65536 if limit is None else limit - off, off)
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    if limit is not None and off >= limit:  # it grew after the fstat
        raise BlobUnusable(path, f"grew past {MAX_BLOB} bytes while being read")
    return b"".join(parts)


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


def holds_exclusive(fd: int, path: str) -> bool:
    """True if the open file description behind ``fd`` itself holds the exclusive lock on
    the file at ``path``: a fresh description sees a write lock, and ``fd``'s own would
    be granted an exclusive lock (so nobody else holds one)."""
    probe = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if conflicting_lock(probe, False) != fcntl.F_WRLCK:
            return False
    finally:
        os.close(probe)
    return conflicting_lock(fd, True) == fcntl.F_UNLCK


def writer_blocked(st: os.stat_result, proc_locks: str = "/proc/locks") -> bool:
    """True if some process is blocked in a lock wait on this inode (``F_OFD_SETLKW`` or
    ``F_SETLKW``: an updater that follows the kernel's scheme and knows nothing of the
    gate). The kernel lists such waiters in /proc/locks as ``->`` lines. Unreadable:
    True, so the caller errs on the side of letting an updater in."""
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    try:
        with open(proc_locks, encoding="ascii", errors="replace") as f:
            return any(" -> " in line and ident in line for line in f)
    except OSError:
        return True


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

class Keeper(Protocol):
    """Where a nested updater's hold hands its blob lock over (``certd.store.nested``)."""

    def keep(self, fd: int) -> bool: ...

    def close(self) -> None: ...


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
                 "acquired_ns", "waited", "gate_waited", "keeper", "kept")

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
        #: Adopted holds: the parent that takes over our blob lock at release, so that it
        #: lasts until the enclosing ``certctl lock`` ends.
        self.keeper: Keeper | None = None
        #: Descriptors locked exclusively on earlier inodes of this path (handed over by
        #: nested updaters): unlocked and closed at release.
        self.kept: list[int] = []

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

    @property
    def adopted(self) -> bool:
        """True if the lock belongs to an enclosing ``certctl lock`` (see nested.py)."""
        return self.adopted_gate

    def read(self) -> bytes:
        """The whole file (see :func:`read_blob`): :class:`BlobUnusable` if it is not a
        regular file or is larger than :data:`MAX_BLOB`, without reading it."""
        if self.fd is None:
            raise BlobMissing(self.path)
        return read_blob(self.fd, self.path)

    def release(self) -> None:
        """Unlock and close. Idempotent. Exclusive holds drop the blob first, then the gate.

        An adopted hold never unlocks the parent's locks, and hands a blob lock it took
        itself (the inode a nested install put in place) to its keeper instead of
        unlocking it."""
        fd, self.fd = self.fd, None
        gate, self.gate_fd = self.gate_fd, None
        kept, self.kept = self.kept, []
        keeper, self.keeper = self.keeper, None
        try:
            if fd is not None:
                handed = not self.adopted_blob and keeper is not None and keeper.keep(fd)
                _drop(fd, unlock_it=not (self.adopted_blob or handed))
            for d in kept:
                _drop(d, unlock_it=True)
            if gate is not None:
                _drop(gate, unlock_it=not self.adopted_gate)
        finally:
            if keeper is not None:
                keeper.close()

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


def _drop(fd: int, unlock_it: bool) -> None:
    try:
        if unlock_it:
            unlock(fd)  # explicit: a forked child may still hold a dup of fd
    finally:
        os.close(fd)


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
                fd = os.open(self.path, _open_flags(os.O_RDONLY))
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
            fd = os.open(self.path, _open_flags(os.O_RDWR))
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

    def _gate_steps(self, backoff: _Backoff):
        """Generator: yields delays to sleep; returns the gate descriptor, locked exclusive."""
        gate = self._open_gate_rw()
        try:
            return (yield from self._retry_steps(
                lambda: gate if try_lock(gate, True) else "gate", backoff, True))
        except BaseException:
            os.close(gate)  # drops the gate lock too
            raise

    def _exclusive_steps(self, deadline: float | None, missing_ok: bool, hold: Hold | None):
        """The exclusive acquisition as a generator of sleep requests, shared by the sync
        and async forms: yields a delay to sleep, returns the Hold. ``hold`` is an adopted
        gate-only Hold (from ``certd.store.nested.adopt``) to complete with the blob lock."""
        backoff = _Backoff(deadline)
        if hold is not None:
            fd, st = yield from self._blob_exclusive_steps(backoff, missing_ok)
            hold.fd, hold.stat, hold.adopted_blob = fd, st, False
            hold.waited, hold.acquired_ns = backoff.waited(), time.monotonic_ns()
            return hold
        gate = yield from self._gate_steps(backoff)
        try:
            gate_waited = backoff.waited()
            fd, st = yield from self._blob_exclusive_steps(backoff, missing_ok)
        except BaseException:
            os.close(gate)
            raise
        return Hold(self.path, fd, st, True, gate_fd=gate, waited=backoff.waited(),
                    gate_waited=gate_waited)

    def _gate_only_steps(self, deadline: float | None):
        backoff = _Backoff(deadline)
        gate = yield from self._gate_steps(backoff)
        return Hold(self.path, None, None, True, gate_fd=gate, waited=backoff.waited(),
                    gate_waited=backoff.waited())

    def acquire_gate_sync(self, deadline: float | None) -> Hold:
        """The update gate alone, exclusive (``fd`` None): stops other updaters and new
        certd readers, but leaves the blob's own lock (and QEMU's readers) alone.
        Raises :class:`LockBusy` at the deadline, OSError if the gate cannot be opened."""
        return _sleep_sync(self._gate_only_steps(deadline))

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
