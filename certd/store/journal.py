"""The update journal beside the blob, and the names of the files certd keeps there.

An updater writes ``<dir>/.<name>.journal`` under the exclusive lock *before* its change
step (a firmware update, a rotation, a hook's command) and removes it only after the blob
at the path was checked against the platform as it is then (``BlobStore.settle``). A
journal found while nobody holds the update gate was therefore left by an updater that
died (or, for ``certctl lock``, one that cannot check certificates): the blob may no
longer fit the platform, and must be settled before it is served again.

The journal is small JSON, written atomically (temp file, fsync, rename, directory fsync)
so that it survives a crash or power loss of the change it announces::

    {"pid": 1234, "started_wall": 1764600000.1, "started_monotonic_ns": 81234000000,
     "boot_id": "5e0f...", "what": "certctl lock --exclusive -- fw-update ..."}

Any file at that name counts as pending, even one that is not such JSON (``problem``
then says what is wrong with it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass

from certd import faults

_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR})

#: Largest journal :func:`read` parses; a bigger file is garbage (and still pending).
MAX_JOURNAL = 4096


def journal_path(blob_path: str) -> str:
    """``<dir>/.<name>.journal`` for the blob at ``blob_path``."""
    d, name = os.path.split(os.path.abspath(blob_path))
    return os.path.join(d, f".{name}.journal")


def temp_path(blob_path: str, kind: str) -> str:
    """A fresh temp name beside the blob: ``.<name>.<kind>.<pid>.<16 hex>`` (kind: tmp or
    prevtmp). Only these names are removed by ``BlobStore.recover``."""
    d, name = os.path.split(os.path.abspath(blob_path))
    return os.path.join(d, f".{name}.{kind}.{os.getpid()}.{secrets.token_hex(8)}")


def temp_pattern(blob_name: str, kinds: tuple[str, ...] = ("tmp", "prevtmp")) -> re.Pattern[str]:
    """Matches exactly the names :func:`temp_path` makes for a blob called ``blob_name``
    (of the given kinds)."""
    return re.compile(r"\A\." + re.escape(blob_name) + r"\.(?:" + "|".join(kinds)
                      + r")\.[0-9]+\.[0-9a-f]{16}\Z")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class JournalInfo:
    """A journal at :attr:`path`: who announced which change when (None: unknown)."""

    path: str
    pid: int | None
    started_wall: float | None
    #: CLOCK_MONOTONIC ns of the writer; comparable only within the same :attr:`boot_id`.
    started_monotonic_ns: int | None
    boot_id: str | None
    what: str | None
    #: Set when the file is not a journal certd wrote (it still counts as pending).
    problem: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def write(blob_path: str, what: str) -> JournalInfo | None:
    """Announce a change: write the journal atomically and durably. Call it only while
    holding the exclusive lock. Returns what was written (None: switched off by the
    test-only ``CERTD_UNSAFE=journal``). Raises OSError (the caller must not go on)."""
    if faults.unsafe("journal"):
        return None
    path = journal_path(blob_path)
    info = JournalInfo(path, os.getpid(), time.time(), time.monotonic_ns(), _boot_id(), what)
    body = json.dumps({k: v for k, v in info.as_dict().items()
                       if k not in ("path", "problem")}).encode() + b"\n"
    tmp = temp_path(blob_path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        try:
            os.write(fd, body)  # a few hundred bytes: one write
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return info


def read(blob_path: str) -> JournalInfo | None:
    """The pending journal of the blob at ``blob_path``, or None (see :func:`read_file`)."""
    return read_file(journal_path(blob_path))


def read_file(path: str) -> JournalInfo | None:
    """The journal at ``path``, or None. One ``open`` when there is none (the daemon calls
    this before every new shared hold). Never raises for a garbage journal: it is pending
    too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in _TRANSIENT:
            raise  # out of descriptors or memory: says nothing about the journal
        return _garbage(path, f"cannot be opened: {e.strerror}")
    try:
        raw = os.read(fd, MAX_JOURNAL + 1)
    except OSError as e:
        return _garbage(path, f"cannot be read: {e.strerror}")
    finally:
        os.close(fd)
    if len(raw) > MAX_JOURNAL:
        return _garbage(path, f"is larger than {MAX_JOURNAL} bytes")
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return JournalInfo(path, _typed(d, "pid", int), _typed(d, "started_wall", (int, float)),
                           _typed(d, "started_monotonic_ns", int), _typed(d, "boot_id", str),
                           _typed(d, "what", str))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _garbage(path, f"is not a certd journal: {e}")


def _typed(d: dict, key: str, kind):
    v = d.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, kind):
        raise ValueError(f"{key!r} is missing or not {getattr(kind, '__name__', 'a number')}")
    return v


def _garbage(path: str, problem: str) -> JournalInfo:
    return JournalInfo(path, None, None, None, None, None, problem=f"{path} {problem}")


def remove(blob_path: str) -> None:
    """Remove the journal (after the blob was settled). Missing is fine.

    Not fsynced: if the removal is lost in a crash the journal comes back and the blob
    is settled once more, which is harmless."""
    try:
        os.unlink(journal_path(blob_path))
    except FileNotFoundError:
        pass
