"""A generated AMD-like PKI and a fake PSP, for tests and ``certd --dev``.

It mirrors AMD's shapes closely enough that the production checks run unchanged against
it: ARK (self-signed), ASK and ASVK are RSA keys signing with RSASSA-PSS SHA-384 / MGF1
SHA-384 / salt 48, named ``ARK-<Product>``, ``SEV-<Product>``, ``SEV-VLEK-<Product>`` with
AMD's other name attributes; VCEK/VLEK are EC P-384 leaves carrying AMD's extensions (TCB,
raw hwID, productName, cspID on VLEKs). Trust comes from :attr:`DevPki.trust`, a
:class:`~certd.amd.roots.TrustStore` of these roots; against AMD's pinned store every dev
chain fails, as it must.

Differences from AMD, on purpose:
- RSA-2048 by default (AMD: 4096) so key generation stays fast; keys are cached per
  process by (name, product, role, bits), certificates are not (they are cheap to sign).
- Dev leaves have serial number 1: cryptography's CertificateBuilder refuses serial 0,
  which real VCEK/VLEKs carry (the serial-0 path is covered with the real vectors).

:class:`FakePsp` plays the firmware: it signs real-format reports (certd.abi.report) with
the current VCEK/VLEK private key, and a firmware update (new reported TCB) switches to a
different key and certificate, the way a real PSP derives a new VCEK per TCB.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Role
from certd.abi.tcb import Tcb
from certd.amd import extensions as amdext
from certd.amd.roots import Roots, TrustStore
from certd.platform import Platform
from certd.verify.chain import PSS

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM

#: KDS productName values (Milan VCEKs say "Milan-B0"; VLEKs say just the line).
PRODUCT_NAMES = {Product.MILAN: "Milan-B0", Product.GENOA: "Genoa", Product.TURIN: "Turin"}
#: AMD's serial scheme: ARK 0xN0000, ASK 0xN0001, ASVK 0xN0101 (N = 1 Milan, 2 Genoa, 3 Turin).
_SERIAL_BASE = {Product.MILAN: 0x10000, Product.GENOA: 0x20000, Product.TURIN: 0x30000}
#: CertificateBuilder refuses serial 0 (AMD's leaf serial), so dev leaves use 1.
LEAF_SERIAL = 1
VCEK_DAYS, VLEK_DAYS, ROOT_DAYS = 7 * 365, 365, 25 * 365


@functools.lru_cache(maxsize=None)
def rsa_key(name: str, product: Product, role: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Per-process cache: RSA generation dominates test time otherwise."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def amd_name(cn: str) -> x509.Name:
    """AMD's subject/issuer attributes with the given CN."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _ca_cert(subject: str, issuer: str, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey,
             serial: int, not_before: datetime, not_after: datetime) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(amd_name(subject)).issuer_name(amd_name(issuer))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(signer, hashes.SHA384(), rsa_padding=PSS))


@dataclass
class DevPki:
    """One product line's generated ARK/ASK/ASVK with their private keys."""

    product: Product
    name: str
    ark: x509.Certificate
    ark_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    asvk: x509.Certificate
    asvk_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, product: Product = Product.MILAN, *, name: str = "dev",
                 not_before: datetime | None = None, not_after: datetime | None = None,
                 rsa_bits: int = 2048) -> "DevPki":
        """A fresh PKI. ``name`` selects the (cached) key set: two names, two unrelated
        PKIs with the same AMD-like subjects (to prove names alone are not trusted)."""
        nb = not_before or _now() - timedelta(days=1)
        na = not_after or nb + timedelta(days=ROOT_DAYS)
        base = _SERIAL_BASE[product]
        p = product.value
        ark_key = rsa_key(name, product, "ARK", rsa_bits)
        ask_key = rsa_key(name, product, "ASK", rsa_bits)
        asvk_key = rsa_key(name, product, "ASVK", rsa_bits)
        ark = _ca_cert(f"ARK-{p}", f"ARK-{p}", ark_key, ark_key, base, nb, na)
        ask = _ca_cert(f"SEV-{p}", f"ARK-{p}", ask_key, ark_key, base + 1, nb, na)
        asvk = _ca_cert(f"SEV-VLEK-{p}", f"ARK-{p}", asvk_key, ark_key, base + 0x101, nb, na)
        return cls(product, name, ark, ark_key, ask, ask_key, asvk, asvk_key)

    # --- trust ---------------------------------------------------------------------------

    @property
    def roots(self) -> Roots:
        return Roots(self.product, self.ark, self.ask, self.asvk)

    @property
    def trust(self) -> TrustStore:
        return TrustStore([self.roots], name=f"{self.name} development")

    def cert_chain_pem(self, vlek: bool = False) -> bytes:
        """Like KDS ``cert_chain``: ASK (or ASVK), then ARK."""
        return (self.asvk if vlek else self.ask).public_bytes(PEM) + self.ark.public_bytes(PEM)

    # --- leaves --------------------------------------------------------------------------

    def _leaf(self, cn: str, issuer: x509.Certificate, signer: rsa.RSAPrivateKey,
              key: ec.EllipticCurvePrivateKey, exts: list, not_before: datetime | None,
              not_after: datetime | None, days: int) -> x509.Certificate:
        nb = not_before or _now() - timedelta(days=1)
        na = not_after or nb + timedelta(days=days)
        b = (x509.CertificateBuilder().subject_name(amd_name(cn)).issuer_name(issuer.subject)
             .public_key(key.public_key()).serial_number(LEAF_SERIAL)
             .not_valid_before(nb).not_valid_after(na))
        for e in exts:
            b = b.add_extension(e, critical=False)
        return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)

    def _check_tcb(self, tcb: Tcb) -> None:
        if self.product.turin_layout != (tcb.fmc is not None):
            raise ValueError(f"a {self.product.value} TCB {'needs' if self.product.turin_layout else 'has no'} fmc")

    def issue_vcek(self, tcb: Tcb, chip_id: bytes, *, key: ec.EllipticCurvePrivateKey | None = None,
                   not_before: datetime | None = None, not_after: datetime | None = None,
                   product_name: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A VCEK for (chip, TCB), signed by the ASK. Returns (certificate, private key)."""
        self._check_tcb(tcb)
        hwid = bytes(chip_id)[: self.product.hwid_len]
        if len(hwid) != self.product.hwid_len:
            raise ValueError(f"{self.product.value} chip id is {self.product.hwid_len} bytes")
        key = key or ec_key()
        exts = amdext.encode(product_name=product_name or PRODUCT_NAMES[self.product],
                             tcb=tcb, hwid=hwid)
        return self._leaf("SEV-VCEK", self.ask, self.ask_key, key, exts, not_before, not_after,
                          VCEK_DAYS), key

    def issue_vlek(self, tcb: Tcb, *, key: ec.EllipticCurvePrivateKey | None = None,
                   csp_id: str = "CN=certd-dev.invalid", not_before: datetime | None = None,
                   not_after: datetime | None = None,
                   ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A VLEK (cspID, no hwID; 1-year validity like AMD's), signed by the ASVK."""
        self._check_tcb(tcb)
        key = key or ec_key()
        exts = amdext.encode(product_name=self.product.value, tcb=tcb, csp_id=csp_id)
        return self._leaf("SEV-VLEK", self.asvk, self.asvk_key, key, exts, not_before,
                          not_after, VLEK_DAYS), key

    def crl(self, revoked: Iterable[int] = (), *, this_update: datetime | None = None,
            next_update: datetime | None = None, revocation_date: datetime | None = None,
            number: int = 1) -> x509.CertificateRevocationList:
        """A CRL signed by the ARK (as KDS's /crl), revoking ``revoked`` serials."""
        tu = this_update or _now() - timedelta(days=1)
        nu = next_update or tu + timedelta(days=45)
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.ark.subject)
             .last_update(tu).next_update(nu)
             .add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(revocation_date or tu).build())
        return b.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)

    def write(self, directory: str | Path) -> dict[str, Path]:
        """PEM files a user or test can pass to certctl: ark, ask, asvk, cert chains."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {"ark": self.ark.public_bytes(PEM), "ask": self.ask.public_bytes(PEM),
                 "asvk": self.asvk.public_bytes(PEM), "cert_chain": self.cert_chain_pem(),
                 "vlek_cert_chain": self.cert_chain_pem(vlek=True)}
        out = {}
        for stem, data in files.items():
            (d / f"{stem}.pem").write_bytes(data)
            out[stem] = d / f"{stem}.pem"
        return out


def trust_store(*pkis: DevPki, name: str = "development") -> TrustStore:
    """One store for several dev product lines (e.g. to test cross-product mix-ups)."""
    return TrustStore([p.roots for p in pkis], name=name)


def blob(ark: x509.Certificate, ask: x509.Certificate, leaf: x509.Certificate,
         crl: x509.CertificateRevocationList | None = None, *, vlek: bool = False) -> bytes:
    """Encode a table WITHOUT validation (tests build broken blobs with it on purpose;
    production code uses certd.policy.build_blob)."""
    entries = [table.Entry.of(Role.ARK, ark.public_bytes(DER)),
               table.Entry.of(Role.ASK, ask.public_bytes(DER)),
               table.Entry.of(Role.VLEK if vlek else Role.VCEK, leaf.public_bytes(DER))]
    if crl is not None:
        entries.append(table.Entry.of(Role.CRL, crl.public_bytes(DER)))
    return table.encode(entries)


def make_platform(product: Product = Product.MILAN, *, tcb: Tcb | None = None,
                  chip_id: bytes | None = None, vlek: bool = False,
                  mask_chip_id: bool = False) -> Platform:
    """A plausible simulated platform (random chip id unless given)."""
    if tcb is None:
        tcb = Tcb(bl=3, tee=0, snp=8, ucode=115) if not product.turin_layout else \
            Tcb(fmc=1, bl=3, tee=2, snp=5, ucode=97)
    return Platform(product=product, reported_tcb=tcb, current_tcb=tcb,
                    chip_id=chip_id if chip_id is not None else os.urandom(product.hwid_len),
                    mask_chip_id=mask_chip_id, signing_key="vlek" if vlek else "vcek")


@dataclass
class FakePsp:
    """A simulated AMD Secure Processor for one platform.

    The signing key is a function of (chip, reported TCB) as on real hardware: updating
    to a new TCB changes key and certificate, going back gives the old key again.
    """

    pki: DevPki
    platform: Platform
    _keys: dict = field(default_factory=dict, repr=False)
    _certs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.platform.product is not self.pki.product:
            raise ValueError(f"platform is {self.platform.product.value}, PKI is "
                             f"{self.pki.product.value}")

    def _ident(self, tcb: Tcb) -> tuple:
        return (self.platform.signing_key, self.platform.chip_id, tcb)

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        ident = self._ident(self.platform.reported_tcb)
        if ident not in self._keys:
            self._keys[ident] = ec_key()
        return self._keys[ident]

    @property
    def leaf(self) -> x509.Certificate:
        """The VCEK (or VLEK) certificate for the current reported TCB."""
        ident = self._ident(self.platform.reported_tcb)
        if ident not in self._certs:
            tcb = self.platform.reported_tcb
            if self.platform.vlek:
                cert, _ = self.pki.issue_vlek(tcb, key=self.key)
            else:
                if self.platform.chip_id is None:
                    raise ValueError("a VCEK platform needs a chip id")
                cert, _ = self.pki.issue_vcek(tcb, self.platform.chip_id, key=self.key)
            self._certs[ident] = cert
        return self._certs[ident]

    def blob(self, crl: x509.CertificateRevocationList | None = None) -> bytes:
        """The table a host should serve for this platform right now (not validated)."""
        ask = self.pki.asvk if self.platform.vlek else self.pki.ask
        return blob(self.pki.ark, ask, self.leaf, crl, vlek=self.platform.vlek)

    def report(self, report_data: bytes = b"", *, measurement: bytes = b"",
               version: int = 5) -> bytes:
        """A signed ATTESTATION_REPORT in the real format."""
        p = self.platform
        chip = bytes(64) if (p.mask_chip_id or p.chip_id is None) else p.chip_id
        body = reportmod.build(
            product=p.product, reported_tcb=p.reported_tcb, chip_id=chip,
            signing_key=reportmod.SigningKey.VLEK if p.vlek else reportmod.SigningKey.VCEK,
            report_data=report_data, measurement=measurement, version=version)
        der = self.key.sign(body[: reportmod.SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return reportmod.with_signature(body, r, s)

    def update_firmware(self, new_tcb: Tcb) -> Platform:
        """Install firmware and commit: the reported TCB (and so the key) changes."""
        self.platform = self.platform.replace(reported_tcb=new_tcb, current_tcb=new_tcb)
        return self.platform
