"""The C integration kit (contrib/certd-client.h + .c, vmm-example.c, certd-client-cli.c)
built with -Wall -Wextra -Werror and run against a REAL certd (tests/daemon_support.py)
serving the real milan_gcp blob.

vmm-example plays the VMM side of KVM_EXIT_SNP_REQ_CERTS: the guest offers 1 page, gets
ENOSPC with the exact page count, retries, and gets the table copied into its buffer; the
lease is held while "the report is signed" and released at the -EINTR. Its -W pauses let
the test look at the daemon at those two moments (events on stdout, no sleeps).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from certd import client as clientmod, exitcodes
from certd.abi import table
from tests.daemon_support import make_daemon
from test_c_client import CONTRIB, SOURCES, compile_c

PAGE = 4096


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("kit")
    lib = CONTRIB / "certd-client.c"
    return {"vmm": compile_c(d / "vmm-example", CONTRIB / "vmm-example.c", lib),
            "cli": compile_c(d / "certd-client", *SOURCES)}


@pytest.fixture
def daemon(tmp_path):
    d = make_daemon(tmp_path / "d").start()
    try:
        yield d
    finally:
        assert d.stop() == 0


def leases(d) -> int:
    with clientmod.Client(d.socket) as c:
        return c.status()["leases"]


class Vmm:
    """vmm-example -W, read line by line; every wait is bounded by the read timeout."""

    def __init__(self, exe: str, *args: str):
        self.proc = subprocess.Popen([exe, "-W", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def until(self, needle: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"vmm-example ended before {needle!r}: {self.lines}"
            self.lines.append(line.rstrip("\n"))
            if needle in line:
                return line

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        out, err = self.proc.communicate(timeout=30)
        self.lines += out.splitlines()
        self.stderr = err
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def vmm_runs():
    runs: list[Vmm] = []
    yield runs
    for v in runs:
        v.kill()


def test_vmm_flow_against_a_real_daemon(kit, daemon, tmp_path, vmm_runs):
    blob = daemon.blob.read_bytes()
    need = -(-len(blob) // PAGE)
    assert need == 2  # precondition: the guest's first offer (1 page) is too small
    out = tmp_path / "guest.bin"
    v = Vmm(kit["vmm"], "-s", daemon.socket, "-g", "1", "-o", str(out), "vm-kit")
    vmm_runs.append(v)
    v.until("paused: report signing")
    assert leases(daemon) == 1  # certd holds the blob's lock while the report is signed
    v.go()
    v.until("paused: before disconnect")
    assert leases(daemon) == 0  # released by RELEASE, with the connection still open
    v.go()
    assert v.finish() == 0, (v.lines, v.stderr)
    text = "\n".join(v.lines)
    assert "exit 1: KVM_EXIT_SNP_REQ_CERTS vm=vm-kit gpa=0x100000 npages=1" in text
    assert f"certd: ret=28 (ENOSPC) npages={need} generation=1 lease=0 table_len=0" in text
    assert f"guest: ret=28 (ENOSPC), retries with {need} page(s)" in text
    assert f"certd: ret=0 (OK) npages={need} generation=1 lease=" in text
    assert f"table_len={len(blob)}" in text
    assert "-> released" in text and "guest: ret=0 (OK)" in text
    guest = out.read_bytes()
    assert len(guest) == need * PAGE
    assert guest[:len(blob)] == blob and not any(guest[len(blob):])
    with clientmod.Client(daemon.socket) as c:
        counters = c.status()["counters"]
    assert (counters["enospc"], counters["served"], counters["releases"]) == (1, 1, 1)


def test_negative_control_without_release_the_lease_stays(kit, daemon, vmm_runs):
    """-R skips RELEASE: at the same point the lease is still live, so the 0 above is the
    RELEASE's doing; closing the connection then ends it."""
    v = Vmm(kit["vmm"], "-R", "-s", daemon.socket, "-g", "2", "vm-kit")
    vmm_runs.append(v)
    v.until("paused: report signing")
    v.go()
    v.until("paused: before disconnect")
    assert leases(daemon) == 1
    v.go()
    assert v.finish() == 0
    assert "NOT releasing lease" in "\n".join(v.lines)
    assert leases(daemon) == 0


def test_unreachable_certd_answers_the_guest_eagain(kit, tmp_path):
    r = subprocess.run([kit["vmm"], "-s", str(tmp_path / "none.sock"), "-r", "1", "-d", "1",
                        "vm-kit"], capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.BUSY, r.stdout
    assert r.stdout.count("answering the guest EAGAIN") == 2  # both exits, reconnect tried
    assert "guest: ret=11 (EAGAIN)" in r.stdout and "ret=5" not in r.stdout


def test_unconfigured_host_gives_the_empty_table(kit, tmp_path, vmm_runs):
    d = make_daemon(tmp_path / "d", blob=None).start()
    try:
        out = tmp_path / "guest.bin"
        v = Vmm(kit["vmm"], "-s", d.socket, "-g", "1", "-o", str(out), "vm-kit")
        vmm_runs.append(v)
        v.until("paused: report signing")
        v.go()
        v.until("paused: before disconnect")
        v.go()
        assert v.finish() == 0
        assert "lease=0 table_len=24" in "\n".join(v.lines)
        assert out.read_bytes()[:24] == table.EMPTY_TABLE
    finally:
        assert d.stop() == 0


def test_cli_against_a_real_daemon(kit, daemon, tmp_path):
    out = tmp_path / "t.bin"
    r = subprocess.run([kit["cli"], "-s", daemon.socket, "get", "vm-cli", "-o", str(out),
                        "-H", "50"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == daemon.blob.read_bytes()
    assert "release=released" in r.stdout
    r = subprocess.run([kit["cli"], "-s", daemon.socket, "status"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pid"] == daemon.proc.pid and doc["leases"] == 0
    r = subprocess.run([kit["cli"], "-s", daemon.socket, "get", "vm-cli", "-n", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.NOSPACE and "ret=28 (ENOSPC) npages=2" in r.stdout


# ---- contrib/hooks: firmware-update wrappers around certctl fw-update ------------------

HOOKS = CONTRIB / "hooks"


@pytest.fixture
def fake_tools(tmp_path):
    """A certctl that records its argv (one line per argument) instead of updating."""
    log = tmp_path / "argv"
    certctl = tmp_path / "certctl"
    certctl.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    certctl.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "CERTCTL": str(certctl), "CERTD_CONFIG": "/etc/c.toml",
           "FW_UPDATE_TIMEOUT": "45"}
    return env, log


@pytest.mark.parametrize("hook, args, expected", [
    ("snphost-config-set.sh", ["4", "0", "29", "222"],
     ["--expect-tcb", "bl=4,tee=0,snp=29,ucode=222", "--timeout", "45",
      "--", "snphost", "config", "set", "4", "0", "29", "222", "0"]),
    ("snphost-config-set.sh", ["1", "0", "2", "3", "4"],
     ["--expect-tcb", "bl=1,tee=0,snp=2,ucode=3,fmc=4", "--timeout", "45",
      "--", "snphost", "config", "set", "1", "0", "2", "3", "0", "4"]),
    ("snphost-config-reset.sh", [], ["--timeout", "45", "--", "snphost", "config", "reset"]),
    ("snphost-commit.sh", [], ["--timeout", "45", "--", "snphost", "commit"]),
])
def test_hooks_run_certctl_fw_update_in_its_documented_form(fake_tools, hook, args, expected):
    env, log = fake_tools
    r = subprocess.run([str(HOOKS / hook), *args], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["fw-update", "--config", "/etc/c.toml", *expected]


@pytest.mark.parametrize("hook, args", [
    ("snphost-config-set.sh", []), ("snphost-config-set.sh", ["4", "0", "29"]),
    ("snphost-config-set.sh", ["4", "0", "29", "x"]),
    ("snphost-config-set.sh", ["4", "0", "29", "256"]),
    ("snphost-config-set.sh", ["4", "0", "29", "-1"]),
    ("snphost-config-reset.sh", ["extra"]), ("snphost-commit.sh", ["extra"]),
])
def test_hooks_refuse_bad_arguments_before_running_anything(fake_tools, hook, args):
    env, log = fake_tools
    r = subprocess.run([str(HOOKS / hook), *args], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == exitcodes.USAGE and "usage:" in r.stderr
    assert not log.exists()
