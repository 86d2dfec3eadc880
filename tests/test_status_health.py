"""`certctl status` exit codes against a real daemon: 0 only while every profile serves a
valid blob that stays valid past --warn-days; 4 (degraded) otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from certd import devpki, exitcodes, policy
from certd.cli import certctl, cmd_status
from certd.service import health
from certd.platform import PlatformSource
from certd.service.profiles import Judge, Profile
from tests.daemon_support import BIN, DaemonProc, config_text, make_daemon

#: A real daemon process on a development PKI (so its leaf and CRL can be short-lived):
#: builds and validates the blob, then runs the daemon on the config DaemonProc wrote.
LAUNCHER = r"""
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from certd import config, devpki, logs, platform as platformmod, policy
from certd.service import daemon

d, leaf_days, crl_days = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
now = datetime.now(timezone.utc)
pki = devpki.DevPki.generate(name="status-test")
plat = devpki.make_platform()
leaf, _ = pki.issue_vcek(plat.reported_tcb, plat.chip_id,
                         not_after=now + timedelta(days=leaf_days))
crl = pki.crl(next_update=now + timedelta(days=crl_days)) if crl_days else None
blob = policy.build_blob(pki.ark, pki.ask, leaf, crl, trust=pki.trust, platform=plat)
(d / "certs.blob").write_bytes(blob)
platformmod.save(plat, d / "platform.toml")
cfg = config.load(d / "certd.toml")
logs.configure(cfg.log.level, cfg.log.format)
sys.exit(daemon.run(cfg, str(d / "certd.toml"), daemon.Context(trust=pki.trust)))
"""


def status(sock: str, *args: str) -> tuple[int, dict]:
    r = subprocess.run([str(BIN / "certctl"), "status", "--socket", sock, "--json", *args],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


def dev_daemon(directory: Path, leaf_days: float, crl_days: float = 0) -> DaemonProc:
    directory.mkdir(parents=True)
    d = DaemonProc(directory, config_text(directory, platform_file=directory / "platform.toml"))
    return d.start(argv=[sys.executable, "-c", LAUNCHER, str(directory), str(leaf_days),
                         str(crl_days)])


@pytest.fixture
def serving(tmp_path):
    d = make_daemon(tmp_path / "d").start()
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def empty(tmp_path):
    d = make_daemon(tmp_path / "e", blob=None).start()  # no blob at the path
    yield d
    assert d.stop() == 0, d.log()


def test_serving_a_valid_blob_is_0(serving):
    code, doc = status(serving.socket)
    assert code == exitcodes.OK, doc
    assert doc["health"] == {"ok": True, "exit_code": 0, "warn_days": 14.0, "problems": []}
    p = doc["profiles"][0]
    assert p["state"] == "serving" and p["crl_next_update"] is None
    assert p["leaf_not_after"] == "2033-05-31T05:19:03Z"  # the real milan_gcp VCEK
    assert doc["counters"] and doc["limits"]  # nothing the old --json had is gone


def test_the_empty_table_is_degraded(empty):
    code, doc = status(empty.socket)
    assert code == exitcodes.DEGRADED == 4, doc
    assert doc["profiles"][0]["state"] == "empty"
    assert doc["health"]["ok"] is False
    assert doc["health"]["problems"] == [
        f"profile 'default' serves the empty table: no blob at {empty.blob}"]


def test_negative_control_a_verdict_that_says_ok_fails_the_empty_table_test(empty, monkeypatch,
                                                                             capsys):
    """The empty-table test fails if the verdict is switched off: run the same check in
    process with ``verdict`` patched to "nothing wrong" and see the exit code it asserts
    become 0."""
    assert certctl.main(["status", "--socket", empty.socket]) == exitcodes.DEGRADED
    monkeypatch.setattr(cmd_status, "verdict", lambda status, now, warn_days: [])
    code = certctl.main(["status", "--socket", empty.socket])
    assert code == exitcodes.OK
    with pytest.raises(AssertionError):
        assert code == exitcodes.DEGRADED  # what test_the_empty_table_is_degraded asserts
    assert capsys.readouterr().out.splitlines()[-1].split() == ["health", "ok"]


def test_an_invalid_blob_is_degraded(tmp_path):
    d = make_daemon(tmp_path / "d", blob=b"not a certificate table").start()
    try:
        code, doc = status(d.socket)
        assert code == exitcodes.DEGRADED, doc
        assert doc["profiles"][0]["state"] == "invalid"
        assert "failed the policy" in doc["health"]["problems"][0]
    finally:
        assert d.stop() == 0


def test_a_leaf_expiring_within_warn_days_is_degraded(tmp_path):
    d = dev_daemon(tmp_path / "d", leaf_days=5)
    try:
        code, doc = status(d.socket)
        assert doc["profiles"][0]["state"] == "serving"  # valid today...
        assert code == exitcodes.DEGRADED, doc  # ...but within the default 14 days
        (problem,) = doc["health"]["problems"]
        assert "the leaf expires at" in problem and "within --warn-days 14" in problem
        # control: the same daemon with a horizon shorter than the leaf's 5 days is fine
        code, doc = status(d.socket, "--warn-days", "3")
        assert code == exitcodes.OK, doc
    finally:
        assert d.stop() == 0, d.log()


def test_a_crl_due_within_warn_days_is_degraded(tmp_path):
    d = dev_daemon(tmp_path / "d", leaf_days=400, crl_days=2)
    try:
        code, doc = status(d.socket)
        assert code == exitcodes.DEGRADED, doc
        (problem,) = doc["health"]["problems"]
        assert "the CRL needs its next update" in problem
        assert doc["profiles"][0]["crl_next_update"] is not None
        assert status(d.socket, "--warn-days", "1")[0] == exitcodes.OK
    finally:
        assert d.stop() == 0, d.log()


def test_text_output_and_help(serving, empty):
    r = subprocess.run([str(BIN / "certctl"), "status", "--socket", empty.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4
    assert "degraded (exit 4)" in r.stdout and "  - profile 'default' serves the empty" in r.stdout
    r = subprocess.run([str(BIN / "certctl"), "status", "--socket", serving.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1].split() == ["health", "ok"]
    h = subprocess.run([str(BIN / "certctl"), "status", "--help"], capture_output=True,
                       text=True, timeout=60).stdout
    assert "--warn-days" in h and "    4  degraded" in h
    bad = subprocess.run([str(BIN / "certctl"), "status", "--warn-days", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == exitcodes.USAGE and "between 0 and 3650" in bad.stderr


# -- the verdict and the state, on their own -----------------------------------------------


def test_verdict_without_dates_from_an_older_daemon():
    doc = {"profiles": [{"name": "default", "state": "serving", "blob": "/b"}]}
    assert cmd_status.verdict(doc, datetime.now(timezone.utc), 14) == []


def test_stale_once_the_leaf_has_run_out(tmp_path):
    """A blob validated while its leaf was valid becomes stale when the leaf runs out, and
    STATUS and the metrics say so (checked at a later 'now' rather than by waiting)."""
    now = datetime.now(timezone.utc)
    pki = devpki.DevPki.generate(name="stale-test")
    plat = devpki.make_platform()
    leaf, _ = pki.issue_vcek(plat.reported_tcb, plat.chip_id, not_after=now + timedelta(days=1))
    path = tmp_path / "certs.blob"
    path.write_bytes(policy.build_blob(pki.ark, pki.ask, leaf, trust=pki.trust, platform=plat))
    p = Profile("default", str(path), Judge(pki.trust, PlatformSource("fixed", fixed=plat)))
    try:
        assert not p.decided and p.look() == "serving" and p.decided
        assert health.state(p) == "serving"
        assert health.state(p, now + timedelta(days=2)) == "stale"
        assert health.dates(p).leaf_not_after == leaf.not_valid_after_utc
        assert health.dates(p) is health.dates(p)  # parsed once per generation
        doc = {"profiles": [{"name": "default", "blob": str(path), "problems": [],
                             **health.status_fields(p)}]}
        assert cmd_status.verdict(doc, now + timedelta(days=2), 14)[0].endswith("days ago)")
    finally:
        p.close()
