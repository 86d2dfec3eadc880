"""Load and classify AMD SEV certificates and CRLs (PEM or DER, single or bundles).

Every bad input raises :class:`PkiError` naming the source (file name or blob entry) and
the problem; no other exception escapes the public functions.

cryptography parses most fields lazily: a certificate whose outer DER is sound can still
raise on ``.subject``, ``.extensions``, ``.public_key()``, dates or CRL entries, long after
it was "loaded". So the one place a :class:`Cert` or :class:`Crl` is built
(:func:`cert_from_der`, :func:`crl_from_der`) reads every field certd uses, turns any
failure into a PkiError naming the field, and keeps the values; code above uses those
values and never meets a lazy parse error.

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
import functools
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import cryptography
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from certd import faults
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
    """A parsed, classified AMD certificate. Every field was read at load time, so none
    of them raises; use them rather than re-reading ``cert``."""

    cert: x509.Certificate
    der: bytes
    kind: Kind
    product: Product | None
    source: str
    ext: amdext.AmdExtensions
    subject: x509.Name
    issuer: x509.Name
    subject_cn: str | None
    issuer_cn: str | None
    public_key: CertificatePublicKeyTypes
    spki: bytes  # DER SubjectPublicKeyInfo: what "the same key" compares
    serial: int  # not cert.serial_number: cryptography warns on every access to serial 0
    not_before: datetime
    not_after: datetime
    #: None if cryptography does not support the signature algorithm (not AMD's, then).
    signature_hash: hashes.HashAlgorithm | None

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
    """A parsed CRL; as for :class:`Cert`, every field was read at load time."""

    crl: x509.CertificateRevocationList
    der: bytes
    product: Product | None  # from the issuer CN ARK-<Product>
    source: str
    issuer: x509.Name
    issuer_cn: str | None
    this_update: datetime
    next_update: datetime | None
    #: serial -> revocation date, in CRL order (read-only: a Crl is shared, see below).
    revoked: Mapping[int, datetime]
    signature_hash: hashes.HashAlgorithm | None

    def revoked_serials(self) -> list[int]:
        return list(self.revoked)


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


def _parse_der_certificate(der: bytes, source: str) -> x509.Certificate:
    """DER -> Certificate, accepting AMD's serial number 0 (inside a _Reader, which keeps
    the serial-number warning quiet)."""
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as e:
        serial = _serial_of(der)
        if serial is not None and serial <= 0 and "serial" in str(e).lower():
            raise PkiError(
                f"{source}: certificate has serial number {serial}, as AMD issues every "
                f"VCEK/VLEK, and cryptography {cryptography.__version__} refuses to parse "
                "it (RFC 5280 wants positive serials). certd needs a cryptography release "
                "that still accepts them (pyproject pins <51)") from None
        raise PkiError(f"{source}: not a valid DER X.509 certificate ({_brief(e)})") from None


def _parse_der_crl(der: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        return x509.load_der_x509_crl(der)
    except (ValueError, x509.InvalidVersion) as e:
        raise PkiError(f"{source}: not a valid DER X.509 CRL ({_brief(e)})") from None


# --- reading every lazily parsed field, once ---------------------------------------------

#: What cryptography raises on bytes it cannot read, each seen by tests/test_policy_fuzz.py
#: (TypeError: a name attribute of a type its OID does not allow, raised by NameAttribute).
#: Only cryptography's accessors run inside a _Reader, so none of these is a bug of ours.
_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
               x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class _Reader:
    """Reads fields one by one inside ``with``, so a failure names the field.

    ``with _Reader(source, "certificate") as r: subject = r("subject name", lambda: ...)``.
    cryptography's exceptions become PkiError, and so do its warnings (a country name of
    the wrong length, say): a certificate it only half accepts is malformed, and a warning
    must not escape to the daemon's stderr (or become an error under ``-W error``). The
    serial-number warning is the exception: AMD's leaves all carry serial 0.
    ``CERTD_UNSAFE=total-policy`` lets both through (the fuzz test's negative control),
    all but the serial-number warning, as before this class existed.
    """

    def __init__(self, source: str, what: str):
        self.source, self.what = source, what
        self.safe = not faults.unsafe("total-policy")

    def __enter__(self) -> "_Reader":
        self._guard = warnings.catch_warnings(record=self.safe)
        self._seen = self._guard.__enter__()
        if self.safe:
            warnings.simplefilter("always")  # recorded, then judged in __call__
        else:
            warnings.filterwarnings("ignore", message=_SERIAL_WARNING,
                                    category=CryptographyDeprecationWarning)
        return self

    def __exit__(self, *exc_info) -> None:
        self._guard.__exit__(*exc_info)

    def __call__(self, field: str, read):
        if not self.safe:
            return read()
        try:
            value = read()
        except PkiError:
            raise
        except _UNREADABLE as e:
            raise PkiError(f"{self.source}: unreadable {self.what} {field} "
                           f"({_brief(e)})") from None
        if self._seen:
            bad = [w for w in self._seen if not (w.category is CryptographyDeprecationWarning
                                                 and re.match(_SERIAL_WARNING, str(w.message)))]
            if bad:
                raise PkiError(f"{self.source}: malformed {self.what} {field} "
                               f"(cryptography warns: {bad[0].message})")
            self._seen.clear()
        return value

    def signature(self, signed: x509.Certificate | x509.CertificateRevocationList,
                  ) -> hashes.HashAlgorithm | None:
        """Read the signature fields (of a certificate or a CRL); return the hash algorithm,
        None if cryptography does not support it."""
        self("signature", lambda: (signed.signature_algorithm_oid, signed.signature))
        return self("signature algorithm parameters", lambda: _signature_hash(signed))


def _brief(e: BaseException) -> str:
    """cryptography's message; its ASN.1 parser's made readable: "error parsing asn1 value:
    ParseError { kind: InvalidValue, location: ["TBSCertList::this_update", ...] }" becomes
    "malformed DER: InvalidValue at TBSCertList::this_update > ..."."""
    text = str(e) or type(e).__name__
    kind = re.search(r"kind: (\w+)", text)
    if not text.startswith("error parsing asn1 value") or not kind:
        return text
    where = re.search(r"location: \[(.*)\]", text)
    steps = [x.strip().strip('"') for x in where.group(1).split(",")] if where else []
    return f"malformed DER: {kind.group(1)}" + (f" at {' > '.join(steps)}" if steps else "")


def _signature_hash(signed: x509.Certificate | x509.CertificateRevocationList,
                    ) -> hashes.HashAlgorithm | None:
    try:
        return signed.signature_hash_algorithm
    except UnsupportedAlgorithm:  # a well-formed but unknown algorithm: chain checks say so
        return None


# --- classification --------------------------------------------------------------------

def _product_from(name: str, source: str, what: str) -> Product:
    try:
        return Product.parse(name)
    except ValueError:
        raise PkiError(f"{source}: {what} names unknown product {name!r}") from None


def classify(subject: x509.Name, issuer_name: x509.Name, extensions: x509.Extensions,
             source: str) -> tuple[Kind, Product | None, amdext.AmdExtensions]:
    """Kind, product and AMD extensions of a certificate, from fields already read."""
    try:
        ext = amdext.parse(extensions)
    except amdext.ExtensionError as e:
        raise PkiError(f"{source}: bad AMD extension: {e}") from None
    cn = common_name(subject) or ""
    issuer = common_name(issuer_name) or ""

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
    """The one place a :class:`Cert` is made: parse, read every field, classify.

    Memoized by (bytes, source): the daemon and the CLI check the same certificates over
    and over, and a Cert is immutable, so a cached one is the one a new parse would give.
    """
    return _cert_from_der(bytes(der), source)


def crl_from_der(der: bytes, source: str) -> Crl:
    """The one place a :class:`Crl` is made: parse and read every field (memoized, as
    :func:`cert_from_der`)."""
    return _crl_from_der(bytes(der), source)


def clear_cache() -> None:
    """Forget memoized certificates and CRLs (for tests that patch cryptography)."""
    _cert_from_der.cache_clear()
    _crl_from_der.cache_clear()


@functools.lru_cache(maxsize=128)
def _cert_from_der(der: bytes, source: str) -> Cert:
    with _Reader(source, "certificate") as r:
        cert = r("DER encoding", lambda: _parse_der_certificate(der, source))
        subject = r("subject name", lambda: cert.subject)
        issuer = r("issuer name", lambda: cert.issuer)
        extensions = r("extensions", lambda: cert.extensions)
        public_key = r("public key", cert.public_key)
        spki = r("public key", lambda: public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        serial = r("serial number", lambda: cert.serial_number)  # warning handled by r
        not_before = r("notBefore date", lambda: cert.not_valid_before_utc)
        not_after = r("notAfter date", lambda: cert.not_valid_after_utc)
        signature_hash = r.signature(cert)
        r("signed part", lambda: cert.tbs_certificate_bytes)
    kind, product, ext = classify(subject, issuer, extensions, source)
    return Cert(cert, der, kind, product, source, ext, subject, issuer, common_name(subject),
                common_name(issuer), public_key, spki, serial, not_before, not_after,
                signature_hash)


@functools.lru_cache(maxsize=128)
def _crl_from_der(der: bytes, source: str) -> Crl:
    with _Reader(source, "CRL") as r:
        crl = r("DER encoding", lambda: _parse_der_crl(der, source))
        issuer = r("issuer name", lambda: crl.issuer)
        this_update = r("thisUpdate date", lambda: crl.last_update_utc)
        next_update = r("nextUpdate date", lambda: crl.next_update_utc)
        r("extensions", lambda: crl.extensions)
        signature_hash = r.signature(crl)
        r("signed part", lambda: crl.tbs_certlist_bytes)
        revoked: dict[int, datetime] = {}
        for n, entry in enumerate(r("list of revoked certificates", lambda: list(crl)), 1):
            serial = r(f"revoked entry {n}", lambda: entry.serial_number)
            date = r(f"revoked entry {n} (serial 0x{serial:x})",
                     lambda: (entry.extensions, entry.revocation_date_utc)[1])
            revoked.setdefault(serial, date)  # the first entry counts, as in a lookup
    cn = common_name(issuer)
    product = None
    if cn and cn.startswith("ARK-"):
        try:
            product = Product.parse(cn[4:])
        except ValueError:
            product = None
    return Crl(crl, der, product, source, issuer, cn, this_update, next_update,
               MappingProxyType(revoked), signature_hash)


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
