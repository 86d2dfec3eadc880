"""The certificate blob on disk: read it under a shared lock, change it under the
exclusive lock, and never leave it wrong for the platform.

Every change is an :meth:`BlobStore.update` (``install`` and ``rollback`` are updates whose
change is pure); each step has a name (:data:`STEPS`) at which a test can kill the process
(``CERTD_FAULT_AT=<step>`` or the ``fault`` callable):

    gate exclusive, then the current blob exclusive, inode verified      -> "locked"
    (a journal a dead updater left: settle the blob first)
    write the journal <dir>/.<name>.journal, atomically and fsynced
    (not for install and rollback: their change cannot move the platform) -> "journaled"
    such a change runs with the empty table at the path (the old blob in
    .prev and in memory): killed in it, it leaves nothing stale          -> "emptied"
    run the change step (firmware update, hook, or just "here are new bytes")
    validate the blob it returned (caller's validator; empty list = OK)  -> "validated"
    clean up temp files a crashed updater left (we hold the gate)        -> "recovered"
    write the new bytes to a temp file in the same directory             -> "temp_written"
    copy the old mode/owner to it, fsync it                              -> "temp_synced"
    lock the temp file exclusive (a reader that opens it after the
    rename finds it locked until we are done)                            -> "temp_locked"
    hard-link the old inode to <path>.prev (via a temp name + rename)    -> "prev_saved"
    rename the temp file over the path                                   -> "renamed"
    fsync the directory; unlock the old file, keep the new one locked    -> "dir_synced"
    if nothing was installed: settle (the blob still fits the platform
    as it is now, else the empty table replaces it; after emptying first,
    the old blob is put back only if it still fits)
    remove the journal, release the new file, then the gate              -> "released"

Every rename is atomic, so whatever the moment of a crash the path names a complete blob,
the old one or the new one, and ``<path>.prev`` is absent, the blob before the old one, or
the old one. A crash leaves at most temp files named ``.<name>.tmp.<pid>.<hex>`` /
``.<name>.prevtmp.<pid>.<hex>``, which :meth:`BlobStore.recover` (run by every install,
under the gate) removes, and the journal, which the next updater (or the daemon) settles.

The empty table (:data:`certd.abi.table.EMPTY_TABLE`) is always installable: it is never
wrong, only empty. :func:`check` is the one place that says so; validators are never asked
about it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat as stat_mod
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from certd import faults
from certd.abi import table
from certd.store import journal, locks, nested
from certd.store.journal import JournalInfo
from certd.verify.problems import Problem

#: ``validate(blob) -> problems``; [] means the blob may be served on this platform now.
#: Validators read the platform when called, so that a check after a change step sees it.
Validator = Callable[[bytes], Sequence[Problem]]

STEPS = ("locked", "journaled", "validated", "recovered", "temp_written", "temp_synced",
         "temp_locked", "prev_saved", "renamed", "dir_synced", "released")
#: Test hook step of :meth:`BlobStore.ensure_exists`: the blob was found missing, the gate
#: is not taken yet.
ENSURE_CHECKED = "ensure_checked"
#: Test-only: ``CERTD_FAULT_AT=<step>`` makes the updating process SIGKILL itself there.
FAULT_ENV = faults.FAULT_AT_ENV
DEFAULT_MODE = 0o644  # the blob holds public certificates; QEMU runs as another user
DEFAULT_TIMEOUT = 2.0


def check(blob: bytes, validate: Validator) -> list[Problem]:
    """Why ``blob`` must not be installed (or served) now; [] if it may.

    The empty table always may: ``validate`` is not asked about it. A validator that
    raises proves nothing, so its exception is a problem (never-wrong: not trusted)."""
    if blob == table.EMPTY_TABLE:
        return []
    try:
        return list(validate(blob))
    except Exception as e:
        return [Problem("validator", f"the check failed ({type(e).__name__}: {e}); "
                                     "the blob is not trusted")]


class StoreError(Exception):
    """An install, rollback or read failed; the current blob is untouched."""


class InvalidBlob(StoreError):
    """The validator refused the blob. ``result`` says what the update did instead (the
    current blob was kept, or replaced by the empty table because it no longer fits)."""

    def __init__(self, problems: Sequence[Problem], what: str = "new blob",
                 result: "UpdateResult | None" = None):
        self.problems = list(problems)
        self.result = result
        msg = f"{what} refused: " + "; ".join(str(p) for p in self.problems)
        if result is not None and result.outcome == "emptied":
            msg += f"; {result.settled.summary()}"
        super().__init__(msg)


class StoreIOError(StoreError):
    """A filesystem error, with the errno, the file and the step that failed."""

    def __init__(self, message: str, err: int | None = None, filename: str | None = None):
        self.errno = err
        self.filename = filename
        super().__init__(message)


class NothingToRollBack(StoreError):
    pass


_EXPLAIN = {
    errno.ENOSPC: "disk full (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.ENOENT: "no such file or directory (ENOENT)",
    errno.EIO: "I/O error (EIO)",
}


def _io_error(e: OSError, doing: str, path: str, file: str | None = None) -> StoreIOError:
    why = _EXPLAIN.get(e.errno or 0, e.strerror or str(e))
    name = e.filename or file or path
    return StoreIOError(f"{doing} failed: {why}: {name}; the current blob {path} is untouched",
                        e.errno, name)


@dataclass
class InstallResult:
    """One replacement of the blob (by a new blob, the previous one, or the empty table)."""

    path: str
    sha256: str
    size: int
    #: sha256 of the blob replaced, None on a first install (or an unreadable old file).
    previous_sha256: str | None
    #: Where the replaced blob was kept (None on a first install).
    prev_path: str | None
    gate_wait_s: float
    lock_wait_s: float
    #: CLOCK_MONOTONIC ns when the exclusive section began (gate and blob held) and ended.
    locked_ns: int
    released_ns: int
    removed_temps: list[str] = field(default_factory=list)
    #: The settle of a journal a dead updater left, done first (see UpdateResult).
    recovered: "SettleResult | None" = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SettleResult:
    """What :meth:`BlobStore.settle` found: the blob ``kept`` (it fits the platform now),
    ``emptied`` (it did not: the empty table replaced it), or ``missing`` (no blob)."""

    path: str
    outcome: str
    #: Why the blob was emptied ([] unless ``emptied``).
    problems: list[Problem]
    #: The journal a dead updater left, settled and cleared by this call (None: none).
    journal: JournalInfo | None = None
    #: The replacement by the empty table (``emptied`` only).
    emptied: InstallResult | None = None
    #: CLOCK_MONOTONIC ns of the exclusive section (0 inside an update: see UpdateResult).
    locked_ns: int = 0
    released_ns: int = 0

    def summary(self) -> str:
        """One sentence for messages."""
        if self.outcome == "emptied":
            return (f"the blob at {self.path} no longer fit ("
                    + "; ".join(str(p) for p in self.problems)
                    + "): it was replaced by the empty table")
        if self.outcome == "missing":
            return f"there is no blob at {self.path}"
        return f"the blob at {self.path} still fits"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class UpdateResult:
    """What :meth:`BlobStore.update` did: ``installed`` the change's blob, or, when it
    installed nothing (none returned, refused, or the change failed), ``kept`` the blob
    that still fits or ``emptied`` it."""

    path: str
    outcome: str = "kept"
    installed: InstallResult | None = None
    #: Why the change's blob was refused ([] if installed or none was returned).
    refused: list[Problem] = field(default_factory=list)
    #: The settle after a change that installed nothing (None after an install).
    settled: SettleResult | None = None
    #: The settle of a journal a dead updater left, before our change ran.
    recovered: SettleResult | None = None
    #: Our journal (None when the lock was adopted from an enclosing ``certctl lock``,
    #: whose journal it is).
    journal: JournalInfo | None = None
    gate_wait_s: float = 0.0
    lock_wait_s: float = 0.0
    #: CLOCK_MONOTONIC ns: the exclusive section (gate and blob held) ...
    locked_ns: int = 0
    released_ns: int = 0
    #: ... and the change step within it.
    change_started_ns: int = 0
    change_ended_ns: int = 0

    @property
    def change_s(self) -> float:
        return (self.change_ended_ns - self.change_started_ns) / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "change_s": self.change_s}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class BlobStore:
    """The blob at ``path``. ``validate(blob) -> list[Problem]`` decides what may be
    installed and what may stay (certctl passes ``certd.policy.check_blob`` reading the
    platform when called; the daemon passes its own, the same check).

    ``fault(step)`` is a test hook called at every step of :data:`STEPS`.
    """

    def __init__(self, path: str | os.PathLike[str], validate: Validator, *,
                 fault: Callable[[str], None] | None = None, mode: int = DEFAULT_MODE):
        self.path = os.path.abspath(os.fspath(path))
        self.dir, self.name = os.path.split(self.path)
        self.prev_path = self.path + ".prev"
        self.validate = validate
        self.mode = mode
        self.lock = locks.BlobLock(self.path)
        self._fault_hook = fault
        self._temp_re = journal.temp_pattern(self.name)
        self.journal_path = journal.journal_path(self.path)
        #: The exclusive hold while an update's change runs, else None: a change that runs
        #: a command passes it to ``certd.store.nested.run_command(store.hold, cmd)`` so
        #: that a ``certctl install`` in the command adopts it (and its new blob stays
        #: locked until the update ends).
        self.hold: locks.Hold | None = None

    # -- test hook

    def _fault(self, step: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step)
        if os.environ.get(FAULT_ENV) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- reading

    def read(self, timeout: float | None = DEFAULT_TIMEOUT) -> bytes | None:
        """The current blob, read under a shared lock; None if there is none (unconfigured).
        Raises :class:`certd.store.locks.BlobUnusable` for a non-file or oversized file."""
        try:
            with self.lock.acquire_shared_sync(locks.deadline_in(timeout)) as hold:
                return hold.read()
        except locks.BlobMissing:
            return None

    def journal(self) -> JournalInfo | None:
        """The journal of an update not yet settled, or None. One ``open`` when there is
        none. A journal whose writer still holds the gate is an update in progress; any
        other is the trace of one that died: :meth:`settle` the blob."""
        return journal.read_file(self.journal_path)

    # -- temp files

    def is_temp(self, name: str) -> bool:
        return bool(self._temp_re.match(name))

    def _remove_temps(self) -> list[str]:
        removed = []
        for entry in os.scandir(self.dir):
            if self.is_temp(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                    removed.append(entry.path)
                except FileNotFoundError:
                    pass
        return removed

    def recover(self, timeout: float | None = DEFAULT_TIMEOUT) -> list[str]:
        """Remove temp files a crashed install left behind; returns their paths.

        Runs under the exclusive gate (so no live updater's temp file can be taken for a
        leftover) but does not touch the blob's own lock: readers are not disturbed.
        """
        self._check_dir()
        try:
            hold = self.lock.acquire_gate_sync(locks.deadline_in(timeout))
        except locks.LockBusy:
            raise
        except OSError as e:
            if e.errno == errno.EROFS:
                return []  # nothing can have been left on a read-only filesystem
            raise _io_error(e, "opening the update gate", self.path) from None
        with hold:
            return self._remove_temps()

    # -- locking

    def _check_dir(self) -> None:
        if not os.path.isdir(self.dir):
            raise StoreIOError(f"directory {self.dir} does not exist (blob {self.path})",
                               errno.ENOENT, self.dir)

    def _acquire(self, timeout: float | None) -> locks.Hold:
        """Exclusive hold on gate + current blob; adopts an enclosing ``certctl lock``'s."""
        self._check_dir()
        deadline = locks.deadline_in(timeout)
        hold = None
        try:
            hold = nested.adopt(self.path, deadline)
            if hold is not None:
                if hold.fd is None:
                    hold = self.lock.acquire_exclusive_sync(deadline, missing_ok=True, hold=hold)
                return hold
            return self.lock.acquire_exclusive_sync(deadline, missing_ok=True)
        except RuntimeError as e:
            raise StoreError(str(e)) from None
        except locks.LockBusy:
            if hold is not None:
                hold.release()
            raise
        except OSError as e:
            if hold is not None:
                hold.release()
            raise _io_error(e, "locking the blob for update", self.path) from None

    # -- settling

    def settle(self, validate: Validator | None = None, *,
               timeout: float | None = DEFAULT_TIMEOUT) -> SettleResult:
        """Under the exclusive lock: make sure the blob at the path fits now (``validate``,
        default the store's), else replace it with the empty table; clear a leftover
        journal. Raises LockBusy, StoreIOError (the journal then stays: still pending)."""
        hold = self._acquire(timeout)
        try:
            leftover = None if hold.adopted else journal.read(self.path)
            res = self._settle(hold, validate or self.validate, leftover)
            if not hold.adopted:
                journal.remove(self.path)
        finally:
            hold.release()
        res.locked_ns, res.released_ns = hold.acquired_ns, time.monotonic_ns()
        return res

    def _settle(self, hold: locks.Hold, validate: Validator,
                leftover: JournalInfo | None) -> SettleResult:
        if hold.fd is None:
            return SettleResult(self.path, "missing", [], leftover)
        try:
            problems = check(hold.read(), validate)
        except locks.BlobUnusable as e:
            problems = [Problem("format", str(e))]
        if not problems:
            return SettleResult(self.path, "kept", [], leftover)
        emptied = self._replace(table.EMPTY_TABLE, hold)
        return SettleResult(self.path, "emptied", problems, leftover, emptied)

    def _restore(self, hold: locks.Hold, validate: Validator, old: bytes) -> SettleResult:
        """After an emptied-first change installed nothing: put the old blob back if it
        still fits the platform as it is now (kept), else leave the empty table (emptied)."""
        problems = [] if faults.unsafe("settle") else check(old, validate)
        if problems:
            return SettleResult(self.path, "emptied", problems)
        self._replace(old, hold, save_prev=False)
        return SettleResult(self.path, "kept", [])

    def ensure_exists(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> InstallResult | None:
        """If there is no blob at the path, write the empty table there (atomically, mode
        :attr:`mode`, default 0644), so that a stock QEMU finds a file. None if a blob
        exists (also one an updater installed while we waited for the gate)."""
        if os.path.lexists(self.path):
            return None
        self._fault(ENSURE_CHECKED)
        hold = self._acquire(timeout)
        try:
            if hold.fd is not None and not faults.unsafe("ensure-recheck"):
                return None  # someone installed a blob meanwhile: it is theirs
            r = self._replace(table.EMPTY_TABLE, hold)
        finally:
            hold.release()
        r.released_ns = time.monotonic_ns()
        return r

    # -- install / rollback / update

    def install(self, blob: bytes, *, timeout: float | None = DEFAULT_TIMEOUT,
                validate: Validator | None = None) -> InstallResult:
        """Validate ``blob`` and make it the current blob atomically (an :meth:`update`
        whose change returns ``blob``).

        Raises :class:`InvalidBlob` (validator said no; ``.result`` says whether the
        current blob was kept or emptied), :class:`StoreIOError` (filesystem),
        :class:`certd.store.locks.LockBusy` (lock not obtained within ``timeout``).
        """
        blob = bytes(blob)
        r = self._update(lambda current: blob, timeout, validate, None)
        return self._installed(r, "new blob")

    def rollback(self, *, timeout: float | None = DEFAULT_TIMEOUT,
                 validate: Validator | None = None) -> InstallResult:
        """Make ``<path>.prev`` current again; the blob it replaces becomes the new ``.prev``.

        An :meth:`update` whose change reads ``.prev``, so it is just as crash-safe and
        settles the same way. Raises :class:`NothingToRollBack` if there is no ``.prev``.
        """
        what = f"previous blob {self.prev_path}"

        def previous(_current: bytes | None) -> bytes:
            try:
                fd = os.open(self.prev_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NothingToRollBack(
                    f"no previous blob to roll back to ({self.prev_path} does not exist)") from None
            except OSError as e:
                raise _io_error(e, "reading the previous blob", self.path) from None
            try:
                return locks.read_blob(fd, self.prev_path)
            except locks.BlobUnusable as e:
                raise InvalidBlob([Problem("format", str(e))], what) from None
            except OSError as e:
                raise _io_error(e, "reading the previous blob", self.path) from None
            finally:
                os.close(fd)

        r = self._update(previous, timeout, validate, None)
        return self._installed(r, what)

    @staticmethod
    def _installed(r: UpdateResult, what: str) -> InstallResult:
        if r.installed is None:
            raise InvalidBlob(r.refused, what, r)
        return r.installed

    def update(self, change: Callable[[bytes | None], bytes | None], *,
               timeout: float | None = DEFAULT_TIMEOUT, validate: Validator | None = None,
               what: str = "update") -> UpdateResult:
        """Run ``change(current_blob_or_None)`` under the exclusive lock (this is where a
        firmware update, SNP_COMMIT, SNP_SET_CONFIG or SNP_VLEK_LOAD belongs) and leave a
        blob that fits the platform as it is afterwards before any reader gets in again.

        Before the change: a journal a dead updater left is settled, then our journal
        (``what``) is written. After it, still under the lock: the blob ``change``
        returned is installed if ``validate`` (default: the store's) accepts it;
        otherwise (refused, None returned, or ``change`` raised) the current blob is
        settled: kept if it still fits, else replaced by the empty table. Then the
        journal is removed and the lock released. An exception from ``change`` propagates
        after that (with a note saying what was settled).
        """
        return self._update(change, timeout, validate, what)

    def _update(self, change: Callable[[bytes | None], bytes | None], timeout: float | None,
                validate: Validator | None, what: str | None) -> UpdateResult:
        """:meth:`update`; ``what`` None: a pure change (install, rollback) that cannot
        move the platform, so it needs no journal (and skips its two fsyncs)."""
        validate = validate or self.validate
        hold = self._acquire(timeout)
        res = UpdateResult(self.path, locked_ns=hold.acquired_ns, gate_wait_s=hold.gate_waited,
                           lock_wait_s=hold.waited)
        failure: BaseException | None = None
        try:
            self._fault("locked")
            if not hold.adopted:  # else the enclosing 'certctl lock' owns the journal
                leftover = journal.read(self.path)
                if leftover is not None:  # we hold the gate: its writer is gone
                    res.recovered = self._settle(hold, validate, leftover)
                if what is not None:
                    try:
                        res.journal = journal.write(self.path, what)
                    except OSError as e:
                        raise _io_error(e, "writing the update journal", self.path) from None
            self._fault("journaled")
            early = faults.fault("early-release") and not hold.adopted
            if early:
                self._release_early(hold)
            current = self._current(hold)
            # Empty first: a change that may move the platform (a firmware step) runs with
            # the empty table at the path, so an updater killed in it leaves nothing stale
            # for a reader that never looks at the journal (a stock QEMU). The blob it
            # replaced is in .prev and in memory, to be put back if it still fits.
            emptied_first = (what is not None and not early and not hold.adopted
                             and current not in (None, table.EMPTY_TABLE)
                             and not faults.unsafe("empty-first"))
            if emptied_first:
                self._replace(table.EMPTY_TABLE, hold)
                self._fault("emptied")
            try:
                res.change_started_ns = time.monotonic_ns()
                self.hold = hold
                try:
                    blob = change(current)
                finally:
                    self.hold = None
                    res.change_ended_ns = time.monotonic_ns()
                if blob is not None:
                    blob = bytes(blob)
                    res.refused = check(blob, validate)
                    if not res.refused:
                        self._fault("validated")
                        res.installed = self._replace(blob, hold, save_prev=not emptied_first)
            except BaseException as e:
                failure = e
            if res.installed is None and emptied_first and \
                    self._current(hold) == table.EMPTY_TABLE:  # (not a nested install's)
                res.settled = self._restore(hold, validate, current)
            elif res.installed is None and not faults.unsafe("settle"):
                res.settled = self._settle(hold, validate, None)
            if not hold.adopted and (res.journal is not None or res.recovered is not None):
                journal.remove(self.path)
        finally:
            hold.release()
        res.released_ns = time.monotonic_ns()
        self._fault("released")
        if res.installed is not None:
            res.outcome = "installed"
            res.installed.released_ns = res.released_ns
            res.installed.recovered = res.recovered
        elif res.settled is not None and res.settled.outcome == "emptied":
            res.outcome = "emptied"
        if failure is not None:
            if res.settled is not None:
                failure.add_note(f"certd: after this failure, {res.settled.summary()}")
            raise failure
        return res

    def _current(self, hold: locks.Hold) -> bytes | None:
        if hold.fd is None:
            return None
        try:
            return hold.read()
        except locks.BlobUnusable:
            return None

    @staticmethod
    def _release_early(hold: locks.Hold) -> None:
        """Test-only fault ``early-release``: drop the blob and gate locks now (the
        descriptors stay open, so everything else runs as usual)."""
        for fd in (hold.fd, hold.gate_fd):
            if fd is not None:
                locks.unlock(fd)

    def _replace(self, blob: bytes, hold: locks.Hold, save_prev: bool = True) -> InstallResult:
        """Put ``blob`` (already checked) at the path atomically. On return ``hold`` holds
        the new inode, locked exclusive (the old one is unlocked and closed). ``save_prev``
        False: ``.prev`` already holds the blob to keep (an emptied-first update)."""
        removed = self._remove_temps()
        self._fault("recovered")
        old_bytes = self._current(hold)
        old_st = hold.stat
        tmp = journal.temp_path(self.path, "tmp")
        step = "creating a temp file"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as e:
            raise _io_error(e, step, self.path) from None
        renamed = False
        try:
            try:
                step = "writing the temp file"
                _write_all(fd, blob)
                self._fault("temp_written")
                step = "setting the temp file's mode and owner"
                self._copy_owner(fd, old_st)
                step = "syncing the temp file"
                os.fsync(fd)
                self._fault("temp_synced")
                if not locks.try_lock(fd, True):  # nobody else knows this file yet
                    raise StoreIOError(f"could not lock the fresh temp file {tmp}")
                self._fault("temp_locked")
                step = "keeping the previous blob"
                if hold.fd is not None and save_prev:
                    self._save_prev(old_bytes, old_st)
                self._fault("prev_saved")
                step = "renaming the temp file over the blob"
                os.rename(tmp, self.path)
                renamed = True
            except OSError as e:
                raise _io_error(e, step, self.path, tmp) from None
            finally:
                if not renamed:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
        except BaseException:
            try:
                locks.unlock(fd)
            finally:
                os.close(fd)
            raise
        # Release the old file first: readers that opened it see it unlinked and retry on
        # the new path, where they wait for our lock on the new file (released with hold).
        self._swap(hold, fd)
        self._fault("renamed")
        # After the rename the new blob is in place; a failing directory fsync is
        # reported but cannot be undone (the rename is already visible).
        try:
            self._fsync_dir()
        except OSError as e:
            raise StoreIOError(f"blob {self.path} was replaced but syncing the directory "
                               f"failed: {e.strerror}", e.errno, self.dir) from None
        self._fault("dir_synced")
        return InstallResult(
            path=self.path, sha256=_sha(blob), size=len(blob),
            previous_sha256=None if old_bytes is None else _sha(old_bytes),
            prev_path=None if old_st is None else self.prev_path,
            gate_wait_s=hold.gate_waited, lock_wait_s=hold.waited,
            locked_ns=hold.acquired_ns, released_ns=0, removed_temps=removed)

    @staticmethod
    def _swap(hold: locks.Hold, new_fd: int) -> None:
        """The hold lets go of the replaced inode and takes ``new_fd`` (locked) instead."""
        old, hold.fd = hold.fd, None
        if old is not None:
            try:
                if not hold.adopted_blob:
                    locks.unlock(old)
            finally:
                os.close(old)
        hold.fd, hold.adopted_blob, hold.stat = new_fd, False, os.fstat(new_fd)

    def _copy_owner(self, fd: int, old: os.stat_result | None) -> None:
        if old is None:
            os.fchmod(fd, self.mode)
            return
        os.fchmod(fd, stat_mod.S_IMODE(old.st_mode))
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the new blob is ours; its mode still matches
            else:
                os.fchmod(fd, stat_mod.S_IMODE(old.st_mode))  # chown clears setuid bits

    def _save_prev(self, old_bytes: bytes | None, old_st: os.stat_result | None) -> None:
        """Make ``<path>.prev`` the inode we hold locked, atomically: hard-link it (or copy
        it) to a temp name, then rename that over ``.prev``. A crash leaves ``.prev`` old or
        new, never partial."""
        tmp = journal.temp_path(self.path, "prevtmp")
        try:
            linked = False
            try:
                # Link by path (linkat through /proc/self/fd gives EXDEV on some mounts),
                # then check the link is the inode we locked and verified.
                os.link(self.path, tmp, follow_symlinks=False)
                st = os.lstat(tmp)
                linked = old_st is not None and (st.st_dev, st.st_ino) == (old_st.st_dev, old_st.st_ino)
                if not linked:
                    os.unlink(tmp)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOENT, errno.EMLINK,
                                   errno.EOPNOTSUPP):
                    raise
            if not linked:
                self._copy_file(tmp, old_bytes or b"", old_st)
            os.rename(tmp, self.prev_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _copy_file(self, dest: str, data: bytes, st: os.stat_result | None) -> None:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            self._copy_owner(fd, st)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
