"""contrib/nginx-kds-cache.conf in a real nginx on 127.0.0.1 in front of the test KDS: the
second host's fetch is a cache hit; errors and 429 pass through uncached."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from certd.amd.roots import pinned
from certd.sources import kds as kdsmod
from certd.sources.kds import KdsClient

from kds_support import VECTORS, KdsServer, Reply
from test_kds_client import case_platform, leaf_of

CONTRIB = Path(__file__).parent.parent / "contrib" / "nginx-kds-cache.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_config(upstream: str, cache_dir: Path, port: int, *, drop: str | None = None) -> str:
    """The shipped file with the fleet-specific parts replaced (each must be there)."""
    text = CONTRIB.read_text()
    for old, new in (("https://kdsintf.amd.com", upstream),
                     ("/var/cache/nginx/kds", str(cache_dir)),
                     ("listen 8080;", f"listen 127.0.0.1:{port};")):
        assert old in text, f"{old!r} is no longer in {CONTRIB}"
        text = text.replace(old, new)
    if drop is not None:
        assert drop in text
        text = text.replace(drop, "")
    return text


class Nginx:
    def __init__(self, tmp: Path, upstream: str, *, drop: str | None = None):
        self.prefix = tmp
        self.port = free_port()
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        (tmp / "site.conf").write_text(site_config(upstream, tmp / "cache", self.port, drop=drop))
        # master_process off: one process, no user switch, stopped by its pid
        (tmp / "nginx.conf").write_text(f"""\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
""")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        check = subprocess.run([NGINX, "-t", "-p", str(self.prefix), "-c",
                                str(self.prefix / "nginx.conf"), "-e",
                                str(self.prefix / "logs" / "error.log")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c",
                                      str(self.prefix / "nginx.conf"), "-e",
                                      str(self.prefix / "logs" / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(1000):  # until it accepts connections (bounded: 10 s)
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return self
            except OSError:
                time.sleep(0.01)
        pytest.fail("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.proc.stderr.close()


@pytest.fixture
def kds():
    with KdsServer() as server:
        yield server


def make_nginx(tmp_path, kds, **kw) -> Nginx:
    return Nginx(tmp_path / "nginx", kds.url, **kw)


def host(mirror: str, cache: Path) -> KdsClient:
    # kds.mirrors = [nginx]; no base_url: everything must go through the cache
    return KdsClient([mirror], cache, trust=pinned(), timeout_s=5, min_backoff_s=0.01,
                     max_backoff_s=0.05)


def test_second_host_is_a_cache_hit(kds, tmp_path):
    nginx = make_nginx(tmp_path, kds).start()
    try:
        platform, target = case_platform("milan")
        a = host(nginx.url, tmp_path / "host-a")
        b = host(nginx.url, tmp_path / "host-b")
        blob_a = a.vcek_blob_sync(platform, deadline_s=20)
        assert [r.target for r in kds.vcek_requests()] == [target]
        blob_b = b.vcek_blob_sync(platform, deadline_s=20)
        assert b.requests == 1  # host B asked (its own cache was empty)...
        assert len(kds.vcek_requests()) == 1  # ...and nginx answered from its cache
        assert leaf_of(blob_a) == leaf_of(blob_b) == (VECTORS / "milan_vcek.der").read_bytes()
        r = kdsmod.http_get(nginx.url + target, 5)
        assert r.status == 200 and r.headers["x-cache-status"] == "HIT"
    finally:
        nginx.stop()


def test_errors_and_429_pass_through_uncached(kds, tmp_path):
    nginx = make_nginx(tmp_path, kds).start()
    try:
        platform, target = case_platform("turin")
        kds.script(Reply(429, b"Too Many Requests", {"Retry-After": "1"}))
        first = kdsmod.http_get(nginx.url + target, 5)
        assert first.status == 429 and first.headers["retry-after"] == "1"
        # the 429 was not cached: a host retrying after Retry-After reaches KDS and gets it
        a = host(nginx.url, tmp_path / "host-a")
        assert leaf_of(a.vcek_blob_sync(platform, deadline_s=20)) == \
            (VECTORS / "turin_vcek.der").read_bytes()
        assert len(kds.vcek_requests()) == 2
        # 404 (and 500) are never cached either
        unknown = "/vcek/v1/Milan/" + "ab" * 64 + "?blSPL=1&teeSPL=0&snpSPL=1&ucodeSPL=1"
        assert kdsmod.http_get(nginx.url + unknown, 5).status == 404
        assert kdsmod.http_get(nginx.url + unknown, 5).status == 404
        kds.script(Reply(500, b"oops"))
        milan, milan_target = case_platform("milan")
        assert kdsmod.http_get(nginx.url + milan_target, 5).status == 500
        assert kdsmod.http_get(nginx.url + milan_target, 5).status == 200
        targets = [r.target for r in kds.vcek_requests()]
        assert targets.count(unknown) == 2 and targets.count(milan_target) == 2
    finally:
        nginx.stop()


def test_negative_control_obeying_kds_no_cache_header_caches_nothing(kds, tmp_path):
    # KDS sends "Cache-Control: no-cache"; without proxy_ignore_headers nginx obeys it
    nginx = make_nginx(tmp_path, kds,
                       drop="proxy_ignore_headers Cache-Control Expires Set-Cookie;").start()
    try:
        platform, _ = case_platform("milan")
        host(nginx.url, tmp_path / "host-a").vcek_blob_sync(platform, deadline_s=20)
        host(nginx.url, tmp_path / "host-b").vcek_blob_sync(platform, deadline_s=20)
        assert len(kds.vcek_requests()) == 2  # no cache hit: the directive is what makes it
    finally:
        nginx.stop()
