"""The chaos harness: a real daemon, VMM processes full of guests, updates and SIGKILLs.

:func:`run` sets up a simulated platform (:mod:`certd.sim.psp`), binds the listening
socket itself and starts the daemon on it as systemd socket activation does (fd 3,
``LISTEN_FDS``/``LISTEN_PID``), so that after a SIGKILL the restarted daemon serves the
same socket and clients only see a delay. VMM processes (:mod:`certd.sim.vmm`) host the
guests, on the socket face and on the file face (a stock QEMU reading the blob). One
thread runs the firmware updates one after another (some killed at a random moment),
another kills and restarts the daemon at random moments. Everything is bounded in time
and every process is stopped by its pid at the end.

The daemon is ``certd --config`` on the development trust (``[trust] roots``) with a
development KDS process (``python -m certd.devkds``) as its ``[kds]``, like ``certd --dev``
but with a PKI directory that every process shares.

The updater is a strategy (:data:`UPDATERS`): a function from the run's paths and the new
TCB to the argv of one update. :data:`DEFAULT_UPDATER` picks it.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from certd import devpki, platform as platformmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.sim import psp as pspmod
from certd.sim.guests import Counters
from certd.store import blobstore

PY = sys.executable
#: The updater strategy runs use (see :data:`UPDATERS`).
DEFAULT_UPDATER = "fw-update"
CERTCTL = str(Path(sys.executable).parent / "certctl")
CERTD = str(Path(sys.executable).parent / "certd")


@dataclass
class Params:
    """One run. Times in seconds unless the name says otherwise."""

    vms: int = 40
    updates: int = 5
    daemon_kills: int = 0
    updater_kills: int = 0
    #: Updates that also switch the signing key (VCEK -> VLEK, then back, ...). On the
    #: VLEK, after every update the CSP drops the VLEK for the new TCB into the drop
    #: directory (until then certd serves the empty table).
    vlek_drops: int = 0
    #: Share of VMs behind certd's socket (the rest read the blob like a stock QEMU).
    socket_share: float = 0.75
    #: Share of COCONUT SVSM guests (the rest are Linux guests), on both faces.
    svsm_share: float = 0.5
    vmm_processes: int = 4
    update_gap: float = 1.5
    settle: float = 1.0
    #: The daemon's request_deadline_ms, and the file-face VMMs' certs-timeout.
    request_deadline_ms: int = 1000
    lease_timeout_ms: int = 2000
    #: Linux guests' 2 s retry and 60 s budget are multiplied by this. Not much less: a
    #: certd restart takes real seconds here (0.3-3 s on a loaded 2-core machine), and a
    #: budget scaled below that would fail guests that a real 60 s budget carries through.
    time_scale: float = 0.25
    think_ms: tuple[float, float] = (300.0, 900.0)
    resume_delay_ms: float = 2.0
    #: How much longer the firmware command runs after it moved the TCB, lock held.
    hold_ms: float = 0.0
    updater: str = DEFAULT_UPDATER
    #: When killed updaters die: "random" (a random moment of their life) or
    #: "after-firmware" (once the firmware step is done, before the install).
    updater_kill_when: str = "random"
    updater_timeout: float = 30.0
    product: str = "Milan"
    seed: int | None = None
    max_run: float = 540.0
    directory: str | None = None
    keep: bool = False
    #: Extra environment for the daemon only (tests: CERTD_UNSAFE=... for certd alone).
    daemon_env: dict = field(default_factory=dict)


# --- the updater strategies --------------------------------------------------------------

@dataclass
class Paths:
    dir: Path
    pki: Path
    platform: Path
    blob: Path
    socket: Path
    config: Path


def firmware_command(paths: Paths, tcb: Tcb, p: Params, signing_key: str) -> list[str]:
    """The firmware step (``python -m certd.devfw``: the new TCB, and SNP_VLEK_LOAD or back
    when ``signing_key`` changes), then ``hold_ms`` more under the lock."""
    fw = [PY, "-m", "certd.devfw", str(paths.platform), "--snp", str(tcb.snp),
          "--signing-key", signing_key]
    if not p.hold_ms:
        return fw
    return ["sh", "-c", f'{shlex.join(fw)} && exec sleep {p.hold_ms / 1000:.3f}']


def fw_update(paths: Paths, tcb: Tcb, p: Params, signing_key: str) -> list[str]:
    """``certctl fw-update``: prefetch the VCEK (not for a VLEK: that one comes from the
    drop directory), lock, firmware step, install, release."""
    prefetch = ["--expect-tcb", str(tcb).replace(" ", ",")] if signing_key == "vcek" else []
    return [CERTCTL, "fw-update", "--config", str(paths.config), *prefetch, "--lock-timeout",
            str(p.updater_timeout), "--json", "--",
            *firmware_command(paths, tcb, p, signing_key)]


#: argv of one update to (new TCB, signing key "vcek" or "vlek").
UPDATERS: dict[str, Callable[[Paths, Tcb, Params, str], list[str]]] = {
    "fw-update": fw_update,
}


# --- processes ---------------------------------------------------------------------------

class Notify:
    """A fake NOTIFY_SOCKET (abstract datagram) to await the daemon's READY=1."""

    def __init__(self) -> None:
        self.name = f"certd-sim-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.address = "@" + self.name

    def wait_ready(self, proc: subprocess.Popen, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            self.sock.settimeout(min(0.2, max(end - time.monotonic(), 0.01)))
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return True
            except socket.timeout:
                continue
        return False

    def close(self) -> None:
        self.sock.close()


def psp_roots(paths: Paths) -> Path:
    return pspmod.roots_path(paths.pki)


def config_text(paths: Paths, p: Params, kds_url: str) -> str:
    return f"""\
# Written by the certd simulator (certd/sim/chaos.py).
[server]
socket = "{paths.socket}"
socket_mode = "0600"
request_deadline_ms = {p.request_deadline_ms}
lease_timeout_ms = {p.lease_timeout_ms}
rate_per_vm = 1000
rate_burst = 1000
max_connections = 8192
# One simulated VMM process stands for many QEMUs (one connection per VM).
max_connections_per_pid = 1024

[access]
allow_uids = [{os.getuid()}]

[store]
blob = "{paths.blob}"

[platform]
source = "file"
file = "{paths.platform}"

[trust]
roots = ["{psp_roots(paths)}"]

[watch]
drop_dir = "{paths.dir / 'drop'}"

[kds]
base_url = "{kds_url}"
cache_dir = "{paths.dir / 'kds-cache'}"
min_backoff_s = 0.2
max_backoff_s = 2.0

[log]
level = "info"
format = "json"
"""


class DaemonRunner:
    """Starts certd on the harness's listening socket (socket activation) and restarts it
    after a kill, as systemd's Restart=always would."""

    def __init__(self, paths: Paths, listener: socket.socket, log_path: Path,
                 env: dict | None = None):
        self.paths = paths
        self.env = env or {}
        # Not 3 (the child gets the socket as fd 3); bash redirects multi-digit fds.
        self.fd = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        self.log = open(log_path, "ab")
        self.notify = Notify()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        self.restart_ms: list[float] = []
        self.kill_times: list[float] = []
        self.lock = threading.Lock()

    def start(self, timeout: float = 60.0) -> bool:
        script = (f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=certd; '
                  f'exec "$0" "$@" 3<&{self.fd} {self.fd}<&-')
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", script, CERTD, "--config", str(self.paths.config)],
            pass_fds=(self.fd,), stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, "NOTIFY_SOCKET": self.notify.address})
        self.starts += 1
        return self.notify.wait_ready(self.proc, timeout)

    def kill_and_restart(self) -> None:
        with self.lock:
            assert self.proc is not None
            t0 = time.monotonic()
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1
            self.kill_times.append(time.time())
            ok = self.start()
            self.restart_ms.append((time.monotonic() - t0) * 1000 if ok else float("inf"))

    def stop(self) -> int | None:
        with self.lock:
            rc = None
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        rc = self.proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        rc = self.proc.wait()
                else:
                    rc = self.proc.returncode
            os.close(self.fd)
            self.notify.close()
            self.log.close()
            return rc


def _stop_pid(proc: subprocess.Popen, group: bool = False) -> None:
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
    proc.wait()


# --- the run -----------------------------------------------------------------------------

@dataclass
class UpdateRecord:
    n: int
    tcb: str
    killed_after_ms: float | None = None
    exit_code: int | None = None
    lock_wait_ms: float | None = None
    held_ms: float | None = None
    total_ms: float = 0.0
    #: After a kill: had the firmware step run (the PSP signs with the new key)?
    after_firmware: bool | None = None
    #: ... and was the old blob still at the path when the harness looked, just after?
    stale: bool | None = None
    #: Where fw-update got the certificate (cache, kds, ...; None: not reported).
    source: str | None = None
    #: The firmware command's own time within the exclusive section.
    cmd_ms: float | None = None
    #: The signing key after the update, and whether the CSP dropped a VLEK after it.
    signing_key: str = "vcek"
    dropped: bool = False


@dataclass
class RunResult:
    counters: Counters
    by_kind: dict[str, dict]
    by_face: dict[str, dict]
    updates: list[UpdateRecord] = field(default_factory=list)
    daemon_kills: int = 0
    daemon_restart_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    aborted: str | None = None
    params: dict = field(default_factory=dict)
    directory: str | None = None
    daemon_log_tail: list[str] = field(default_factory=list)


def start_kds(paths: Paths, product: Product, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The development KDS process on 127.0.0.1 (it creates the PKI directory)."""
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen([PY, "-m", "certd.devkds", "--port", "0", "--pki-dir",
                                 str(paths.pki), "--product", product.value],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                text=True)
    finally:
        log.close()
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        _stop_pid(proc)
        raise RuntimeError(f"the development KDS did not start (see {log_path})")
    return proc, url


def setup(directory: Path, product: Product, p: Params, kds_url: str) -> Paths:
    """Platform file, installed blob and configuration, on the PKI the KDS created."""
    paths = paths_in(directory)
    platformmod.save(devpki.make_platform(product), paths.platform)
    psp = pspmod.SharedPsp.open(paths.pki, paths.platform)
    blobstore.BlobStore(paths.blob, psp.validator()).install(psp.valid_blob())
    (directory / "drop").mkdir(exist_ok=True)
    paths.config.write_text(config_text(paths, p, kds_url))
    return paths


def paths_in(directory: Path) -> Paths:
    return Paths(directory, directory / "pki", directory / "platform.toml",
                 directory / "certs.blob", directory / "certd.sock", directory / "certd.toml")


def drop_vlek(paths: Paths, n: int) -> bool:
    """The CSP's part of a VLEK platform: the VLEK for the reported TCB as it is now,
    written to a temp name and renamed into the drop directory. False on a VCEK platform."""
    psp = pspmod.SharedPsp.open(paths.pki, paths.platform)
    if not psp.platform.vlek:
        return False
    tmp = paths.dir / "drop" / f".vlek-{n}.tmp"
    tmp.write_bytes(psp.leaf.public_bytes(devpki.PEM))
    os.rename(tmp, paths.dir / "drop" / f"vlek-{n}.pem")
    return True


def _last_json(out: str) -> dict:
    """The JSON object an updater printed last (its command's own output comes first)."""
    lines = out.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return {}


def _wait_for_tcb(platform_path: Path, tcb: Tcb, proc: subprocess.Popen,
                  timeout: float) -> float:
    """Poll (2 ms) until the platform file reports ``tcb`` (the updater's firmware step is
    done) or the updater exits; returns 0, to kill at once."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if platformmod.load(platform_path).reported_tcb == tcb:
                break
        except platformmod.PlatformError:
            pass
        time.sleep(0.002)
    return 0.0


def _vm_plan(p: Params) -> list[dict]:
    """VMM process specs: socket-face and file-face processes, VMs spread over them."""
    n_socket = round(p.vms * p.socket_share)

    def kind(j: int) -> str:  # svsm_share of each face's VMs, spread evenly
        return "svsm" if int((j + 1) * p.svsm_share) > int(j * p.svsm_share) else "linux"

    kinds = [kind(i) for i in range(n_socket)] + [kind(j) for j in range(p.vms - n_socket)]
    procs_socket = max(1, round(p.vmm_processes * p.socket_share)) if n_socket else 0
    procs_file = max(1, p.vmm_processes - procs_socket) if p.vms - n_socket else 0
    specs = [{"face": "socket", "vms": []} for _ in range(procs_socket)] + \
            [{"face": "file", "vms": []} for _ in range(procs_file)]
    for i in range(p.vms):
        face = "socket" if i < n_socket else "file"
        group = [s for s in specs if s["face"] == face]
        group[i % len(group)]["vms"].append([f"vm-{i:04d}-{face}-{kinds[i]}", kinds[i]])
    return [s for s in specs if s["vms"]]


def run(p: Params, log: Callable[[str], None] = lambda s: None) -> RunResult:
    """One bounded chaos run; every process it starts is stopped before it returns."""
    rng = random.Random(p.seed)
    product = Product.parse(p.product)
    t_start = time.monotonic()
    directory = Path(p.directory) if p.directory else Path(tempfile.mkdtemp(prefix="certd-sim-"))
    directory.mkdir(parents=True, exist_ok=True)
    kds, kds_url = start_kds(paths_in(directory), product, directory / "kds.log")
    try:
        paths = setup(directory, product, p, kds_url)
    except BaseException:
        _stop_pid(kds)
        raise
    make_argv = UPDATERS[p.updater]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(paths.socket))
    paths.socket.chmod(0o600)
    listener.listen(4096)
    daemon = DaemonRunner(paths, listener, directory / "certd.log", p.daemon_env)
    vmms: list[tuple[subprocess.Popen, dict]] = []
    updaters: list[subprocess.Popen] = []
    result = RunResult(Counters(), {}, {}, params=asdict(p), directory=str(directory))
    stop_chaos = threading.Event()
    kinds: dict[str, Counters] = {}
    faces: dict[str, Counters] = {}
    hard_end = t_start + p.max_run
    try:
        if not daemon.start():
            raise RuntimeError(f"certd did not become ready; log: {directory / 'certd.log'}")
        common = {"socket": str(paths.socket), "blob": str(paths.blob), "pki": str(paths.pki),
                  "platform": str(paths.platform), "time_scale": p.time_scale,
                  "think_ms": list(p.think_ms), "resume_delay_ms": p.resume_delay_ms,
                  "certs_timeout_ms": p.request_deadline_ms}
        for i, spec in enumerate(_vm_plan(p)):
            spec_path = directory / f"vmm-{i}.json"
            spec_path.write_text(json.dumps({**common, **spec}))
            proc = subprocess.Popen([PY, "-m", "certd.sim.vmm", str(spec_path)],
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            vmms.append((proc, spec))
        for proc, spec in vmms:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"VMM process {proc.pid} did not start: {line!r}")
        log(f"{p.vms} VMs in {len(vmms)} VMM processes; certd pid {daemon.proc.pid}")
        time.sleep(p.settle)

        # Updater kills: a random moment of a random update's life (never the last update,
        # so the run ends on a completed one). An updater that finished before its kill
        # moment passes the kill on to the next update.
        killable = max(p.updates - 1, 0)
        pending_kills = [min(p.updater_kills, killable)]
        planned = set(rng.sample(range(killable), pending_kills[0]))
        span = p.updates * (p.update_gap + 0.5)  # about how long the updates take
        kill_times = sorted(rng.uniform(0, max(span, 1.0)) for _ in range(p.daemon_kills))
        typical_ms = [1000.0]
        switches = {round((j + 1) * p.updates / (p.vlek_drops + 1)) for j in range(p.vlek_drops)}

        def updates() -> None:
            for n in range(p.updates):
                if stop_chaos.is_set() or time.monotonic() > hard_end:
                    return
                before = platformmod.load(paths.platform)
                current = before.reported_tcb
                new = pspmod.next_tcb(current)
                key = before.signing_key
                if n in switches:
                    key = "vcek" if key == "vlek" else "vlek"
                rec = UpdateRecord(n, str(new), signing_key=key)
                t0 = time.monotonic()
                proc = subprocess.Popen(make_argv(paths, new, p, key), stdout=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True,
                                        start_new_session=True)
                updaters.append(proc)
                kill = pending_kills[0] > 0 and n < killable and (
                    n in planned or killable - n <= pending_kills[0])
                if kill:
                    if p.updater_kill_when == "after-firmware":
                        delay = _wait_for_tcb(paths.platform, new, proc, p.updater_timeout)
                    else:
                        delay = rng.uniform(0, 0.9 * typical_ms[0]) / 1000
                    try:
                        proc.wait(timeout=delay)
                        planned.add(n + 1)  # finished first: kill the next one instead
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        rec.killed_after_ms = (time.monotonic() - t0) * 1000
                        pending_kills[0] -= 1
                    proc.wait()
                    out = proc.stdout.read()
                    after = platformmod.load(paths.platform).reported_tcb
                    blob_tcb = pspmod.leaf_tcb(paths.blob.read_bytes(), product)
                    rec.after_firmware = rec.killed_after_ms is not None and after == new
                    rec.stale = blob_tcb is not None and blob_tcb != after
                    if rec.stale:
                        log(f"update {n}: updater killed after {rec.killed_after_ms:.0f} ms, "
                            f"after the firmware step ({after}) and before the install "
                            f"(blob for {blob_tcb}): a stale blob")
                else:
                    try:
                        out, _ = proc.communicate(timeout=p.updater_timeout + 30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        out, _ = proc.communicate()
                rec.exit_code = proc.returncode
                rec.total_ms = (time.monotonic() - t0) * 1000
                proc.stdout.close()
                info = _last_json(out)
                if "exclusive_s" in info:
                    rec.lock_wait_ms = 1000 * info["lock_wait_s"]
                    rec.held_ms = 1000 * info["exclusive_s"]
                    rec.source = info.get("source")
                    rec.cmd_ms = 1000 * info.get("cmd_s", 0.0)
                    if rec.exit_code == 0:  # the shortest life seen: kills land within it
                        typical_ms[0] = min(typical_ms[0], rec.total_ms)
                rec.dropped = drop_vlek(paths, n)
                result.updates.append(rec)
                stop_chaos.wait(p.update_gap * rng.uniform(0.5, 1.5))

        def daemon_chaos() -> None:
            t0 = time.monotonic()
            for t in kill_times:
                if stop_chaos.wait(max(t0 + t - time.monotonic(), 0)):
                    return
                daemon.kill_and_restart()
                log(f"certd SIGKILLed and restarted in {daemon.restart_ms[-1]:.0f} ms")

        threads = [threading.Thread(target=updates, daemon=True),
                   threading.Thread(target=daemon_chaos, daemon=True)]
        for t in threads:
            t.start()
        threads[0].join(max(hard_end - time.monotonic(), 0))
        # Every daemon kill asked for happens, even when the updates finish early.
        threads[1].join(max(hard_end - time.monotonic(), 0))
        stop_chaos.set()
        threads[1].join(max(hard_end - time.monotonic(), 0))
        if any(t.is_alive() for t in threads):
            result.aborted = f"the run exceeded max_run = {p.max_run} s"
        time.sleep(p.settle)
        for proc, spec in vmms:
            proc.send_signal(signal.SIGTERM)
        for proc, spec in vmms:
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                result.aborted = result.aborted or f"VMM process {proc.pid} did not stop"
                continue
            data = json.loads(out.strip().splitlines()[-1])
            for kind, c in data["by_kind"].items():
                result.counters.add(c)
                kinds.setdefault(kind, Counters()).add(c)
                faces.setdefault(data["face"], Counters()).add(c)
        result.by_kind = {k: c.as_dict() for k, c in kinds.items()}
        result.by_face = {k: c.as_dict() for k, c in faces.items()}
    finally:
        stop_chaos.set()
        for proc, _ in vmms:
            _stop_pid(proc)
            if proc.stdout:
                proc.stdout.close()
        for proc in updaters:
            _stop_pid(proc, group=True)
        rc = daemon.stop()
        listener.close()
        kds.terminate()
        _stop_pid(kds)
        if kds.stdout:
            kds.stdout.close()
        result.daemon_kills = daemon.kills
        result.params["kill_times"] = daemon.kill_times
        result.daemon_restart_ms = [round(x, 1) for x in daemon.restart_ms]
        result.duration_s = round(time.monotonic() - t_start, 2)
        try:
            result.daemon_log_tail = (directory / "certd.log").read_text().splitlines()[-5:]
        except OSError:
            pass
        if rc not in (0, None) and not result.aborted:
            result.aborted = f"certd exited with {rc} at the end of the run"
        if not p.keep and not p.directory:
            shutil.rmtree(directory, ignore_errors=True)
            result.directory = None
    return result
