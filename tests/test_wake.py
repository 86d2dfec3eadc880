"""Waiting GETs are woken, not polling (issue "10,000 VMs", item 3): a GET that arrives
while an updater holds the lock is answered when the updater releases it, woken by the
inotify event of the release, and its deadline counts from when its frame arrived."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from certd.abi import table, wire
from certd.client import AsyncClient
from certd.service import access
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from certd.store import blobstore, locks
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


NEW = table.encode([table.Entry.of(table.Role.ARK, b"n" * 100)])


class _RecordingJudge(TableOnlyJudge):
    """Judges by format; remembers the bytes it judged and wakes a waiter on NEW."""

    def __init__(self):
        self.judged: list[bytes] = []
        self.saw_new = threading.Event()

    def problems(self, blob: bytes):
        self.judged.append(bytes(blob))
        if blob == NEW:
            self.saw_new.set()
        return super().problems(blob)


async def _install_while_a_get_waits(tmp_path, wait_for_verdict_s: float):
    """An updater (BlobStore.install in a thread) installs NEW while a GET waits. At the
    step after the temp file is written and its mode set, and before it is renamed into
    place, the updater waits (up to ``wait_for_verdict_s``) for certd to have judged NEW.
    Returns (judged before the rename, the GET's answer, the judge)."""
    path = tmp_path / "certs.blob"
    path.write_bytes(BLOB)
    judge = _RecordingJudge()
    profile = Profile("t", str(path), judge)
    srv = CertServer(ProfileSet(profile), Limits(request_deadline=5.0),
                     access.AllowList(frozenset({os.getuid()})), access.RateLimiter(0, 0))
    sock = str(tmp_path / "s")
    server = await asyncio.get_running_loop().create_unix_server(srv.protocol, sock)
    gate_taken, seen = threading.Event(), {}

    def step(name: str) -> None:
        if name == "locked":
            gate_taken.set()
        if name == "temp_synced":
            seen["before_rename"] = judge.saw_new.wait(wait_for_verdict_s)

    def update() -> None:
        store = blobstore.BlobStore(str(path), TableOnlyJudge().problems, fault=step)
        store.install(NEW, timeout=5)  # as certctl install does

    try:
        async with AsyncClient(sock) as c:
            r0 = await c.get("vm", 4)  # the hold on BLOB, released: no lease blocks the update
            await c.release(r0.lease_id)
            await profile.changed(0)  # sets up the directory watch that waiting GETs use
            loop = asyncio.get_running_loop()
            upd = loop.run_in_executor(None, update)
            assert await loop.run_in_executor(None, gate_taken.wait, 5), \
                "precondition: the update locked"
            r = await c.get("vm", 4)  # waits for the updater
            await upd
            await c.release(r.lease_id)
    finally:
        server.close()
        await server.wait_closed()
        srv.profiles.close()
    assert "before_rename" in seen, "precondition: the updater reached the temp_synced step"
    return seen["before_rename"], r, judge


async def test_the_new_blob_is_judged_before_it_is_renamed_into_place(tmp_path):
    """certd judges an updater's temp file once its bytes and mode are set (IN_ATTRIB):
    the first GET after the release is served from that verdict, without judging on the
    request path."""
    before, r, judge = await _install_while_a_get_waits(tmp_path, wait_for_verdict_s=5)
    assert before, "certd had not judged the new blob before it was renamed into place"
    assert r.ret == 0 and r.table == NEW
    # The temp file, then the renamed blob (same bytes: the verdict is reused), and nothing
    # after the release: one verdict on NEW.
    assert judge.judged.count(NEW) == 1, judge.judged.count(NEW)


async def test_control_without_the_temp_file_prejudge(tmp_path, monkeypatch):
    """Negative control: judging only the renamed blob leaves nothing judged before the
    rename, which the test above would catch."""
    only_renamed = Profile.prejudge
    monkeypatch.setattr(Profile, "prejudge", lambda self, path=None: only_renamed(self)
                        if path is None else None)
    before, r, judge = await _install_while_a_get_waits(tmp_path, wait_for_verdict_s=0.3)
    assert not before
    assert r.ret == 0 and r.table == NEW
