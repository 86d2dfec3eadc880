"""Attestation report parsing and TCB layouts, on the real reports in tests/vectors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from certd.abi import report, tcb
from certd.abi.product import Product
from certd.abi.tcb import Tcb, TcbError

VECTORS = Path(__file__).parent / "vectors"

# name: (version, signing key, product from the report alone, reported TCB)
EXPECTED = {
    "milan_report.bin": (2, "VCEK", None, "bl=2 tee=0 snp=5 ucode=68"),
    "milan_virtee_report.bin": (2, "VCEK", None, "bl=3 tee=0 snp=8 ucode=115"),
    "milan_trustee_report.bin": (2, "VCEK", None, "bl=3 tee=0 snp=8 ucode=115"),
    "milan_gcp_report.bin": (5, "VCEK", Product.MILAN, "bl=4 tee=0 snp=29 ucode=222"),
    "milan_msft_report.bin": (3, "VCEK", Product.MILAN, "bl=4 tee=0 snp=24 ucode=219"),
    "genoa_report.bin": (5, "VCEK", Product.GENOA, "bl=10 tee=0 snp=27 ucode=27"),
    "genoa_msft_report.bin": (3, "VCEK", Product.GENOA, "bl=10 tee=0 snp=23 ucode=84"),
    "turin_report.bin": (5, "VCEK", Product.TURIN, "fmc=1 bl=3 tee=2 snp=5 ucode=97"),
    "turin_msft_report.bin": (5, "VCEK", Product.TURIN, "fmc=1 bl=1 tee=1 snp=4 ucode=81"),
    "milan_vlek_report.bin": (2, "VLEK", None, "bl=3 tee=0 snp=21 ucode=209"),
    "milan_vlek_b_report.bin": (3, "VLEK", Product.MILAN, "bl=4 tee=0 snp=24 ucode=217"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_reports(name):
    version, key, product, tcb_text = EXPECTED[name]
    r = report.parse((VECTORS / name).read_bytes())
    assert r.version == version
    assert r.signing_key.name == key
    assert r.product() == product
    p = product or Product.MILAN
    assert str(r.reported_tcb(p)) == tcb_text
    assert r.sig_r and r.sig_s
    assert r.chip_id_masked == (key == "VLEK")


def test_turin_chip_id_is_eight_bytes():
    r = report.parse((VECTORS / "turin_report.bin").read_bytes())
    assert r.hwid(Product.TURIN).hex() == "0910b4f884ff4ba9"
    assert not any(r.chip_id[8:])


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b[:-1], "1184 bytes"),
    (lambda b: (1).to_bytes(4, "little") + b[4:], "version 1"),
    (lambda b: (9).to_bytes(4, "little") + b[4:], "version 9"),
    (lambda b: b[:0x34] + (2).to_bytes(4, "little") + b[0x38:], "signature algorithm 2"),
])
def test_bad_reports_named(mutate, needle):
    raw = (VECTORS / "milan_gcp_report.bin").read_bytes()
    with pytest.raises(report.ReportError, match=needle):
        report.parse(mutate(raw))


def test_parse_fuzz_only_report_error():
    rng = random.Random(7)
    raw = (VECTORS / "genoa_report.bin").read_bytes()
    for _ in range(5000):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(0x200)] = rng.randrange(256)
        if rng.random() < 0.2:
            del buf[rng.randrange(len(buf)):]
        try:
            r = report.parse(bytes(buf))
            r.product()
        except report.ReportError:
            pass


def test_build_round_trip():
    t = Tcb(fmc=2, bl=3, tee=4, snp=5, ucode=6)
    body = report.build(product=Product.TURIN, reported_tcb=t, chip_id=b"\x11" * 8)
    r = report.parse(report.with_signature(body, 5, 7))
    assert r.product() is Product.TURIN and r.reported_tcb(Product.TURIN) == t
    assert (r.sig_r, r.sig_s) == (5, 7)


@pytest.mark.parametrize("product", list(Product))
def test_tcb_encode_decode(product):
    t = Tcb(bl=1, tee=2, snp=3, ucode=4, fmc=5 if product.turin_layout else None)
    raw = tcb.encode(t, product)
    assert tcb.decode(raw, product) == t
    assert tcb.reserved_bytes_clear(raw, product)


def test_tcb_layouts_differ():
    raw = bytes.fromhex("0103020500000061")  # turin_report REPORTED_TCB
    assert str(tcb.decode(raw, Product.TURIN)) == "fmc=1 bl=3 tee=2 snp=5 ucode=97"
    assert str(tcb.decode(raw, Product.MILAN)) == "bl=1 tee=3 snp=0 ucode=97"


def test_tcb_parse_errors():
    assert Tcb.parse("blSPL=2 teeSPL=0 snpSPL=5 ucodeSPL=68") == Tcb(2, 0, 5, 68)
    with pytest.raises(TcbError, match="lacks ucode"):
        Tcb.parse("bl=1,tee=2,snp=3")
    with pytest.raises(TcbError, match="bad TCB component"):
        Tcb.parse("bl=1,tee=2,snp=3,ucode=4,foo=1")
    with pytest.raises(TcbError, match="out of range"):
        Tcb.parse("bl=1,tee=2,snp=3,ucode=400")
    with pytest.raises(TcbError, match="no fmc"):
        tcb.encode(Tcb(1, 2, 3, 4, fmc=1), Product.GENOA)


def test_product_mapping():
    assert Product.from_cpuid(0x19, 0xA0) is Product.GENOA  # Bergamo/Siena → Genoa
    assert Product.from_cpuid(0x19, 0x01) is Product.MILAN
    assert Product.from_cpuid(0x1A, 0x02) is Product.TURIN
    assert Product.from_cpuid(0x17, 0x31) is None
    assert Product.parse("Milan-B0") is Product.MILAN
    assert Product.parse("Siena") is Product.GENOA
    with pytest.raises(ValueError, match="unknown SEV-SNP product"):
        Product.parse("Naples")
