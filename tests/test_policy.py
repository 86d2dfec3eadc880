"""certd.policy: check_blob / check_report / build_blob on real vectors and the dev PKI.

Every negative case asserts the check id of the failure, so a regression that fails "for
the wrong reason" shows up.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certd import devpki, policy
from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Entry, Role
from certd.abi.tcb import Tcb
from certd.amd.roots import pinned
from certd.platform import Platform
from certd.verify import pki
from vector_pairs import PAIRS, VCEK_AT, VLEK_AT, at_for

NOW = None  # dev PKI certificates are valid "now"


def real_blob(vectors, leaf: str, chain: str, crl: bytes | None = None) -> bytes:
    mid, ark = pki.load_bytes((vectors / chain).read_bytes(), chain)
    entries = [Entry.of(Role.ARK, ark.der), Entry.of(Role.ASK, mid.der),
               Entry.of(Role.VLEK if "vlek" in leaf else Role.VCEK,
                        pki.load_certificate((vectors / leaf).read_bytes(), leaf).der)]
    if crl is not None:
        entries.append(Entry.of(Role.CRL, crl))
    return table.encode(entries)


def checks(problems) -> set[str]:
    return {p.check for p in problems}


def platform_of(report_bytes: bytes, product: Product, *, vlek=False) -> Platform:
    r = reportmod.parse(report_bytes)
    return Platform(product=product, reported_tcb=r.reported_tcb(product),
                    chip_id=None if vlek else r.hwid(product), signing_key="vlek" if vlek else "vcek")


# --- real pairs --------------------------------------------------------------------------

@pytest.mark.parametrize("rep,leaf,chain,kind", PAIRS)
def test_real_pairs_pass(vectors, rep, leaf, chain, kind):
    blob = real_blob(vectors, leaf, chain)
    raw = (vectors / rep).read_bytes()
    at = at_for(leaf)
    product = pki.load_certificate((vectors / leaf).read_bytes(), leaf).product
    plat = platform_of(raw, product, vlek=kind == "vlek")
    assert policy.check_blob(blob, trust=pinned(), platform=plat, at=at) == []
    assert policy.check_report(blob, raw, trust=pinned(), platform=plat, at=at) == []


def test_other_chip_same_tcb(vectors):
    # milan_trustee and milan_virtee share TCB bl=3 tee=0 snp=8 ucode=115: only the key
    # and chip id tell them apart.
    blob = real_blob(vectors, "milan_virtee_vcek.der", "milan_cert_chain.pem")
    probs = policy.check_report(blob, (vectors / "milan_trustee_report.bin").read_bytes(),
                                trust=pinned(), at=VCEK_AT)
    assert checks(probs) == {"signature", "chip_id"}


def test_other_product(vectors):
    blob = real_blob(vectors, "milan_msft_vcek.pem", "milan_cert_chain.pem")
    probs = policy.check_report(blob, (vectors / "genoa_msft_report.bin").read_bytes(),
                                trust=pinned(), at=VCEK_AT)
    assert {"product", "signature", "tcb", "chip_id"} <= checks(probs)
    assert any("Genoa CPU" in p.message for p in probs)


@pytest.mark.parametrize("offset", [0x04, 0x50, 0x180, 0x1A0, 0x29F])
def test_one_flipped_bit(vectors, offset):
    blob = real_blob(vectors, "genoa_vcek.der", "genoa_cert_chain.pem")
    raw = bytearray((vectors / "genoa_report.bin").read_bytes())
    raw[offset] ^= 0x04
    probs = policy.check_report(blob, bytes(raw), trust=pinned(), at=VCEK_AT)
    assert "signature" in checks(probs)


def test_vlek_cert_against_vcek_report(vectors):
    blob = real_blob(vectors, "milan_vlek.der", "milan_vlek_cert_chain.pem")
    probs = policy.check_report(blob, (vectors / "milan_report.bin").read_bytes(),
                                trust=pinned(), at=VLEK_AT)
    assert {"signing_key", "signature"} <= checks(probs)


def test_vlek_expiry(vectors):
    blob = real_blob(vectors, "milan_vlek_b.der", "milan_vlek_cert_chain.pem")
    raw = (vectors / "milan_vlek_b_report.bin").read_bytes()
    assert policy.check_report(blob, raw, trust=pinned(), at=VLEK_AT) == []
    probs = policy.check_report(blob, raw, trust=pinned())  # now: expired 2025-12-10
    assert checks(probs) == {"validity"} and "expired at 2025-12-10" in probs[0].message


def test_turin_fmc_and_short_hwid(vectors):
    blob = real_blob(vectors, "turin_vcek.der", "turin_cert_chain.pem")
    raw = (vectors / "turin_report.bin").read_bytes()
    good = platform_of(raw, Product.TURIN)
    assert len(good.chip_id) == 8
    assert policy.check_blob(blob, trust=pinned(), platform=good, at=VCEK_AT) == []
    bad_fmc = good.replace(reported_tcb=Tcb(fmc=2, bl=3, tee=2, snp=5, ucode=97))
    probs = policy.check_blob(blob, trust=pinned(), platform=bad_fmc, at=VCEK_AT)
    assert checks(probs) == {"tcb"} and "fmc=2" in probs[0].message
    other_chip = good.replace(chip_id=bytes.fromhex("1e550a8ee5cf9f4d"))
    assert checks(policy.check_blob(blob, trust=pinned(), platform=other_chip, at=VCEK_AT)) == {"chip_id"}


def test_platform_mismatches(vectors):
    blob = real_blob(vectors, "milan_vcek.der", "milan_cert_chain.pem")
    raw = (vectors / "milan_report.bin").read_bytes()
    good = platform_of(raw, Product.MILAN)
    run = lambda p, **kw: policy.check_blob(blob, trust=pinned(), platform=p, at=VCEK_AT, **kw)  # noqa: E731
    assert run(good) == []
    assert checks(run(good.replace(reported_tcb=Tcb(2, 0, 6, 68)))) == {"tcb"}
    other = good.replace(chip_id=bytes(range(64)))
    assert checks(run(other)) == {"chip_id"}
    assert run(other, mask_chip_id=True) == []
    assert run(other.replace(mask_chip_id=True)) == []
    assert checks(run(good.replace(signing_key="vlek"))) == {"signing_key"}
    genoa = Platform(product=Product.GENOA, reported_tcb=Tcb(2, 0, 5, 68), chip_id=good.chip_id)
    assert "product" in checks(run(genoa))


def test_masked_chip_id_report(vectors, dev_pki):
    pk = dev_pki(Product.GENOA)
    plat = devpki.make_platform(Product.GENOA, mask_chip_id=True)
    psp = devpki.FakePsp(pk, plat)
    raw = psp.report(b"nonce")
    assert reportmod.parse(raw).chip_id_masked
    assert policy.check_report(psp.blob(), raw, trust=pk.trust, platform=plat) == []


# --- roles and format --------------------------------------------------------------------

def test_roles(vectors):
    vcek = pki.load_certificate((vectors / "milan_vcek.der").read_bytes(), "v").der
    vlek = pki.load_certificate((vectors / "milan_vlek.der").read_bytes(), "l").der
    ask, ark = [c.der for c in pki.load_bytes((vectors / "milan_cert_chain.pem").read_bytes(), "c")]
    run = lambda entries: policy.check_blob(table.encode(entries), trust=pinned(), at=VCEK_AT)  # noqa: E731

    probs = run([Entry.of(Role.ASK, ask), Entry.of(Role.VCEK, vcek)])
    assert [p.message for p in probs if p.check == "role"] == ["the blob has no ARK"]
    probs = run([Entry.of(Role.ARK, ark), Entry.of(Role.ASK, ask), Entry.of(Role.VCEK, vcek),
                 Entry.of(Role.VLEK, vlek)])
    assert any("both a VCEK and a VLEK" in p.message for p in probs)
    probs = run([Entry.of(Role.ARK, ark), Entry.of(Role.ASK, ask)])
    assert any("no VCEK or VLEK" in p.message for p in probs)
    probs = run([Entry.of(Role.ARK, vcek), Entry.of(Role.ASK, ask), Entry.of(Role.VCEK, vcek)])
    assert any(p.check == "role" and "holds VCEK" in p.message for p in probs)
    import uuid
    odd = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")
    probs = run([Entry.of(Role.ARK, ark), Entry.of(Role.ASK, ask), Entry.of(Role.VCEK, vcek),
                 Entry(odd, b"\x01" * 8)])
    assert [(p.check, str(odd) in p.message) for p in probs] == [("role", True)]
    probs = run([Entry.of(Role.ARK, ark), Entry.of(Role.ASK, ask), Entry.of(Role.VCEK, b"junk")])
    assert any(p.check == "format" and "blob entry 2" in p.message for p in probs)


def test_empty_and_undecodable_tables():
    probs = policy.check_blob(table.EMPTY_TABLE, trust=pinned())
    assert checks(probs) == {"role"} and len(probs) == 3
    probs = policy.check_blob(b"\x01" * 30, trust=pinned())
    assert checks(probs) == {"format"} and "not a valid certificate table" in probs[0].message


def test_every_problem_reported_not_only_the_first(vectors, dev_pki):
    # A dev chain (not pinned) + an expired, mismatching leaf + oversize padding.
    pk = dev_pki(Product.MILAN)
    past = datetime.now(timezone.utc) - timedelta(days=30)
    leaf, _ = pk.issue_vcek(Tcb(1, 1, 1, 1), b"\x02" * 64, not_before=past - timedelta(days=1),
                            not_after=past)
    import uuid
    entries = [Entry.of(Role.ARK, pk.ark.public_bytes(Encoding.DER)),
               Entry.of(Role.ASK, pk.ask.public_bytes(Encoding.DER)),
               Entry.of(Role.VCEK, leaf.public_bytes(Encoding.DER)),
               Entry(uuid.uuid4(), bytes(17000))]
    plat = devpki.make_platform(Product.MILAN)
    probs = policy.check_blob(table.encode(entries), trust=pinned(), platform=plat)
    assert checks(probs) == {"size", "role", "chain", "validity", "tcb", "chip_id"}


# --- dev PKI: revocation, dates, pinning ---------------------------------------------------

def test_revoked_ask_in_blob_crl(dev_pki):
    pk = dev_pki(Product.GENOA)
    psp = devpki.FakePsp(pk, devpki.make_platform(Product.GENOA))
    ok = pk.crl([0x99999])
    assert policy.check_blob(psp.blob(ok), trust=pk.trust, platform=psp.platform) == []
    revoking = pk.crl([pk.ask.serial_number])
    probs = policy.check_blob(psp.blob(revoking), trust=pk.trust, platform=psp.platform)
    assert checks(probs) == {"revocation"}
    assert f"serial 0x{pk.ask.serial_number:x} is revoked" in probs[0].message


def test_revoked_ask_by_given_crl(dev_pki):
    pk = dev_pki(Product.MILAN)
    psp = devpki.FakePsp(pk, devpki.make_platform(Product.MILAN))
    crl = pk.crl([pk.ask.serial_number]).public_bytes(Encoding.DER)
    probs = policy.check_blob(psp.blob(), trust=pk.trust, crls=[crl])
    assert checks(probs) == {"revocation"}
    # A revocation dated after the check time does not count yet.
    later = datetime.now(timezone.utc) + timedelta(days=3)
    future = pk.crl([pk.ask.serial_number], revocation_date=later)
    assert policy.check_blob(psp.blob(), trust=pk.trust, crls=[future.public_bytes(Encoding.DER)]) == []
    # A CRL of another product line says nothing here.
    other = dev_pki(Product.TURIN).crl([pk.ask.serial_number]).public_bytes(Encoding.DER)
    assert policy.check_blob(psp.blob(), trust=pk.trust, crls=[other]) == []


def test_forged_and_stale_crls(dev_pki):
    pk = dev_pki(Product.MILAN)
    forger = devpki.DevPki.generate(Product.MILAN, name="forger")
    psp = devpki.FakePsp(pk, devpki.make_platform(Product.MILAN))
    probs = policy.check_blob(psp.blob(forger.crl([pk.ask.serial_number])), trust=pk.trust)
    # Forged: reported as such, and its revocations are not believed.
    assert [p.check for p in probs] == ["revocation"] and "not signed" in probs[0].message
    old = datetime.now(timezone.utc) - timedelta(days=100)
    stale = pk.crl(this_update=old, next_update=old + timedelta(days=30))
    probs = policy.check_blob(psp.blob(stale), trust=pk.trust)
    assert [p.check for p in probs] == ["revocation"] and "stale" in probs[0].message
    # The same stale CRL handed in separately is used but not blamed on the blob.
    assert policy.check_blob(psp.blob(), trust=pk.trust, crls=[stale]) == []


def test_leaf_dates(dev_pki):
    pk = dev_pki(Product.MILAN)
    now = datetime.now(timezone.utc)
    plat = devpki.make_platform(Product.MILAN)
    for nb, na, word in ((now - timedelta(days=400), now - timedelta(days=1), "expired"),
                         (now + timedelta(days=1), now + timedelta(days=400), "not valid yet")):
        leaf, _ = pk.issue_vcek(plat.reported_tcb, plat.chip_id, not_before=nb, not_after=na)
        probs = policy.check_blob(devpki.blob(pk.ark, pk.ask, leaf), trust=pk.trust, platform=plat)
        assert checks(probs) == {"validity"} and word in probs[0].message


def test_names_are_not_trust(dev_pki):
    real = dev_pki(Product.MILAN)
    impostor = devpki.DevPki.generate(Product.MILAN, name="impostor")
    psp = devpki.FakePsp(impostor, devpki.make_platform(Product.MILAN))
    probs = policy.check_blob(psp.blob(), trust=real.trust)
    assert checks(probs) == {"chain"}
    assert policy.check_blob(psp.blob(), trust=impostor.trust) == []
    assert checks(policy.check_blob(psp.blob(), trust=pinned())) == {"chain"}


def test_dev_mixed_products(dev_pki):
    m, g = dev_pki(Product.MILAN), dev_pki(Product.GENOA)
    trust = devpki.trust_store(m, g)
    plat = devpki.make_platform(Product.GENOA)
    leaf, _ = g.issue_vcek(plat.reported_tcb, plat.chip_id)
    probs = policy.check_blob(devpki.blob(m.ark, m.ask, leaf), trust=trust)
    assert {"chain", "product"} <= checks(probs)


# --- build_blob ----------------------------------------------------------------------------

def test_build_blob_canonical(vectors):
    chain = (vectors / "milan_cert_chain.pem").read_bytes()
    ask, ark = pki.load_bytes(chain, "chain")
    vcek = (vectors / "milan_vcek.der").read_bytes()
    crl = (vectors / "milan_crl.der").read_bytes()
    at = datetime(2026, 7, 1, tzinfo=timezone.utc)
    blob = policy.build_blob(ark, ask.cert, vcek, crl, trust=pinned(), at=at)
    assert blob == real_blob(vectors, "milan_vcek.der", "milan_cert_chain.pem", crl)
    assert table.is_canonical(blob)
    assert policy.check_blob(blob, trust=pinned(), at=at) == []


def test_build_blob_refuses_with_every_reason(vectors):
    ask, ark = pki.load_bytes((vectors / "milan_vlek_cert_chain.pem").read_bytes(), "chain")
    vlek = (vectors / "milan_vlek.der").read_bytes()
    with pytest.raises(policy.PolicyError) as ei:
        policy.build_blob(ark, ask, vlek, trust=pinned())
    assert checks(ei.value.problems) == {"validity"}
    assert "expired" in str(ei.value)
    with pytest.raises(policy.PolicyError) as ei:
        policy.build_blob(b"garbage", ask, ark, trust=pinned())
    assert checks(ei.value.problems) == {"format", "role"}


def test_build_blob_refuses_oversize(dev_pki):
    pk = dev_pki(Product.MILAN)
    plat = devpki.make_platform(Product.MILAN)
    leaf, _ = pk.issue_vcek(plat.reported_tcb, plat.chip_id)
    big_crl = pk.crl(range(1000, 1700))  # ~20 KB of revoked entries
    with pytest.raises(policy.PolicyError) as ei:
        policy.build_blob(pk.ark, pk.ask, leaf, big_crl, trust=pk.trust)
    assert checks(ei.value.problems) == {"size"}
    assert "16 KiB" in ei.value.problems[0].message


def test_bad_report_is_a_format_problem(vectors):
    blob = real_blob(vectors, "milan_vcek.der", "milan_cert_chain.pem")
    probs = policy.check_report(blob, b"\x00" * 100, trust=pinned(), at=VCEK_AT)
    assert checks(probs) == {"format"} and "1184" in probs[0].message
