"""certd.amd.sev decoders against bytes laid out as include/uapi/linux/psp-sev.h defines them.

The test bytes are built here field by field from the header text (offsets written out by
hand, bit-fields LSB first as GCC allocates them on x86-64), not with certd's own structs.
"""

from __future__ import annotations

import pytest

from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd import sev


def snp_status_bytes(*, api_major=1, api_minor=55, state=2, rmp=1, build=21,
                     mask_chip_id=0, mask_chip_key=0, vlek_en=0, feature_info=0, rapl_dis=0,
                     ct_cap=0, ct_en=0, guests=3, current=b"\0" * 8, reported=b"\0" * 8):
    """struct sev_user_data_snp_status, byte by byte (packed, little-endian)."""
    out = bytearray(32)
    out[0] = api_major                      # __u8 api_major
    out[1] = api_minor                      # __u8 api_minor
    out[2] = state                          # __u8 state
    out[3] = rmp                            # __u8 is_rmp_initialized:1; rsvd:7
    out[4:8] = build.to_bytes(4, "little")  # __u32 build_id
    flags = (mask_chip_id | mask_chip_key << 1 | vlek_en << 2 | feature_info << 3
             | rapl_dis << 4 | ct_cap << 5 | ct_en << 6)
    out[8:12] = flags.to_bytes(4, "little")  # __u32 mask_chip_id:1 ... rsvd1:25
    out[12:16] = guests.to_bytes(4, "little")  # __u32 guest_count
    out[16:24] = current                    # __u64 current_tcb_version
    out[24:32] = reported                   # __u64 reported_tcb_version
    return bytes(out)


# TCB_VERSION bytes in memory order (upstream-protocol.md §5.3).
MILAN_TCB_BYTES = bytes([2, 0, 0, 0, 0, 0, 5, 68])        # bl=2 tee=0 snp=5 ucode=68
MILAN_TCB_BYTES_NEW = bytes([3, 0, 0, 0, 0, 0, 8, 115])
TURIN_TCB_BYTES = bytes([1, 3, 2, 5, 0, 0, 0, 97])        # fmc=1 bl=3 tee=2 snp=5 ucode=97


def test_ioctl_number_matches_header_macro():
    # _IOWR('S', 0x0, struct sev_issue_cmd): dir=3 (read|write), size=16, type='S'=0x53, nr=0
    assert sev.ISSUE_CMD.size == 16
    assert sev.SEV_ISSUE_CMD == (3 << 30) | (16 << 16) | (0x53 << 8) | 0 == 0xC0105300


def test_command_ids_follow_the_enum():
    names = ["SEV_FACTORY_RESET", "SEV_PLATFORM_STATUS", "SEV_PEK_GEN", "SEV_PEK_CSR",
             "SEV_PDH_GEN", "SEV_PDH_CERT_EXPORT", "SEV_PEK_CERT_IMPORT", "SEV_GET_ID",
             "SEV_GET_ID2", "SNP_PLATFORM_STATUS", "SNP_COMMIT", "SNP_SET_CONFIG",
             "SNP_VLEK_LOAD"]
    assert [getattr(sev, n) for n in names] == list(range(len(names)))


def test_snp_status_milan_fields():
    raw = snp_status_bytes(current=MILAN_TCB_BYTES_NEW, reported=MILAN_TCB_BYTES,
                           mask_chip_id=1, guests=7, build=0x1234)
    s = sev.decode_snp_status(raw)
    assert (s.api_major, s.api_minor, s.state, s.build_id, s.guest_count) == (1, 55, 2, 0x1234, 7)
    assert s.is_rmp_initialized and s.mask_chip_id
    assert not (s.vlek_en or s.mask_chip_key or s.feature_info)
    # the reported TCB selects the VCEK; current is what is installed (provisional firmware)
    assert s.reported_tcb(Product.MILAN) == Tcb(bl=2, tee=0, snp=5, ucode=68)
    assert s.current_tcb(Product.MILAN) == Tcb(bl=3, tee=0, snp=8, ucode=115)
    assert sev.encode_snp_status(s) == raw


def test_snp_status_turin_layout():
    s = sev.decode_snp_status(snp_status_bytes(reported=TURIN_TCB_BYTES, current=TURIN_TCB_BYTES))
    assert s.reported_tcb(Product.TURIN) == Tcb(fmc=1, bl=3, tee=2, snp=5, ucode=97)


@pytest.mark.parametrize("bit, name", list(enumerate(sev.POLICY_FLAGS)))
def test_each_policy_bit_is_its_own_field(bit, name):
    kwargs = {"mask_chip_id": 0, "mask_chip_key": 0, "vlek_en": 0, "feature_info": 0,
              "rapl_dis": 0, "ct_cap": 0, "ct_en": 0}
    key = {"ciphertext_hiding_cap": "ct_cap", "ciphertext_hiding_en": "ct_en"}.get(name, name)
    kwargs[key] = 1
    s = sev.decode_snp_status(snp_status_bytes(**kwargs))
    assert [f for f in sev.POLICY_FLAGS if getattr(s, f)] == [name]


def test_rmp_reserved_bits_are_ignored():
    raw = bytearray(snp_status_bytes(rmp=0))
    raw[3] = 0xFE  # rsvd:7 all set, is_rmp_initialized clear
    assert not sev.decode_snp_status(bytes(raw)).is_rmp_initialized


def test_snp_status_wrong_size_refused():
    with pytest.raises(sev.SevError, match="32 bytes"):
        sev.decode_snp_status(bytes(31))


def test_issue_cmd_layout():
    # struct sev_issue_cmd {__u32 cmd; __u64 data; __u32 error;} __packed: 4 + 8 + 4
    raw = (9).to_bytes(4, "little") + (0x7F00DEADBEEF).to_bytes(8, "little") + \
        (0x16).to_bytes(4, "little")
    c = sev.decode_issue_cmd(raw)
    assert (c.cmd, c.data, c.error) == (sev.SNP_PLATFORM_STATUS, 0x7F00DEADBEEF, 0x16)
    assert sev.encode_issue_cmd(c) == raw
    with pytest.raises(sev.SevError):
        sev.decode_issue_cmd(raw[:-1])


def test_get_id2_layout_and_chip_id():
    # struct sev_user_data_get_id2 {__u64 address; __u32 length;} __packed
    raw = (0x1000).to_bytes(8, "little") + (64).to_bytes(4, "little")
    assert sev.encode_get_id2(0x1000, 64) == raw
    assert sev.decode_get_id2(raw) == (0x1000, 64)
    buf = bytes(range(64))
    assert sev.chip_id_from_id_buffer(buf, 64, Product.MILAN) == buf
    # Turin returns an 8-byte id
    assert sev.chip_id_from_id_buffer(buf, 8, Product.TURIN) == buf[:8]
    with pytest.raises(sev.SevError, match="64"):
        sev.chip_id_from_id_buffer(buf, 8, Product.GENOA)
