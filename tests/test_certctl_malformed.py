"""certctl show / verify / install on a corrupted blob and on an empty file, as real
processes: the documented exit code (65: malformed input), no traceback, a message that
names the entry and what is wrong, and one answer for an empty file (policy.EMPTY_FILE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certd import exitcodes, policy
from certd.abi import table
from certd.amd.roots import pinned
from certd.verify import pki

VECTORS = Path(__file__).parent / "vectors"
CERTCTL = [sys.executable, "-m", "certd.cli.certctl"]
BROKEN_KEY = "blob entry 2: unreadable certificate public key (Invalid key)"


def certctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CERTCTL + list(args), capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> dict[str, Path]:
    """good.blob (real Milan chain + VCEK), bad.blob (the VCEK's EC point moved off the
    curve by one bit: cryptography only notices when the key is read), empty.blob."""
    d = tmp_path_factory.mktemp("blobs")
    mid, ark = pki.load_bytes((VECTORS / "milan_cert_chain.pem").read_bytes(), "chain")
    vcek = pki.load_certificate((VECTORS / "milan_vcek.der").read_bytes(), "vcek")
    good = table.encode([table.Entry.of(table.Role.ARK, ark.der),
                         table.Entry.of(table.Role.ASK, mid.der),
                         table.Entry.of(table.Role.VCEK, vcek.der)])
    point = vcek.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    i = good.index(point) + 20
    bad = good[:i] + bytes([good[i] ^ 1]) + good[i + 1:]
    # Preconditions: the corruption is the lazy kind, the rest of the blob is fine.
    assert policy.check_blob(bad, trust=pinned()) == [policy.Problem("format", BROKEN_KEY)]
    out = {"good": d / "good.blob", "bad": d / "bad.blob", "empty": d / "empty.blob"}
    out["good"].write_bytes(good)
    out["bad"].write_bytes(bad)
    out["empty"].write_bytes(b"")
    return out


@pytest.mark.parametrize("cmd", ["show", "verify"])
def test_corrupted_blob_exits_65_naming_the_entry(blobs, cmd):
    r = certctl(cmd, str(blobs["bad"]))
    assert r.returncode == exitcodes.DATAERR, r
    assert "Traceback" not in r.stderr
    assert "unreadable certificate public key (Invalid key)" in r.stdout
    assert "entry 2" in r.stdout
    j = certctl(cmd, "--json", str(blobs["bad"]))
    assert j.returncode == exitcodes.DATAERR and "Traceback" not in j.stderr
    doc = json.loads(j.stdout)
    assert doc["ok"] is False
    if cmd == "verify":
        assert doc["problems"] == [{"check": "format", "message": BROKEN_KEY}]
        assert doc["exit_code"] == exitcodes.DATAERR
    else:
        assert [e.get("error", "") for e in doc["entries"]][2].endswith(
            "unreadable certificate public key (Invalid key)")


def test_good_blob_still_shows_and_verifies(blobs):
    assert certctl("show", str(blobs["good"])).returncode == exitcodes.OK
    r = certctl("verify", "--at", "2026-09-01", str(blobs["good"]))
    assert r.returncode == exitcodes.OK, r


def test_empty_file_gets_one_answer_in_show_verify_and_install(blobs, tmp_path):
    expected = f"certctl: error: {blobs['empty']}: {policy.EMPTY_FILE}\n"
    answers = {}
    for cmd in ("show", "verify"):
        r = certctl(cmd, str(blobs["empty"]))
        answers[cmd] = (r.returncode, r.stderr)
        j = certctl(cmd, "--json", str(blobs["empty"]))
        doc = json.loads(j.stdout)
        assert (j.returncode, doc["exit_code"], doc["ok"]) == (exitcodes.DATAERR,) * 2 + (False,)
        assert doc["problems"] == [policy.EMPTY_FILE.as_dict()]
    assert answers == {"show": (exitcodes.DATAERR, expected),
                       "verify": (exitcodes.DATAERR, expected)}
    # install answers through the policy: the same problem and exit code (the framing
    # around it is install's own until it reads NEW with certinfo.read_blob).
    r = certctl("install", "--blob", str(tmp_path / "certs.blob"), "--force",
                str(blobs["empty"]))
    assert r.returncode == exitcodes.DATAERR and "Traceback" not in r.stderr
    assert str(policy.EMPTY_FILE) in r.stderr
    assert not (tmp_path / "certs.blob").exists()


def test_negative_control_traceback_without_the_protection(blobs):
    """With the total-policy protection off, the same command dies with a traceback: the
    tests above can tell the difference."""
    env = {**os.environ, "CERTD_UNSAFE": "total-policy"}
    r = certctl("verify", str(blobs["bad"]), env=env)
    assert "Traceback" in r.stderr and r.returncode != exitcodes.DATAERR
    assert "ValueError" in r.stderr


def test_build_refuses_a_corrupted_input_with_65(blobs, tmp_path):
    good = blobs["good"].read_bytes()
    bad = blobs["bad"].read_bytes()
    off, n = table.decode(good).spans[2]
    vcek = tmp_path / "vcek.der"
    vcek.write_bytes(bad[off:off + n])
    out = tmp_path / "out.blob"
    r = certctl("build", "--chain", str(VECTORS / "milan_cert_chain.pem"), "--vcek", str(vcek),
                "-o", str(out))
    assert r.returncode == exitcodes.DATAERR and "Traceback" not in r.stderr
    assert f"{vcek}: unreadable certificate public key (Invalid key)" in r.stderr
    assert not out.exists()
