"""certd.service.sdnotify against a real (abstract) notify socket and real socket activation
through ``systemd-socket-activate``; no systemd as PID 1 needed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from certd.service import sdnotify
from certd.service.sdnotify import ActivationError, Notifier

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(monkeypatch):
    """A datagram socket bound in the abstract namespace, announced in $NOTIFY_SOCKET."""
    name = f"certd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    s.bind("\0" + name)
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield s
    finally:
        s.close()


def fields(datagram: bytes) -> list[str]:
    return datagram.decode().split("\n")


def test_messages_arrive(notify_socket):
    with Notifier.from_environ() as n:
        assert "NOTIFY_SOCKET" not in os.environ, "must be popped: children must not inherit it"
        assert n.enabled
        assert n.ready("serving")
        assert fields(notify_socket.recv(4096)) == ["READY=1", "STATUS=serving"]
        assert n.status("3 leases")
        assert fields(notify_socket.recv(4096)) == ["STATUS=3 leases"]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        got = fields(notify_socket.recv(4096))
        assert got[0] == "RELOADING=1"
        assert got[1].startswith("MONOTONIC_USEC=")
        assert before <= int(got[1].split("=")[1]) <= after
        assert n.ready("reloaded")
        assert fields(notify_socket.recv(4096)) == ["READY=1", "STATUS=reloaded"]
        assert n.stopping("draining 2 leases")
        assert fields(notify_socket.recv(4096)) == ["STOPPING=1", "STATUS=draining 2 leases"]
        assert n.watchdog()
        assert fields(notify_socket.recv(4096)) == ["WATCHDOG=1"]


def test_status_is_one_field_and_utf8(notify_socket):
    with Notifier.from_environ() as n:
        n.status("a\nWATCHDOG=1 \u00e9")      # a newline must not smuggle in a second field
        assert notify_socket.recv(4096).decode("utf-8") == "STATUS=a WATCHDOG=1 \u00e9"


def test_filesystem_socket_path(tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        with Notifier(str(path)) as n:
            assert n.ready()
            assert s.recv(100) == b"READY=1"


def test_without_notify_socket_everything_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environ()
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    n.close()


def test_unsupported_address_is_ignored():
    n = Notifier("vsock:2:1234")
    assert not n.enabled and n.ready() is False


def test_failures_never_raise(monkeypatch):
    # Nobody listens on this name: sendto fails with ECONNREFUSED/ENOENT.
    with Notifier("@certd-test-nobody-" + uuid.uuid4().hex) as n:
        assert n.enabled
        for _ in range(3):
            assert n.ready("x") is False
            assert n.watchdog() is False


def test_full_queue_does_not_block(notify_socket):
    """A receiver that never reads fills up (net.unix.max_dgram_qlen); a blocking sender
    would hang the event loop here, ours gets EAGAIN and reports False."""
    with Notifier.from_environ() as n:
        t0 = time.monotonic()
        results = [n.watchdog() for _ in range(5000)]
        assert time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False
        # Once the receiver drains, sending works again.
        notify_socket.setblocking(False)
        try:
            while True:
                notify_socket.recv(100)
        except BlockingIOError:
            pass
        assert n.watchdog() is True


# -- watchdog ----------------------------------------------------------------------------------


def test_watchdog_interval(monkeypatch):
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "400000"}) == pytest.approx(0.2)
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": pid}) == 10
    # Meant for another process (we inherited it): not ours to ping.
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.5


async def recv(sock: socket.socket, timeout: float = 5) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)


async def test_watchdog_task_pings_at_the_interval(notify_socket, monkeypatch):
    notify_socket.setblocking(False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")     # ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_environ()
    task = sdnotify.start_watchdog(n)
    assert task is not None
    try:
        stamps = []
        for _ in range(4):
            assert await recv(notify_socket) == b"WATCHDOG=1"
            stamps.append(time.monotonic())
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert all(g >= 0.04 for g in gaps), gaps        # not a busy loop
        assert sum(gaps) / len(gaps) < 1.0, gaps          # and not stalled
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_hung_loop_stops_the_pings(notify_socket):
    """The reason the pings come from the event loop: while it is blocked, none are sent."""
    notify_socket.setblocking(False)
    n = Notifier.from_environ()
    task = sdnotify.start_watchdog(n, interval=0.02)
    try:
        assert await recv(notify_socket) == b"WATCHDOG=1"
        time.sleep(0.3)           # simulates a hung loop: 15 intervals, on purpose blocking
        with pytest.raises(BlockingIOError):
            notify_socket.recv(100)
        assert await recv(notify_socket) == b"WATCHDOG=1"   # and they resume afterwards
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_unhealthy_skips_pings(notify_socket):
    notify_socket.setblocking(False)
    n = Notifier.from_environ()
    healthy = asyncio.Event()
    task = sdnotify.start_watchdog(n, interval=0.01, healthy=healthy.is_set)
    try:
        with pytest.raises(TimeoutError):
            await recv(notify_socket, timeout=0.15)
        healthy.set()
        assert await recv(notify_socket) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_no_watchdog_no_task(monkeypatch, notify_socket):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with Notifier.from_environ() as n:
        assert sdnotify.start_watchdog(n) is None
    assert sdnotify.start_watchdog(Notifier(None), interval=1) is None
    with pytest.raises(ValueError, match="interval"):
        await sdnotify.watchdog_loop(Notifier(None), 0)


# -- socket activation -------------------------------------------------------------------------


def test_listen_fds_not_activated():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "certd"}
    assert sdnotify.listen_fds(env) == {}
    assert env == {}, "the variables are removed even when they were meant for another process"
    assert sdnotify.listen_fds({}) == {}


def test_listen_fds_malformed():
    with pytest.raises(ActivationError, match="LISTEN_FDS"):
        sdnotify.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})


def test_unix_listener_refuses_wrong_sockets():
    assert sdnotify.unix_listener({}) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as d:
        with pytest.raises(ActivationError, match="ListenStream"):
            sdnotify.unix_listener({"certd": [d]})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ActivationError, match="not listening"):
            sdnotify.unix_listener({"certd": [s]})
        with pytest.raises(ActivationError, match="2 sockets"):
            sdnotify.unix_listener({"certd": [s, s]})


CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from certd.service import sdnotify
    seen = {{k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}}
    fds = sdnotify.listen_fds()
    listener = sdnotify.unix_listener(fds, "certd")
    conn, _ = listener.accept()
    report = {{
        "seen": seen,
        "left": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
        "names": {{name: [s.fileno() for s in socks] for name, socks in fds.items()}},
        "inheritable": [os.get_inheritable(s.fileno()) for socks in fds.values() for s in socks],
        "pid": os.getpid(),
    }}
    conn.sendall(json.dumps(report).encode())
    conn.close()
""")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed")
def test_listen_fds_under_systemd_socket_activate(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    main_sock, other_sock = tmp_path / "certd.sock", tmp_path / "other.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(main_sock), "-l", str(other_sock),
         "--fdname=certd:other", sys.executable, str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The listener exists once systemd-socket-activate prints "Listening on ...";
        # poll for the socket file instead of parsing stderr.
        deadline = time.monotonic() + 10
        while not (main_sock.exists() and other_sock.exists()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(20)
            c.connect(str(main_sock))        # the first connection starts the child
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        report = json.loads(data)
        # systemd-socket-activate execs the child in place: same pid.
        assert report["pid"] == proc.pid
        assert report["seen"] == {"LISTEN_PID": str(proc.pid), "LISTEN_FDS": "2",
                                  "LISTEN_FDNAMES": "certd:other"}
        assert report["left"] == []
        assert report["names"] == {"certd": [3], "other": [4]}
        assert report["inheritable"] == [False, False], "CLOEXEC must be set"
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
