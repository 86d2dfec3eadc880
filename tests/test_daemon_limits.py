"""Per-VM profiles, per-connection limits, the development default and --check-config."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certd import client as clientmod
from certd.abi import table, wire
from certd.client import AsyncClient
from certd.service import access
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from tests.daemon_support import BIN, Notifications, TableOnlyJudge, make_daemon


def test_per_vm_profiles_route_by_vm_id(tmp_path):
    other = tmp_path / "d" / "tenant.blob"  # configured but absent: that profile is empty
    d = make_daemon(tmp_path / "d", extra=f'\n[[profile]]\nname = "tenant"\nblob = "{other}"\n'
                                          'vms = ["tenant-*", "vm-7"]\n').start()
    try:
        with clientmod.Client(d.socket) as c:
            host = c.get("vm-1", 4)
            assert host.ret == 0 and host.table == d.blob.read_bytes()
            c.release(host.lease_id)
            for vm in ("tenant-a", "vm-7"):
                r = c.get(vm, 4)
                assert (r.ret, r.table, r.lease_id) == (0, table.EMPTY_TABLE, 0)
            names = [p["name"] for p in c.status()["profiles"]]
        assert names == ["default", "tenant"]
    finally:
        assert d.stop() == 0


async def _server(tmp_path, **limits):
    blob = tmp_path / "b.blob"
    blob.write_bytes(table.encode([table.Entry.of(table.Role.ARK, b"a" * 100)]))
    rate = limits.pop("rate", access.RateLimiter(0, 0))
    srv = CertServer(ProfileSet(Profile("t", str(blob), TableOnlyJudge())), Limits(**limits),
                     access.AllowList(frozenset({os.getuid()})), rate)
    server = await asyncio.get_running_loop().create_unix_server(srv.protocol,
                                                                 str(tmp_path / "s"))
    return srv, server, str(tmp_path / "s")


async def _close(srv, server):
    srv.close_all()  # connections still open (one paused in a cool-down would linger)
    server.close()
    await server.wait_closed()
    srv.profiles.close()


async def test_leases_per_connection_are_limited(tmp_path):
    srv, server, path = await _server(tmp_path, max_leases_per_connection=2)
    try:
        async with AsyncClient(path) as c:
            a, b = await c.get("vm", 1), await c.get("vm", 1)
            with pytest.raises(clientmod.Refused) as ei:
                await c.get("vm", 1)
            assert ei.value.code == wire.ErrorCode.TOO_MANY_LEASES and ei.value.arg == 2
            await c.release(a.lease_id)
            again = await c.get("vm", 1)  # a released lease frees its slot
            assert again.ret == 0
            for r in (b, again):
                await c.release(r.lease_id)
    finally:
        await _close(srv, server)


async def test_rate_limit_per_vm_is_answered(tmp_path):
    srv, server, path = await _server(tmp_path, rate=access.RateLimiter(1, 3))
    try:
        async with AsyncClient(path) as c:
            for _ in range(3):
                r = await c.get("noisy", 1)
                await c.release(r.lease_id)
            with pytest.raises(clientmod.Refused) as ei:
                await c.get("noisy", 1)
            assert ei.value.code == wire.ErrorCode.RATE_LIMITED and ei.value.arg > 0
            quiet = await c.get("quiet", 1)  # other VMs are not affected
            assert quiet.ret == 0
            await c.release(quiet.lease_id)
        assert srv.counters.rate_limited == 1
    finally:
        await _close(srv, server)


async def test_idle_connection_is_closed_with_an_answer(tmp_path):
    srv, server, path = await _server(tmp_path, idle_timeout=0.2)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        dec = wire.Decoder(wire.REPLIES)
        data = await asyncio.wait_for(reader.read(), 10)  # the server speaks, then closes
        dec.feed(data)
        err = dec.next()
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.IDLE_TIMEOUT
        assert err.closing
        writer.close()
        await writer.wait_closed()
    finally:
        await _close(srv, server)


def test_check_config_names_the_line(tmp_path):
    good = make_daemon(tmp_path / "d").config_text
    (tmp_path / "good.toml").write_text(good)
    ok = subprocess.run([str(BIN / "certd"), "--check-config", str(tmp_path / "good.toml")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout
    lines = good.splitlines()
    n = next(i for i, l in enumerate(lines) if l.startswith("lease_timeout_ms"))
    lines[n] = 'lease_timeout_ms = "soon"'
    (tmp_path / "bad.toml").write_text("\n".join(lines))
    bad = subprocess.run([str(BIN / "certd"), "--check-config", str(tmp_path / "bad.toml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 78
    assert f"bad.toml:{n + 1}: server.lease_timeout_ms" in bad.stderr


def test_dev_mode_end_to_end(tmp_path):
    """README command 1: certd --dev prints working commands; the blob it serves verifies
    against the report its simulated PSP signed."""
    notify = Notifications.open()
    proc = subprocess.Popen([str(BIN / "certd"), "--dev", "--dev-dir", str(tmp_path / "dev")],
                            env={**os.environ, "NOTIFY_SOCKET": notify.address},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        notify.wait_for("READY=1", timeout=60)
        banner = []
        while not (line := proc.stdout.readline()).startswith("Ctrl-C"):
            banner.append(line)
        commands = [l.strip() for l in banner if l.strip().startswith(str(BIN / "certctl"))]
        assert len(commands) == 5, banner  # fetch, status, show, verify, fw-update
        urls = [l.split()[1] for l in banner if l.startswith("  metrics  ")]  # metrics on
        assert len(urls) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", urls[0])
        with urllib.request.urlopen(urls[0], timeout=10) as r:
            assert "certd_profile_state" in {
                f.name for f in text_string_to_metric_families(r.read().decode())}
        fetch = commands[0].replace("/tmp/certs-table.bin", str(tmp_path / "t.bin"))
        for cmd in [fetch] + commands[1:]:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        assert re.search(r"ret=0 .* lease=\d+", subprocess.run(
            fetch, shell=True, capture_output=True, text=True, timeout=60).stdout)
        assert (tmp_path / "t.bin").read_bytes() == (tmp_path / "dev" / "certs.blob").read_bytes()
        # After the banner's fw-update the served blob fits the moved platform.
        dev = tmp_path / "dev"
        r = subprocess.run([str(BIN / "certctl"), "verify", str(tmp_path / "t.bin"), "--roots",
                            str(dev / "dev-roots.pem"), "--platform", str(dev / "platform.toml")],
                           capture_output=True, text=True, timeout=60)
        assert "snp=9" in (dev / "platform.toml").read_text() or "snp = 9" in \
            (dev / "platform.toml").read_text()
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        proc.stdout.close()
        notify.close()


async def _over_rate_flood(tmp_path, gets: int = 400):
    """One connection sends ``gets`` GETs for one VM (50/s allowed), one at a time, never
    waiting the wait its refusals name; another VM asks once meanwhile. Returns the
    server's counters and how many of the flood's GETs were served."""
    srv, server, path = await _server(tmp_path, rate=access.RateLimiter(50, 1))
    served = 0
    try:
        async with AsyncClient(path) as flood, AsyncClient(path) as quiet:
            for i in range(gets):
                try:
                    r = await flood.get("noisy", 1)
                except clientmod.Refused as e:
                    assert e.code == wire.ErrorCode.RATE_LIMITED
                else:
                    served += 1
                    await flood.release(r.lease_id)
                if i == gets // 2:
                    q = await quiet.get("quiet", 1)  # another connection is not held up
                    assert q.ret == 0
                    await quiet.release(q.lease_id)
        return srv.counters, served
    finally:
        await _close(srv, server)


async def test_a_connection_that_keeps_sending_over_its_rate_is_paused(tmp_path):
    """GETs over the rate limit are each answered RATE_LIMITED; after
    OVER_RATE_BEFORE_COOLDOWN of them in a row the connection's reading pauses for the
    wait they named, so a closed-loop flood gets at most that many refusals per wait
    (and a GET at its rate after each)."""
    from certd.service.server import OVER_RATE_BEFORE_COOLDOWN as n
    c, served = await _over_rate_flood(tmp_path)
    assert c.rate_limited + served == 400 and c.rate_limited > n, "precondition: a flood"
    print(f"\nover-rate flood: {c.rate_limited} refusals, {served} served, {c.cooled_down} pauses")
    assert c.cooled_down >= c.rate_limited // n
    assert c.rate_limited <= (c.cooled_down + 1) * n


async def test_control_without_the_cool_down(tmp_path, monkeypatch):
    """Negative control: with no cool-down the same flood is never paused and gets
    hundreds of refusals in a row."""
    from certd.service import server as servermod
    monkeypatch.setattr(servermod, "OVER_RATE_BEFORE_COOLDOWN", 10**9)
    c, served = await _over_rate_flood(tmp_path)
    assert c.cooled_down == 0 and c.rate_limited > 300, (c.rate_limited, served)


async def _pipelined_over_rate(tmp_path, frames: int = 400):
    """One write of ``frames`` pipelined GETs for one VM (50/s allowed). Returns the
    cool-down windows (loop time from, to) and the loop times of the refusals."""
    from certd.service import server as servermod
    srv, server, path = await _server(tmp_path, rate=access.RateLimiter(50, 1))
    loop = asyncio.get_running_loop()
    windows, refusals = [], []
    cool_down, error = servermod.Connection._cool_down, servermod.Connection._error

    def recording_cool_down(self, seconds):
        if not self._cooling():
            windows.append((loop.time(), loop.time() + seconds))
        cool_down(self, seconds)

    def recording_error(self, rid, code, message, arg=0):
        if code == wire.ErrorCode.RATE_LIMITED:
            refusals.append(loop.time())
        error(self, rid, code, message, arg)

    servermod.Connection._cool_down = recording_cool_down
    servermod.Connection._error = recording_error
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"".join(wire.encode_get(i, "noisy", 1) for i in range(1, frames + 1)))
        dec, answered = wire.Decoder(wire.REPLIES), 0
        while answered < frames:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, "the server closed the connection"
            dec.feed(data)
            answered += sum(1 for _ in dec)
        writer.close()
        await writer.wait_closed()
    finally:
        servermod.Connection._cool_down, servermod.Connection._error = cool_down, error
        await _close(srv, server)
    return windows, refusals


def _inside(windows, refusals) -> int:
    return sum(1 for t in refusals for a, b in windows if a < t < b - 1e-4)


async def test_a_cool_down_holds_back_frames_already_read(tmp_path):
    """Pipelined GETs already read are not answered during a cool-down either: the flood
    gets its refusals 16 at a time, one batch per wait."""
    windows, refusals = await _pipelined_over_rate(tmp_path)
    assert len(refusals) > 100 and windows, "precondition: a flood that was cooled down"
    assert _inside(windows, refusals) == 0


async def test_control_a_cool_down_that_only_stops_reading(tmp_path, monkeypatch):
    """Negative control: if the frames already buffered were still handled, the flood
    would be answered right through its cool-downs."""
    from certd.service import server as servermod
    monkeypatch.setattr(servermod.Connection, "_cooling", lambda self: False)
    windows, refusals = await _pipelined_over_rate(tmp_path)
    assert windows and _inside(windows, refusals) > 100
