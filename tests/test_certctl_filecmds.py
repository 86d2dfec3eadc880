"""certctl install / rollback / lock: exit codes, --json, messages, nesting, signals."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certd.abi import table
from certd.abi.table import Entry, Role
from certd import exitcodes
from certd.store import locks
from store_support import CERTCTL, certctl, certctl_runner, milan_platform, real_blob

VECTORS = pathlib.Path(__file__).parent / "vectors"


@pytest.fixture
def env(tmp_path):
    m1, m2 = tmp_path / "m1.blob", tmp_path / "m2.blob"
    m1.write_bytes(real_blob("milan", "milan_vcek.der"))
    m2.write_bytes(real_blob("milan", "milan_gcp_vcek.der"))
    return tmp_path, tmp_path / "certs.blob", m1, m2


def milan_platform_file(tmp_path, blob: bytes, **over) -> pathlib.Path:
    from certd.platform import save
    f = tmp_path / "platform.toml"
    save(milan_platform(blob, **over), f)
    return f


def test_install_first_then_replace_then_rollback(env):
    d, blob, m1, m2 = env
    r = certctl("install", "--blob", str(blob), str(m1), "--force")
    assert r.returncode == 0, r.stderr
    assert "first install" in r.stdout and "platform match skipped" in r.stdout
    r = certctl("install", "--blob", str(blob), str(m2), "--force", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["prev_path"] == str(blob) + ".prev"
    assert out["previous_sha256"] and out["locked_monotonic_ns"] <= out["released_monotonic_ns"]
    assert blob.read_bytes() == m2.read_bytes()
    r = certctl("rollback", "--blob", str(blob), "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert blob.read_bytes() == m1.read_bytes()
    assert pathlib.Path(str(blob) + ".prev").read_bytes() == m2.read_bytes()


def test_install_with_matching_platform(env):
    d, blob, m1, _ = env
    plat = milan_platform_file(d, m1.read_bytes())
    r = certctl("install", "--blob", str(blob), str(m1), "--platform", str(plat), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["checks"] == "policy"


def test_install_refusals_keep_the_blob(env):
    d, blob, m1, m2 = env
    assert certctl("install", "--blob", str(blob), str(m1), "--force").returncode == 0
    before = blob.read_bytes(), os.stat(blob).st_ino

    def refused(*args, code):
        r = certctl("install", "--blob", str(blob), *args, "--json")
        assert r.returncode == code, r.stdout + r.stderr
        assert (blob.read_bytes(), os.stat(blob).st_ino) == before
        out = json.loads(r.stdout)
        assert out["ok"] is False and out["exit_code"] == code
        return out

    junk = d / "junk"
    junk.write_bytes(b"not a blob at all, just text\n")
    out = refused(str(junk), "--force", code=exitcodes.DATAERR)
    assert out["problems"][0]["check"] == "format"
    trunc = d / "trunc"
    trunc.write_bytes(m1.read_bytes()[:-100])
    out = refused(str(trunc), "--force", code=exitcodes.DATAERR)
    assert "runs past the end" in out["error"]
    genoa = d / "genoa.blob"
    genoa.write_bytes(real_blob("genoa", "genoa_vcek.der"))
    plat = milan_platform_file(d, m1.read_bytes())
    out = refused(str(genoa), "--platform", str(plat), code=exitcodes.DATAERR)
    assert any(p["check"] == "product" for p in out["problems"]), out
    # another Milan chip's VCEK: wrong TCB/chip id; --force skips only that match
    out = refused(str(m2), "--platform", str(plat), code=exitcodes.DATAERR)
    assert {p["check"] for p in out["problems"]} & {"tcb", "chip_id"}, out
    out = refused(str(d / "missing"), "--force", code=exitcodes.NOINPUT)
    assert "does not exist" in out["error"]
    # --force never skips the chain check: an ASK/ARK of another product line
    ask, ark = x509.load_pem_x509_certificates((VECTORS / "genoa_cert_chain.pem").read_bytes())
    mixed = d / "mixed.blob"
    mixed.write_bytes(table.encode([Entry.of(Role.ARK, ark.public_bytes(Encoding.DER)),
                                    Entry.of(Role.ASK, ask.public_bytes(Encoding.DER)),
                                    Entry.of(Role.VCEK, (VECTORS / "milan_vcek.der").read_bytes())]))
    refused(str(mixed), "--force", code=exitcodes.DATAERR)


def test_install_needs_a_platform_or_force(env):
    d, blob, m1, _ = env
    if os.path.exists("/dev/sev"):
        pytest.skip("this host has /dev/sev")
    r = certctl("install", "--blob", str(blob), str(m1))
    assert r.returncode == exitcodes.UNAVAILABLE
    assert "--platform FILE, or --force" in r.stderr
    assert not blob.exists()


def test_install_missing_directory_and_busy(env):
    d, blob, m1, _ = env
    r = certctl("install", "--blob", str(d / "nodir" / "certs.blob"), str(m1), "--force")
    assert r.returncode == exitcodes.IOERR
    assert "does not exist" in r.stderr
    assert certctl("install", "--blob", str(blob), str(m1), "--force").returncode == 0
    with locks.acquire_shared_sync(blob, None):  # a VMM holding its lease
        r = certctl("install", "--blob", str(blob), str(m1), "--force", "--timeout", "0.2",
                    "--json")
    assert r.returncode == exitcodes.BUSY
    out = json.loads(r.stdout)
    assert out["busy"] == "blob" and "not obtained" in out["error"]


def test_rollback_without_prev(env):
    d, blob, m1, _ = env
    assert certctl("install", "--blob", str(blob), str(m1), "--force").returncode == 0
    r = certctl("rollback", "--blob", str(blob), "--force")
    assert r.returncode == exitcodes.NOINPUT and ".prev does not exist" in r.stderr


def test_lock_passes_exit_status_and_holds_the_lock(env):
    d, blob, m1, _ = env
    blob.write_bytes(m1.read_bytes())
    probe = (f"import sys; from certd.store import locks as L; "
             f"lk = L.BlobLock({str(blob)!r});\n"
             f"try: L.BlobLock({str(blob)!r}).acquire_shared_sync(None)\n"
             f"except L.LockBusy: sys.exit(7 if lk.updater_waiting() else 8)\n"
             f"sys.exit(9)")
    r = certctl("lock", "--blob", str(blob), "--exclusive", "--json", "--",
                sys.executable, "-c", probe)
    assert r.returncode == 7, r.stderr  # readers were shut out, and saw the updater waiting
    out = json.loads(r.stdout)
    assert out["exit_code"] == 7 and out["lock"] == "exclusive"
    # shared: other readers get in, updaters do not
    probe2 = (f"import sys; from certd.store import locks as L\n"
              f"L.BlobLock({str(blob)!r}).acquire_shared_sync(None).release()\n"
              f"try: L.BlobLock({str(blob)!r}).acquire_exclusive_sync(None)\n"
              f"except L.LockBusy: sys.exit(0)\n"
              f"sys.exit(1)")
    r = certctl("lock", "--blob", str(blob), "--shared", "--", sys.executable, "-c", probe2)
    assert r.returncode == 0, r.stderr
    assert certctl("lock", "--blob", str(blob), "--shared", "--", "false").returncode == 1
    assert certctl("lock", "--blob", str(blob), "--shared", "--", "no-such-cmd-xyz").returncode == 127
    r = certctl("lock", "--blob", str(blob), "--shared")
    assert r.returncode == exitcodes.USAGE


def test_lock_busy_does_not_run_the_command(env):
    d, blob, m1, _ = env
    blob.write_bytes(m1.read_bytes())
    marker = d / "ran"
    with locks.acquire_shared_sync(blob, None):
        t0 = time.monotonic()
        r = certctl("lock", "--blob", str(blob), "--exclusive", "--timeout", "0.3", "--",
                    "touch", str(marker))
        elapsed = time.monotonic() - t0
    assert r.returncode == exitcodes.BUSY
    assert not marker.exists()
    assert "not obtained after 0.3" in r.stderr
    assert elapsed < 10
    r = certctl("lock", "--blob", str(d / "absent"), "--shared", "--", "true")
    assert r.returncode == exitcodes.NOINPUT


def test_lock_forwards_sigterm(env):
    d, blob, m1, _ = env
    blob.write_bytes(m1.read_bytes())
    child_code = ("import signal, sys, time\n"
                  "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
                  "print('ready', flush=True)\n"
                  "time.sleep(30)\n")
    p = subprocess.Popen(CERTCTL + ["lock", "--blob", str(blob), "--exclusive", "--",
                                    sys.executable, "-c", child_code],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 42  # the command's own exit status, passed through
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    # killed by a signal -> 128+N
    r = certctl("lock", "--blob", str(blob), "--shared", "--", "sh", "-c", "kill -KILL $$")
    assert r.returncode == 128 + signal.SIGKILL
    assert not locks.updater_waiting(blob)


def test_hook_installs_under_its_own_exclusive_lock(env):
    """A firmware hook: 'certctl lock --exclusive -- sh -c "update; certctl install ..."'.
    The nested install reuses the held lock; readers stay out until the hook ends."""
    d, blob, m1, m2 = env
    assert certctl("install", "--blob", str(blob), str(m1), "--force").returncode == 0
    cli = certctl_runner(d)
    inner = cli + \
        f" install --blob '{blob}' '{m2}' --force --timeout 1 && " + \
        f"{sys.executable} -c \"import sys; from certd.store import locks as L; " \
        f"sys.exit(0 if L.updater_waiting('{blob}') else 3)\""
    r = certctl("lock", "--blob", str(blob), "--exclusive", "--timeout", "2", "--",
                "sh", "-c", inner)
    assert r.returncode == 0, r.stdout + r.stderr
    assert blob.read_bytes() == m2.read_bytes()
    assert not locks.updater_waiting(blob)
    # under a shared lock the nested install refuses at once instead of deadlocking
    inner = cli + f" install --blob '{blob}' '{m1}' --force"
    r = certctl("lock", "--blob", str(blob), "--shared", "--", "sh", "-c", inner)
    assert r.returncode == exitcodes.USAGE and "--exclusive" in r.stderr
    # first install by a hook: the blob does not exist yet, the gate alone is held
    new_blob = d / "fresh.blob"
    inner = cli + f" install --blob '{new_blob}' '{m1}' --force"
    r = certctl("lock", "--blob", str(new_blob), "--exclusive", "--json", "--", "sh", "-c", inner)
    assert r.returncode == 0, r.stderr
    assert new_blob.read_bytes() == m1.read_bytes()


def test_help_lists_exit_codes():
    for cmd in ("install", "rollback", "lock"):
        r = certctl(cmd, "--help")
        assert r.returncode == 0
        assert "exit codes" in r.stdout and "75" in r.stdout
