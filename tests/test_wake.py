"""Waiting GETs are woken, not polling (issue "10,000 VMs", item 3): a GET that arrives
while an updater holds the lock is answered when the updater releases it, woken by the
inotify event of the release, and its deadline counts from when its frame arrived."""

from __future__ import annotations

import asyncio
import os
import time

from certd.abi import table, wire
from certd.client import AsyncClient
from certd.service import access
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from certd.store import locks
from tests.daemon_support import TableOnlyJudge

BLOB = table.encode([table.Entry.of(table.Role.ARK, b"a" * 100)])


async def _waiting_get(tmp_path, hold_s: float, deadline: float = 2.0):
    path = tmp_path / "certs.blob"
    path.write_bytes(BLOB)
    profile = Profile("t", str(path), TableOnlyJudge())
    srv = CertServer(ProfileSet(profile), Limits(request_deadline=deadline),
                     access.AllowList(frozenset({os.getuid()})), access.RateLimiter(0, 0))
    sock = str(tmp_path / "s")
    server = await asyncio.get_running_loop().create_unix_server(srv.protocol, sock)
    updater = locks.BlobLock(str(path)).acquire_exclusive_sync(locks.deadline_in(5))
    try:
        async with AsyncClient(sock) as c:
            get = asyncio.create_task(c.get("vm", 4))
            await asyncio.sleep(hold_s)  # the updater's work (it holds the lock meanwhile)
            assert not get.done(), "precondition: the GET waits while the updater holds"
            released = time.monotonic()
            updater.release()
            r = await get
            answered = time.monotonic()
            await c.release(r.lease_id)
    finally:
        updater.release()
        server.close()
        await server.wait_closed()
        srv.profiles.close()
    return r, answered - released, profile.wakeups


async def test_a_waiting_get_is_woken_by_the_release(tmp_path):
    r, after_release, wakeups = await _waiting_get(tmp_path, hold_s=0.2)
    assert r.ret == 0 and r.table == BLOB
    print(f"\nwoken GET: answered {after_release * 1000:.2f} ms after the release, "
          f"{wakeups} wake-ups while the updater held the lock for 200 ms")
    assert wakeups <= 3  # the gate's and the blob's close (not one per poll interval)


async def test_control_polling_wakes_many_times(tmp_path, monkeypatch):
    """Negative control: without the inotify watch the same wait polls (a wake-up every
    2 ms), which the wake-up count above would catch."""
    monkeypatch.setattr(Profile, "_watch_directory", lambda self, loop: setattr(self, "_watch", False))
    r, after_release, wakeups = await _waiting_get(tmp_path, hold_s=0.2)
    assert r.ret == 0
    assert wakeups > 20, wakeups


async def test_eagain_deadline_counts_from_the_frame(tmp_path):
    """With the lock held past the deadline the answer is EAGAIN, sent at the deadline."""
    path = tmp_path / "certs.blob"
    path.write_bytes(BLOB)
    profile = Profile("t", str(path), TableOnlyJudge())
    srv = CertServer(ProfileSet(profile), Limits(request_deadline=0.1),
                     access.AllowList(frozenset({os.getuid()})), access.RateLimiter(0, 0))
    sock = str(tmp_path / "s")
    server = await asyncio.get_running_loop().create_unix_server(srv.protocol, sock)
    updater = locks.BlobLock(str(path)).acquire_exclusive_sync(locks.deadline_in(5))
    try:
        async with AsyncClient(sock) as c:
            t0 = time.monotonic()
            r = await c.get("vm", 4)
            took = time.monotonic() - t0
        assert r.ret == wire.EAGAIN
        assert took >= 0.1
        print(f"\nEAGAIN after {took * 1000:.1f} ms (deadline 100 ms), {profile.wakeups} wake-ups")
    finally:
        updater.release()
        server.close()
        await server.wait_closed()
        srv.profiles.close()
