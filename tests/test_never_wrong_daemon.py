"""Never wrong at every boundary (issue 7), against real certd processes.

Each invariant test has its negative control: the same scenario with the protection
switched off in the daemon process (``CERTD_UNSAFE=<name>``, certd/faults.py) must serve
what the invariant forbids, and the control asserts that it does.

Where only an epoch, inode or content check could save the day, the hold's maximum age is
set far beyond the test's length (``hold_max_age_ms = 60000``): otherwise a hold retired
by age would hide the missing check.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from certd import client as clientmod, devpki, platform as platformmod, policy
from certd.abi import table, wire
from certd.amd import roots
from certd.abi.tcb import Tcb
from tests.daemon_support import (BIN, NO_RATE_LIMIT, VECTORS, DaemonProc, OverlappingLeases,
                                  make_daemon, make_dev_daemon, make_vector_daemon,
                                  dev_vcek_blob, dev_vlek_blob, reload, status_of, stopped,
                                  vector_platform, with_server_keys)
from tests.vector_pairs import VLEK_AT

#: No hold retires by age within a test: only the check under test can stop a stale hold.
NO_AGE = {"hold_max_age_ms": 60000}


def gets(socket_path: str, n: int = 5, vm: str = "vm-new") -> list[clientmod.GetResult]:
    """``n`` new GETs on a fresh connection (one VM id each: a VM holds few leases); each
    lease is released only after the last GET is answered (so they overlap the live hold)."""
    out = []
    with clientmod.Client(socket_path) as c:
        for i in range(n):
            out.append(c.get(f"{vm}-{i}", 4))
        for r in out:
            if r.lease_id:
                c.release(r.lease_id)
    return out


# --- item 2: a platform change reaches the very next lease -------------------------------

def other_tcb(p: platformmod.Platform) -> platformmod.Platform:
    t = p.reported_tcb
    return p.replace(reported_tcb=Tcb(bl=t.bl, tee=t.tee, snp=t.snp + 1, ucode=t.ucode),
                     current_tcb=None)


def platform_change_by_sighup(d: DaemonProc) -> tuple[float, float]:
    """Point the configuration at a NEW platform file (so neither inotify nor the look at
    every new hold sees it: only the reload does) whose TCB no longer fits the blob, SIGHUP;
    returns the times just before the SIGHUP and when READY=1 was received."""
    new = d.dir / "platform-after.toml"
    platformmod.save(other_tcb(platformmod.load(d.dir / "platform.toml")), new)
    text = d.config_path.read_text().replace(str(d.dir / "platform.toml"), str(new))
    assert str(new) in text
    d.config_path.write_text(text)
    sighup = time.monotonic()
    assert "reloaded" in reload(d)
    return sighup, time.monotonic()


def overlapping(d: DaemonProc, busy: OverlappingLeases, old: bytes) -> None:
    """Precondition: the leasing clients are at it, served ``old``, with a lease live."""
    busy.wait_count(20)
    assert all(r[3] == old and r[2] for r in busy.results), "the old blob was not served"
    st = status_of(d.socket)
    assert st["profiles"][0]["state"] == "serving" and st["leases"] >= 1, st


def start_busy_daemon(tmp_path: Path, unsafe: str, server: dict) -> tuple[DaemonProc, bytes]:
    d = make_daemon(tmp_path / "d", lease_timeout_ms=20000)
    d.config_text = with_server_keys(d.config_text, **NO_RATE_LIMIT, **server)
    d.start(extra_env={"CERTD_UNSAFE": unsafe} if unsafe else None)
    return d, d.blob.read_bytes()


@pytest.mark.parametrize("server", [{}, NO_AGE], ids=["default-age", "no-age"])
def test_sighup_platform_change_reaches_the_next_lease(tmp_path, server):
    d, old = start_busy_daemon(tmp_path, "", server)
    try:
        with OverlappingLeases(d.socket) as busy:
            overlapping(d, busy, old)
            sighup, ready = platform_change_by_sighup(d)
            after = gets(d.socket)
            st = status_of(d.socket)
        assert [(r.ret, r.lease_id, r.table) for r in after] == [(0, 0, table.EMPTY_TABLE)] * 5
        prof = st["profiles"][0]
        assert prof["state"] == "invalid", prof
        assert any(p.startswith("tcb") for p in prof["problems"]), prof
        late = busy.since(ready)
        assert late and all(r[3] == table.EMPTY_TABLE and r[2] == 0 for r in late)
        early = busy.before(sighup)
        # Sent before the reload: the old blob; or EAGAIN when an aged hold drained (these
        # clients keep leases overlapping, so a drain waits out one GET's deadline); or
        # the empty table for a GET in flight at the SIGHUP, answered after the reload.
        assert early and all(r[3] in (old, table.EMPTY_TABLE) or
                             (r[1] == wire.EAGAIN and not r[2]) for r in early)
        assert sum(r[3] == old for r in early) >= 20
        print(f"platform change by SIGHUP, hold_max_age_ms "
              f"{server.get('hold_max_age_ms', 100)}: {len(early)} overlapping GETs served "
              f"the old blob, then {len(late)} sent after READY: all the empty table")
    finally:
        stopped(d)


@pytest.mark.parametrize("unsafe,server", [("hold-epoch", NO_AGE),
                                           ("hold-epoch,hold-age", {})],
                         ids=["hold-epoch", "hold-epoch+hold-age"])
def test_control_sighup_platform_change_without_the_epoch_check_serves_stale(
        tmp_path, unsafe, server):
    d, old = start_busy_daemon(tmp_path, unsafe, server)
    try:
        with OverlappingLeases(d.socket) as busy:
            overlapping(d, busy, old)
            _, ready = platform_change_by_sighup(d)
            after = gets(d.socket)
        # The protection off: the hold validated under the old platform keeps taking leases.
        assert all(r.ret == 0 and r.lease_id and r.table == old for r in after), after
        assert all(r[3] == old for r in busy.since(ready))
    finally:
        stopped(d)


def platform_change_in_place(d: DaemonProc) -> None:
    """Rewrite the platform file at its path (as a firmware update makes /dev/sev say
    something new): the daemon sees it by inotify and says so in a STATUS notification."""
    pf = d.dir / "platform.toml"
    platformmod.save(other_tcb(platformmod.load(pf)), pf)
    d.notify.wait_for("STATUS=")


def test_platform_file_change_reaches_the_next_lease(tmp_path):
    d, old = start_busy_daemon(tmp_path, "", NO_AGE)
    try:
        with OverlappingLeases(d.socket) as busy:
            overlapping(d, busy, old)
            platform_change_in_place(d)
            seen = time.monotonic()
            after = gets(d.socket)
            st = status_of(d.socket)["profiles"][0]
        assert [r.table for r in after] == [table.EMPTY_TABLE] * 5
        assert st["state"] == "invalid"
        assert all(r[3] == table.EMPTY_TABLE for r in busy.since(seen))
    finally:
        log = stopped(d)
    assert "platform identity changed" in log


def test_control_platform_file_change_without_the_epoch_check_serves_stale(tmp_path):
    d, old = start_busy_daemon(tmp_path, "hold-epoch", NO_AGE)
    try:
        with OverlappingLeases(d.socket) as busy:
            overlapping(d, busy, old)
            platform_change_in_place(d)
            after = gets(d.socket)
        assert all(r.table == old for r in after)
    finally:
        log = stopped(d)
    assert "platform identity changed" in log


# --- item 3: the daemon checks exactly what certctl verify checks ------------------------

def vlek_profile(d: DaemonProc, blob_path: Path) -> None:
    """A per-VM profile serving ``blob_path`` to VMs ``vm-vlek-*`` (the default profile
    keeps the blob path of ``d``)."""
    d.config_text += (f'\n[[profile]]\nname = "vlek"\nblob = "{blob_path}"\n'
                      f'vms = ["vm-vlek-*"]\n')


def certctl_verify(blob: Path, platform_file: Path, *extra: str) -> tuple[int, list[str]]:
    p = subprocess.run([str(BIN / "certctl"), "verify", str(blob), "--platform",
                        str(platform_file), "--json", *extra],
                       capture_output=True, text=True, timeout=60)
    doc = json.loads(p.stdout)
    assert doc["exit_code"] == p.returncode, (p.stdout, p.stderr)
    return p.returncode, [f"{x['check']}: {x['message']}" for x in doc["problems"]]


def timeless(problems: list[str]) -> list[str]:
    """Problems without the "(checked at <now>)" a validity message carries, sorted."""
    return sorted(re.sub(r" \(checked at [^)]*\)", "", p) for p in problems)


def vlek_profile_status(d: DaemonProc) -> dict:
    return next(p for p in status_of(d.socket)["profiles"] if p["name"] == "vlek")


@pytest.mark.parametrize("signing_key", ["vcek", "vlek"])
def test_real_vlek_blob_is_judged_as_certctl_verify_judges_it(tmp_path, signing_key):
    """AMD's real VLEK (expired by now: VLEKs are 1-year certificates) in a per-VM profile:
    the daemon's problems are exactly certctl verify's, for the same platform file, and a
    platform signing with its VCEK adds the signing-key problem (the daemon no longer takes
    the signing key from the blob's leaf)."""
    asvk, ark = x509.load_pem_x509_certificates(
        (VECTORS / "milan_vlek_cert_chain.pem").read_bytes())
    leaf = (VECTORS / "milan_vlek.der").read_bytes()
    vlek_platform = vector_platform("milan_vlek_report.bin").replace(signing_key="vlek")
    blob = policy.build_blob(ark, asvk, leaf, trust=roots.pinned(), platform=vlek_platform,
                             at=VLEK_AT)  # precondition: valid back then on a VLEK platform
    d = make_vector_daemon(tmp_path / "d", vlek_platform.replace(signing_key=signing_key),
                           blob=None)
    vblob = d.dir / "vlek.blob"
    vblob.write_bytes(blob)
    vlek_profile(d, vblob)
    d.start()
    try:
        with clientmod.Client(d.socket) as c:
            r = c.get("vm-vlek-1", 4)
        assert (r.ret, r.lease_id, r.table) == (0, 0, table.EMPTY_TABLE)  # expired: never
        st = vlek_profile_status(d)
    finally:
        stopped(d)
    code, problems = certctl_verify(vblob, d.dir / "platform.toml")
    assert st["state"] == "invalid" and code != 0
    assert timeless(st["problems"]) == timeless(problems)
    checks = {p.split(":")[0] for p in problems}
    assert "validity" in checks
    assert ("signing_key" in checks) == (signing_key == "vcek"), problems
    # Back when the VLEK was valid, certctl agrees that only the signing key was wrong.
    code, then = certctl_verify(vblob, d.dir / "platform.toml", "--at", "2025-03-01")
    assert {p.split(":")[0] for p in then} == ({"signing_key"} if signing_key == "vcek"
                                               else set()), then


@pytest.fixture(scope="module")
def vlek_pki():
    return devpki.DevPki.generate(name="issue7-vlek")


@pytest.mark.parametrize("signing_key", ["vcek", "vlek"])
def test_vlek_blob_is_served_only_where_the_platform_signs_with_its_vlek(
        tmp_path, vlek_pki, signing_key):
    """A valid (development) VLEK blob in a per-VM profile: served exactly when the
    platform's signing key is the VLEK, and certctl verify says the same. signing_key
    "vlek" is the positive control: the blob is otherwise fine."""
    vlek_platform = devpki.make_platform(vlek=True)
    blob = dev_vlek_blob(vlek_pki, vlek_platform)
    platform = vlek_platform.replace(signing_key=signing_key)
    d = make_dev_daemon(tmp_path / "d", vlek_pki, platform, blob=dev_vcek_blob(
        vlek_pki, vlek_platform.replace(signing_key="vcek")))
    vblob = d.dir / "vlek.blob"
    vblob.write_bytes(blob)
    vlek_profile(d, vblob)
    d.start()
    try:
        with clientmod.Client(d.socket) as c:
            r = c.get("vm-vlek-1", 4)
            if r.lease_id:
                c.release(r.lease_id)
        st = vlek_profile_status(d)
    finally:
        stopped(d)
    code, problems = certctl_verify(vblob, d.dir / "platform.toml", "--roots",
                                    str(d.dir / "dev-roots.pem"))
    assert timeless(st["problems"]) == timeless(problems)
    if signing_key == "vlek":
        assert (r.ret, r.table) == (0, blob) and r.lease_id > 0
        assert st["state"] == "serving" and code == 0
    else:
        assert (r.ret, r.lease_id, r.table) == (0, 0, table.EMPTY_TABLE)
        assert st["state"] == "invalid" and code != 0
        assert [p.split(":")[0] for p in problems] == ["signing_key"], problems


# --- items 6 and 7: what is served equals what the path holds now ------------------------

@pytest.fixture(scope="module")
def pki():
    return devpki.DevPki.generate(name="issue7-files")


class LiveLease:
    """One lease held on its own connection for the whole block (so the hold stays)."""

    def __init__(self, socket_path: str):
        self.c = clientmod.Client(socket_path)

    def __enter__(self) -> clientmod.GetResult:
        self.c.connect()
        self.r = self.c.get("vm-holder", 4)
        assert self.r.ret == 0 and self.r.lease_id > 0, self.r
        return self.r

    def __exit__(self, *exc: object) -> None:
        self.c.close()


def two_blobs(pki: devpki.DevPki, platform: platformmod.Platform) -> tuple[bytes, bytes]:
    """Two different valid blobs of the same size for ``platform``."""
    a, b = dev_vcek_blob(pki, platform), dev_vcek_blob(pki, platform)
    assert a != b and len(a) == len(b)
    return a, b


def start_dev(tmp_path: Path, pki: devpki.DevPki, unsafe: str
              ) -> tuple[DaemonProc, bytes, bytes]:
    platform = devpki.make_platform()
    old, new = two_blobs(pki, platform)
    d = make_dev_daemon(tmp_path / "d", pki, platform, blob=old, lease_timeout_ms=20000)
    d.config_text = with_server_keys(d.config_text, **NO_AGE)
    d.start(extra_env={"CERTD_UNSAFE": unsafe} if unsafe else None)
    return d, old, new


def replace_behind_certds_back(d: DaemonProc, data: bytes) -> None:
    """``mv new.blob certs.blob``: no lock, no gate."""
    tmp = d.dir / "new.blob"
    tmp.write_bytes(data)
    before = d.blob.stat().st_ino
    os.rename(tmp, d.blob)
    assert d.blob.stat().st_ino != before


def test_blob_replaced_behind_certds_back_is_never_served_from_the_old_inode(tmp_path, pki):
    d, old, new = start_dev(tmp_path, pki, "")
    try:
        with LiveLease(d.socket) as held:
            assert held.table == old
            gen = status_of(d.socket)["profiles"][0]["generation"]
            replace_behind_certds_back(d, new)
            after = gets(d.socket)
            st = status_of(d.socket)["profiles"][0]
        assert [(r.ret, r.table) for r in after] == [(0, new)] * 5
        assert all(r.lease_id > 0 for r in after)
        assert st["state"] == "serving" and st["generation"] == gen + 1, st
        assert {r.generation for r in after} == {gen + 1}
    finally:
        stopped(d)


def test_control_replaced_blob_without_the_inode_check_serves_the_old_inode(tmp_path, pki):
    d, old, new = start_dev(tmp_path, pki, "inode-check")
    try:
        with LiveLease(d.socket):
            replace_behind_certds_back(d, new)
            after = gets(d.socket)
        assert [r.table for r in after] == [old] * 5
    finally:
        stopped(d)


def test_blob_deleted_behind_certds_back_is_never_served(tmp_path, pki):
    d, old, _ = start_dev(tmp_path, pki, "")
    try:
        with LiveLease(d.socket) as held:
            assert held.table == old
            d.blob.unlink()
            after = gets(d.socket)
            st = status_of(d.socket)["profiles"][0]
        assert [(r.ret, r.lease_id, r.table) for r in after] == [(0, 0, table.EMPTY_TABLE)] * 5
        assert st["state"] == "empty", st
    finally:
        stopped(d)


def test_control_deleted_blob_without_the_inode_check_is_still_served(tmp_path, pki):
    d, old, _ = start_dev(tmp_path, pki, "inode-check")
    try:
        with LiveLease(d.socket):
            d.blob.unlink()
            after = gets(d.socket)
        assert [r.table for r in after] == [old] * 5
    finally:
        stopped(d)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """``cp -p`` onto the existing file: same inode, same size, mtime put back."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = path.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert path.read_bytes() == data


def test_in_place_rewrite_with_mtime_kept_serves_what_the_file_holds_now(tmp_path, pki):
    d, old, new = start_dev(tmp_path, pki, "")
    try:
        with LiveLease(d.socket) as held:
            assert held.table == old
            rewrite_in_place(d.blob, new)
            after = gets(d.socket)
        assert [(r.ret, r.table) for r in after] == [(0, new)] * 5
    finally:
        stopped(d)


def test_control_in_place_rewrite_without_the_content_check_serves_old_bytes(tmp_path, pki):
    d, old, new = start_dev(tmp_path, pki, "content-check")
    try:
        with LiveLease(d.socket):
            rewrite_in_place(d.blob, new)
            after = gets(d.socket)
        assert [r.table for r in after] == [old] * 5
    finally:
        stopped(d)


def corrupt_vcek_signature(blob: bytes) -> bytes:
    """``blob`` with one byte flipped in the VCEK's signature (its DER's last byte)."""
    t = table.decode(blob)
    vcek = t.get(table.Role.VCEK).data
    at = blob.index(vcek) + len(vcek) - 1
    bad = blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]
    assert len(bad) == len(blob) and table.decode(bad).get(table.Role.VCEK).data != vcek
    return bad


@pytest.mark.parametrize("unsafe", ["", "content-check"], ids=["checked", "control"])
def test_in_place_corruption_of_the_real_blob_is_never_served(tmp_path, unsafe):
    """The real AMD blob, one byte of the VCEK's signature flipped in place (mtime kept):
    the file no longer validates, so the empty table; the control serves the old bytes."""
    d = make_daemon(tmp_path / "d", lease_timeout_ms=20000)
    d.config_text = with_server_keys(d.config_text, **NO_AGE)
    d.start(extra_env={"CERTD_UNSAFE": unsafe} if unsafe else None)
    old = d.blob.read_bytes()
    try:
        with LiveLease(d.socket) as held:
            assert held.table == old
            rewrite_in_place(d.blob, corrupt_vcek_signature(old))
            after = gets(d.socket)
            st = status_of(d.socket)["profiles"][0]
        if unsafe:
            assert [r.table for r in after] == [old] * 5
        else:
            assert [(r.ret, r.lease_id, r.table) for r in after] == \
                   [(0, 0, table.EMPTY_TABLE)] * 5
            assert st["state"] == "invalid", st
            assert any(p.startswith("chain") or p.startswith("signature")
                       for p in st["problems"]), st
    finally:
        stopped(d)


# --- item 15: the blob path exists whenever certd is ready -------------------------------

def test_no_blob_at_start_becomes_the_empty_table_before_ready(tmp_path):
    """With a strict umask (077) in the daemon, so the mode must be set on purpose."""
    d = make_daemon(tmp_path / "d", blob=None)
    vm_blob = d.dir / "vm.blob"
    d.config_text += f'\n[[profile]]\nname = "vms"\nblob = "{vm_blob}"\nvms = ["vm-p-*"]\n'
    assert not d.blob.exists() and not vm_blob.exists()  # precondition
    old = os.umask(0o077)
    try:
        d.start(wait=False)
    finally:
        os.umask(old)
    try:
        d.notify.wait_for("READY=1")
        # Nothing writes these files after READY: what is there now was there at READY.
        for path in (d.blob, vm_blob):
            st = path.stat()
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644, oct(st.st_mode)
            assert path.read_bytes() == table.EMPTY_TABLE and len(table.EMPTY_TABLE) == 24
        with clientmod.Client(d.socket) as c:
            for vm in ("vm-1", "vm-p-1"):
                r = c.get(vm, 1)
                assert (r.ret, r.lease_id, r.table) == (0, 0, table.EMPTY_TABLE)
            st = c.status()
        assert [p["state"] for p in st["profiles"]] == ["empty", "empty"]
    finally:
        log = stopped(d)
    assert log.count("no blob at start: wrote the empty table") == 2
