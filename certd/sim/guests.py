"""Guest models: what a Linux guest and a COCONUT SVSM do with each answer.

A guest asks its VMM for an extended report (``exit``: the VMM's handling of
KVM_EXIT_SNP_REQ_CERTS plus the firmware call) and checks the report with the leaf it
received, using :func:`certd.policy.check_report` (signature, TCB, chip id, chain).

Behaviour (docs/upstream-protocol.md §4, field notes 2026-12):

* **Linux** (``arch/x86/coco/sev/core.c``): EAGAIN is retried every 2 s until 60 s have
  passed, then the VMPCK is disabled; EIO disables the VMPCK at once; ENOSPC re-issues the
  request without certificates and keeps the key.
* **COCONUT SVSM** (``kernel/src/greq/driver.rs``): a busy answer is resent once,
  immediately; if that fails too, ``clear_vmpck(0)``. A length error gets one plain retry;
  any other error clears the key.

An empty table is not a mismatch: never wrong, sometimes empty.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Awaitable, Callable

from certd import policy
from certd.abi import table, wire
from certd.amd.roots import TrustStore

#: exit(vm_id, npages, report_data) -> (ret, table bytes, signed report or None)
Exit = Callable[[str, int, bytes], Awaitable[tuple[int, bytes, bytes | None]]]

LINUX_RETRY_S = 2.0
LINUX_BUDGET_S = 60.0
#: Both guest kinds offer a 16 KiB certificate buffer (configfs-tsm, SVSM attest.rs).
GUEST_NPAGES = 4


@dataclass
class Counters:
    """Per-run counts; :meth:`add` sums the counters of several guests or processes."""

    attestations: int = 0      # requests that reached the firmware (ret 0)
    verified: int = 0          # ... whose report verified with the leaf received
    mismatches: int = 0        # ... whose report did NOT match the certificates
    empty: int = 0             # ... that came with the empty table (nothing to check)
    torn: int = 0              # tables that do not decode (a torn read)
    eagain: int = 0
    enospc: int = 0
    eio: int = 0
    vmpck_lost: int = 0        # guests that can no longer attest
    max_wait_ms: float = 0.0   # longest time a guest waited for one report
    errors: int = 0            # simulator failures (exceptions): must be 0
    leases_lost: int = 0       # RELEASE impossible: the daemon died holding our lease
    leases_expired: int = 0    # RELEASE answered EXPIRED: the lock dropped before signing
    reconnects: int = 0        # GETs retried because the daemon was unreachable
    unavailable: int = 0       # EAGAINs a VMM answered because certd stayed unreachable
    #: Up to 20 examples of what went wrong (mismatch, torn, vmpck_lost, error).
    details: list = field(default_factory=list)

    def add(self, other: "Counters | dict") -> "Counters":
        o = other if isinstance(other, dict) else asdict(other)
        for f in fields(self):
            if f.name == "max_wait_ms":
                self.max_wait_ms = max(self.max_wait_ms, o.get(f.name, 0.0))
            elif f.name == "details":
                self.details.extend(o.get(f.name, ())[: max(20 - len(self.details), 0)])
            else:
                setattr(self, f.name, getattr(self, f.name) + o.get(f.name, 0))
        return self

    def note(self, detail: dict) -> None:
        if len(self.details) < 20:
            self.details.append(detail)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["max_wait_ms"] = round(self.max_wait_ms, 1)
        return d


class Guest:
    """One VM's attestation loop. ``time_scale`` shrinks the Linux 2 s / 60 s timers."""

    kind = "guest"

    def __init__(self, vm_id: str, exit: Exit, trust: TrustStore, counters: Counters, *,
                 time_scale: float = 1.0, npages: int = GUEST_NPAGES):
        self.vm_id = vm_id
        self.exit = exit
        self.trust = trust
        self.c = counters
        self.scale = time_scale
        self.npages = npages
        self.vmpck = True
        self.stop = asyncio.Event()

    def _lose_vmpck(self, why: str, t0: float) -> None:
        self.vmpck = False
        self.c.vmpck_lost += 1
        self.c.note({"what": "vmpck_lost", "vm": self.vm_id, "why": why, "at": time.time(),
                     "waited_ms": round((time.monotonic() - t0) * 1000)})

    def _check(self, tbl: bytes, report: bytes) -> None:
        self.c.attestations += 1
        if not tbl or tbl == table.EMPTY_TABLE:
            self.c.empty += 1
            return
        try:
            table.decode(tbl)
        except table.TableError as e:
            self.c.torn += 1
            self.c.note({"what": "torn", "vm": self.vm_id, "why": str(e)})
            return
        problems = policy.check_report(tbl, report, trust=self.trust)
        if problems:
            self.c.mismatches += 1
            self.c.note({"what": "mismatch", "vm": self.vm_id, "at": time.time(),
                         "problems": [str(p) for p in problems]})
        else:
            self.c.verified += 1

    async def attest(self) -> bool:
        """One attestation; False once the VMPCK is gone."""
        raise NotImplementedError

    def _waited(self, t0: float) -> None:
        self.c.max_wait_ms = max(self.c.max_wait_ms, (time.monotonic() - t0) * 1000)

    async def _request(self, npages: int) -> tuple[int, bytes, bytes | None]:
        ret, tbl, report = await self.exit(self.vm_id, npages, os.urandom(64))
        if ret == wire.EAGAIN:
            self.c.eagain += 1
        elif ret == wire.ENOSPC:
            self.c.enospc += 1
        elif ret == wire.EIO:
            self.c.eio += 1
        return ret, tbl, report

    async def run(self, stop: asyncio.Event, think: Callable[[], float]) -> None:
        self.stop = stop
        while self.vmpck and not stop.is_set():
            if not await self.attest():
                return
            try:
                await asyncio.wait_for(stop.wait(), think())
            except asyncio.TimeoutError:
                pass


class LinuxGuest(Guest):
    kind = "linux"

    async def attest(self) -> bool:
        t0 = time.monotonic()
        budget = t0 + LINUX_BUDGET_S * self.scale
        while True:
            ret, tbl, report = await self._request(self.npages)
            if ret == wire.RET_OK:
                self._waited(t0)
                self._check(tbl, report)
                return True
            if ret == wire.ENOSPC:
                # Re-issued as a plain GUEST_REQUEST (no certificates): the key is kept.
                self._waited(t0)
                return True
            if ret == wire.EAGAIN:
                if time.monotonic() > budget:
                    self._waited(t0)
                    self._lose_vmpck("EAGAIN for the whole 60 s budget", t0)  # -ETIMEDOUT
                    return False
                try:  # the run ending abandons the retry (it is not counted)
                    await asyncio.wait_for(self.stop.wait(), LINUX_RETRY_S * self.scale)
                    return True
                except asyncio.TimeoutError:
                    continue
            self._waited(t0)
            self._lose_vmpck(f"ret {ret}", t0)  # EIO or anything else: snp_disable_vmpck()
            return False


class SvsmGuest(Guest):
    kind = "svsm"

    async def attest(self) -> bool:
        t0 = time.monotonic()
        ret, tbl, report = await self._request(self.npages)
        if ret == wire.EAGAIN:
            ret, tbl, report = await self._request(self.npages)  # once, immediately
        self._waited(t0)
        if ret == wire.RET_OK:
            self._check(tbl, report)
            return True
        if ret == wire.ENOSPC:
            return True  # one plain-request retry, key kept
        self._lose_vmpck("busy twice" if ret == wire.EAGAIN else f"ret {ret}", t0)  # clear_vmpck
        return False


KINDS = {"linux": LinuxGuest, "svsm": SvsmGuest}
