"""The daemon fetches its VCEK from KDS by itself (issue "Rotation", acceptance): for
Milan, Genoa (model A0h) and Turin platform files, a real certd with no blob requests
exactly the documented URL from a loopback KDS serving the real AMD vectors, installs the
blob and serves it, its leaf the vector VCEK."""

from __future__ import annotations

import time

import pytest

from certd import client as clientmod, platform as platformmod, policy
from certd.amd import roots
from certd.platform import Platform
from tests.daemon_support import DaemonProc, config_text
from tests.kds_support import SERVED, VECTORS, KdsServer, spl_query, vector_identity


def _served_leaf(sock: str) -> bytes | None:
    with clientmod.Client(sock) as c:
        r = c.get("vm-1", 4)
        if r.lease_id:
            c.release(r.lease_id)
    leaf = policy.parse_blob(r.table).leaf
    return None if leaf is None else leaf.der


@pytest.mark.parametrize("product,report,vcek", SERVED, ids=[p.value for p, _, _ in SERVED])
def test_the_daemon_fetches_and_serves_the_vcek_for_its_platform(tmp_path, product, report, vcek):
    hwid, tcb = vector_identity(product, report)
    pf = tmp_path / "platform.toml"
    platformmod.save(Platform(product=product, reported_tcb=tcb, chip_id=hwid), pf)
    with KdsServer() as kds:
        text = config_text(tmp_path, platform_file=pf).replace(
            '[kds]\nbase_url = ""',
            f'[kds]\nbase_url = "{kds.url}"\ncache_dir = "{tmp_path / "cache"}"\n'
            'min_backoff_s = 0.05\nmax_backoff_s = 0.2')
        d = DaemonProc(tmp_path, text)
        assert not d.blob.exists(), "precondition: no blob at start"
        d.start()
        try:
            want = (VECTORS / vcek).read_bytes()
            end = time.monotonic() + 30
            while (got := _served_leaf(d.socket)) != want:  # the rotator works in the background
                assert time.monotonic() < end, f"no {product.value} VCEK served (got {got!r:.40})"
                time.sleep(0.05)
            paths = [r.target for r in kds.vcek_requests()]
        finally:
            assert d.stop() == 0
    assert paths == [f"/vcek/v1/{product.value}/{hwid.hex()}?{spl_query(tcb)}"], paths
    assert policy.check_blob(d.blob.read_bytes(), trust=roots.pinned(),
                             platform=platformmod.load(pf)) == []
