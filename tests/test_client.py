"""certd.client and certctl fetch/status against a minimal test-only server.

FakeServer is built from certd.abi.wire alone and is NOT the daemon: it answers GET with a
fixed table (ENOSPC with the exact page count when the buffer is small), RELEASE with an ack,
STATUS with a small document. A few magic vm ids drive the other paths. These tests move to
the real daemon (certd.service.server) once it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time

import pytest

from certd.abi import table as tablemod
from certd.abi import wire
from certd.abi.wire import ErrorCode
from certd.cli import cmd_fetch, cmd_status
from certd import exitcodes
from certd.cli.common import CliError, report_error
from certd.client import (AsyncClient, Client, GetResult, InvalidRequest, ProtocolError,
                          Refused, ReleaseResult, RequestTimeout, Unavailable)

#: A real-format table of 4096*2+1 bytes (3 pages): ENOSPC boundaries are visible with it.
TABLE = tablemod.encode([
    tablemod.Entry.of(tablemod.Role.ARK, b"A" * 3000),
    tablemod.Entry.of(tablemod.Role.ASK, b"S" * 3000),
    tablemod.Entry.of(tablemod.Role.VCEK, b"V" * (4096 * 2 + 1 - 3000 - 3000 - 4 * 24)),
])
assert len(TABLE) == 4096 * 2 + 1 and tablemod.npages(len(TABLE)) == 3
GENERATION = 7


class FakeServer:
    """Test-only certd stand-in. Magic vm ids: 'busy' -> EAGAIN, 'broken' -> EIO,
    'denied' -> ERROR ACCESS_DENIED (closing), 'ratelimit' -> ERROR RATE_LIMITED,
    'slow' -> answered after a later request, 'silent' -> never answered,
    'garbage' -> a frame with bad magic, 'empty' -> ret 0 with the empty table, no lease."""

    def __init__(self, path: str, table: bytes = TABLE):
        self.path = path
        self.table = table
        self.leases: dict[int, str] = {}
        self.released: list[int] = []
        self.next_lease = 100
        self.requests: list[wire.Message] = []
        self.slow_gate = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._all_writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "FakeServer":
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def stop(self) -> None:
        # A client may have connected and gone before we accepted it. Let the loop finish
        # accepting first (a few iterations): closing the server while an accept is half
        # done leaks that transport in CPython 3.11 (Server._attach asserts).
        for _ in range(20):
            await asyncio.sleep(0)
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Wait for every transport to really close, or the loop ends with sockets open.
        await asyncio.gather(*(w.wait_closed() for w in self._all_writers),
                             return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self._writers.add(writer)
        self._all_writers.append(writer)
        dec = wire.Decoder(wire.REQUESTS)
        mine: set[int] = set()
        try:
            while data := await reader.read(65536):
                dec.feed(data)
                while True:
                    try:
                        msg = dec.next()
                    except wire.WireError as e:
                        writer.write(wire.encode_wire_error(e))
                        if e.fatal:
                            return
                        continue
                    if msg is None:
                        break
                    self.requests.append(msg)
                    if not await self._answer(msg, writer, mine):
                        return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for lease in mine:  # connection close ends its leases
                self.leases.pop(lease, None)
            self._writers.discard(writer)
            self._tasks.discard(asyncio.current_task())
            writer.close()

    async def _answer(self, msg, writer, mine: set[int]) -> bool:
        rid = msg.request_id
        if isinstance(msg, wire.Status):
            writer.write(wire.encode_status_reply(rid, {
                "version": 1, "generation": GENERATION, "leases": len(self.leases),
                "table_len": len(self.table), "fake": True}))
        elif isinstance(msg, wire.Release):
            result = (ReleaseResult.RELEASED if self.leases.pop(msg.lease_id, None)
                      else ReleaseResult.UNKNOWN)
            if result == ReleaseResult.RELEASED:
                self.released.append(msg.lease_id)
                mine.discard(msg.lease_id)
            writer.write(wire.encode_release_reply(rid, msg.lease_id, result))
        elif msg.vm_id == "denied":
            writer.write(wire.encode_error(0, ErrorCode.ACCESS_DENIED, "uid 1234 not allowed",
                                           closing=True))
            return False
        elif msg.vm_id == "ratelimit":
            writer.write(wire.encode_error(rid, ErrorCode.RATE_LIMITED, "10 req/s", arg=250))
        elif msg.vm_id == "garbage":
            writer.write(b"JUNK" + bytes(12))
        elif msg.vm_id == "silent":
            pass
        elif msg.vm_id == "slow":
            async def later() -> None:
                await self.slow_gate.wait()
                writer.write(self._get_reply(msg, mine))
            t = asyncio.get_running_loop().create_task(later())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        else:
            writer.write(self._get_reply(msg, mine))
        return True

    def _get_reply(self, msg: wire.Get, mine: set[int]) -> bytes:
        rid = msg.request_id
        if msg.vm_id == "busy":
            return wire.encode_get_reply(rid, wire.EAGAIN, 0, GENERATION)
        if msg.vm_id == "broken":
            return wire.encode_get_reply(rid, wire.EIO, 0, GENERATION)
        if msg.vm_id == "empty":
            return wire.encode_get_reply(rid, 0, 1, GENERATION, 0, tablemod.EMPTY_TABLE)
        need = tablemod.npages(len(self.table))
        if msg.npages < need:
            return wire.encode_get_reply(rid, wire.ENOSPC, need, GENERATION)
        self.next_lease += 1
        self.leases[self.next_lease] = msg.vm_id
        mine.add(self.next_lease)
        return wire.encode_get_reply(rid, 0, need, GENERATION, self.next_lease, self.table)


class ThreadedServer:
    """FakeServer on its own event loop in a thread, for the blocking client and the CLI."""

    def __init__(self, path: str, **kw):
        self.path = path
        self.kw = kw
        self.loop = asyncio.new_event_loop()
        self.server: FakeServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            FakeServer(self.path, **self.kw).start(), self.loop).result(10)
        self.server.runner = self
        return self.server

    def call(self, fn) -> None:
        self.loop.call_soon_threadsafe(fn)

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def sock_path(tmp_path):
    # AF_UNIX paths are limited to 107 bytes; tmp_path can be long, so use a short dir.
    d = tmp_path / "s"
    d.mkdir()
    p = str(d / "certd.sock")
    if len(p) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    return p


@pytest.fixture
def server(sock_path):
    with ThreadedServer(sock_path) as srv:
        yield srv


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


# ------------------------------------------------------------------ sync client

def test_get_write_release(server):
    with Client(server.path) as c:
        r = c.get("vm-1", 4)
        assert r == GetResult(0, 3, GENERATION, r.lease_id, TABLE)
        assert r.ok and r.lease_id in server.leases
        assert c.release(r.lease_id) == ReleaseResult.RELEASED
        assert c.release(r.lease_id) == ReleaseResult.UNKNOWN
    assert server.released == [r.lease_id]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_enospc_page_arithmetic_at_boundaries(sock_path, k):
    """ENOSPC carries ceil(len/4096): exact at 4096k-1, 4096k and 4096k+1 bytes."""
    for length, need in ((4096 * k - 1, k), (4096 * k, k), (4096 * k + 1, k + 1)):
        table = bytes(length)
        with ThreadedServer(sock_path, table=table), Client(sock_path) as c:
            small = c.get("vm", need - 1)
            assert (small.ret, small.npages, small.lease_id, small.table) == (wire.ENOSPC, need, 0, b"")
            fits = c.get("vm", need)
            assert fits.ret == 0 and len(fits.table) == length
            assert fits.npages == tablemod.npages(length) == need
        os.unlink(sock_path)


def test_eagain_eio_and_empty(server):
    with Client(server.path) as c:
        assert c.get("busy", 4).ret == wire.EAGAIN
        assert c.get("broken", 4).ret_name == "EIO"
        e = c.get("empty", 1)
        assert (e.ret, e.lease_id, e.table) == (0, 0, tablemod.EMPTY_TABLE)


def test_status(server):
    with Client(server.path) as c:
        c.get("vm", 4)
        st = c.status()
    assert st["generation"] == GENERATION and st["leases"] == 1 and st["fake"] is True


def test_close_ends_leases(server):
    with Client(server.path) as c:
        c.get("vm", 4)
    wait_for(lambda: not server.leases)


def test_refused_and_connection_errors(server, sock_path):
    with Client(server.path) as c:
        with pytest.raises(Refused) as ei:
            c.get("ratelimit", 4)
        assert ei.value.code == ErrorCode.RATE_LIMITED and ei.value.arg == 250
        assert c.get("vm", 4).ok  # a refusal does not end the connection
        with pytest.raises(Refused) as ei:
            c.get("denied", 4)
        assert ei.value.code == ErrorCode.ACCESS_DENIED
    with pytest.raises(Unavailable, match="no certd socket"):
        Client(sock_path + ".missing").get("vm", 4)


def test_protocol_error_on_garbage(server):
    with Client(server.path) as c:
        with pytest.raises(ProtocolError, match="BAD_MAGIC"):
            c.get("garbage", 4)


def test_invalid_request_is_refused_locally(server):
    with Client(server.path) as c:
        with pytest.raises(InvalidRequest):
            c.get("bad\nid", 4)
        with pytest.raises(InvalidRequest):
            c.release(0)
    assert server.requests == []


def test_timeout_then_late_lease_is_released(server):
    """A GET that times out must not pin a lease: its late answer is released at once."""
    with Client(server.path, timeout=0.2) as c:
        with pytest.raises(RequestTimeout):
            c.get("slow", 4)
        server.runner.call(server.slow_gate.set)  # now the server answers the slow GET
        wait_for(lambda: server.next_lease > 100)
        assert c.status()["fake"]  # reading on makes the client see the late answer
        wait_for(lambda: not server.leases)
    assert server.released == [101]


# ------------------------------------------------------------------ async client

async def test_async_many_in_flight_out_of_order(sock_path):
    srv = await FakeServer(sock_path).start()
    try:
        async with AsyncClient(sock_path) as c:
            slow = asyncio.ensure_future(c.get("slow", 4))
            fast = await asyncio.gather(*(c.get(f"vm-{i}", 4) for i in range(20)),
                                        c.status(), c.get("vm-small", 1))
            assert not slow.done()  # answers came out of order: 'slow' is still waiting
            srv.slow_gate.set()
            r_slow = await slow
            assert r_slow.ok and r_slow.table == TABLE
            leases = [r.lease_id for r in fast[:20]]
            assert len(set(leases)) == 20 and all(r.table == TABLE for r in fast[:20])
            assert fast[20]["leases"] == 20
            assert fast[21].ret == wire.ENOSPC and fast[21].npages == 3
            results = await asyncio.gather(*(c.release(x) for x in leases + [r_slow.lease_id]))
            assert set(results) == {ReleaseResult.RELEASED}
            assert not srv.leases
    finally:
        await srv.stop()


async def test_async_errors(sock_path):
    srv = await FakeServer(sock_path).start()
    try:
        async with AsyncClient(sock_path, timeout=0.2) as c:
            with pytest.raises(Refused):
                await c.get("ratelimit", 4)
            with pytest.raises(RequestTimeout):
                await c.get("silent", 4)
            assert (await c.get("busy", 4)).ret == wire.EAGAIN
            pending = asyncio.ensure_future(c.get("silent", 4, timeout=5))
            await asyncio.sleep(0)
            with pytest.raises(Refused) as ei:
                await c.get("denied", 4)
            assert ei.value.code == ErrorCode.ACCESS_DENIED
            # The connection is closed by the server: everything in flight fails too.
            with pytest.raises(Refused):
                await pending
            # The next request opens a new connection.
            assert (await c.status())["fake"]
        async with AsyncClient(sock_path) as c:
            with pytest.raises(ProtocolError):
                await c.get("garbage", 4)
        with pytest.raises(Unavailable):
            await AsyncClient(sock_path + ".missing").connect()
    finally:
        await srv.stop()


async def test_async_close_releases_leases(sock_path):
    srv = await FakeServer(sock_path).start()
    try:
        c = AsyncClient(sock_path)
        await c.connect()
        await c.get("vm", 4)
        assert srv.leases
        await c.close()
        for _ in range(200):
            if not srv.leases:
                break
            await asyncio.sleep(0.01)
        assert not srv.leases
        assert (await c.get("vm", 4)).ok  # a closed client reconnects on use
        await c.close()
    finally:
        await srv.stop()


async def test_async_first_requests_share_one_connection(sock_path):
    srv = await FakeServer(sock_path).start()
    try:
        c = AsyncClient(sock_path)
        results = await asyncio.gather(*(c.get(f"vm{i}", 4) for i in range(5)))
        assert all(r.ok for r in results) and len(srv._all_writers) == 1
        await c.close()
    finally:
        await srv.stop()


async def test_async_late_lease_is_released_without_further_requests(sock_path):
    srv = await FakeServer(sock_path).start()
    try:
        async with AsyncClient(sock_path) as c:
            with pytest.raises(RequestTimeout):
                await c.get("slow", 4, timeout=0.1)
            srv.slow_gate.set()
            for _ in range(500):
                if srv.released:
                    break
                await asyncio.sleep(0.01)
            assert srv.released == [101] and not srv.leases
    finally:
        await srv.stop()


# ------------------------------------------------------------------ certctl fetch / status

def certctl(*argv: str) -> int:
    """certctl main() restricted to fetch/status (other subcommands are not ours to load)."""
    parser = argparse.ArgumentParser(prog="certctl")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_fetch.register(sub)
    cmd_status.register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        return report_error(args, e)


def test_fetch_writes_table_and_releases(server, tmp_path, capsys):
    out = tmp_path / "t.bin"
    assert certctl("fetch", "--socket", server.path, "--vm", "vm-9", "-o", str(out)) == 0
    assert out.read_bytes() == TABLE
    text = capsys.readouterr().out
    assert "ret=0 (OK) npages=3" in text and "released" in text
    assert len(server.released) == 1 and not server.leases


def test_fetch_hold_keeps_the_lease(server, tmp_path):
    result = {}
    t = threading.Thread(target=lambda: result.update(
        rc=certctl("fetch", "--socket", server.path, "--vm", "vm", "--hold", "0.3", "--json")))
    t.start()
    try:
        wait_for(lambda: server.leases)  # held while certctl sleeps
        assert not server.released
    finally:
        t.join(10)
    assert result["rc"] == 0 and server.released and not server.leases


@pytest.mark.parametrize("vm, npages, code", [
    ("vm", 2, exitcodes.NOSPACE),
    ("busy", 4, exitcodes.BUSY),
    ("broken", 4, exitcodes.UNAVAILABLE),
    ("denied", 4, exitcodes.NOPERM),
    ("ratelimit", 4, exitcodes.BUSY),
    ("garbage", 4, exitcodes.SOFTWARE),
])
def test_fetch_exit_codes(server, capsys, vm, npages, code):
    rc = certctl("fetch", "--socket", server.path, "--vm", vm, "--npages", str(npages), "--json")
    assert rc == code
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == code
    if vm == "vm":
        assert doc["ret"] == wire.ENOSPC and doc["npages"] == 3 and doc["ok"] is False


def test_fetch_unavailable_and_usage(sock_path, capsys):
    assert certctl("fetch", "--socket", sock_path, "--vm", "vm") == exitcodes.UNAVAILABLE
    assert "no certd socket" in capsys.readouterr().err
    assert certctl("fetch", "--socket", sock_path, "--vm", "a b\t") == exitcodes.USAGE


def test_status_cli(server, capsys):
    assert certctl("status", "--socket", server.path, "--json") == 0
    assert json.loads(capsys.readouterr().out)["generation"] == GENERATION
    assert certctl("status", "--socket", server.path) == 0
    assert "generation  7" in capsys.readouterr().out
    assert certctl("status", "--socket", server.path + "x") == exitcodes.UNAVAILABLE


def test_certctl_dispatcher_has_fetch_and_status(capsys):
    from certd.cli import certctl as certctl_main
    assert {"fetch", "status"} <= set(certctl_main.COMMANDS)
    with pytest.raises(SystemExit) as ei:
        certctl_main.main(["fetch", "--help"])
    assert ei.value.code == 0 and "--hold" in capsys.readouterr().out
