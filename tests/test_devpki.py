"""The development PKI looks like AMD's to the production checks, and the fake PSP
behaves like firmware: real-format signed reports, a new key per reported TCB."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import SignatureAlgorithmOID

from certd import devpki, policy
from certd.abi import report as reportmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.platform import Platform
from certd.verify import pki
from certd.verify.pki import Kind
from certd.verify.report import verify_signature


@pytest.mark.parametrize("product", list(Product))
def test_shapes_match_amd(dev_pki, product):
    pk = dev_pki(product)
    p = product.value
    names = [(c, pki.cert_from_der(c.public_bytes(Encoding.DER), "dev")) for c in (pk.ark, pk.ask, pk.asvk)]
    assert [(x.kind, x.subject_cn, x.product) for _, x in names] == [
        (Kind.ARK, f"ARK-{p}", product), (Kind.ASK, f"SEV-{p}", product),
        (Kind.ASVK, f"SEV-VLEK-{p}", product)]
    for cert, _ in names:
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
        params = cert.signature_algorithm_parameters
        assert isinstance(params, padding.PSS) and params._salt_length == 48
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
        assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert "O=Advanced Micro Devices" in pk.ark.subject.rfc4514_string()


@pytest.mark.parametrize("product", list(Product))
def test_leaves(dev_pki, product):
    pk = dev_pki(product)
    plat = devpki.make_platform(product)
    vcek, key = pk.issue_vcek(plat.reported_tcb, plat.chip_id)
    c = pki.cert_from_der(vcek.public_bytes(Encoding.DER), "vcek")
    assert (c.kind, c.product, c.tcb(), c.hwid) == (Kind.VCEK, product, plat.reported_tcb, plat.chip_id)
    assert len(c.hwid) == (8 if product is Product.TURIN else 64)
    assert isinstance(key.curve, ec.SECP384R1)
    assert c.serial == devpki.LEAF_SERIAL  # CertificateBuilder refuses AMD's serial 0
    vlek, _ = pk.issue_vlek(plat.reported_tcb, csp_id="CN=csp.example")
    v = pki.cert_from_der(vlek.public_bytes(Encoding.DER), "vlek")
    assert (v.kind, v.hwid, v.ext.csp_id) == (Kind.VLEK, None, "CN=csp.example")
    assert (v.not_after - v.not_before).days == devpki.VLEK_DAYS


def test_wrong_tcb_shape_refused(dev_pki):
    with pytest.raises(ValueError, match="needs fmc"):
        dev_pki(Product.TURIN).issue_vcek(Tcb(1, 2, 3, 4), b"\x01" * 8)
    with pytest.raises(ValueError, match="has no fmc"):
        dev_pki(Product.MILAN).issue_vlek(Tcb(1, 2, 3, 4, fmc=1))


def test_rsa_keys_cached_per_name():
    a = devpki.DevPki.generate(Product.MILAN, name="cache-a")
    b = devpki.DevPki.generate(Product.MILAN, name="cache-a")
    c = devpki.DevPki.generate(Product.MILAN, name="cache-b")
    assert a.ark_key is b.ark_key and a.ark_key is not c.ark_key


@pytest.mark.parametrize("product", list(Product))
@pytest.mark.parametrize("vlek", [False, True])
def test_fake_psp_reports_verify(dev_pki, product, vlek):
    pk = dev_pki(product)
    plat = devpki.make_platform(product, vlek=vlek)
    psp = devpki.FakePsp(pk, plat)
    raw = psp.report(b"nonce-1", measurement=b"m" * 48)
    r = reportmod.parse(raw)
    assert r.report_data.startswith(b"nonce-1") and r.signing_key.name == ("VLEK" if vlek else "VCEK")
    assert r.product() is product
    assert verify_signature(r, psp.leaf.public_key())
    assert policy.check_report(psp.blob(), raw, trust=pk.trust, platform=plat) == []


def test_firmware_update_changes_key(dev_pki):
    pk = dev_pki(Product.MILAN)
    psp = devpki.FakePsp(pk, devpki.make_platform(Product.MILAN, tcb=Tcb(3, 0, 8, 115)))
    old_blob, old_leaf = psp.blob(), psp.leaf
    new = psp.update_firmware(Tcb(3, 0, 9, 115))
    assert new.reported_tcb == Tcb(3, 0, 9, 115) and psp.platform is new
    assert psp.leaf is not old_leaf
    raw = psp.report()
    # The old blob no longer matches what the PSP signs: exactly the invariant certd keeps.
    probs = policy.check_report(old_blob, raw, trust=pk.trust, platform=new)
    assert {p.check for p in probs} == {"signature", "tcb"}
    assert policy.check_report(psp.blob(), raw, trust=pk.trust, platform=new) == []
    # Rolling back the TCB gives back the same key, as on real hardware.
    psp.update_firmware(Tcb(3, 0, 8, 115))
    assert psp.leaf is old_leaf
    assert policy.check_report(old_blob, psp.report(), trust=pk.trust, platform=psp.platform) == []


def test_report_versions(dev_pki):
    pk = dev_pki(Product.GENOA)
    psp = devpki.FakePsp(pk, devpki.make_platform(Product.GENOA))
    for v in (2, 3, 5):
        raw = psp.report(version=v)
        assert reportmod.parse(raw).version == v
        assert policy.check_report(psp.blob(), raw, trust=pk.trust) == []


def test_platform_product_must_match(dev_pki):
    with pytest.raises(ValueError, match="platform is Genoa"):
        devpki.FakePsp(dev_pki(Product.MILAN), devpki.make_platform(Product.GENOA))


def test_write_files_round_trip(dev_pki, tmp_path):
    pk = dev_pki(Product.TURIN)
    files = pk.write(tmp_path)
    kinds = [c.kind for c in pki.load_file(files["cert_chain"])]
    assert kinds == [Kind.ASK, Kind.ARK]
    assert [c.kind for c in pki.load_file(files["vlek_cert_chain"])] == [Kind.ASVK, Kind.ARK]


def test_make_platform_is_a_platform():
    p = devpki.make_platform(Product.TURIN)
    assert isinstance(p, Platform) and len(p.chip_id) == 8 and p.reported_tcb.fmc is not None
