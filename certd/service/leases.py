"""Leases: the shared OFD lock a VMM holds from reading the blob until the report is signed.

All leases on the same blob inode share one open file description holding one shared
lock (a :class:`SharedHold`), reference-counted. The lock is dropped the moment the last lease
ends, so an updater waits at most for the longest live lease (bounded by the lease
timeout). While an updater is waiting (it holds the gate, see :mod:`certd.store.locks`),
no lease joins an existing hold: new requests wait for the updater and get EAGAIN at
their deadline, so the hold drains and the updater gets in.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable

from certd.store import locks


@dataclass(eq=False)
class SharedHold:
    """One shared lock on one blob inode, the bytes read from it, and its lease count."""

    lock: locks.Hold
    table: bytes
    generation: int
    on_close: Callable[["SharedHold"], None] = lambda hold: None
    leases: int = 0
    closed: bool = False

    def unref(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lock.release()
            self.on_close(self)


@dataclass(eq=False, slots=True)
class Lease:
    id: int
    vm_id: str
    hold: SharedHold
    owner: object  # the connection, so its close ends its leases
    deadline: float  # loop time


@dataclass
class LeaseTable:
    """Live leases by id. Ids are never reused within a daemon's life.

    Expiry uses one timer for the whole table, not one per lease: leases are kept in
    grant order and (but for a reload that changes the timeout) their deadlines grow in
    that order, so a sweep stops at the first lease not yet due. Creating and cancelling
    a timer per lease cost a measurable share of every GET+RELEASE.
    """

    timeout: float
    on_expire: Callable[[Lease], None] = lambda lease: None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    live: dict[int, Lease] = field(default_factory=dict)
    expired: int = 0
    _timer: asyncio.TimerHandle | None = None

    def grant(self, vm_id: str, hold: SharedHold, owner: object,
              loop: asyncio.AbstractEventLoop) -> Lease:
        lease = Lease(next(self._ids), vm_id, hold, owner, loop.time() + self.timeout)
        hold.leases += 1
        self.live[lease.id] = lease
        if self._timer is None:
            self._timer = loop.call_at(lease.deadline, self._sweep, loop)
        return lease

    def release(self, lease_id: int, owner: object) -> bool:
        """End a lease; only the connection that holds it may release it."""
        lease = self.live.get(lease_id)
        if lease is None or lease.owner is not owner:
            return False
        self._end(lease)
        return True

    def release_all(self, owner: object) -> int:
        mine = [lease for lease in self.live.values() if lease.owner is owner]
        for lease in mine:
            self._end(lease)
        return len(mine)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        due = []
        for lease in self.live.values():
            if lease.deadline > now:
                break
            due.append(lease)
        for lease in due:
            self.expired += 1
            self._end(lease)
            self.on_expire(lease)
        if self.live:
            first = next(iter(self.live.values()))
            self._timer = loop.call_at(first.deadline, self._sweep, loop)

    def _end(self, lease: Lease) -> None:
        del self.live[lease.id]
        lease.hold.unref()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
