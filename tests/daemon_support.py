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
