"""Lease hoarders (issue "10,000 VMs", item 4): a client process that let a lease time out
has its leases ended after ``server.hoarder_grace_ms`` while an update waits, so it delays
an update by about the grace, not the lease timeout. An honest client's lease is never
ended early, update or not: that is what keeps its guest's certificates right.

The hoarder is a real separate process (the rule is per client pid); the updater is a real
gated exclusive lock (BlobLock, as certctl takes it) in a thread; the server is in-process.
Negative controls: with ``CERTD_UNSAFE=hoarder-cut`` the updater is still locked out after
2 s; with every client taken for a hoarder the honest lease is cut (RELEASE: EXPIRED)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from certd.abi import table, wire
from certd.client import AsyncClient
from certd.service import access
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from certd.store import locks
from tests.daemon_support import TableOnlyJudge

BLOB = table.encode([table.Entry.of(table.Role.ARK, b"h" * 200)])

HOARDER = r"""
import sys
from certd.client import Client
c = Client(sys.argv[1])
print("first", c.get("hoard-vm", 4).lease_id, flush=True)   # never released
sys.stdin.readline()
print("second", c.get("hoard-vm", 4).lease_id, flush=True)  # never released either
sys.stdin.readline()
"""


async def _until(cond, what: str, within: float = 5.0) -> None:
    end = time.monotonic() + within
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Rig:
    def __init__(self, tmp_path):
        self.path = tmp_path / "certs.blob"
        self.path.write_bytes(BLOB)
        self.profile = Profile("t", str(self.path), TableOnlyJudge())
        self.srv = CertServer(ProfileSet(self.profile),
                              Limits(lease_timeout=0.1, hoarder_grace=0.05),
                              access.AllowList(frozenset({os.getuid()})),
                              access.RateLimiter(0, 0))
        self.sock = str(tmp_path / "s")
        self.hoarder = None

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(self.srv.protocol, self.sock)
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        self.hoarder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOARDER, self.sock, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert (await self.hoarder.stdout.readline()).startswith(b"first ")
        # Its first lease times out (0.1 s): from then on it is a hoarder.
        await _until(lambda: self.srv.leases.expired == 1, "the first lease to expire")
        assert self.srv.hoarders, "precondition: the process is remembered as a hoarder"
        self.srv.leases.timeout = 30.0  # later leases: the timeout alone would take 30 s
        self.hoarder.stdin.write(b"\n")
        assert (await self.hoarder.stdout.readline()).startswith(b"second ")
        assert len(self.srv.leases.live) == 1, "precondition: the hoarder holds a lease"
        return self

    async def __aexit__(self, *exc):
        if self.hoarder is not None and self.hoarder.returncode is None:
            self.hoarder.kill()  # by its pid (asyncio's Process)
            await self.hoarder.wait()
        self.srv.close_all()
        self.server.close()
        await self.server.wait_closed()
        self.srv.profiles.close()

    async def update(self, within: float) -> float | None:
        """A gated exclusive lock, as certctl takes it: seconds it waited, None if it
        did not get in ``within`` seconds."""
        def take():
            t0 = time.monotonic()
            try:
                h = locks.BlobLock(str(self.path)).acquire_exclusive_sync(
                    locks.deadline_in(within))
            except locks.LockBusy:
                return None
            h.release()
            return time.monotonic() - t0
        return await asyncio.get_running_loop().run_in_executor(None, take)


async def test_a_hoarder_delays_an_update_by_the_grace_not_the_lease_timeout(tmp_path):
    async with Rig(tmp_path) as rig:
        waited = await rig.update(within=2.0)
        assert waited is not None, "the updater got in"
        assert rig.srv.leases.cut_short == 1
        print(f"\nhoarder: updater in after {waited * 1000:.1f} ms (grace 50 ms; its lease "
              f"would have lasted 30 s)")


async def test_control_without_the_cut_the_hoarder_locks_the_update_out(tmp_path, monkeypatch):
    monkeypatch.setenv("CERTD_UNSAFE", "hoarder-cut")
    async with Rig(tmp_path) as rig:
        assert await rig.update(within=2.0) is None
        assert rig.srv.leases.cut_short == 0


async def _honest_lease_during_an_update(tmp_path) -> tuple[int, float | None]:
    """With a hoarder around and an update waiting, an honest client (this process) holds
    a lease for 0.5 s: what its RELEASE returns, and when the updater got in."""
    async with Rig(tmp_path) as rig:
        async with AsyncClient(rig.sock) as honest:
            r = await honest.get("honest-vm", 4)
            assert r.ret == 0 and r.lease_id
            update = asyncio.ensure_future(rig.update(within=5.0))
            await _until(lambda: rig.srv.leases.cut_short >= 1, "the hoarder's lease cut")
            await asyncio.sleep(0.5)  # the honest VMM's report is still being signed
            held_through = not update.done()
            result = await honest.release(r.lease_id)
            waited = await update
        assert held_through or result != wire.ReleaseResult.RELEASED, \
            "an update got in while an honest lease was live"
        return result, waited


async def test_an_honest_lease_is_never_ended_early(tmp_path):
    result, waited = await _honest_lease_during_an_update(tmp_path)
    assert result == wire.ReleaseResult.RELEASED
    assert waited is not None and waited >= 0.5


async def test_control_cutting_every_lease_ends_the_honest_one(tmp_path, monkeypatch):
    monkeypatch.setattr(CertServer, "is_hoarder", lambda self, owner: True)
    result, _ = await _honest_lease_during_an_update(tmp_path)
    assert result == wire.ReleaseResult.EXPIRED
