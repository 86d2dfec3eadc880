"""A real certd given a blob whose VCEK cryptography only half parses (the EC point is off
the curve, noticed when the key is read): it stays up, answers every GET with the empty
table, and logs the named problem (issue 7, item 8). Negative control: with the
protection off (CERTD_UNSAFE=total-policy) the same blob takes the daemon down.
"""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certd import client as clientmod
from certd import policy
from certd.abi import table
from certd.amd.roots import pinned
from certd.verify import pki
from tests.daemon_support import make_daemon, vector_blob, vector_platform

PROBLEM = "blob entry 2: unreadable certificate public key (Invalid key)"


@pytest.fixture(scope="module")
def bad_blob() -> bytes:
    good = vector_blob()
    off, n = table.decode(good).spans[2]
    leaf = pki.cert_from_der(good[off:off + n], "leaf")
    i = good.index(leaf.public_key.public_bytes(Encoding.X962,
                                                PublicFormat.UncompressedPoint)) + 20
    bad = good[:i] + bytes([good[i] ^ 1]) + good[i + 1:]
    assert policy.check_blob(bad, trust=pinned(), platform=vector_platform()) == \
        [policy.Problem("format", PROBLEM)]
    return bad


def test_daemon_serves_the_empty_table_for_a_malformed_blob(tmp_path, bad_blob):
    d = make_daemon(tmp_path / "d", blob=bad_blob)
    try:
        d.start()
        with clientmod.Client(d.socket) as c:
            for vm in ("vm-1", "vm-2"):  # the connection survives the first answer
                r = c.get(vm, 4)
                assert (r.ret, r.table) == (0, table.EMPTY_TABLE)
    finally:
        assert d.stop() == 0, d.log()
    assert PROBLEM in d.log() and "Traceback" not in d.log()


def test_negative_control_daemon_fails_without_the_protection(tmp_path, bad_blob):
    d = make_daemon(tmp_path / "d", blob=bad_blob)
    try:
        d.start(extra_env={"CERTD_UNSAFE": "total-policy"}, wait=False)
        try:
            d.proc.wait(timeout=20)  # today it dies at start-up, validating the blob
        except subprocess.TimeoutExpired:
            pass
        served_empty = False
        if d.proc.poll() is None:
            try:
                with clientmod.Client(d.socket) as c:
                    served_empty = all(c.get(vm, 4).table == table.EMPTY_TABLE
                                       for vm in ("vm-1", "vm-2"))
            except (OSError, clientmod.ClientError):
                served_empty = False
    finally:
        d.stop()
    assert not served_empty or "Traceback" in d.log()
    assert "ValueError: Invalid key" in d.log()
