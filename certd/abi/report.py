"""SEV-SNP ATTESTATION_REPORT (1184 bytes): pure parsing, no I/O, no cryptography.

Offsets follow the SEV-SNP firmware ABI (and go-sev-guest / virtee). The signature is
ECDSA P-384 over bytes 0x000..0x29F; r and s are 72-byte little-endian integers at 0x2A0
and 0x2E8. Verifying it is the job of :mod:`certd.verify.report`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from certd.abi import tcb as tcbmod
from certd.abi.product import Product

REPORT_SIZE = 0x4A0
SIGNED_LEN = 0x2A0
SIG_R = slice(0x2A0, 0x2A0 + 72)
SIG_S = slice(0x2E8, 0x2E8 + 72)
SIG_ALGO_ECDSA_P384_SHA384 = 1
MIN_VERSION, MAX_VERSION = 2, 5


class ReportError(ValueError):
    pass


class SigningKey(enum.IntEnum):
    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True)
class AttestationReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    signature_algo: int
    current_tcb_raw: bytes
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey | int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    report_id: bytes
    reported_tcb_raw: bytes
    cpuid: tuple[int, int, int] | None  # family, model, stepping (v3+)
    chip_id: bytes
    committed_tcb_raw: bytes
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb_raw: bytes
    sig_r: int
    sig_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LEN]

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)

    def hwid(self, product: Product) -> bytes:
        """The chip id as the VCEK's hwID extension and KDS carry it (8 bytes on Turin)."""
        return self.chip_id[: product.hwid_len]

    def product(self) -> Product | None:
        """Product line from CPUID (v3+); for v2 only a Turin-shaped chip id is telling."""
        if self.cpuid is not None:
            return Product.from_cpuid(self.cpuid[0], self.cpuid[1])
        if any(self.chip_id[:8]) and not any(self.chip_id[8:]):
            return Product.TURIN
        return None

    def reported_tcb(self, product: Product) -> tcbmod.Tcb:
        return tcbmod.decode(self.reported_tcb_raw, product)

    def current_tcb(self, product: Product) -> tcbmod.Tcb:
        return tcbmod.decode(self.current_tcb_raw, product)

    def committed_tcb(self, product: Product) -> tcbmod.Tcb:
        return tcbmod.decode(self.committed_tcb_raw, product)

    def launch_tcb(self, product: Product) -> tcbmod.Tcb:
        return tcbmod.decode(self.launch_tcb_raw, product)


def parse(raw: bytes) -> AttestationReport:
    """Parse a report; raises :class:`ReportError` naming the problem."""
    raw = bytes(raw)
    if len(raw) != REPORT_SIZE:
        raise ReportError(f"an attestation report is {REPORT_SIZE} bytes, got {len(raw)}")
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", raw, off)[0]  # noqa: E731
    version = u32(0x00)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise ReportError(f"report version {version} is not supported "
                          f"(expected {MIN_VERSION}..{MAX_VERSION})")
    algo = u32(0x34)
    if algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise ReportError(f"signature algorithm {algo} is not ECDSA P-384/SHA-384 (1)")
    signer = u32(0x48)
    key = (signer >> 2) & 0x7
    try:
        key = SigningKey(key)
    except ValueError:
        pass
    return AttestationReport(
        raw=raw,
        version=version,
        guest_svn=u32(0x04),
        policy=u64(0x08),
        vmpl=u32(0x30),
        signature_algo=algo,
        current_tcb_raw=raw[0x38:0x40],
        platform_info=u64(0x40),
        author_key_en=bool(signer & 1),
        mask_chip_key=bool(signer & 2),
        signing_key=key,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        report_id=raw[0x140:0x160],
        reported_tcb_raw=raw[0x180:0x188],
        cpuid=(raw[0x188], raw[0x189], raw[0x18A]) if version >= 3 else None,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb_raw=raw[0x1E0:0x1E8],
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
        launch_tcb_raw=raw[0x1F0:0x1F8],
        sig_r=int.from_bytes(raw[SIG_R], "little"),
        sig_s=int.from_bytes(raw[SIG_S], "little"),
    )


def build(*, product: Product, reported_tcb: tcbmod.Tcb, chip_id: bytes,
          signing_key: SigningKey = SigningKey.VCEK, report_data: bytes = bytes(64),
          measurement: bytes = bytes(48), version: int = 5,
          cpuid: tuple[int, int, int] | None = None) -> bytes:
    """An unsigned report body (signature zero) for simulators: a fake PSP signs it."""
    out = bytearray(REPORT_SIZE)
    tcb_raw = tcbmod.encode(reported_tcb, product)
    struct.pack_into("<I", out, 0x00, version)
    struct.pack_into("<I", out, 0x34, SIG_ALGO_ECDSA_P384_SHA384)
    struct.pack_into("<I", out, 0x48, int(signing_key) << 2)
    for off in (0x38, 0x180, 0x1E0, 0x1F0):
        out[off : off + 8] = tcb_raw
    out[0x50:0x90] = report_data.ljust(64, b"\0")[:64]
    out[0x90:0xC0] = measurement.ljust(48, b"\0")[:48]
    if version >= 3:
        fam, model, step = cpuid or {Product.MILAN: (0x19, 0x01, 1), Product.GENOA: (0x19, 0x11, 1),
                                      Product.TURIN: (0x1A, 0x02, 1)}[product]
        out[0x188:0x18B] = bytes((fam, model, step))
    out[0x1A0:0x1E0] = chip_id.ljust(64, b"\0")[:64]
    return bytes(out)


def with_signature(body: bytes, r: int, s: int) -> bytes:
    out = bytearray(body)
    out[SIG_R] = r.to_bytes(72, "little")
    out[SIG_S] = s.to_bytes(72, "little")
    return bytes(out)
