"""Load and classify AMD SEV certificates and CRLs (PEM or DER, single or bundles).

Every bad input raises :class:`PkiError` naming the source (file name or blob entry) and
the problem; no other exception escapes the public functions.

Classification follows AMD's subject names, then structure:

    CN=ARK-<Product>        ARK  (self-issued root, RSA-4096)
    CN=SEV-<Product>        ASK  (signs VCEKs)
    CN=SEV-VLEK-<Product>   ASVK (signs VLEKs)
    CN=SEV-VCEK             VCEK (EC P-384 leaf; hwID extension)
    CN=SEV-VLEK             VLEK (EC P-384 leaf; cspID extension, no hwID)

A leaf with another CN is still recognised by its AMD extensions (cspID -> VLEK,
hwID -> VCEK). The product of a leaf comes from productName, else from its issuer's CN.

VCEK/VLEK certificates carry serial number 0, which RFC 5280 forbids. cryptography 50
parses them with a CryptographyDeprecationWarning that we silence for exactly that
message; a future release may refuse them, which we turn into a PkiError that says so.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cryptography
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd import extensions as amdext


class PkiError(ValueError):
    pass


class Kind(enum.Enum):
    ARK = "ARK"
    ASK = "ASK"
    ASVK = "ASVK"
    VCEK = "VCEK"
    VLEK = "VLEK"

    @property
    def is_leaf(self) -> bool:
        return self in (Kind.VCEK, Kind.VLEK)


_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("latin-1") if isinstance(value, bytes) else value


@dataclass(frozen=True, eq=False)
class Cert:
    """A parsed, classified AMD certificate."""

    cert: x509.Certificate
    der: bytes
    kind: Kind
    product: Product | None
    source: str
    ext: amdext.AmdExtensions

    @property
    def subject_cn(self) -> str | None:
        return common_name(self.cert.subject)

    @property
    def issuer_cn(self) -> str | None:
        return common_name(self.cert.issuer)

    @property
    def serial(self) -> int:
        """Use this, not ``cert.serial_number``: cryptography warns again on every access."""
        return serial_number(self.cert)

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def hwid(self) -> bytes | None:
        return self.ext.hwid

    def tcb(self) -> Tcb:
        """The leaf's TCB from its extensions; raises PkiError if missing or malformed."""
        try:
            return self.ext.tcb(self.product)
        except amdext.ExtensionError as e:
            raise PkiError(f"{self.source}: {e}") from None

    def describe(self) -> str:
        return f"{self.kind.value} {self.subject_cn!r} ({self.source})"


@dataclass(frozen=True, eq=False)
class Crl:
    crl: x509.CertificateRevocationList
    der: bytes
    product: Product | None  # from the issuer CN ARK-<Product>
    source: str

    @property
    def issuer_cn(self) -> str | None:
        return common_name(self.crl.issuer)

    def revoked_serials(self) -> list[int]:
        return [r.serial_number for r in self.crl]


def serial_number(cert: x509.Certificate) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING,
                                category=CryptographyDeprecationWarning)
        return cert.serial_number


# --- DER ------------------------------------------------------------------------------

def _tbs_first_tag(der: bytes) -> int | None:
    """Tag of the first element inside the TBS sequence, or None if not DER-shaped."""
    try:
        tag, outer, _ = amdext.read_tlv(der)
        if tag != 0x30:
            return None
        tag, tbs, _ = amdext.read_tlv(outer)
        if tag != 0x30 or not tbs:
            return None
        return tbs[0]
    except amdext.ExtensionError:
        return None


def _serial_of(der: bytes) -> int | None:
    """The serial number read straight from the DER (used to explain a refusal)."""
    try:
        _, outer, _ = amdext.read_tlv(der)
        _, tbs, _ = amdext.read_tlv(outer)
        pos = 0
        tag, _, end = amdext.read_tlv(tbs, pos)
        if tag == 0xA0:  # [0] EXPLICIT version
            pos = end
            tag, _, end = amdext.read_tlv(tbs, pos)
        if tag != 0x02:
            return None
        _, value, _ = amdext.read_tlv(tbs, pos)
        return int.from_bytes(value, "big", signed=True)
    except amdext.ExtensionError:
        return None


def parse_der_certificate(der: bytes, source: str) -> x509.Certificate:
    """DER -> Certificate, accepting AMD's serial number 0."""
    with warnings.catch_warnings():
        # Exactly the serial-number deprecation, nothing else (filterwarnings=error in tests
        # keeps any other warning visible). Note: catch_warnings is process-global state.
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING,
                                category=CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError as e:
            serial = _serial_of(der)
            if serial is not None and serial <= 0:
                raise PkiError(
                    f"{source}: certificate has serial number {serial}, as AMD issues every "
                    f"VCEK/VLEK, and cryptography {cryptography.__version__} refuses to parse "
                    "it (RFC 5280 wants positive serials). certd needs a cryptography release "
                    "that still accepts them (pyproject pins <51)") from None
            raise PkiError(f"{source}: not a valid DER X.509 certificate ({e})") from None


def parse_der_crl(der: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        return x509.load_der_x509_crl(der)
    except ValueError as e:
        raise PkiError(f"{source}: not a valid DER X.509 CRL ({e})") from None


# --- classification --------------------------------------------------------------------

def _product_from(name: str, source: str, what: str) -> Product:
    try:
        return Product.parse(name)
    except ValueError:
        raise PkiError(f"{source}: {what} names unknown product {name!r}") from None


def classify(cert: x509.Certificate, source: str) -> tuple[Kind, Product | None, amdext.AmdExtensions]:
    try:
        ext = amdext.parse(cert.extensions)
    except amdext.ExtensionError as e:
        raise PkiError(f"{source}: bad AMD extension: {e}") from None
    except ValueError as e:  # cryptography refusing a malformed extension list
        raise PkiError(f"{source}: unreadable extensions ({e})") from None
    cn = common_name(cert.subject) or ""
    issuer = common_name(cert.issuer) or ""

    if cn.startswith("ARK-"):
        return Kind.ARK, _product_from(cn[4:], source, f"subject CN {cn!r}"), ext
    if cn.startswith("SEV-VLEK-"):
        return Kind.ASVK, _product_from(cn[9:], source, f"subject CN {cn!r}"), ext
    if cn == "SEV-VCEK" or (cn != "SEV-VLEK" and not cn.startswith("SEV-")
                            and ext.hwid is not None and ext.csp_id is None):
        kind = Kind.VCEK
    elif cn == "SEV-VLEK" or (not cn.startswith("SEV-") and ext.csp_id is not None):
        kind = Kind.VLEK
    elif cn.startswith("SEV-"):
        return Kind.ASK, _product_from(cn[4:], source, f"subject CN {cn!r}"), ext
    else:
        raise PkiError(f"{source}: not an AMD SEV certificate (subject CN {cn!r}; expected "
                       "ARK-<Product>, SEV-<Product>, SEV-VLEK-<Product>, SEV-VCEK or SEV-VLEK)")
    product = ext.product
    if product is None:
        prefix = "SEV-VLEK-" if kind is Kind.VLEK else "SEV-"
        if issuer.startswith(prefix):
            try:
                product = Product.parse(issuer[len(prefix):])
            except ValueError:
                product = None
    return kind, product, ext


def load_certificate(data: bytes, source: str) -> Cert:
    """Exactly one certificate (DER, or PEM with one CERTIFICATE block)."""
    items = load_bytes(data, source)
    certs = [i for i in items if isinstance(i, Cert)]
    if len(items) != 1 or len(certs) != 1:
        raise PkiError(f"{source}: expected one certificate, found {len(certs)} "
                       f"certificate(s) and {len(items) - len(certs)} CRL(s)")
    return certs[0]


def load_crl(data: bytes, source: str) -> Crl:
    """Exactly one CRL (DER, or PEM with one X509 CRL block)."""
    items = load_bytes(data, source)
    crls = [i for i in items if isinstance(i, Crl)]
    if len(items) != 1 or len(crls) != 1:
        raise PkiError(f"{source}: expected one CRL, found {len(crls)} CRL(s) "
                       f"and {len(items) - len(crls)} certificate(s)")
    return crls[0]


def cert_from_der(der: bytes, source: str) -> Cert:
    cert = parse_der_certificate(der, source)
    kind, product, ext = classify(cert, source)
    return Cert(cert, bytes(der), kind, product, source, ext)


def crl_from_der(der: bytes, source: str) -> Crl:
    crl = parse_der_crl(der, source)
    cn = common_name(crl.issuer) or ""
    product = None
    if cn.startswith("ARK-"):
        try:
            product = Product.parse(cn[4:])
        except ValueError:
            product = None
    return Crl(crl, bytes(der), product, source)


_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def load_bytes(data: bytes, source: str) -> list[Cert | Crl]:
    """All certificates and CRLs in ``data``: a DER object or a PEM bundle (in order)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PkiError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.strip():
        raise PkiError(f"{source}: empty input")
    if b"-----BEGIN" in data:
        out: list[Cert | Crl] = []
        blocks = list(_PEM.finditer(data))
        if not blocks:
            raise PkiError(f"{source}: PEM header without a matching END line")
        for n, m in enumerate(blocks, 1):
            label = m.group(1).decode()
            where = f"{source} (PEM block {n})" if len(blocks) > 1 else source
            try:
                der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
            except (binascii.Error, ValueError):
                raise PkiError(f"{where}: PEM {label} block is not valid base64") from None
            if label in ("CERTIFICATE", "X509 CERTIFICATE"):
                out.append(cert_from_der(der, where))
            elif label == "X509 CRL":
                out.append(crl_from_der(der, where))
            else:
                raise PkiError(f"{where}: unexpected PEM block {label!r} "
                               "(expected CERTIFICATE or X509 CRL)")
        return out
    first = _tbs_first_tag(data)
    if first is None:
        raise PkiError(f"{source}: neither PEM nor DER (no ASN.1 SEQUENCE at the start)")
    # A v3 certificate's TBS starts with [0] version; a CRL's with INTEGER or SEQUENCE.
    if first == 0xA0:
        return [cert_from_der(data, source)]
    return [crl_from_der(data, source)]


def load_file(path: str | Path) -> list[Cert | Crl]:
    """Everything in one file; OS errors become PkiError naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PkiError(f"{p}: cannot read ({e.strerror or e})") from None
    return load_bytes(data, str(p))
