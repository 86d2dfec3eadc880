"""The host's /dev/sev interface (include/uapi/linux/psp-sev.h): pure encoders/decoders.

Every structure is ``__packed`` little-endian; bit-fields are allocated from the least
significant bit (x86-64 GCC/Clang), so a ``__u32 a:1; __u32 b:1;`` pair is bits 0 and 1 of
one u32. The only ioctl is ``SEV_ISSUE_CMD``; the command id in ``struct sev_issue_cmd``
selects the operation (``SEV_GET_ID2``, ``SNP_PLATFORM_STATUS``, ...) and ``data`` points at
that command's structure. No I/O here: :func:`certd.platform.read_dev_sev` is the glue.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from certd.abi import tcb as tcbmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb

# --- command ids (enum in psp-sev.h, in order from 0) ---------------------------------
SEV_FACTORY_RESET = 0
SEV_PLATFORM_STATUS = 1
SEV_PEK_GEN = 2
SEV_PEK_CSR = 3
SEV_PDH_GEN = 4
SEV_PDH_CERT_EXPORT = 5
SEV_PEK_CERT_IMPORT = 6
SEV_GET_ID = 7
SEV_GET_ID2 = 8
SNP_PLATFORM_STATUS = 9
SNP_COMMIT = 10
SNP_SET_CONFIG = 11
SNP_VLEK_LOAD = 12

# --- ioctl numbers (asm-generic/ioctl.h encoding) -------------------------------------
_IOC_WRITE, _IOC_READ = 1, 2


def ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: dir in bits 30-31, size 16-29, type 8-15, nr 0-7."""
    return (direction << 30) | (size << 16) | (ord(type_) << 8) | nr


SEV_IOC_TYPE = "S"
ISSUE_CMD = struct.Struct("<IQI")  # struct sev_issue_cmd {u32 cmd; u64 data; u32 error}
#: ``_IOWR('S', 0x0, struct sev_issue_cmd)`` = 0xC0105300.
SEV_ISSUE_CMD = ioc(_IOC_READ | _IOC_WRITE, SEV_IOC_TYPE, 0, ISSUE_CMD.size)


class SevError(ValueError):
    pass


# --- struct sev_issue_cmd ---------------------------------------------------------------

@dataclass(frozen=True)
class IssueCmd:
    cmd: int
    data: int      #: user address of the command's structure
    error: int = 0  #: SEV firmware return code (out)


def encode_issue_cmd(c: IssueCmd) -> bytes:
    return ISSUE_CMD.pack(c.cmd, c.data, c.error)


def decode_issue_cmd(raw: bytes) -> IssueCmd:
    if len(raw) != ISSUE_CMD.size:
        raise SevError(f"struct sev_issue_cmd is {ISSUE_CMD.size} bytes, got {len(raw)}")
    return IssueCmd(*ISSUE_CMD.unpack(raw))


# --- struct sev_user_data_get_id2 {u64 address; u32 length} -------------------------------

GET_ID2 = struct.Struct("<QI")
#: GET_ID2 returns 64 bytes per socket on Milan/Genoa and 8 on Turin; the kernel writes the
#: length it needs back and fails with EIO if the buffer is too small.
ID_BUFFER_LEN = 64


def encode_get_id2(address: int, length: int) -> bytes:
    return GET_ID2.pack(address, length)


def decode_get_id2(raw: bytes) -> tuple[int, int]:
    """(address, length) from the 12-byte structure the kernel wrote back."""
    if len(raw) != GET_ID2.size:
        raise SevError(f"struct sev_user_data_get_id2 is {GET_ID2.size} bytes, got {len(raw)}")
    return GET_ID2.unpack(raw)


def chip_id_from_id_buffer(buf: bytes, length: int, product: Product) -> bytes:
    """The chip id (hwID as VCEKs carry it) from GET_ID2's buffer and returned length.

    The buffer holds the first socket's id first; Turin's id is 8 bytes, older parts' 64.
    """
    if length < product.hwid_len or length > len(buf):
        raise SevError(f"GET_ID2 returned {length} bytes; a {product.value} chip id has "
                       f"{product.hwid_len}")
    return bytes(buf[: product.hwid_len])


# --- struct sev_user_data_snp_status (32 bytes) ---------------------------------------------

SNP_STATUS = struct.Struct("<BBBBIIIQQ")
assert SNP_STATUS.size == 32

#: Bits of the u32 at offset 8, as the header declares them (bit 0 first).
POLICY_FLAGS = ("mask_chip_id", "mask_chip_key", "vlek_en", "feature_info", "rapl_dis",
                "ciphertext_hiding_cap", "ciphertext_hiding_en")


@dataclass(frozen=True)
class SnpStatus:
    api_major: int
    api_minor: int
    state: int
    is_rmp_initialized: bool
    build_id: int
    mask_chip_id: bool
    mask_chip_key: bool
    vlek_en: bool
    feature_info: bool
    rapl_dis: bool
    ciphertext_hiding_cap: bool
    ciphertext_hiding_en: bool
    guest_count: int
    current_tcb_raw: int
    reported_tcb_raw: int

    def current_tcb(self, product: Product) -> Tcb:
        return tcbmod.decode(self.current_tcb_raw, product)

    def reported_tcb(self, product: Product) -> Tcb:
        return tcbmod.decode(self.reported_tcb_raw, product)


def decode_snp_status(raw: bytes) -> SnpStatus:
    if len(raw) != SNP_STATUS.size:
        raise SevError(f"struct sev_user_data_snp_status is {SNP_STATUS.size} bytes, "
                       f"got {len(raw)}")
    (major, minor, state, rmp, build, flags, guests, current,
     reported) = SNP_STATUS.unpack(raw)
    bits = {name: bool(flags >> i & 1) for i, name in enumerate(POLICY_FLAGS)}
    return SnpStatus(api_major=major, api_minor=minor, state=state,
                     is_rmp_initialized=bool(rmp & 1), build_id=build, guest_count=guests,
                     current_tcb_raw=current, reported_tcb_raw=reported, **bits)


def encode_snp_status(s: SnpStatus) -> bytes:
    """Inverse of :func:`decode_snp_status` (for tests and simulators)."""
    flags = sum(1 << i for i, name in enumerate(POLICY_FLAGS) if getattr(s, name))
    return SNP_STATUS.pack(s.api_major, s.api_minor, s.state, int(s.is_rmp_initialized),
                           s.build_id, flags, s.guest_count, s.current_tcb_raw,
                           s.reported_tcb_raw)
