"""AMD's VCEK/VLEK X.509 extensions (OIDs 1.3.6.1.4.1.3704.1.*): parse and encode.

Encodings as KDS issues them (checked on the real certificates in tests/vectors):

    .1      structVersion   DER INTEGER (0 on Milan/Genoa, 1 on Turin)
    .2      productName     DER IA5String ("Milan-B0", "Genoa", "Turin"; VLEK "Milan")
    .3.1-8  bl/tee/snp/spl4-7/ucode SPL   DER INTEGER
    .3.9    fmcSPL (Turin)  DER INTEGER
    .4      hwID            the chip id as RAW bytes, without an OCTET STRING tag
                            (64 bytes Milan/Genoa, 8 bytes Turin); the tagged form is
                            accepted too, as go-sev-guest and snpguest do
    .5      cspID (VLEK)    DER IA5String

The small DER reader here is deliberately minimal (definite lengths, single TLV): these
values are tiny, and a full ASN.1 stack would be more code to trust than this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from certd.abi.product import Product
from certd.abi.tcb import Tcb, TcbError

PREFIX = "1.3.6.1.4.1.3704.1."

STRUCT_VERSION = ObjectIdentifier(PREFIX + "1")
PRODUCT_NAME = ObjectIdentifier(PREFIX + "2")
BL_SPL = ObjectIdentifier(PREFIX + "3.1")
TEE_SPL = ObjectIdentifier(PREFIX + "3.2")
SNP_SPL = ObjectIdentifier(PREFIX + "3.3")
SPL4 = ObjectIdentifier(PREFIX + "3.4")
SPL5 = ObjectIdentifier(PREFIX + "3.5")
SPL6 = ObjectIdentifier(PREFIX + "3.6")
SPL7 = ObjectIdentifier(PREFIX + "3.7")
UCODE_SPL = ObjectIdentifier(PREFIX + "3.8")
FMC_SPL = ObjectIdentifier(PREFIX + "3.9")
HWID = ObjectIdentifier(PREFIX + "4")
CSP_ID = ObjectIdentifier(PREFIX + "5")

#: Integer-valued extensions: OID -> attribute of :class:`AmdExtensions`.
_INT_FIELDS = {
    STRUCT_VERSION: "struct_version",
    BL_SPL: "bl", TEE_SPL: "tee", SNP_SPL: "snp",
    SPL4: "spl4", SPL5: "spl5", SPL6: "spl6", SPL7: "spl7",
    UCODE_SPL: "ucode", FMC_SPL: "fmc",
}
_STR_FIELDS = {PRODUCT_NAME: "product_name", CSP_ID: "csp_id"}
_NAMES = {STRUCT_VERSION: "structVersion", PRODUCT_NAME: "productName", BL_SPL: "blSPL",
          TEE_SPL: "teeSPL", SNP_SPL: "snpSPL", SPL4: "spl4", SPL5: "spl5", SPL6: "spl6",
          SPL7: "spl7", UCODE_SPL: "ucodeSPL", FMC_SPL: "fmcSPL", HWID: "hwID",
          CSP_ID: "cspID"}

TAG_INTEGER, TAG_OCTET_STRING, TAG_IA5STRING = 0x02, 0x04, 0x16


class ExtensionError(ValueError):
    pass


def read_tlv(buf: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, end). Raises ExtensionError on bad framing."""
    if pos + 2 > len(buf):
        raise ExtensionError("DER value truncated (no tag/length)")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(buf):
            raise ExtensionError("DER length is indefinite, too long or truncated")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > len(buf):
        raise ExtensionError(f"DER value truncated: needs {length} bytes, {len(buf) - pos} left")
    return tag, bytes(buf[pos : pos + length]), pos + length


def _single(buf: bytes, tag: int, dotted: str) -> bytes:
    try:
        t, value, end = read_tlv(buf)
    except ExtensionError as e:
        raise ExtensionError(f"{_what(dotted)}: {e}") from None
    if t != tag:
        raise ExtensionError(f"{_what(dotted)}: expected DER tag 0x{tag:02x}, got 0x{t:02x}")
    if end != len(buf):
        raise ExtensionError(f"{_what(dotted)}: {len(buf) - end} trailing bytes after the "
                             "DER value")
    return value


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_integer(v: int) -> bytes:
    """Non-negative DER INTEGER (a leading zero keeps 0x80+ values positive)."""
    if v < 0:
        raise ExtensionError("AMD extension integers are non-negative")
    body = v.to_bytes(v.bit_length() // 8 + 1, "big")
    return bytes([TAG_INTEGER]) + _der_len(len(body)) + body


def der_ia5(s: str) -> bytes:
    body = s.encode("ascii")
    return bytes([TAG_IA5STRING]) + _der_len(len(body)) + body


def _parse_int(raw: bytes, dotted: str) -> int:
    body = _single(raw, TAG_INTEGER, dotted)
    if not body:
        raise ExtensionError(f"{_what(dotted)}: empty INTEGER")
    if body[0] & 0x80:
        raise ExtensionError(f"{_what(dotted)}: negative INTEGER")
    return int.from_bytes(body, "big")


def _parse_ia5(raw: bytes, dotted: str) -> str:
    body = _single(raw, TAG_IA5STRING, dotted)
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise ExtensionError(f"{_what(dotted)}: IA5String is not ASCII") from None


def parse_hwid(raw: bytes) -> bytes:
    """hwID: raw 64 or 8 bytes; or the same wrapped in an OCTET STRING (66 or 10 bytes).

    Only the exact wrapped lengths are unwrapped, so a raw hwID that happens to start
    with 0x04 is never misread as a tagged one (raw is 64/8 bytes, wrapped is 66/10).
    """
    if len(raw) in (66, 10) and raw[0] == TAG_OCTET_STRING and raw[1] == len(raw) - 2:
        return bytes(raw[2:])
    if len(raw) in (64, 8):
        return bytes(raw)
    raise ExtensionError(f"hwID is {len(raw)} bytes; expected 64 (Milan/Genoa) or 8 (Turin), "
                         "raw or in an OCTET STRING")


@dataclass(frozen=True)
class AmdExtensions:
    struct_version: int | None = None
    product_name: str | None = None
    bl: int | None = None
    tee: int | None = None
    snp: int | None = None
    spl4: int | None = None
    spl5: int | None = None
    spl6: int | None = None
    spl7: int | None = None
    ucode: int | None = None
    fmc: int | None = None
    hwid: bytes | None = None
    csp_id: str | None = None
    #: Dotted OIDs under the AMD prefix that this version does not know (kept, not fatal:
    #: go-sev-guest rejecting unknown OIDs is why it broke on Turin's fmcSPL).
    unknown: tuple[str, ...] = field(default=())

    @property
    def product(self) -> Product | None:
        """Product line from productName (``Milan-B0`` -> Milan), None if absent/unknown."""
        if not self.product_name:
            return None
        try:
            return Product.parse(self.product_name)
        except ValueError:
            return None

    @property
    def has_tcb(self) -> bool:
        return None not in (self.bl, self.tee, self.snp, self.ucode)

    def tcb(self, product: Product | None = None) -> Tcb:
        """The certificate's TCB. On Turin (by ``product`` or productName) fmcSPL is required."""
        product = product or self.product
        missing = [n for n in ("bl", "tee", "snp", "ucode") if getattr(self, n) is None]
        if product is not None and product.turin_layout and self.fmc is None:
            missing.append("fmc")
        if missing:
            raise ExtensionError("certificate lacks TCB extension(s): "
                                 + ", ".join(f"{m}SPL" for m in missing))
        fmc = self.fmc if (product is None or product.turin_layout) else None
        try:
            return Tcb(bl=self.bl, tee=self.tee, snp=self.snp, ucode=self.ucode, fmc=fmc)
        except TcbError as e:
            raise ExtensionError(str(e)) from None


#: dotted OID -> (attribute of AmdExtensions, value parser), for :func:`parse`.
_FIELDS = {**{oid.dotted_string: (attr, "int") for oid, attr in _INT_FIELDS.items()},
           **{oid.dotted_string: (attr, "ia5") for oid, attr in _STR_FIELDS.items()},
           HWID.dotted_string: ("hwid", "hwid")}


_NAME_OF = {oid.dotted_string: name for oid, name in _NAMES.items()}


def _what(dotted: str) -> str:
    """``blSPL (1.3.6.1.4.1.3704.1.3.1)`` for error messages (built only for them)."""
    return f"{_NAME_OF[dotted]} ({dotted})" if dotted in _NAME_OF else dotted


def parse(extensions: x509.Extensions) -> AmdExtensions:
    """Read the AMD extensions of a certificate; other extensions are ignored."""
    values: dict[str, object] = {}
    unknown: list[str] = []
    for ext in extensions:
        dotted = ext.oid.dotted_string
        if not dotted.startswith(PREFIX):
            continue
        value = ext.value
        if not isinstance(value, x509.UnrecognizedExtension):
            raise ExtensionError(f"AMD extension {dotted} was decoded as "
                                 f"{type(value).__name__}, not raw bytes")
        raw = value.value
        attr, kind = _FIELDS.get(dotted, (None, None))
        if kind == "int":
            values[attr] = _parse_int(raw, dotted)
        elif kind == "ia5":
            values[attr] = _parse_ia5(raw, dotted)
        elif kind == "hwid":
            values[attr] = parse_hwid(raw)
        else:
            unknown.append(dotted)
    return AmdExtensions(unknown=tuple(unknown), **values)  # type: ignore[arg-type]


def encode(*, product_name: str, tcb: Tcb, hwid: bytes | None = None,
           csp_id: str | None = None, struct_version: int | None = None,
           ) -> list[x509.UnrecognizedExtension]:
    """Extensions as KDS writes them, for the development PKI.

    Turin-style (tcb.fmc set) certificates get structVersion 1, fmcSPL and no spl4, as
    the real ones do; others structVersion 0 and spl4..spl7 = 0. hwID is raw.
    """
    turin = tcb.fmc is not None
    if struct_version is None:
        struct_version = 1 if turin else 0
    out = [
        (STRUCT_VERSION, der_integer(struct_version)),
        (PRODUCT_NAME, der_ia5(product_name)),
    ]
    if turin:
        out.append((FMC_SPL, der_integer(tcb.fmc)))
    out += [(BL_SPL, der_integer(tcb.bl)), (TEE_SPL, der_integer(tcb.tee)),
            (SNP_SPL, der_integer(tcb.snp))]
    out += [(oid, der_integer(0)) for oid in ((SPL5, SPL6, SPL7) if turin else
                                              (SPL4, SPL5, SPL6, SPL7))]
    out.append((UCODE_SPL, der_integer(tcb.ucode)))
    if hwid is not None:
        if len(hwid) not in (64, 8):
            raise ExtensionError(f"hwID must be 64 or 8 bytes, got {len(hwid)}")
        out.append((HWID, bytes(hwid)))
    if csp_id is not None:
        out.append((CSP_ID, der_ia5(csp_id)))
    return [x509.UnrecognizedExtension(oid, value) for oid, value in out]
