"""Leases: the shared OFD lock a VMM holds from reading the blob until the report is signed.

All leases on the same blob inode share one open file description holding one shared
lock (a :class:`SharedHold`), reference-counted. Whether a new lease may join a hold is
decided in one place, :meth:`certd.service.profiles.Profile.lease_source`; this module
only counts and times leases. An updater waits at most for the longest live lease
(bounded by the lease timeout) plus a hold's maximum age.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable

from certd.abi import table
from certd.store import locks


@dataclass(eq=False)
class SharedHold:
    """One shared lock on one blob inode, the bytes read from it and judged under it, and
    its lease count. Made and retired by :class:`certd.service.profiles.Profile`, which
    alone decides whether a new lease may join it."""

    lock: locks.Hold
    table: bytes
    generation: int
    judge: object = None  # the Judge whose verdict allowed these bytes
    epoch: int = 0  # the platform epoch of that verdict
    opened: float = 0.0  # time.monotonic() when made
    checked: float = 0.0  # when its age was last weighed against a waiting updater
    #: A kernel-scheme updater was seen blocked on its inode (looked for in a thread).
    writer_seen: bool = False
    looking: bool = False
    fresh_until: float = 0.0  # monotonic: the last full check holds until then
    valid_until: float = float("inf")  # wall clock: a date in the blob passes then
    #: Called when the last lease ends (the profile keeps it a moment, or closes it).
    on_idle: Callable[["SharedHold"], None] = lambda hold: hold.close()
    on_close: Callable[["SharedHold"], None] = lambda hold: None
    leases: int = 0  # live leases on it, counted by LeaseTable (grant and _end)
    closed: bool = False
    idle_since: float = 0.0
    idle_timer: object = None
    #: The event loop that times its idleness (None: made outside one). Kept here because
    #: asyncio.get_running_loop() costs a getpid() system call, and a hold goes idle often.
    loop: asyncio.AbstractEventLoop | None = None
    #: Pages the table needs (a GET with fewer gets ENOSPC), computed once.
    npages: int = field(init=False)

    def __post_init__(self) -> None:
        self.npages = table.npages(len(self.table))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.idle_timer is not None:
                self.idle_timer.cancel()
                self.idle_timer = None
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
    #: Called with each lease ended without a RELEASE, and whether it was cut short.
    on_expire: Callable[[Lease, bool], None] = lambda lease, cut_short: None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    live: dict[int, Lease] = field(default_factory=dict)
    #: Live leases per VM id.
    per_vm: dict[str, int] = field(default_factory=dict)
    expired: int = 0
    #: Of those, ended early: a hoarder's, while an update or a drain waited for readers.
    cut_short: int = 0
    _timer: asyncio.TimerHandle | None = None

    def grant(self, vm_id: str, hold: SharedHold, owner: object,
              loop: asyncio.AbstractEventLoop) -> Lease:
        lease = Lease(next(self._ids), vm_id, hold, owner, loop.time() + self.timeout)
        hold.leases += 1  # hold.ref(), inline: this is every GET
        self.live[lease.id] = lease
        self.per_vm[vm_id] = self.per_vm.get(vm_id, 0) + 1
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
            if self.live.get(lease.id) is not lease:
                continue  # ended meanwhile, by what an earlier on_expire did
            self.expired += 1
            self._end(lease)
            self.on_expire(lease, False)
        if self.live:
            first = next(iter(self.live.values()))
            self._timer = loop.call_at(first.deadline, self._sweep, loop)

    def cut(self, leases: list[Lease]) -> None:
        """End ``leases`` before their time (see CertServer.cut_hoarders), as expired."""
        for lease in leases:
            if self.live.get(lease.id) is lease:
                self.expired += 1
                self.cut_short += 1
                self._end(lease)
                self.on_expire(lease, True)

    def _end(self, lease: Lease) -> None:
        del self.live[lease.id]
        n = self.per_vm[lease.vm_id] - 1
        if n:
            self.per_vm[lease.vm_id] = n
        else:
            del self.per_vm[lease.vm_id]
        hold = lease.hold
        hold.leases -= 1  # hold.unref(), inline: this is every RELEASE
        if not hold.leases:
            hold.on_idle(hold)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
