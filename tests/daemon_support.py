"""Run a real certd process for tests: config in a temp dir, readiness from sd_notify.

The daemon reports READY=1 on a fake NOTIFY_SOCKET (an abstract datagram socket the test
binds), so tests await that event instead of sleeping or polling the socket path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd import platform as platformmod, policy
from certd.abi.product import Product
from certd.abi import report as reportmod
from certd.amd import roots
from certd.platform import Platform

VECTORS = Path(__file__).parent / "vectors"
BIN = Path(sys.executable).parent


def vector_platform(report_name: str = "milan_gcp_report.bin",
                    product: Product = Product.MILAN) -> Platform:
    """The platform identity a real vector report was signed on."""
    r = reportmod.parse((VECTORS / report_name).read_bytes())
    return Platform(product=product, reported_tcb=r.reported_tcb(product),
                    chip_id=r.hwid(product))


def vector_blob(vcek: str = "milan_gcp_vcek.der", chain: str = "milan_cert_chain.pem",
                platform: Platform | None = None) -> bytes:
    """A real AMD blob (pinned roots, real VCEK), built through the policy."""
    ask, ark = x509.load_pem_x509_certificates((VECTORS / chain).read_bytes())
    leaf = (VECTORS / vcek).read_bytes()
    return policy.build_blob(ark, ask, leaf, trust=roots.pinned(),
                             platform=platform or vector_platform())


@dataclass
class Notifications:
    sock: socket.socket
    address: str
    seen: list[str] = field(default_factory=list)

    @classmethod
    def open(cls) -> "Notifications":
        name = f"certd-test-{uuid.uuid4().hex}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("\0" + name)
        return cls(s, "@" + name)

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """Block until a datagram containing ``needle`` arrives (an event, not a sleep)."""
        end = time.monotonic() + timeout
        while True:
            for msg in self.seen:
                if needle in msg:
                    self.seen.remove(msg)
                    return msg
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {needle!r} from certd within {timeout} s "
                                   f"(got {self.seen})")
            self.sock.settimeout(left)
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProc:
    dir: Path
    config_text: str
    proc: subprocess.Popen | None = None
    notify: Notifications | None = None
    log_path: Path | None = None
    _log_file: object = None

    @property
    def socket(self) -> str:
        return str(self.dir / "certd.sock")

    @property
    def blob(self) -> Path:
        return self.dir / "certs.blob"

    @property
    def config_path(self) -> Path:
        return self.dir / "certd.toml"

    def start(self, extra_env: dict[str, str] | None = None, argv: list[str] | None = None,
              wait: bool = True) -> "DaemonProc":
        self.config_path.write_text(self.config_text)
        self.notify = Notifications.open()
        self.log_path = self.dir / "certd.log"
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, **(extra_env or {})}
        cmd = argv or [str(BIN / "certd"), "--config", str(self.config_path)]
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        if wait:
            self.notify.wait_for("READY=1")
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def stop(self) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait(timeout=10)
            else:
                rc = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.notify is not None:
            self.notify.close()
        return rc


def config_text(directory: Path, *, platform_file: Path | None, extra: str = "",
                lease_timeout_ms: int = 2000, deadline_ms: int = 100,
                allow_uids: tuple[int, ...] = (0,), socket_mode: str = "0660") -> str:
    plat = (f'[platform]\nsource = "file"\nfile = "{platform_file}"\n' if platform_file
            else '[platform]\nsource = "file"\nfile = "/nonexistent"\n')
    return f"""\
[server]
socket = "{directory / 'certd.sock'}"
socket_mode = "{socket_mode}"
lease_timeout_ms = {lease_timeout_ms}
request_deadline_ms = {deadline_ms}

[access]
allow_uids = [{', '.join(map(str, sorted(set(allow_uids) | {os.getuid()})))}]

[store]
blob = "{directory / 'certs.blob'}"

{plat}
[kds]
base_url = ""   # tests never reach AMD; KDS tests start their own server

[log]
level = "debug"
format = "json"
{extra}"""


def make_daemon(directory: Path, *, blob: bytes | None = b"", **kw) -> DaemonProc:
    """A daemon on the real milan_gcp vector blob (pinned roots), unless ``blob`` is given
    (None: no blob file at all)."""
    directory.mkdir(parents=True, exist_ok=True)
    platform = vector_platform()
    pf = directory / "platform.toml"
    platformmod.save(platform, pf)
    if blob == b"":
        blob = vector_blob(platform=platform)
    if blob is not None:
        (directory / "certs.blob").write_bytes(blob)
    return DaemonProc(directory, config_text(directory, platform_file=pf, **kw))


class TableOnlyJudge:
    """Tests that serve arbitrary (non-certificate) tables judge by format alone. The
    daemon itself always judges with certd.policy (certd.service.profiles.Judge)."""

    epoch = 0

    def observe(self, force: bool = False) -> bool:
        return False

    def problems(self, blob: bytes):
        from certd.abi import table
        from certd.verify.problems import Problem
        try:
            table.decode(blob)
        except table.TableError as e:
            return [Problem("format", str(e))]
        return []


# --- helpers for the boundary tests (issue 7) -------------------------------------------

def with_server_keys(text: str, **keys: object) -> str:
    """``text`` (from :func:`config_text`) with more ``[server]`` keys (TOML values given as
    Python ints/strs), e.g. ``hold_max_age_ms=60000``."""
    lines = "".join(f"{k} = {v if not isinstance(v, str) else repr(v)}\n" for k, v in keys.items())
    assert "[server]\n" in text
    return text.replace("[server]\n", "[server]\n" + lines, 1)


def fd_count(pid: int) -> int:
    """Descriptors open in process ``pid`` now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def make_dev_daemon(directory: Path, pki, platform: Platform, *, blob: bytes | None,
                    extra: str = "", **kw) -> DaemonProc:
    """A daemon trusting ``pki`` (a certd.devpki.DevPki: ``[trust] roots`` is its
    ``dev-roots.pem``) instead of AMD's roots, on the platform file
    ``directory/platform.toml`` holding ``platform``; ``blob`` at the blob path (None: no
    file). ``kw`` as for :func:`config_text`."""
    directory.mkdir(parents=True, exist_ok=True)
    roots_pem = directory / "dev-roots.pem"
    roots_pem.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                   for c in (pki.ark, pki.ask, pki.asvk)))
    trust = f'\n[trust]\nroots = ["{roots_pem}"]\n'
    return make_vector_daemon(directory, platform, blob=blob, extra=trust + extra, **kw)


def dev_vcek_blob(pki, platform: Platform) -> bytes:
    """A valid development blob for ``platform``: a fresh VCEK (new key each call, so two
    calls give two different valid blobs, of the same size) built through the policy."""
    leaf, _ = pki.issue_vcek(platform.reported_tcb, platform.chip_id)
    return policy.build_blob(pki.ark, pki.ask, leaf, trust=pki.trust, platform=platform)


def dev_vlek_blob(pki, platform: Platform) -> bytes:
    """A VLEK blob for ``platform``'s TCB (ASVK chain), encoded without validation (it is
    valid exactly when the platform's signing key is the VLEK)."""
    from certd import devpki
    leaf, _ = pki.issue_vlek(platform.reported_tcb)
    return devpki.blob(pki.ark, pki.asvk, leaf, vlek=True)


def stopped(d: DaemonProc) -> str:
    """Stop ``d``, assert it exited 0 with no traceback in its log; returns the log."""
    rc = d.stop()
    log = d.log()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    return log


def status_of(socket_path: str) -> dict:
    """One STATUS on a fresh connection."""
    from certd import client as clientmod
    with clientmod.Client(socket_path) as c:
        return c.status()


def reload(d: DaemonProc, config_text: str | None = None) -> str:
    """Rewrite the configuration (if given), SIGHUP, and wait for RELOADING=1 then READY=1;
    returns the READY datagram."""
    if config_text is not None:
        d.config_path.write_text(config_text)
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    return d.notify.wait_for("READY=1")


def make_vector_daemon(directory: Path, platform: Platform, *, blob: bytes | None,
                       **kw) -> DaemonProc:
    """Like :func:`make_daemon` (pinned AMD roots) on a given platform and blob (None: no
    file); ``kw`` as for :func:`config_text`."""
    directory.mkdir(parents=True, exist_ok=True)
    pf = directory / "platform.toml"
    platformmod.save(platform, pf)
    if blob is not None:
        (directory / "certs.blob").write_bytes(blob)
    return DaemonProc(directory, config_text(directory, platform_file=pf, **kw))


#: [server] keys that keep the per-VM rate limiter out of the way of load loops (the
#: configuration refuses 0; these are the largest accepted values).
NO_RATE_LIMIT = {"rate_per_vm": 1000000, "rate_burst": 1048576}


class OverlappingLeases:
    """Two connections, in a thread, keep leases overlapping for as long as they run: each
    GET is sent while the previous lease is still live and that lease is released only
    after the GET is answered, so a shared hold never drains by itself.

    ``results``: ``(monotonic time the GET was sent, ret, lease_id, table)`` per GET."""

    def __init__(self, socket_path: str, vm_id: str = "vm-busy", npages: int = 4):
        import threading
        self.socket_path, self.vm_id, self.npages = socket_path, vm_id, npages
        self.results: list[tuple[float, int, int, bytes]] = []
        self._stop = threading.Event()
        self._first = threading.Event()
        self._more = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from certd import client as clientmod
        clients = [clientmod.Client(self.socket_path) for _ in range(2)]
        try:
            prev = None
            i = 0
            while not self._stop.is_set():
                c = clients[i % 2]
                i += 1
                t = time.monotonic()
                r = c.get(self.vm_id, self.npages)
                with self._more:
                    self.results.append((t, r.ret, r.lease_id, r.table))
                    self._more.notify_all()
                if prev is not None:
                    prev[0].release(prev[1])
                prev = (c, r.lease_id) if r.lease_id else None
                self._first.set()
            if prev is not None:
                prev[0].release(prev[1])
        except BaseException as e:  # reported by stop()
            self._error = e
            self._first.set()
        finally:
            for c in clients:
                c.close()

    def __enter__(self) -> "OverlappingLeases":
        self._thread.start()
        if not self._first.wait(20):
            raise TimeoutError("the leasing clients got no answer within 20 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "the leasing clients did not stop"
        if self._error is not None and exc[0] is None:
            raise self._error

    def wait_count(self, n: int, timeout: float = 20.0) -> None:
        """Block until ``n`` GETs have been answered."""
        with self._more:
            if not self._more.wait_for(lambda: len(self.results) >= n or self._error,
                                       timeout):
                raise TimeoutError(f"{len(self.results)} of {n} GETs answered in {timeout} s")
        if self._error is not None:
            raise self._error

    def before(self, t: float) -> list[tuple[float, int, int, bytes]]:
        """The GETs sent before ``t``."""
        return [r for r in list(self.results) if r[0] < t]

    def since(self, t: float) -> list[tuple[float, int, int, bytes]]:
        """The GETs sent after ``t`` (so answered after anything the daemon did before)."""
        return [r for r in list(self.results) if r[0] > t]


#: An updater that knows only the kernel's documented scheme: open the blob, take an
#: exclusive OFD lock with a blocking F_OFD_SETLKW (no gate, no certd), then let go. Prints
#: "waiting" before the wait and the seconds waited after it. With ``--repeat``: one such
#: attempt per line read on stdin (benchmarks: no process start per attempt).
PLAIN_UPDATER = """
import fcntl, os, sys, time
from certd.store import locks
def attempt():
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
    print("waiting", flush=True)
    t = time.monotonic()
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, locks.FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    print(f"{time.monotonic() - t:.6f}", flush=True)
    os.close(fd)
if sys.argv[2:] == ["--repeat"]:
    for _ in sys.stdin:
        attempt()
else:
    attempt()
"""


def plain_updater(blob: Path, repeat: bool = False) -> subprocess.Popen:
    """Start :data:`PLAIN_UPDATER` on ``blob``; returns once it is about to wait (with
    ``repeat``: at once, waiting for a line on its stdin per attempt)."""
    p = subprocess.Popen([sys.executable, "-c", PLAIN_UPDATER, str(blob)]
                         + (["--repeat"] if repeat else []),
                         stdin=subprocess.PIPE if repeat else None, stdout=subprocess.PIPE,
                         text=True)
    if not repeat:
        assert p.stdout.readline().strip() == "waiting"
    return p


def plain_updater_wait(p: subprocess.Popen, timeout: float) -> float:
    """Seconds a :func:`plain_updater` waited for its lock; raises TimeoutExpired if it is
    not in within ``timeout`` (then kill it by its pid)."""
    p.wait(timeout=timeout)
    # Not communicate(): it reads the pipe's fd and would lose what readline() buffered.
    out = p.stdout.read()
    assert p.returncode == 0, out
    return float(out.strip())


def build_loadgen(directory: Path) -> Path:
    """benchmarks/loadgen.c compiled into ``directory`` (as benchmarks/bench_server.py
    compiles it)."""
    benchmarks = str(Path(__file__).parent.parent / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    import bench_server
    return bench_server.compile_loadgen(directory)


def counters_when(socket_path: str, ok, timeout: float = 20.0) -> dict:
    """Bounded wait until ``ok(counters)`` holds for the daemon's STATUS counters (load
    progress: nothing signals it)."""
    end = time.monotonic() + timeout
    while True:
        c = status_of(socket_path)["counters"]
        if ok(c):
            return c
        assert time.monotonic() < end, f"counters never got there: {c}"
        time.sleep(0.02)
