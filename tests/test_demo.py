"""certctl demo: the README's second example, as a user runs it."""

from __future__ import annotations

import json
import subprocess

from certd import exitcodes
from tests.daemon_support import BIN

KEYS = ("attestations", "verified", "mismatches", "torn", "eio", "vmpck_lost", "max_wait_ms")


def certctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "certctl"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_json_passes_with_both_guest_kinds_and_one_update():
    r = certctl("demo", "--json")
    assert r.returncode == exitcodes.OK, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert all(k in out for k in KEYS), sorted(out)
    assert out["attestations"] > 0 and out["verified"] > 0
    assert [out[k] for k in ("mismatches", "torn", "eio", "vmpck_lost")] == [0, 0, 0, 0]
    assert set(out["by_kind"]) == {"linux", "svsm"} and set(out["by_face"]) == {"socket", "file"}
    assert out["updates"]["completed"] == 1


def test_demo_text_reads_in_ten_seconds():
    r = certctl("demo", "--seed", "1")
    assert r.returncode == exitcodes.OK, r.stdout + r.stderr
    assert r.stdout.count("\n") < 20
    for word in ("PASS", "mismatches", "vmpck_lost", "firmware updates: 1 of 1"):
        assert word in r.stdout, r.stdout


def test_demo_help_and_usage_errors():
    h = certctl("demo", "--help")
    assert h.returncode == 0 and "vmpck_lost" in h.stdout and "exit codes" in h.stdout
    bad = certctl("demo", "--vms", "0")
    assert bad.returncode == exitcodes.USAGE and "--vms" in bad.stderr
    bad = certctl("demo", "--updater", "nonsense")
    assert bad.returncode == exitcodes.USAGE and "fw-update" in bad.stderr
