"""The certificate blob on disk: read it under a shared lock, replace it atomically.

An install follows DESIGN §3 step by step; each step has a name (:data:`STEPS`) at which a
test can kill the process (``CERTD_FAULT_AT=<step>`` or the ``fault`` callable):

    gate exclusive, then the current blob exclusive, inode verified      -> "locked"
    validate the new bytes (caller's validator; empty list = OK)         -> "validated"
    clean up temp files a crashed updater left (we hold the gate)        -> "recovered"
    write the new bytes to a temp file in the same directory             -> "temp_written"
    copy the old mode/owner to it, fsync it                              -> "temp_synced"
    lock the temp file exclusive (a reader that opens it after the
    rename finds it locked until we are done)                            -> "temp_locked"
    hard-link the old inode to <path>.prev (via a temp name + rename)    -> "prev_saved"
    rename the temp file over the path                                   -> "renamed"
    fsync the directory                                                  -> "dir_synced"
    release the old file, then the new one, then the gate                -> "released"

Every rename is atomic, so whatever the moment of a crash the path names a complete blob,
the old one or the new one, and ``<path>.prev`` is absent, the blob before the old one, or
the old one. A crash leaves at most temp files named ``.<name>.tmp.<pid>.<hex>`` /
``.<name>.prevtmp.<pid>.<hex>``; :meth:`BlobStore.recover` (run by every install, under the
gate) removes exactly those.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import signal
import stat as stat_mod
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from certd.abi import table
from certd.store import locks
from certd.verify.problems import Problem

Validator = Callable[[bytes], Sequence[Problem]]

STEPS = ("locked", "validated", "recovered", "temp_written", "temp_synced", "temp_locked",
         "prev_saved", "renamed", "dir_synced", "released")
#: Test-only: ``CERTD_FAULT_AT=<step>`` makes the installing process SIGKILL itself there.
FAULT_ENV = "CERTD_FAULT_AT"
DEFAULT_MODE = 0o644  # the blob holds public certificates; QEMU runs as another user
DEFAULT_TIMEOUT = 2.0


def format_problems(blob: bytes) -> list[Problem]:
    """Format-only validator: a strict GHCB table a Linux guest can receive. No PKI checks."""
    if not blob:
        return [Problem("format", "empty file: not a certificate table "
                                  "(an empty table is 24 zero bytes)")]
    try:
        table.decode(blob)
    except table.TableError as e:
        return [Problem("format", f"not a valid certificate table: {e}")]
    if len(blob) > table.GUEST_MAX_SIZE:
        return [Problem("size", f"{len(blob)} bytes; Linux guests accept at most "
                                f"{table.GUEST_MAX_SIZE} bytes")]
    return []


class StoreError(Exception):
    """An install, rollback or read failed; the current blob is untouched."""


class InvalidBlob(StoreError):
    def __init__(self, problems: Sequence[Problem], what: str = "new blob"):
        self.problems = list(problems)
        super().__init__(f"{what} refused: " + "; ".join(str(p) for p in self.problems))


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
    path: str
    sha256: str
    size: int
    #: sha256 of the blob replaced, None on a first install.
    previous_sha256: str | None
    #: Where the replaced blob was kept (None on a first install).
    prev_path: str | None
    gate_wait_s: float
    lock_wait_s: float
    #: CLOCK_MONOTONIC ns when the exclusive section began (gate and blob held) and ended.
    locked_ns: int
    released_ns: int
    removed_temps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class BlobStore:
    """The blob at ``path``. ``validate(blob) -> list[Problem]`` gates every install
    (default: :func:`format_problems`; certctl passes ``certd.policy``'s check).

    ``fault(step)`` is a test hook called at every step of :data:`STEPS`.
    """

    def __init__(self, path: str | os.PathLike[str], validate: Validator | None = None, *,
                 fault: Callable[[str], None] | None = None, mode: int = DEFAULT_MODE):
        self.path = os.path.abspath(os.fspath(path))
        self.dir, self.name = os.path.split(self.path)
        self.prev_path = self.path + ".prev"
        self.validate: Validator = validate or format_problems
        self.mode = mode
        self.lock = locks.BlobLock(self.path)
        self._fault_hook = fault
        self._temp_re = re.compile(
            r"\A\." + re.escape(self.name) + r"\.(?:tmp|prevtmp)\.[0-9]+\.[0-9a-f]{16}\Z")

    # -- test hook

    def _fault(self, step: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step)
        if os.environ.get(FAULT_ENV) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- reading

    def read(self, timeout: float | None = DEFAULT_TIMEOUT) -> bytes | None:
        """The current blob, read under a shared lock; None if there is none (unconfigured)."""
        try:
            with self.lock.acquire_shared_sync(locks.deadline_in(timeout)) as hold:
                return hold.read()
        except locks.BlobMissing:
            return None

    # -- temp files

    def _temp_name(self, kind: str) -> str:
        return os.path.join(self.dir, f".{self.name}.{kind}.{os.getpid()}.{secrets.token_hex(8)}")

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
            gate = os.open(self.lock.gate, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.EROFS:
                return []  # nothing can have been left on a read-only filesystem
            raise _io_error(e, "opening the update gate", self.path) from None
        try:
            backoff = locks._Backoff(locks.deadline_in(timeout))
            while not locks.try_lock(gate, True):
                delay = backoff.next()
                if delay is None:
                    raise locks.LockBusy(self.path, "gate", backoff.waited(), True)
                time.sleep(delay)
            return self._remove_temps()
        finally:
            os.close(gate)

    # -- journal, settle, ensure_exists (interim: the store branch replaces these)

    @property
    def journal_path(self) -> str:
        return os.path.join(self.dir, f".{self.name}.journal")

    def journal(self) -> str | None:
        """The journal an updater left (it died mid-change), or None."""
        return self.journal_path if os.path.exists(self.journal_path) else None

    def settle(self, validate: Validator | None = None, *,
               timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Under the exclusive lock: empty the blob if it does not fit now; clear the journal."""
        validate = validate or self.validate
        hold = self._acquire(timeout)
        try:
            if hold.fd is None:
                result = "missing"
            else:
                blob = hold.read()
                if blob == table.EMPTY_TABLE or not list(validate(blob)):
                    result = "kept"
                else:
                    self._replace(table.EMPTY_TABLE, hold, lambda b: [], "empty table")
                    result = "emptied"
            try:
                os.unlink(self.journal_path)
            except FileNotFoundError:
                pass
            return result
        finally:
            hold.release()

    def ensure_exists(self) -> bool:
        """Write the empty table if there is no blob; True if written."""
        if os.path.exists(self.path):
            return False
        hold = self._acquire(DEFAULT_TIMEOUT)
        try:
            if hold.fd is not None:
                return False
            self._replace(table.EMPTY_TABLE, hold, lambda b: [], "empty table")
            return True
        finally:
            hold.release()

    # -- install / rollback

    def _check_dir(self) -> None:
        if not os.path.isdir(self.dir):
            raise StoreIOError(f"directory {self.dir} does not exist (blob {self.path})",
                               errno.ENOENT, self.dir)

    def _acquire(self, timeout: float | None) -> locks.Hold:
        """Exclusive hold on gate + current blob; adopts a parent ``certctl lock``'s."""
        self._check_dir()
        deadline = locks.deadline_in(timeout)
        try:
            hold = locks.inherited_hold(self.path)
        except RuntimeError as e:
            raise StoreError(str(e)) from None
        try:
            if hold is not None:
                if hold.fd is None:
                    hold = self.lock.acquire_exclusive_sync(deadline, missing_ok=True, hold=hold)
                return hold
            return self.lock.acquire_exclusive_sync(deadline, missing_ok=True)
        except locks.LockBusy:
            if hold is not None:
                hold.release()
            raise
        except OSError as e:
            if hold is not None:
                hold.release()
            raise _io_error(e, "locking the blob for update", self.path) from None

    def install(self, blob: bytes, *, timeout: float | None = DEFAULT_TIMEOUT,
                validate: Validator | None = None) -> InstallResult:
        """Validate ``blob`` and make it the current blob atomically (see module doc).

        Raises :class:`InvalidBlob` (validator said no), :class:`StoreIOError` (filesystem),
        :class:`certd.store.locks.LockBusy` (lock not obtained within ``timeout``). In every
        failure case the current blob is left as it was.
        """
        blob = bytes(blob)
        return self.update(lambda current: blob, timeout=timeout, validate=validate)

    def update(self, change: Callable[[bytes | None], bytes], *,
               timeout: float | None = DEFAULT_TIMEOUT,
               validate: Validator | None = None) -> InstallResult:
        """A rotation: run ``change(current_blob_or_None)`` under the exclusive lock (this is
        where a firmware update, SNP_COMMIT, SNP_SET_CONFIG or SNP_VLEK_LOAD belongs), then
        validate and install the blob it returns before any reader gets in again.

        ``validate`` is evaluated after ``change``, so it may read state that ``change``
        updated (the new reported TCB). If ``change`` raises, nothing is installed.
        """
        hold = self._acquire(timeout)
        try:
            blob = bytes(change(hold.read() if hold.fd is not None else None))
            return self._replace(blob, hold, validate or self.validate, "new blob")
        finally:
            hold.release()

    def rollback(self, *, timeout: float | None = DEFAULT_TIMEOUT,
                 validate: Validator | None = None) -> InstallResult:
        """Make ``<path>.prev`` current again; the blob it replaces becomes the new ``.prev``.

        Done exactly like an install of the previous bytes (same locks, temp file, renames),
        so it is just as crash-safe.
        """
        hold = self._acquire(timeout)
        try:
            try:
                with open(self.prev_path, "rb") as f:
                    old = f.read()
            except FileNotFoundError:
                raise NothingToRollBack(
                    f"no previous blob to roll back to ({self.prev_path} does not exist)") from None
            except OSError as e:
                raise _io_error(e, "reading the previous blob", self.path) from None
            return self._replace(old, hold, validate or self.validate, f"previous blob {self.prev_path}")
        finally:
            hold.release()

    def _replace(self, blob: bytes, hold: locks.Hold, validate: Validator,
                 what: str) -> InstallResult:
        locked_ns = hold.acquired_ns
        self._fault("locked")
        problems = list(validate(blob))
        if problems:
            raise InvalidBlob(problems, what)
        self._fault("validated")
        removed = self._remove_temps()
        self._fault("recovered")

        old_bytes = hold.read() if hold.fd is not None else None
        old_st = hold.stat
        tmp = self._temp_name("tmp")
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
                if hold.fd is not None:
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
            self._fault("renamed")
            # After the rename the new blob is in place; a failing directory fsync is
            # reported but cannot be undone (the rename is already visible).
            try:
                self._fsync_dir()
            except OSError as e:
                raise StoreIOError(f"blob {self.path} was replaced but syncing the directory "
                                   f"failed: {e.strerror}", e.errno, self.dir) from None
            self._fault("dir_synced")
            # Release the old file first: readers that opened it see it unlinked and retry on
            # the new path, where they wait for our lock on the new file.
            if hold.fd is not None:
                old_fd, hold.fd = hold.fd, None
                try:
                    if not hold.adopted_blob:
                        locks.unlock(old_fd)
                finally:
                    os.close(old_fd)
        finally:
            try:
                locks.unlock(fd)
            finally:
                os.close(fd)
        released_ns = time.monotonic_ns()
        hold.release()  # the gate
        self._fault("released")
        return InstallResult(
            path=self.path, sha256=_sha(blob), size=len(blob),
            previous_sha256=None if old_bytes is None else _sha(old_bytes),
            prev_path=None if old_bytes is None else self.prev_path,
            gate_wait_s=hold.gate_waited, lock_wait_s=hold.waited,
            locked_ns=locked_ns, released_ns=released_ns, removed_temps=removed)

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
        tmp = self._temp_name("prevtmp")
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
