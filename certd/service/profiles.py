"""Which blob a VM gets, and the shared hold on it that leases hang on.

A profile is one blob file served to the VMs whose ids match its patterns (for example a
VLEK blob for some VMs, the host VCEK blob for the rest). Each profile keeps the bytes of
the inode it last read, so requests are served from memory; the file is read (and
validated) again only when a new hold finds another inode, size or mtime. While a hold
is open the inode cannot change: an updater needs the exclusive lock to replace it.

Never wrong, sometimes empty: a missing blob is an unconfigured host (empty table), and
an unusable blob (malformed, or failing the policy) is served as the empty table too;
the bytes of an earlier inode are never served.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from certd.abi import table
from certd.service.leases import SharedHold
from certd.store import locks
from certd.verify.problems import Problem

Validator = Callable[[bytes], Sequence[Problem]]

#: try_hold() answers: a hold to lease from, BUSY (an updater is at work: wait or EAGAIN),
#: or EMPTY (nothing to lock: serve the empty table).
BUSY = "busy"
EMPTY = "empty"


def format_only(blob: bytes) -> list[Problem]:
    try:
        table.decode(blob)
    except table.TableError as e:
        return [Problem("format", str(e))]
    return []


@dataclass(eq=False)
class Profile:
    name: str
    blob_path: str
    patterns: tuple[str, ...] = ()
    validate: Validator = format_only
    #: Called when what this profile serves changes (new generation or new problems).
    on_change: Callable[["Profile"], None] = lambda profile: None
    generation: int = 0
    problems: Sequence[Problem] = ()
    current: SharedHold | None = None
    #: True once a look at the path reached a verdict (serve, empty or invalid); an update
    #: holding the lock at every look so far leaves it False (/readyz waits for it).
    decided: bool = False
    _key: tuple[int, int, int, int] | None = None
    _table: bytes = table.EMPTY_TABLE
    _lock: locks.BlobLock = field(init=False)

    def __post_init__(self) -> None:
        self._lock = locks.BlobLock(self.blob_path)

    def use_validator(self, validate: Validator) -> None:
        """Judge blobs with ``validate`` from now on (a reload may bring a new platform):
        the verdict on the bytes in memory is forgotten, so the next new hold re-reads and
        re-validates the file."""
        self.validate = validate
        self._key = None

    def matches(self, vm_id: str) -> bool:
        return any(fnmatch.fnmatchcase(vm_id, p) for p in self.patterns)

    @property
    def served(self) -> bytes:
        return self._table

    def try_hold(self) -> SharedHold | str:
        """Without waiting: the hold to lease from, BUSY, or EMPTY."""
        if self._lock.updater_waiting():
            return BUSY  # join no hold: let the current one drain so the updater gets in
        hold = self.current
        if hold is not None:
            return hold
        try:
            lock = self._lock.acquire_shared_sync(None)
        except locks.BlobMissing:
            self._remember(None, table.EMPTY_TABLE, ())
            return EMPTY
        except locks.LockBusy:
            return BUSY
        if lock.key != self._key:
            try:
                blob = lock.read()
            except OSError as e:
                lock.release()
                self._remember(None, table.EMPTY_TABLE, [Problem("io", f"cannot read: {e}")])
                return EMPTY
            problems = list(self.validate(blob)) if blob else []
            self._remember(lock.key, blob if blob and not problems else table.EMPTY_TABLE,
                           problems)
        if self._table == table.EMPTY_TABLE:
            lock.release()
            return EMPTY
        self.current = SharedHold(lock, self._table, self.generation, self._forget)
        return self.current

    def _forget(self, hold: SharedHold) -> None:
        if self.current is hold:
            self.current = None

    def _remember(self, key, served: bytes, problems: Sequence[Problem]) -> None:
        changed = served != self._table or list(problems) != list(self.problems)
        self._key = key
        if served != self._table:
            self.generation += 1
        self._table = served
        self.problems = problems
        if changed:
            self.on_change(self)  # sees decided still False on the first verdict
        self.decided = True

    def refresh(self) -> bool:
        """Look at the file now (for status and logs) without keeping a hold; False if an
        updater is still at work."""
        got = self.try_hold()
        if isinstance(got, SharedHold) and got.leases == 0:
            got.close()
        return got is not BUSY

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        self._lock.close()


@dataclass
class ProfileSet:
    """The default profile plus per-VM ones; the first whose patterns match wins."""

    default: Profile
    others: tuple[Profile, ...] = ()
    _cache: dict[str, Profile] = field(default_factory=dict)

    def for_vm(self, vm_id: str) -> Profile:
        p = self._cache.get(vm_id)
        if p is None:
            p = next((o for o in self.others if o.matches(vm_id)), self.default)
            if len(self._cache) >= 65536:  # bounded: VM ids come from clients
                self._cache.clear()
            self._cache[vm_id] = p
        return p

    def __iter__(self) -> Iterator[Profile]:
        yield self.default
        yield from self.others

    def close(self) -> None:
        for p in self:
            p.close()
