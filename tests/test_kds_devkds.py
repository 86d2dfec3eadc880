"""certd.devkds (the development KDS) with the real KDS client: any chip and TCB, fresh
CRLs, the CRL refresh rules, and the subprocess form with certctl --roots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization

from certd import devkds, devpki, exitcodes, platform as platmod, policy
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Role
from certd.abi.tcb import Tcb
from certd.sources.kds import KdsClient

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pkis():
    return [devpki.DevPki.generate(p, name="devkds-test") for p in (Product.MILAN, Product.TURIN)]


@pytest.fixture
def dev(pkis):
    with devkds.DevKds(pkis) as kds:
        yield kds


def client(kds, cache, **kw):
    return KdsClient([kds.url], cache, trust=kds.trust, timeout_s=5, min_backoff_s=0.01,
                     max_backoff_s=0.05, **kw)


def entries(blob):
    return {e.role: e.data for e in table.decode(blob).entries}


@pytest.mark.parametrize("product", [Product.MILAN, Product.TURIN])
def test_any_chip_and_tcb_with_a_fresh_crl(dev, tmp_path, product):
    platform = devpki.make_platform(product)
    c = client(dev, tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    got = entries(blob)
    assert Role.CRL in got  # fresh: included
    assert policy.check_blob(blob, trust=dev.trust, platform=platform) == []
    want = dev.vcek_key(product, platform.chip_id, platform.reported_tcb)
    from cryptography import x509
    leaf = x509.load_der_x509_certificate(got[Role.VCEK])
    assert leaf.public_key().public_bytes(*SPKI) == want.public_key().public_bytes(*SPKI)
    # another TCB: another key; KDS would not know the roots of the pinned store
    newer = platform.replace(reported_tcb=Tcb(**{**platform.reported_tcb.__dict__,
                                                 "snp": platform.reported_tcb.snp + 1}))
    blob2 = c.vcek_blob_sync(newer, deadline_s=20)
    assert entries(blob2)[Role.VCEK] != got[Role.VCEK]
    assert any("?" in r and f"snpSPL={newer.reported_tcb.snp}" in r for r in dev.requests)


def test_kds_shaped_refusals(dev):
    assert dev.answer("/vcek/v1/Siena/cert_chain").status == 404
    assert dev.answer("/vcek/v1/Turin/" + "11" * 64 + "?fmcSPL=1").status == 404  # long hwid
    assert dev.answer("/vcek/v1/Milan/" + "00" * 64).status == 404               # masked id
    assert dev.answer("/vcek/v1/Milan/" + "11" * 64 + "?blSPL=x").status == 400
    assert dev.answer("/vcek/v1/Milan/" + "11" * 64).status == 200  # SPLs default to 0


def write_crl(path, pki, *, this_update, next_update):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pki.crl(this_update=this_update, next_update=next_update)
                     .public_bytes(serialization.Encoding.DER))


def test_a_crl_near_next_update_is_refetched(dev, pkis, tmp_path):
    platform = devpki.make_platform(Product.MILAN)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    crl_file = tmp_path / "cache" / "crl" / "Milan.der"
    write_crl(crl_file, pkis[0], this_update=now - timedelta(days=2), next_update=now + timedelta(hours=1))
    old = crl_file.read_bytes()
    c = client(dev, tmp_path / "cache")
    assert c.crl_refresh_at(Product.MILAN) < now  # precondition: due for refresh
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert "/vcek/v1/Milan/crl" in dev.requests
    assert entries(blob)[Role.CRL] != old
    assert crl_file.read_bytes() == entries(blob)[Role.CRL]


def test_a_fresh_cached_crl_is_kept_when_kds_is_down(pkis, tmp_path):
    platform = devpki.make_platform(Product.MILAN)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with devkds.DevKds(pkis) as kds:
        c = client(kds, tmp_path / "cache")
        c.prefetch(platform.product, platform.chip_id, platform.reported_tcb, deadline_s=20)
    crl_file = tmp_path / "cache" / "crl" / "Milan.der"
    write_crl(crl_file, pkis[0], this_update=now - timedelta(days=2), next_update=now + timedelta(hours=1))
    # KDS is gone (the server stopped): the near-expiry but fresh CRL is still served...
    blob = c.vcek_blob_sync(platform, deadline_s=5)
    assert entries(blob)[Role.CRL] == crl_file.read_bytes()
    # ...a stale one is dropped, not served
    write_crl(crl_file, pkis[0], this_update=now - timedelta(days=3), next_update=now - timedelta(hours=1))
    blob = c.vcek_blob_sync(platform, deadline_s=5)
    assert Role.CRL not in entries(blob) and not crl_file.exists()


def test_subprocess_and_certctl_with_dev_roots(tmp_path):
    pki_dir = tmp_path / "pki"
    proc = subprocess.Popen([sys.executable, "-m", "certd.devkds", "--port", "0", "--pki-dir",
                             str(pki_dir), "--product", "Milan"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        pkis = [devkds.load_pki(pki_dir, Product.MILAN)]
        assert pkis[0] is not None and (pki_dir / "dev-roots.pem").exists()
        platform = devpki.make_platform(Product.MILAN)
        pf = tmp_path / "platform.toml"
        platmod.save(platform, pf)
        base = [sys.executable, "-m", "certd.cli.certctl", "kds", "fetch", "--platform", str(pf),
                "--url", url, "--config", str(tmp_path / "none.toml"), "--timeout", "2", "--json"]
        (tmp_path / "none.toml").write_text(f'[kds]\ncache_dir = "{tmp_path / "cache"}"\n'
                                            "min_backoff_s = 0.01\nmax_backoff_s = 0.02\n")
        # Negative control: against AMD's pinned roots every dev VCEK is refused
        r = subprocess.run(base + ["-o", str(tmp_path / "x.blob")], capture_output=True, text=True)
        assert r.returncode == exitcodes.DATAERR, r.stderr
        assert not (tmp_path / "x.blob").exists()
        r = subprocess.run(base + ["-o", str(tmp_path / "ok.blob"), "--roots",
                                   str(pki_dir / "dev-roots.pem")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["crl"] is True
        trust = devpki.trust_store(*pkis)
        assert policy.check_blob((tmp_path / "ok.blob").read_bytes(), trust=trust,
                                 platform=platform) == []
        # the same PKI directory gives the same VCEK key in another process (derived keys)
        again = devkds.DevKds(pkis)
        try:
            from cryptography import x509
            leaf = x509.load_der_x509_certificate(entries((tmp_path / "ok.blob").read_bytes())[Role.VCEK])
            want = again.vcek_key(Product.MILAN, platform.chip_id, platform.reported_tcb)
            assert leaf.public_key().public_bytes(*SPKI) == want.public_key().public_bytes(*SPKI)
        finally:
            again.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
