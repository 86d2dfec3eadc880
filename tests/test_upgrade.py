"""Upgrade and forced rotation under load (issue 10 item 4), as SPIRE tests its agent.

(a) The previous release (commit PREV, built from git into a cached venv) runs on a state
    directory and blob; clients request continuously through a socket the test binds and
    passes as fd 3 (LISTEN_FDS/LISTEN_PID, as systemd's socket activation does); the old
    daemon is stopped (SIGTERM) and this build started on the same socket and state. The
    clients see no error other than a reconnect: never a refused connect, an EIO or a
    wrong table. Negative control: the same swap without the passed socket leaves a gap.
(b) A forced rotation under load: ``certctl fw-update -- true`` and ``certctl rollback``
    while clients request: every table served passes ``certd.policy.check_blob`` against
    the platform, no EIO. Negative control: the same check catches a wrong table.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from certd import client as clientmod, platform as platformmod, policy
from certd.abi import table, wire
from certd.amd import roots
from daemon_support import (BIN, NO_RATE_LIMIT, listening_socket, make_daemon, start_daemon,
                            status_of, vector_platform, with_server_keys)

ROOT = Path(__file__).parent.parent
#: The previous release: the last commit before the issue-10 work.
PREV = "50cfccf"
PREV_VENV = Path(f"/var/cache/certd-prev-{PREV}")


@pytest.fixture(scope="module")
def prev_bin(tmp_path_factory) -> Path:
    """bin/ of a venv with the previous release installed (built once, then cached)."""
    certd = PREV_VENV / "bin" / "certd"
    done = PREV_VENV / ".certd-test-complete"  # written last: a killed build is not reused
    with open(f"{PREV_VENV}.lock", "w") as lock:  # two test runs do not build it at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build_prev(tmp_path_factory.mktemp("prev-src"))
        done.write_text(PREV + "\n")
    out = subprocess.run([str(certd), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "certd" in out.stdout
    return certd.parent


def _build_prev(src: Path) -> None:
    """The previous release from git (git archive, no worktree) into PREV_VENV."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PREV],
                             capture_output=True, timeout=120)
    if archive.returncode != 0:
        pytest.skip(f"commit {PREV} is not in this checkout: {archive.stderr.decode()}")
    tar = src / "prev.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(src / "tree", filter="data")
    shutil.rmtree(PREV_VENV, ignore_errors=True)
    # Built in place: a venv's scripts name its interpreter by absolute path.
    subprocess.run([sys.executable, "-m", "venv", str(PREV_VENV)], check=True, timeout=120)
    subprocess.run([str(PREV_VENV / "bin" / "pip"), "install", "-q", str(src / "tree")],
                   check=True, timeout=600, capture_output=True)


class Load:
    """Clients that GET and RELEASE continuously, each on its own connection, and classify
    every outcome: ``ok`` tables (kept for checking), ``reconnects`` (an established
    connection ended: SHUTTING_DOWN or EOF, and the next connect worked), ``gaps``
    (a connect failed: nothing was listening), ``eio``, ``eagain``, ``errors`` (anything
    else)."""

    def __init__(self, socket_path: str, n: int = 2):
        self.path = socket_path
        self.ok: list[tuple[float, bytes]] = []
        self.reconnects = 0
        self.gaps: list[str] = []
        self.eio = 0
        self.eagain = 0
        self.eagain_at: list[float] = []
        self.generations: set[int] = set()
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(f"vm-{i}",), daemon=True)
                        for i in range(n)]

    def _run(self, vm: str) -> None:
        c = clientmod.Client(self.path, timeout=30)
        try:
            while not self.stop_event.is_set():
                if c._sock is None:
                    try:
                        c.connect()
                    except clientmod.ClientError as e:
                        with self.cond:
                            self.gaps.append(str(e))
                            self.cond.notify_all()
                        time.sleep(0.01)  # nothing listens: a guest's retry pace
                        continue
                try:
                    r = c.get(vm, 4)
                    if r.lease_id:
                        c.release(r.lease_id)
                except clientmod.RequestTimeout as e:
                    with self.cond:
                        self.errors.append(f"timeout: {e}")
                    c.close()
                    continue
                except clientmod.Unavailable:
                    c.close()
                    with self.cond:
                        self.reconnects += 1
                    continue
                except clientmod.ClientError as e:
                    with self.cond:
                        self.errors.append(repr(e))
                    c.close()
                    continue
                with self.cond:
                    if r.ret == wire.RET_OK:
                        self.ok.append((time.monotonic(), r.table))
                        self.generations.add(r.generation)
                    elif r.ret == wire.EIO:
                        self.eio += 1
                    elif r.ret == wire.EAGAIN:
                        self.eagain += 1
                        self.eagain_at.append(time.monotonic())
                    else:
                        self.errors.append(f"ret {r.ret_name}")
                    self.cond.notify_all()
        except BaseException as e:  # reported by the test
            with self.cond:
                self.errors.append(f"client thread died: {e!r}")
                self.cond.notify_all()
        finally:
            c.close()

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(40)
            assert not t.is_alive(), "a load client did not stop"

    def wait(self, pred, timeout: float = 60.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self) or bool(self.errors), timeout):
                raise TimeoutError(f"load did not reach the state in {timeout} s: "
                                   f"{len(self.ok)} ok, {self.reconnects} reconnects, "
                                   f"{len(self.gaps)} gaps")
        assert not self.errors, self.errors

    def ok_since(self, t: float) -> int:
        return sum(1 for when, _ in self.ok if when > t)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise
    return proc.returncode


def stop_all(d, *procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None:
            stop(p)
    if d.notify is not None:
        d.notify.close()


def upgrade_daemon(tmp_path: Path):
    d = make_daemon(tmp_path / "state", lease_timeout_ms=2000)
    d.config_text = with_server_keys(d.config_text, **NO_RATE_LIMIT)
    return d


def test_prev_release_state_taken_over_without_a_gap(tmp_path, prev_bin):
    d = upgrade_daemon(tmp_path)
    blob = d.blob.read_bytes()
    plat = d.dir / "platform.toml"
    # The previous release's certctl leaves its state: the blob installed twice, so
    # BLOB.prev exists too.
    for _ in range(2):
        r = subprocess.run([str(prev_bin / "certctl"), "install", "--blob", str(d.blob),
                            "--platform", str(plat), str(d.blob)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert Path(f"{d.blob}.prev").exists()
    listener = listening_socket(d.socket)
    old = new = None
    try:
        old = start_daemon(d, prev_bin / "certd", listener)
        old_pid = old.pid
        assert status_of(d.socket)["pid"] == old_pid
        with Load(d.socket) as load:
            load.wait(lambda l: len(l.ok) >= 50)
            stopping = time.monotonic()
            assert stop(old) == 0
            swapped = time.monotonic()
            new = start_daemon(d, BIN / "certd", listener)
            ready = time.monotonic()
            assert new.pid != old_pid
            load.wait(lambda l: l.ok_since(swapped) >= 50)
            with load.cond:
                eagain_at_swap, reconnects_at_swap = load.eagain, load.reconnects
            # A rollback by this build on the state the previous release wrote.
            r = subprocess.run([str(BIN / "certctl"), "rollback", "--config",
                                str(d.config_path), "--platform", str(plat)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            after_rollback = time.monotonic()
            load.wait(lambda l: l.ok_since(after_rollback) >= 20)
        st = status_of(d.socket)
        assert st["pid"] == new.pid and st["profiles"][0]["state"] == "serving"
        print(f"\nEAGAIN: {sum(1 for t in load.eagain_at if t < stopping)} before the stop, "
              f"{sum(1 for t in load.eagain_at if stopping <= t < swapped)} while the old stopped, "
              f"{sum(1 for t in load.eagain_at if swapped <= t < ready)} while the new started, "
              f"{sum(1 for t in load.eagain_at if ready <= t)} after READY")
        print(f"\nupgrade: {len(load.ok)} tables, {reconnects_at_swap} reconnects and "
              f"{eagain_at_swap} EAGAIN across the swap, {load.eagain - eagain_at_swap} "
              f"EAGAIN during the rollback, {len(load.gaps)} gaps")
        assert load.errors == [] and load.eio == 0 and load.gaps == []
        # EAGAIN ("retry"; a Linux guest's driver retries a busy answer by itself) comes
        # only from the old daemon while it drains: nobody can serve the blob then. The new
        # one answers nothing but the table from its first request on.
        assert all(stopping <= t < swapped for t in load.eagain_at[:eagain_at_swap]), \
            "EAGAIN outside the old daemon's drain"
        assert all(t == blob for _, t in load.ok), "a table other than the blob was served"
        assert load.ok_since(swapped) >= 50
    finally:
        stop_all(d, old, new)
        listener.close()


def test_negative_control_swap_without_the_passed_socket_leaves_a_gap(tmp_path, prev_bin):
    d = upgrade_daemon(tmp_path)
    old = new = None
    try:
        old = start_daemon(d, prev_bin / "certd")  # binds the socket itself
        with Load(d.socket) as load:
            load.wait(lambda l: len(l.ok) >= 20)
            assert stop(old) == 0
            load.wait(lambda l: len(l.gaps) > 0)  # a guest's VMM finds nobody listening
            new = start_daemon(d, BIN / "certd")
            swapped = time.monotonic()
            load.wait(lambda l: l.ok_since(swapped) >= 20)
        assert load.gaps, "the swap without socket activation must show a gap"
    finally:
        stop_all(d, old, new)


def judge(blob: bytes, platform) -> list:
    return policy.check_blob(blob, trust=roots.pinned(), platform=platform)


def other_layout(blob: bytes) -> bytes:
    """The same certificates with their bytes laid out in reverse order: another valid
    blob of the same size for the same platform (AMD's roots pin one VCEK per chip)."""
    t = table.decode(blob)
    start = table.ENTRY_SIZE * (len(t.entries) + 1)
    offsets, data = {}, b""
    for i in reversed(range(len(t.entries))):
        offsets[i] = start + len(data)
        data += t.entries[i].data
    header = b"".join(table.ENTRY.pack(e.guid.bytes, offsets[i], len(e.data))
                      for i, e in enumerate(t.entries))
    return header + table.TERMINATOR + data


def test_forced_rotation_under_load(tmp_path):
    d = upgrade_daemon(tmp_path)
    platform = platformmod.load(d.dir / "platform.toml")
    assert platform == vector_platform()
    certctl = str(BIN / "certctl")
    copy = d.dir / "other-layout.blob"
    copy.write_bytes(other_layout(d.blob.read_bytes()))
    assert copy.read_bytes() != d.blob.read_bytes() and judge(copy.read_bytes(), platform) == []
    try:
        d.start()
        # One install first, so that there is a BLOB.prev to roll back to.
        r = subprocess.run([certctl, "install", "--config", str(d.config_path), "--platform",
                            str(d.dir / "platform.toml"), str(copy)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        with Load(d.socket, n=3) as load:
            load.wait(lambda l: len(l.ok) >= 30)
            rounds = []
            for i in range(3):
                t0 = time.monotonic()
                r = subprocess.run([certctl, "fw-update", "--config", str(d.config_path),
                                    "--json", "--", "true"],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
                out = json.loads(r.stdout)
                # A no-op CMD on a host without KDS keeps the blob that still fits.
                assert out["platform_changed"] is False and out["empty_table"] is False, out
                r = subprocess.run([certctl, "rollback", "--config", str(d.config_path),
                                    "--platform", str(d.dir / "platform.toml")],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
                load.wait(lambda l: l.ok_since(t0) >= 20)
                rounds.append(load.ok_since(t0))
        tables = {t for _, t in load.ok}
        assert len(tables) == 2 and len(load.generations) >= 4, "the blob was replaced under load"
        print(f"\nforced rotation: {len(load.ok)} tables ({len(tables)} distinct, "
              f"{len(load.generations)} generations), "
              f"{load.eagain} EAGAIN, {load.reconnects} reconnects, per round {rounds}")
        assert load.errors == [] and load.eio == 0 and load.gaps == []
        for t in tables:
            assert judge(t, platform) == [], f"served {len(t)} bytes failing the policy: {judge(t, platform)}"
        assert status_of(d.socket)["profiles"][0]["state"] == "serving"
    finally:
        assert d.stop() == 0


def test_negative_control_the_check_catches_a_wrong_table(tmp_path):
    """The invariant's check is not vacuous: the served blob against another platform,
    and the empty table, both fail it."""
    d = upgrade_daemon(tmp_path)
    platform = vector_platform()
    blob = d.blob.read_bytes()
    assert judge(blob, platform) == []
    moved = platform.replace(reported_tcb=dataclasses.replace(
        platform.reported_tcb, snp=platform.reported_tcb.snp + 1))
    assert judge(blob, moved) != []
    assert judge(table.EMPTY_TABLE, platform) != []
