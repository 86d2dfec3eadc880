"""Metrics and health endpoints, scraped from a real certd over real HTTP (loopback TCP and
a Unix socket) and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import socket
import stat
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certd import client as clientmod, config, exitcodes
from certd.service import httpd
from certd.store import locks
from tests.daemon_support import BIN, make_daemon, vector_blob

REQUIRED = {
    # family name (as the parser names it) -> type; every name issue 10 spells out
    "certd_build_info": "gauge",
    "certd_requests": "counter",
    "certd_request_duration_seconds": "histogram",
    "certd_leases_live": "gauge",
    "certd_leases_expired": "counter",
    "certd_leases_cut_short": "counter",
    "certd_lock_wait_seconds": "histogram",
    "certd_rotations": "counter",
    "certd_kds_requests": "counter",
    "certd_kds_cache_hits": "counter",
    "certd_blob_generation": "gauge",
    "certd_profile_state": "gauge",
    "certd_leaf_not_after_timestamp_seconds": "gauge",
    "certd_crl_next_update_timestamp_seconds": "gauge",
    "certd_connections": "gauge",
    "certd_refusals": "counter",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def http_get(where: str, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """``where``: "127.0.0.1:PORT", "[::1]:PORT" or a Unix socket path."""
    if where.startswith("/"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(where)
    else:
        host, _, port = where.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def scrape(where: str) -> dict:
    """{family name: family}, and the samples as {(sample name, sorted labels): value}."""
    status, headers, body = http_get(where, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    return {"families": families, "samples": samples}


def value(m: dict, name: str, **labels) -> float | None:
    return m["samples"].get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def tcp_daemon(tmp_path):
    where = f"127.0.0.1:{free_port()}"
    d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "{where}"\n').start()
    d.where = where
    yield d
    assert d.stop() == 0, d.log()


def test_every_required_metric_is_exposed_with_its_type(tcp_daemon):
    m = scrape(tcp_daemon.where)
    for name, kind in REQUIRED.items():
        assert name in m["families"], f"{name} missing"
        assert m["families"][name].type == kind, name
    from certd import __version__
    assert value(m, "certd_build_info", version=__version__) == 1
    assert value(m, "certd_blob_generation", profile="default") == 1
    assert value(m, "certd_profile_state", profile="default", state="serving") == 1
    for s in ("empty", "invalid", "stale"):
        assert value(m, "certd_profile_state", profile="default", state=s) == 0
    leaf = vector_blob()
    from certd import policy
    want = policy.parse_blob(leaf).leaf.not_after.timestamp()
    assert value(m, "certd_leaf_not_after_timestamp_seconds", profile="default") == want
    # the vector blob has no CRL: no sample rather than a made-up date
    assert not m["families"]["certd_crl_next_update_timestamp_seconds"].samples
    assert value(m, "process_open_fds") is not None


def test_counters_move_with_requests(tcp_daemon):
    before = scrape(tcp_daemon.where)
    # The common answers are exported from the start, at 0 (no series appears from nowhere).
    assert value(before, "certd_requests_total", op="get", ret="ok") == 0
    assert value(before, "certd_requests_total", op="get", ret="enospc") is None
    with clientmod.Client(tcp_daemon.socket) as c:
        r = c.get("vm-1", 4)
        assert r.ret == 0 and r.lease_id
        during = scrape(tcp_daemon.where)
        assert value(during, "certd_leases_live") == 1
        assert value(during, "certd_connections") == 1
        assert c.get("vm-1", 0).ret == 28  # ENOSPC: a buffer too small
        assert c.release(r.lease_id) == 0
        c.status()
    after = scrape(tcp_daemon.where)
    assert value(after, "certd_requests_total", op="get", ret="ok") == 1
    assert value(after, "certd_requests_total", op="get", ret="enospc") == 1
    assert value(after, "certd_requests_total", op="release", ret="released") == 1
    assert value(after, "certd_requests_total", op="status", ret="ok") == 1
    assert value(after, "certd_request_duration_seconds_count", op="get") == 2
    assert value(after, "certd_request_duration_seconds_bucket", op="get", le="+Inf") == 2
    assert value(after, "certd_request_duration_seconds_sum", op="get") > 0
    assert value(after, "certd_leases_live") == 0


def test_a_rotation_moves_rotations_and_generation(tcp_daemon, tmp_path):
    """Issue 10 acceptance: scraped during rotations, the rotation, the generation and the
    request counters move. A tool renames garbage over the blob; then certctl installs the
    good blob again."""
    d = tcp_daemon
    good = tmp_path / "good.blob"
    good.write_bytes(d.blob.read_bytes())
    junk = d.dir / "junk.tmp"
    junk.write_bytes(b"not a certificate table")
    os.replace(junk, d.blob)
    d.notify.wait_for("STATUS=serving the empty table")
    with clientmod.Client(d.socket) as c:
        assert c.get("vm-1", 4).lease_id == 0  # the empty table: nothing leased
    m = scrape(d.where)
    assert value(m, "certd_blob_generation", profile="default") == 2
    assert value(m, "certd_profile_state", profile="default", state="invalid") == 1
    assert value(m, "certd_rotations_total", source="file", result="invalid") == 1
    assert value(m, "certd_requests_total", op="get", ret="empty") == 1
    assert not m["families"]["certd_leaf_not_after_timestamp_seconds"].samples
    subprocess.run([str(BIN / "certctl"), "install", "--blob", str(d.blob), "--platform",
                    str(d.dir / "platform.toml"), str(good)],
                   check=True, capture_output=True, timeout=60)
    d.notify.wait_for("STATUS=serving generation 3")
    with clientmod.Client(d.socket) as c:
        r = c.get("vm-1", 4)
        assert r.ret == 0 and r.generation == 3
        c.release(r.lease_id)
    m = scrape(d.where)
    assert value(m, "certd_blob_generation", profile="default") == 3
    assert value(m, "certd_profile_state", profile="default", state="serving") == 1
    assert value(m, "certd_rotations_total", source="file", result="serving") == 1
    assert value(m, "certd_rotations_total", source="file", result="invalid") == 1
    assert value(m, "certd_requests_total", op="get", ret="ok") == 1
    # the start-up look at the blob is not a rotation
    assert sum(v for (n, _), v in m["samples"].items() if n == "certd_rotations_total") == 2


def test_a_get_waiting_for_an_updater_is_a_lock_wait_and_eagain(tcp_daemon):
    lock = locks.blob_lock(tcp_daemon.blob)
    hold = lock.acquire_exclusive_sync(time.monotonic() + 5)
    try:
        with clientmod.Client(tcp_daemon.socket) as c:
            assert c.get("vm-1", 4).ret == 11  # EAGAIN after the 100 ms deadline
    finally:
        hold.release()
        lock.close()
    m = scrape(tcp_daemon.where)
    assert value(m, "certd_requests_total", op="get", ret="eagain") == 1
    assert value(m, "certd_lock_wait_seconds_count", who="get") == 1
    waited = value(m, "certd_lock_wait_seconds_sum", who="get")
    assert 0.09 <= waited < 5, waited
    # the 0.1 s bucket may or may not hold it; the 0.05 s one cannot
    assert value(m, "certd_lock_wait_seconds_bucket", who="get", le="0.05") == 0
    assert value(m, "certd_request_duration_seconds_bucket", op="get", le="0.05") == 0


def test_refusals_are_counted_by_why(tmp_path):
    where = f"127.0.0.1:{free_port()}"
    d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "{where}"\n'
                    ).start()
    try:
        with clientmod.Client(d.socket) as c:  # at most 16 leases per connection
            leases = [c.get(f"vm-{i}", 4).lease_id for i in range(16)]
            assert all(leases)
            with pytest.raises(clientmod.Refused):
                c.get("vm-17", 4)  # the 17th: TOO_MANY_LEASES
        m = scrape(where)
        assert value(m, "certd_refusals_total", why="too_many_leases") == 1
        assert value(m, "certd_requests_total", op="get", ret="too_many_leases") == 1
    finally:
        assert d.stop() == 0


def test_healthz_and_readyz(tcp_daemon):
    status, headers, body = http_get(tcp_daemon.where, "/healthz")
    assert (status, body) == (200, b'{"live": true}\n')
    status, headers, body = http_get(tcp_daemon.where, "/readyz")
    assert (status, body) == (200, b'{"ready": true, "why": []}\n')
    assert headers["Content-Type"] == "application/json"


def test_readyz_waits_until_every_profile_is_decided(tmp_path):
    """An updater holds the blob's lock while certd starts: the daemon cannot look at the
    blob, so it is not ready (503, saying why) until it has; the control is the same daemon
    after a GET made it look."""
    where = f"127.0.0.1:{free_port()}"
    d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "{where}"\n')
    d.dir.mkdir(parents=True, exist_ok=True)
    lock = locks.blob_lock(d.blob)
    hold = lock.acquire_exclusive_sync(time.monotonic() + 5)
    try:
        d.start()
        status, _, body = http_get(where, "/readyz")
        assert status == 503, body
        assert b"not looked at yet" in body and b"'default'" in body
        assert http_get(where, "/healthz")[0] == 200  # alive all the same
    finally:
        hold.release()
        lock.close()
    try:
        with clientmod.Client(d.socket) as c:
            r = c.get("vm-1", 4)
            assert r.ret == 0
            c.release(r.lease_id)
        assert http_get(where, "/readyz")[0] == 200
    finally:
        assert d.stop() == 0


def test_a_reload_keeps_the_listener_and_adds_the_new_profile(tcp_daemon):
    d = tcp_daemon
    vlek = d.dir / "vlek.blob"
    d.config_path.write_text(d.config_text + f"""
[[profile]]
name = "vlek"
blob = "{vlek}"
vms = ["tenant-*"]
""")
    d.proc.send_signal(signal.SIGHUP)
    assert "reloaded" in d.notify.wait_for("READY=1")
    m = scrape(d.where)
    assert value(m, "certd_profile_state", profile="vlek", state="empty") == 1
    assert value(m, "certd_profile_state", profile="default", state="serving") == 1
    # looked at during the reload, not left for the first GET: ready at once
    assert http_get(d.where, "/readyz")[0] == 200
    assert value(m, "certd_rotations_total", source="file", result="empty") is None


def test_an_empty_profile_is_ready_but_not_serving(tmp_path):
    where = f"127.0.0.1:{free_port()}"
    d = make_daemon(tmp_path / "d", blob=None, extra=f'[metrics]\nlisten = "{where}"\n').start()
    try:
        m = scrape(where)
        assert value(m, "certd_profile_state", profile="default", state="empty") == 1
        assert value(m, "certd_profile_state", profile="default", state="serving") == 0
        assert http_get(where, "/readyz")[0] == 200  # a missing blob is decided: empty
    finally:
        assert d.stop() == 0


def test_unix_socket_listener(tmp_path):
    path = str(tmp_path / "d" / "metrics.sock")
    d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "{path}"\n'
                    'socket_mode = "0600"\n').start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        m = scrape(path)
        assert value(m, "certd_profile_state", profile="default", state="serving") == 1
        assert http_get(path, "/readyz")[0] == 200
        with clientmod.Client(d.socket) as c:
            c.status()
        assert value(scrape(path), "certd_requests_total", op="status", ret="ok") == 1
    finally:
        assert d.stop() == 0
    assert not os.path.exists(path), "the metrics socket is removed at a clean exit"


def test_ipv6_loopback_listener(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no ::1 on this host")
    d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "[::1]:{port}"\n').start()
    try:
        assert value(scrape(f"[::1]:{port}"), "certd_blob_generation", profile="default") == 1
    finally:
        assert d.stop() == 0


def test_http_answers_only_what_it_should(tcp_daemon):
    w = tcp_daemon.where
    assert http_get(w, "/nope")[0] == 404
    assert http_get(w, "/metrics", "POST")[0] == 405
    status, headers, body = http_get(w, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    assert http_get(w, "/metrics?name[]=x")[0] == 200  # a query string is ignored
    host, port = w.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 hello TLS\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400 ")
    assert http_get(w, "/healthz")[0] == 200  # and the listener is still there


def test_metrics_are_off_by_default(tmp_path):
    d = make_daemon(tmp_path / "d").start()
    try:
        assert "metrics listening" not in d.log()
    finally:
        assert d.stop() == 0
    assert config.parse("").metrics.address is None


def test_a_taken_port_stops_certd_with_69(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = make_daemon(tmp_path / "d", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        d.start(wait=False)
        try:
            assert d.proc.wait(timeout=30) == exitcodes.UNAVAILABLE
        finally:
            d.stop()
    assert re.search(r"\[metrics\] listen: cannot listen on 127\.0\.0\.1:\d+", d.log())


def test_config_refuses_non_loopback_and_the_request_socket(tmp_path):
    for bad in ("0.0.0.0:9100", "192.168.1.1:80", "localhost:80", "127.0.0.1:0",
                "[::]:9100", "metrics.sock"):
        with pytest.raises(config.ConfigError, match="metrics.listen"):
            config.parse(f'[metrics]\nlisten = "{bad}"\n')
    with pytest.raises(config.ConfigError, match="is server.socket"):
        config.parse('[server]\nsocket = "/run/x.sock"\n[metrics]\nlisten = "/run/x.sock"\n')
    assert config.parse('[metrics]\nlisten = "[::1]:9100"\n').metrics.address == \
        ("tcp", "::1", 9100)


# -- the HTTP server's bounds, in process (the limits are module constants) ---------------


@pytest.fixture
def fast_httpd(monkeypatch):
    monkeypatch.setattr(httpd, "TIMEOUT", 0.2)


async def _start(routes) -> tuple[httpd.HttpServer, int]:
    port = free_port()
    srv = httpd.HttpServer(routes)
    await srv.start(("tcp", "127.0.0.1", port))
    return srv, port


async def test_a_silent_client_gets_408_and_is_dropped(fast_httpd):
    srv, port = await _start({"/x": lambda: (200, "text/plain", b"x")})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        assert data.startswith(b"HTTP/1.1 408 ")
        writer.close()
    finally:
        await srv.close()


async def test_clients_beyond_the_limit_are_closed_unanswered(monkeypatch):
    monkeypatch.setattr(httpd, "TIMEOUT", 60)  # the first ones stay while the test runs
    srv, port = await _start({"/x": lambda: (200, "text/plain", b"x")})
    conns = []
    try:
        for _ in range(httpd.MAX_CLIENTS):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        while srv.clients < httpd.MAX_CLIENTS:  # each is accepted on a loop turn
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        conns[0][1].write(b"GET /x HTTP/1.0\r\n\r\n")  # the ones inside are still served
        assert (await asyncio.wait_for(conns[0][0].read(), 10)).endswith(b"\r\n\r\nx")
    finally:
        for _, w in conns:
            w.close()
        await srv.close()


async def test_a_failing_handler_is_a_500_not_a_dead_listener(capsys):
    def boom():
        raise RuntimeError("bug")
    srv, port = await _start({"/boom": boom, "/ok": lambda: (200, "text/plain", b"ok")})
    try:
        for path, want in (("/boom", b"HTTP/1.1 500 "), ("/ok", b"HTTP/1.1 200 ")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(want)
            writer.close()
    finally:
        await srv.close()
    assert "metrics handler failed" in capsys.readouterr().out


def test_parse_head():
    assert httpd.parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == \
        ("GET", "/metrics")
    for bad in (b"GET /metrics\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                b"GET /m HTTP/2\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n", b"\r\n\r\n"):
        with pytest.raises(httpd.BadRequest):
            httpd.parse_head(bad)
