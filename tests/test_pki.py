"""AMD extensions, pinned roots, KDS URLs, certificate loading/classification, chain, CRL
and report-signature checks, on the real vectors; plus the platform file."""

from __future__ import annotations

import warnings
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from certd import platform as platmod
from certd.abi import report as reportmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd import extensions as amdext
from certd.amd import kds, roots
from certd.verify import chain, pki
from certd.verify.pki import Cert, Crl, Kind, PkiError
from certd.verify.report import signature_problems, verify_signature
from vector_pairs import PAIRS, at_for

AT = datetime(2026, 9, 1, tzinfo=timezone.utc)


def load1(vectors, name) -> Cert:
    return pki.load_certificate((vectors / name).read_bytes(), name)


def chain_of(vectors, name) -> tuple[Cert, Cert]:
    mid, ark = pki.load_bytes((vectors / name).read_bytes(), name)
    return ark, mid


# --- extensions ------------------------------------------------------------------------

LEAVES = {
    "milan_vcek.der": (Product.MILAN, "bl=2 tee=0 snp=5 ucode=68", 64, "3ac3fe21"),
    "milan_gcp_vcek.der": (Product.MILAN, "bl=4 tee=0 snp=29 ucode=222", 64, "84ce42a8"),
    "genoa_vcek.der": (Product.GENOA, "bl=10 tee=0 snp=27 ucode=27", 64, "b5f9a4c8"),
    "turin_vcek.der": (Product.TURIN, "fmc=1 bl=3 tee=2 snp=5 ucode=97", 8, "0910b4f884ff4ba9"),
    "turin_virtee_vcek.der": (Product.TURIN, "fmc=0 bl=0 tee=0 snp=0 ucode=9", 8, "1e550a8ee5cf9f4d"),
    "milan_vlek.der": (Product.MILAN, "bl=3 tee=0 snp=21 ucode=209", None, None),
}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_extensions(vectors, name):
    product, tcb, hwid_len, hwid_prefix = LEAVES[name]
    c = load1(vectors, name)
    assert c.product is product
    assert str(c.tcb()) == tcb
    if hwid_len is None:
        assert c.kind is Kind.VLEK and c.hwid is None
        assert c.ext.csp_id == "CN=cc-us-east-2.amazonaws.com"
    else:
        assert c.kind is Kind.VCEK and len(c.hwid) == hwid_len
        assert c.hwid.hex().startswith(hwid_prefix)
    assert c.ext.unknown == ()


def test_turin_extension_shape(vectors):
    e = load1(vectors, "turin_vcek.der").ext
    assert e.struct_version == 1 and e.product_name == "Turin"
    assert e.fmc == 1 and e.spl4 is None  # Turin certs carry fmcSPL and no spl4
    m = load1(vectors, "milan_vcek.der").ext
    assert m.struct_version == 0 and m.fmc is None and m.spl4 == 0
    assert m.product_name == "Milan-B0" and m.product is Product.MILAN


def test_der_integer_encoding_matches_kds():
    assert amdext.der_integer(222) == bytes.fromhex("020200de")  # ucodeSPL 222 in a real VCEK
    assert amdext.der_integer(4) == bytes.fromhex("020104")
    assert amdext.der_integer(0) == bytes.fromhex("020100")


def test_hwid_forms():
    raw64 = bytes(range(64))
    assert amdext.parse_hwid(raw64) == raw64
    assert amdext.parse_hwid(b"\x04\x40" + raw64) == raw64  # OCTET STRING-wrapped
    assert amdext.parse_hwid(b"\x04\x08" + raw64[:8]) == raw64[:8]
    tricky = b"\x04\x3e" + bytes(62)  # raw 64 bytes that look like a TLV: kept raw
    assert amdext.parse_hwid(tricky) == tricky
    for bad in (b"", bytes(63), bytes(65), b"\x04\x41" + bytes(64)):
        with pytest.raises(amdext.ExtensionError, match="hwID"):
            amdext.parse_hwid(bad)


def test_malformed_extension_values():
    with pytest.raises(amdext.ExtensionError, match="negative"):
        amdext._parse_int(b"\x02\x01\x80", "blSPL")
    with pytest.raises(amdext.ExtensionError, match="expected DER tag"):
        amdext._parse_int(b"\x16\x01\x01", "blSPL")
    with pytest.raises(amdext.ExtensionError, match="trailing"):
        amdext._parse_int(b"\x02\x01\x01\x00", "blSPL")
    with pytest.raises(amdext.ExtensionError, match="truncated"):
        amdext._parse_int(b"\x02\x05\x01", "blSPL")


spl = st.integers(0, 255)


@settings(max_examples=60, deadline=None)
@given(bl=spl, tee=spl, snp=spl, ucode=spl, fmc=st.none() | spl,
       hwid=st.none() | st.binary(min_size=8, max_size=8) | st.binary(min_size=64, max_size=64),
       csp=st.none() | st.text(alphabet="abcxyz=.-", min_size=1, max_size=30))
def test_extension_round_trip(bl, tee, snp, ucode, fmc, hwid, csp):
    tcb = Tcb(bl=bl, tee=tee, snp=snp, ucode=ucode, fmc=fmc)
    exts = x509.Extensions([x509.Extension(e.oid, False, e)
                            for e in amdext.encode(product_name="Turin" if fmc is not None
                                                   else "Genoa", tcb=tcb, hwid=hwid,
                                                   csp_id=csp)])
    parsed = amdext.parse(exts)
    assert parsed.tcb() == tcb
    assert parsed.hwid == hwid and parsed.csp_id == csp
    assert parsed.struct_version == (1 if fmc is not None else 0)


def test_turin_tcb_requires_fmc():
    e = amdext.AmdExtensions(product_name="Turin", bl=1, tee=1, snp=1, ucode=1)
    with pytest.raises(amdext.ExtensionError, match="fmcSPL"):
        e.tcb()


# --- loading and classification ---------------------------------------------------------

CLASSES = {
    "milan_ark.pem": [(Kind.ARK, Product.MILAN)],
    "genoa_ask.pem": [(Kind.ASK, Product.GENOA)],
    "turin_cert_chain.pem": [(Kind.ASK, Product.TURIN), (Kind.ARK, Product.TURIN)],
    "milan_vlek_cert_chain.pem": [(Kind.ASVK, Product.MILAN), (Kind.ARK, Product.MILAN)],
    "genoa_vlek_cert_chain.pem": [(Kind.ASVK, Product.GENOA), (Kind.ARK, Product.GENOA)],
    "milan_msft_vcek.pem": [(Kind.VCEK, Product.MILAN)],
    "turin_vcek.der": [(Kind.VCEK, Product.TURIN)],
    "milan_vlek_b.der": [(Kind.VLEK, Product.MILAN)],
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_classify(vectors, name):
    items = pki.load_file(vectors / name)
    assert [(i.kind, i.product) for i in items] == CLASSES[name]


@pytest.mark.parametrize("name,product,revoked", [
    ("genoa_crl_2024.pem", Product.GENOA, [0x20001]),
    ("milan_crl.der", Product.MILAN, []),
    ("milan_crl_2025.pem", Product.MILAN, []),
])
def test_load_crls(vectors, name, product, revoked):
    crl = pki.load_crl((vectors / name).read_bytes(), name)
    assert isinstance(crl, Crl) and crl.product is product
    assert crl.revoked_serials() == revoked


def test_mixed_bundle(vectors):
    data = (vectors / "milan_cert_chain.pem").read_bytes() + (vectors / "milan_crl_2025.pem").read_bytes()
    kinds = [i.kind if isinstance(i, Cert) else "CRL" for i in pki.load_bytes(data, "bundle")]
    assert kinds == [Kind.ASK, Kind.ARK, "CRL"]


def test_serial_zero_loads_without_leaking_the_warning(vectors):
    # pytest runs with filterwarnings=error: any escaping warning would fail this test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = load1(vectors, "milan_vcek.der")
        assert c.serial == 0
        assert pki.serial_number(c.cert) == 0


def test_serial_zero_refused_by_a_future_cryptography(vectors, monkeypatch):
    def refuse(der):
        raise ValueError("error parsing asn1 value: invalid serial number")
    monkeypatch.setattr(pki.x509, "load_der_x509_certificate", refuse)
    pki.clear_cache()  # a memoized Cert would not reach the patched loader
    with pytest.raises(PkiError, match=r"milan_vcek.der: certificate has serial number 0.*"
                                       r"cryptography .* refuses"):
        load1(vectors, "milan_vcek.der")
    # A positive serial gets the generic message instead.
    with pytest.raises(PkiError, match="not a valid DER X.509 certificate"):
        load1(vectors, "milan_ark.pem")


@pytest.mark.parametrize("data,match", [
    (b"", "empty input"),
    (b"hello world", "neither PEM nor DER"),
    (b"\x30\x82\x10\x00\x30", "neither PEM nor DER"),
    (b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n", "not valid base64"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "without a matching END"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "unexpected PEM block"),
    (b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n", "not a valid DER X.509 certificate"),
])
def test_bad_inputs_name_source_and_problem(data, match):
    with pytest.raises(PkiError, match=match) as ei:
        pki.load_bytes(data, "some/file.pem")
    assert "some/file.pem" in str(ei.value)


def test_truncated_der_and_wrong_counts(vectors):
    der = (vectors / "milan_vcek.der").read_bytes()
    with pytest.raises(PkiError, match="cut.der"):
        pki.load_bytes(der[:-10], "cut.der")
    with pytest.raises(PkiError, match="expected one certificate, found 2"):
        pki.load_certificate((vectors / "milan_cert_chain.pem").read_bytes(), "chain")
    with pytest.raises(PkiError, match="expected one CRL"):
        pki.load_crl(der, "vcek")
    with pytest.raises(PkiError, match="cannot read"):
        pki.load_file(vectors / "does-not-exist.pem")


def test_non_amd_certificate_refused(dev_pki):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    from certd.devpki import ec_key
    key = ec_key()
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "example.org")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(5).not_valid_before(now)
            .not_valid_after(now).sign(key, hashes.SHA384()))
    with pytest.raises(PkiError, match="not an AMD SEV certificate.*example.org"):
        pki.load_bytes(cert.public_bytes(Encoding.DER), "web.der")


# --- pinned roots ------------------------------------------------------------------------

def test_pinned_roots_match_vectors(vectors):
    store = roots.pinned()
    assert set(store.products) == set(Product)
    for p in Product:
        r = store.roots(p)
        stem = p.value.lower()
        ark, ask = chain_of(vectors, f"{stem}_cert_chain.pem")
        assert r.ark.public_bytes(Encoding.DER) == ark.der
        assert r.ask.public_bytes(Encoding.DER) == ask.der
        assert store.is_pinned(p, "ARK", ark.cert) and store.is_pinned(p, "ASK", ask.cert)
        assert not store.is_pinned(p, "ASK", ark.cert)
        _, asvk = chain_of(vectors, f"{stem}_vlek_cert_chain.pem")
        assert store.is_pinned(p, "ASVK", asvk.cert)
        # Each pinned chain verifies with the production checker.
        assert chain.verify_chain(ark, ask, None, trust=store, at=AT) == []
        assert chain.verify_chain(ark, asvk, None, trust=store, at=AT) == []


def test_cross_product_chain_fails(vectors):
    g_ark, _ = chain_of(vectors, "genoa_cert_chain.pem")
    _, m_ask = chain_of(vectors, "milan_cert_chain.pem")
    msgs = [str(p) for p in chain.verify_chain(g_ark, m_ask, None, trust=roots.pinned(), at=AT)]
    assert any("not signed by ARK 'ARK-Genoa'" in m for m in msgs), msgs
    assert all(m.startswith("chain:") for m in msgs)


def test_vlek_under_ask_fails(vectors):
    ark, ask = chain_of(vectors, "milan_cert_chain.pem")
    vlek = load1(vectors, "milan_vlek.der")
    msgs = [str(p) for p in chain.verify_chain(ark, ask, vlek, trust=roots.pinned(),
                                               at=at_for("vlek"))]
    assert any("a VLEK is signed by an ASVK" in m for m in msgs), msgs
    assert any("not signed by ASK" in m for m in msgs), msgs


def test_self_made_amd_like_roots_fail_against_pinned(dev_pki):
    # Same names as AMD's, internally consistent, signed the AMD way: still not trusted.
    from cryptography.hazmat.primitives.serialization import Encoding
    d = dev_pki(Product.MILAN)
    ark = pki.cert_from_der(d.ark.public_bytes(Encoding.DER), "fake ark")
    ask = pki.cert_from_der(d.ask.public_bytes(Encoding.DER), "fake ask")
    assert (ark.subject_cn, ask.subject_cn) == ("ARK-Milan", "SEV-Milan")
    probs = chain.verify_chain(ark, ask, None, trust=roots.pinned())  # dev certs: valid now
    assert {p.check for p in probs} == {"chain"}
    assert any("not the pinned Milan ARK" in p.message for p in probs)
    assert any("not the pinned Milan ASK" in p.message for p in probs)
    assert chain.verify_chain(ark, ask, None, trust=d.trust) == []


# --- CRLs --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,at", [
    ("genoa_crl_2024.pem", datetime(2025, 1, 1, tzinfo=timezone.utc)),
    ("milan_crl.der", datetime(2026, 7, 1, tzinfo=timezone.utc)),
    ("milan_crl_2025.pem", datetime(2025, 6, 1, tzinfo=timezone.utc)),
])
def test_real_crls_verify_against_pinned_arks(vectors, name, at):
    crl = pki.load_crl((vectors / name).read_bytes(), name)
    assert chain.crl_problems(crl, trust=roots.pinned(), at=at) == []
    stale = chain.crl_problems(crl, trust=roots.pinned(), at=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert [p.check for p in stale] == ["revocation"] and "stale" in stale[0].message


def test_genoa_crl_revokes_old_ask_only(vectors):
    crl = pki.load_crl((vectors / "genoa_crl_2024.pem").read_bytes(), "genoa crl")
    _, ask = chain_of(vectors, "genoa_cert_chain.pem")
    assert ask.serial == 0x20002
    assert chain.revocation_problems([ask], [crl], at=AT) == []
    assert crl.crl.get_revoked_certificate_by_serial_number(0x20001) is not None


def test_tampered_crl_is_not_signed(vectors):
    raw = bytearray((vectors / "milan_crl.der").read_bytes())
    raw[-5] ^= 1  # inside the signature
    crl = pki.load_crl(bytes(raw), "tampered")
    probs = chain.crl_problems(crl, trust=roots.pinned(), at=datetime(2026, 7, 1, tzinfo=timezone.utc))
    assert any("not signed by the pinned ARK-Milan" in p.message for p in probs)


def test_crl_of_other_product_is_not_signed_by_this_ark(vectors):
    g = pki.load_crl((vectors / "genoa_crl_2024.pem").read_bytes(), "g")
    store = roots.TrustStore([roots.pinned().roots(Product.MILAN)], name="milan only")
    assert "not an ARK" in chain.crl_problems(g, trust=store)[0].message


# --- report signatures -------------------------------------------------------------------

@pytest.mark.parametrize("rep,leaf,_chain,_kind", PAIRS)
def test_real_report_signatures(vectors, rep, leaf, _chain, _kind):
    r = reportmod.parse((vectors / rep).read_bytes())
    c = load1(vectors, leaf)
    assert verify_signature(r, c.cert.public_key())
    flipped = bytearray(r.raw)
    flipped[0x50] ^= 0x01  # one bit of REPORT_DATA
    assert signature_problems(reportmod.parse(bytes(flipped)), c)[0].check == "signature"


def test_report_signature_other_key(vectors):
    r = reportmod.parse((vectors / "milan_trustee_report.bin").read_bytes())
    assert not verify_signature(r, load1(vectors, "milan_virtee_vcek.der").cert.public_key())
    # An RSA key is never a report key.
    ark, _ = chain_of(vectors, "milan_cert_chain.pem")
    assert not verify_signature(r, ark.cert.public_key())


# --- KDS URLs ----------------------------------------------------------------------------

def test_kds_vcek_urls(vectors):
    r = reportmod.parse((vectors / "milan_report.bin").read_bytes())
    url = kds.vcek_url(Product.MILAN, r.chip_id, r.reported_tcb(Product.MILAN))
    assert url.startswith("https://kdsintf.amd.com/vcek/v1/Milan/3ac3fe21")
    assert url.endswith("?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68")
    t = reportmod.parse((vectors / "turin_report.bin").read_bytes())
    # 64-byte report CHIP_ID in, 8-byte hwid out; fmcSPL first.
    assert kds.vcek_url(Product.TURIN, t.chip_id, t.reported_tcb(Product.TURIN)) == (
        "https://kdsintf.amd.com/vcek/v1/Turin/0910b4f884ff4ba9"
        "?fmcSPL=1&blSPL=3&teeSPL=2&snpSPL=5&ucodeSPL=97")
    assert kds.vcek_url(Product.GENOA, bytes([1]) * 64, Tcb(1, 2, 3, 4),
                        base="http://cache.local:8080/").startswith(
        "http://cache.local:8080/vcek/v1/Genoa/0101")


def test_kds_other_urls_and_refusals():
    assert kds.cert_chain_url(Product.GENOA) == "https://kdsintf.amd.com/vcek/v1/Genoa/cert_chain"
    assert kds.cert_chain_url(Product.TURIN, vlek=True).endswith("/vlek/v1/Turin/cert_chain")
    assert kds.crl_url(Product.MILAN, base="https://m.example/") == "https://m.example/vcek/v1/Milan/crl"
    with pytest.raises(ValueError, match="all zero"):
        kds.vcek_url(Product.MILAN, bytes(64), Tcb(1, 2, 3, 4))
    with pytest.raises(ValueError, match="fmc"):
        kds.vcek_url(Product.TURIN, b"\x01" * 8, Tcb(1, 2, 3, 4))
    with pytest.raises(ValueError, match="64 bytes"):
        kds.vcek_url(Product.MILAN, b"\x01" * 8, Tcb(1, 2, 3, 4))
    with pytest.raises(ValueError, match="must start with"):
        kds.crl_url(Product.MILAN, base="kdsintf.amd.com")


# --- platform ----------------------------------------------------------------------------

def test_platform_file_round_trip(tmp_path):
    p = platmod.Platform(product=Product.TURIN, reported_tcb=Tcb(1, 2, 3, 4, fmc=5),
                         current_tcb=Tcb(1, 2, 3, 5, fmc=5), chip_id=b"\x09" * 8 + bytes(56))
    assert p.chip_id == b"\x09" * 8  # a 64-byte Turin CHIP_ID is shortened to the hwID
    platmod.save(p, tmp_path / "platform.toml")
    assert platmod.load(tmp_path / "platform.toml") == p
    v = platmod.Platform(product=Product.MILAN, reported_tcb=Tcb(1, 2, 3, 4), signing_key="vlek")
    assert platmod.loads(platmod.dumps(v)) == v


@pytest.mark.parametrize("text,match", [
    ("product = ", "not valid TOML"),
    ('product = "Zen"\n[reported_tcb]\nbl=1\ntee=1\nsnp=1\nucode=1', "unknown SEV-SNP product"),
    ('product = "Milan"\nchip_id="00"\n', "missing 'reported_tcb'"),
    ('product = "Milan"\n[reported_tcb]\nbl=1\ntee=1\nsnp=1\nucode=1', "missing 'chip_id'"),
    ('product = "Milan"\nchip_id="0011"\n[reported_tcb]\nbl=1\ntee=1\nsnp=1\nucode=1',
     "chip_id is 64 bytes, got 2"),
    ('product = "Turin"\nchip_id="0011223344556677"\n[reported_tcb]\nbl=1\ntee=1\nsnp=1\nucode=1',
     "needs an fmc"),
    ('product = "Milan"\nmask_chip_id=true\n[reported_tcb]\nbl=1\ntee=1\nsnp=1\nucode=999',
     "out of range"),
    ('product = "Milan"\ncolour = 1\n', "unknown key"),
])
def test_platform_file_errors(text, match):
    with pytest.raises(platmod.PlatformError, match=match) as ei:
        platmod.loads(text, "plat.toml")
    assert "plat.toml" in str(ei.value)


def test_dev_sev_absent_is_a_clear_error(tmp_path):
    with pytest.raises(platmod.PlatformError, match="does not exist.*platform file"):
        platmod.read_dev_sev(str(tmp_path / "sev"))
