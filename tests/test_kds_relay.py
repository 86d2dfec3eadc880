"""kds.relay: the KDS client reaching its source through a Unix-socket TCP relay, as the
shipped certd.service (no network of its own) does through certd-kds-relay.socket.

The relay is the real one: ``systemd-socket-proxyd`` under ``systemd-socket-activate``
(which listens on the Unix socket and passes it, as the socket unit does), forwarding to
the test KDS on 127.0.0.1. The source URLs name hosts that do not resolve (``*.test``), so
an answer can only have come through the relay. For https:// the test KDS speaks TLS with a
certificate from a test CA (passed to the client as its SSLContext): the session is end to
end, with SNI and the host name checked against the URL's host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certd import config as configmod
from certd import exitcodes
from certd.amd.roots import pinned
from certd.service import rotation
from certd.sources import kds as kdsmod
from certd.sources.kds import KdsClient, KdsUnavailable

from kds_support import KdsServer
from test_kds_cli import platform_file, run, write_config
from test_kds_client import case_platform, leaf_of

PROXYD = next((p for p in ("/usr/lib/systemd/systemd-socket-proxyd",
                           "/lib/systemd/systemd-socket-proxyd") if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(PROXYD is None or shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-proxyd / systemd-socket-activate missing")

#: Hosts in the URLs: .test never resolves (RFC 6761), so a direct connection fails.
HOST = "kds.test"


class Relay:
    """``systemd-socket-activate -l SOCK systemd-socket-proxyd 127.0.0.1:PORT``."""

    def __init__(self, sock: Path, port: int):
        self.sock = sock
        self.proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(sock), PROXYD, f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        # It says "Listening on SOCK" once bound, before it execs the proxy.
        seen = []
        while not any(line.startswith("Listening on") for line in seen):
            line = self.proc.stderr.readline()
            assert line, f"relay exited before listening: {seen}"
            seen.append(line)
        assert sock.is_socket()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def kds():
    with KdsServer() as server:
        yield server


@pytest.fixture
def relay(kds, tmp_path):
    r = Relay(tmp_path / "relay.sock", kds.server.server_address[1])
    try:
        yield r
    finally:
        r.stop()


def client(urls, cache, **kw) -> KdsClient:
    return KdsClient(urls, cache, trust=pinned(), timeout_s=5, min_backoff_s=0.01,
                     max_backoff_s=0.05, **kw)


def test_fetch_through_the_relay(kds, relay, tmp_path):
    platform, target = case_platform("milan")
    c = client([f"http://{HOST}"], tmp_path / "cache", relay=relay.sock)
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert [r.target for r in kds.vcek_requests()] == [target]
    assert leaf_of(blob) == kds.routes[target]


def test_without_the_relay_the_host_is_unreachable(kds, tmp_path):
    """Control: the same client without ``relay`` cannot reach kds.test at all."""
    platform, _ = case_platform("milan")
    c = client([f"http://{HOST}"], tmp_path / "cache")
    with pytest.raises(KdsUnavailable) as e:
        c.vcek_blob_sync(platform, deadline_s=1)
    assert {f.kind for f in e.value.failures} == {"network"}
    assert kds.requests == []


def test_relay_stopped_names_the_relay(kds, relay, tmp_path):
    platform, _ = case_platform("milan")
    relay.stop()
    c = client([f"http://{HOST}"], tmp_path / "cache", relay=relay.sock)
    with pytest.raises(KdsUnavailable) as e:
        c.vcek_blob_sync(platform, deadline_s=1)
    assert f"KDS relay {relay.sock}" in str(e.value), str(e.value)
    assert "Connection refused" in str(e.value)
    relay.sock.unlink()  # what RemoveOnStop= does when certd-kds-relay.socket stops
    with pytest.raises(KdsUnavailable) as e:
        c.vcek_blob_sync(platform, deadline_s=1)
    assert f"KDS relay {relay.sock}: No such file or directory" in str(e.value)
    assert kds.requests == []


def test_relay_that_cannot_reach_its_target_is_named(tls, tmp_path):
    """The relay accepts, cannot connect on (nothing listens on the port), and hangs up:
    the failure says so instead of a bare TLS EOF."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again below: nothing listens there
    r = Relay(tmp_path / "relay.sock", port)
    try:
        with pytest.raises(ConnectionResetError) as e:
            kdsmod.http_get(f"https://{HOST}/vcek/v1/Milan/crl", 5, relay=r.sock,
                            context=ssl.create_default_context(cafile=str(tls[0])))
        assert f"KDS relay {r.sock} closed the connection before TLS with {HOST}" in str(e.value)
    finally:
        r.stop()


def test_the_daemon_and_certctl_use_kds_relay(kds, relay, tmp_path):
    """[kds] relay reaches the client the daemon builds (rotation.kds_client)."""
    cfg = configmod.parse(f'[kds]\nbase_url = "http://{HOST}"\nrelay = "{relay.sock}"\n'
                          f'cache_dir = "{tmp_path / "cache"}"\nmin_backoff_s = 0.01\n')
    c = rotation.kds_client(cfg, pinned())
    assert c.relay == relay.sock
    platform, target = case_platform("milan")
    c.vcek_blob_sync(platform, deadline_s=20)
    assert [r.target for r in kds.vcek_requests()] == [target]


def test_certctl_kds_fetch_uses_kds_relay(kds, relay, tmp_path, capsys):
    """certctl kds fetch with the daemon's configuration goes through its relay; --url
    names another source, so it connects directly (the relay forwards elsewhere)."""
    pf = platform_file(tmp_path, "milan")
    cfg = write_config(tmp_path, [f"http://{HOST}"], relay=f'"{relay.sock}"')
    out = tmp_path / "new.blob"
    rc, _, err = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                     "-o", str(out), "--timeout", "20")
    assert rc == 0, err
    assert len(kds.vcek_requests()) == 1 and out.stat().st_size > 0
    rc, _, err = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                     "--url", f"http://{HOST}", "--cache-dir", str(tmp_path / "c2"),
                     "-o", str(out), "--timeout", "1")
    assert rc == exitcodes.UNAVAILABLE and "KDS relay" not in err, err
    assert len(kds.vcek_requests()) == 1


def test_config_relay_needs_one_target():
    cfg = configmod.parse('[kds]\nrelay = "/run/certd-kds/relay.sock"\n')
    assert cfg.kds.relay == Path("/run/certd-kds/relay.sock")
    assert configmod.parse("[kds]\n").kds.relay is None
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse('[kds]\nrelay = "/run/certd-kds/relay.sock"\n'
                        'mirrors = ["http://mirror.example:8080"]\n')
    assert "kds.relay" in str(e.value) and "http://mirror.example:8080" in str(e.value)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse('[kds]\nrelay = "run/relay.sock"\n')
    assert "absolute" in str(e.value)


# --- TLS end to end through the relay --------------------------------------------------------

def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, san: list[str] = ()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in san] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls(tmp_path):
    """(CA file, server context): a test CA and a server certificate for kds.test."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certd test CA")])
    ca = _cert("certd test CA", ca_key, ca_name, ca_key, ca=True)
    leaf = _cert(HOST, key, ca_name, ca_key, ca=False, san=[HOST])
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    (tmp_path / "server.pem").write_bytes(pem(leaf) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem")
    return tmp_path / "ca.pem", server


@pytest.fixture
def tls_kds(tls):
    ca, server_ctx = tls
    server = KdsServer()
    server.sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    server.server.socket = server_ctx.wrap_socket(server.server.socket, server_side=True)
    with server:
        yield server, ca


@pytest.fixture
def tls_relay(tls_kds, tmp_path):
    r = Relay(tmp_path / "relay.sock", tls_kds[0].server.server_address[1])
    try:
        yield r
    finally:
        r.stop()


def test_https_through_the_relay_is_tls_to_the_urls_host(tls_kds, tls_relay, tmp_path):
    kds, ca = tls_kds
    platform, target = case_platform("milan")
    ctx = ssl.create_default_context(cafile=str(ca))
    c = client([f"https://{HOST}"], tmp_path / "cache", relay=tls_relay.sock, ssl_context=ctx)
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert leaf_of(blob) == kds.routes[target]
    assert [r.target for r in kds.vcek_requests()] == [target]
    assert set(kds.sni) == {HOST}  # SNI: the URL's host, not the relay's socket


def test_https_through_the_relay_checks_the_host_name(tls_kds, tls_relay, tmp_path):
    """Negative control: a URL whose host the certificate does not name is refused, though
    the relay delivers the bytes to the same server."""
    kds, ca = tls_kds
    ctx = ssl.create_default_context(cafile=str(ca))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        kdsmod.http_get("https://other.test/vcek/v1/Milan/cert_chain", 5,
                        relay=tls_relay.sock, context=ctx)
    assert kds.sni == ["other.test"] and kds.requests == []
    # The right name passes, through the same relay.
    assert kdsmod.http_get(f"https://{HOST}/vcek/v1/Milan/cert_chain", 5,
                           relay=tls_relay.sock, context=ctx).status == 200


def test_https_through_the_relay_verifies_the_certificate(tls_kds, tls_relay):
    """Negative control: without the test CA (the default context: the system's roots) the
    server's certificate is refused, so the relay path does not skip verification."""
    kds, _ = tls_kds
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        kdsmod.http_get(f"https://{HOST}/vcek/v1/Milan/cert_chain", 5, relay=tls_relay.sock)
    assert kds.requests == []


# --- no relay configured where there is no network --------------------------------------------

UNSHARE = shutil.which("unshare")


def _fetch_in(netns_cmd: list[str]) -> subprocess.CompletedProcess:
    code = ("from certd.sources import kds\n"
            "try:\n"
            f"    kds.http_get('http://{HOST}/vcek/v1/Milan/crl', 5)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e)\n")
    return subprocess.run([*netns_cmd, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare")
def test_no_network_and_no_relay_says_set_kds_relay():
    """As under the shipped certd.service with kds.relay = "": the error names the fix."""
    r = _fetch_in([UNSHARE, "--net"])
    assert r.returncode == 0, r.stderr
    assert "no network but lo: set kds.relay" in r.stdout, r.stdout
    # Control: with the host's network the same failure (an unresolvable name) says no such
    # thing.
    r = _fetch_in([])
    assert r.returncode == 0 and r.stdout.startswith("gaierror"), (r.stdout, r.stderr)
    assert "kds.relay" not in r.stdout
