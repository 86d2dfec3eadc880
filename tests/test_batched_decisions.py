"""GETs that arrive while the loop is busy share one decision (server.BATCH_WINDOW): it is
made at the end of the loop turn, after every one of their frames arrived, so a blob
replaced or deleted before a GET's frame arrived is never served to it, even when another
GET was answered from the old inode moments before.

The batch window is widened here so that the second GET is deferred for certain; the
negative control answers the deferred GETs from the decision made before they arrived
(what "one check per loop turn, at its first GET" would do) and must serve stale bytes."""

from __future__ import annotations

import asyncio
import os

from certd.abi import table
from certd.client import AsyncClient
from certd.service import access, server as servermod
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from tests.daemon_support import TableOnlyJudge

OLD = table.encode([table.Entry.of(table.Role.ARK, b"o" * 200)])
NEW = table.encode([table.Entry.of(table.Role.ARK, b"n" * 300)])


async def _second_get_after_a_change(tmp_path, change: str) -> tuple[bytes, bytes]:
    """GET on one connection (served from OLD, lease kept), change the blob behind
    certd's back, GET on another: both tables."""
    path = tmp_path / "certs.blob"
    path.write_bytes(OLD)
    profile = Profile("t", str(path), TableOnlyJudge())
    srv = CertServer(ProfileSet(profile), Limits(), access.AllowList(frozenset({os.getuid()})),
                     access.RateLimiter(0, 0))
    sock = str(tmp_path / "s")
    server = await asyncio.get_running_loop().create_unix_server(srv.protocol, sock)
    try:
        async with AsyncClient(sock) as a, AsyncClient(sock) as b:
            first = await a.get("vm-a", 4)
            assert first.ret == 0 and first.table == OLD, "precondition: OLD is served"
            assert profile.current is not None and profile.current.leases == 1
            if change == "replace":
                (tmp_path / "new.blob").write_bytes(NEW)
                os.rename(tmp_path / "new.blob", path)  # no lock, no gate
            else:
                os.unlink(path)
            second = await b.get("vm-b", 4)
            assert srv.counters.gets == 2
            await a.release(first.lease_id)
            if second.lease_id:
                await b.release(second.lease_id)
        return first.table, second.table
    finally:
        server.close()
        await server.wait_closed()
        srv.profiles.close()


async def _batched(tmp_path, monkeypatch, change: str) -> bytes:
    monkeypatch.setattr(servermod, "BATCH_WINDOW", 3600.0)  # every later GET is deferred
    deferred = []
    real_defer = CertServer.defer

    def counting_defer(self, profile, conn, msg):
        later = real_defer(self, profile, conn, msg)
        if later:
            deferred.append(msg.vm_id)
        return later

    monkeypatch.setattr(CertServer, "defer", counting_defer)
    _, second = await _second_get_after_a_change(tmp_path, change)
    assert deferred == ["vm-b"], "precondition: the second GET waited for the turn's end"
    return second


async def test_a_deferred_get_never_gets_a_replaced_blob(tmp_path, monkeypatch):
    second = await _batched(tmp_path, monkeypatch, "replace")
    assert second == NEW


async def test_a_deferred_get_never_gets_a_deleted_blob(tmp_path, monkeypatch):
    second = await _batched(tmp_path, monkeypatch, "delete")
    assert second == table.EMPTY_TABLE


async def test_control_a_decision_made_before_the_frame_serves_stale_bytes(tmp_path,
                                                                         monkeypatch):
    """Negative control: deferred GETs answered from the hold decided before they
    arrived get the replaced inode's bytes, which the tests above would catch."""

    def stale_decision(self):
        batches, self._deferred = self._deferred, {}
        for profile, gets in batches.items():
            got = profile.current or profile.lease_source()  # the earlier decision
            for conn, msg, started in gets:
                conn.decided(msg, profile, got, started)

    monkeypatch.setattr(CertServer, "_decide_deferred", stale_decision)
    assert await _batched(tmp_path, monkeypatch, "replace") == OLD
