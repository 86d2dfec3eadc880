"""GHCB certificate table codec: round trips, strictness, fuzzing, independent reading."""

from __future__ import annotations

import random
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from certd.abi import table
from certd.abi.table import Entry, Role, TableError

VECTORS = Path(__file__).parent / "vectors"

# From the byte layout in docs (upstream-protocol.md §3.2), typed in as strings on purpose:
# this must not be derived from the encoder's own constants.
DOC_GUIDS = {
    "ARK": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
    "ASK": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "VCEK": "63da758d-e664-4564-adc5-f4b93be8accd",
    "VLEK": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "CRL": "92f81bc3-5811-4d3d-97ff-d19f88dc67ea",
}


def independent_read(buf: bytes) -> list[tuple[str, bytes]]:
    """A from-the-spec reader: 24-byte entries {GUID in string byte order, u32 offset LE,
    u32 length LE} until an all-zero entry; offsets from the table start."""
    names = {bytes.fromhex(g.replace("-", "")): n for n, g in DOC_GUIDS.items()}
    out, i = [], 0
    while True:
        raw = buf[i * 24:(i + 1) * 24]
        assert len(raw) == 24
        if raw == b"\0" * 24:
            break
        off = int.from_bytes(raw[16:20], "little")
        length = int.from_bytes(raw[20:24], "little")
        out.append((names[raw[:16]], buf[off:off + length]))
        i += 1
    return out


def der(name: str) -> bytes:
    """PEM → DER with cryptography directly, not through certd."""
    cert = x509.load_pem_x509_certificates((VECTORS / name).read_bytes())[0]
    return cert.public_bytes(Encoding.DER)


def real_blob() -> tuple[bytes, dict[str, bytes]]:
    parts = {"ARK": der("milan_ark.pem"), "ASK": der("milan_ask.pem"),
             "VCEK": (VECTORS / "milan_gcp_vcek.der").read_bytes(),
             "CRL": (VECTORS / "milan_crl.der").read_bytes()}
    # Given out of order: the encoder must still write the canonical order.
    blob = table.encode([Entry.of(Role.CRL, parts["CRL"]), Entry.of(Role.VCEK, parts["VCEK"]),
                         Entry.of(Role.ASK, parts["ASK"]), Entry.of(Role.ARK, parts["ARK"])])
    return blob, parts


def test_real_blob_matches_independent_reading():
    blob, parts = real_blob()
    read = independent_read(blob)
    assert [n for n, _ in read] == ["ARK", "ASK", "VCEK", "CRL"]
    assert all(data == parts[n] for n, data in read)
    # First certificate right after the terminator; certificates back to back.
    assert int.from_bytes(blob[16:20], "little") == 5 * 24
    assert blob[4 * 24:5 * 24] == bytes(24)
    assert len(blob) == 5 * 24 + sum(len(p) for p in parts.values())
    assert table.is_canonical(blob)


def test_guid_bytes_are_rfc4122_order_not_efi():
    blob = table.encode([Entry.of(Role.ARK, b"x")])
    assert blob[:16] == bytes.fromhex("c0b406a4a803495297433fb6014cd0ae")
    assert blob[:16] != uuid.UUID(DOC_GUIDS["ARK"]).bytes_le


def test_aws_header_shape():
    # The one real header seen in public (AWS, go-sev-guest PR #67): VLEK at 0x30, len 0x530.
    blob = table.encode([Entry.of(Role.VLEK, b"v" * 0x530)])
    assert blob[:24].hex() == "a8074bc2a25a483eaae639c045a0b8a1" + "30000000" + "30050000"


def test_empty():
    assert table.encode([]) == bytes(24)
    assert table.decode(bytes(24)) == table.CertTable()
    assert table.decode(b"") == table.CertTable()


@pytest.mark.parametrize("length,pages", [(0, 0), (1, 1), (4095, 1), (4096, 1), (4097, 2),
                                          (8191, 2), (8192, 2), (8193, 3), (16384, 4)])
def test_npages_exact(length, pages):
    assert table.npages(length) == pages


entries_st = st.lists(
    st.tuples(st.sampled_from(list(Role) + [uuid.UUID(int=7), uuid.UUID(int=2**100)]),
              st.binary(min_size=1, max_size=300)),
    max_size=8, unique_by=lambda t: t[0])


@given(entries_st)
@settings(max_examples=300, deadline=None)
def test_round_trip(items):
    entries = [Entry(g.value if isinstance(g, Role) else g, d) for g, d in items]
    blob = table.encode(entries)
    decoded = table.decode(blob)
    assert sorted((e.guid.int, e.data) for e in decoded.entries) == \
        sorted((e.guid.int, e.data) for e in entries)
    assert table.decode(table.encode(decoded.entries)) == decoded
    assert table.is_canonical(blob)
    known = [e.role for e in decoded.entries if e.role]
    assert known == [r for r in table.CANONICAL_ORDER if r in known]


def _header(entries: list[tuple[bytes, int, int]]) -> bytes:
    return b"".join(g + struct.pack("<II", o, n) for g, o, n in entries) + bytes(24)


ARK = Role.ARK.value.bytes
ASK = Role.ASK.value.bytes


@pytest.mark.parametrize("buf,needle", [
    (b"\x01" * 23, "no terminator"),
    (_header([(ARK, 48, 4)])[:40], "no terminator"),
    (_header([(ARK, 10, 4)]) + b"abcd", "points into the header"),
    (_header([(ARK, 48, 5)]) + b"abcd", "runs past the end"),
    (_header([(ARK, 48, 0)]) + b"abcd", "length 0"),
    (_header([(ARK, 72, 4), (ARK, 76, 4)]) + b"abcdefgh", "duplicate ARK"),
    (_header([(ARK, 72, 4), (ASK, 74, 4)]) + b"abcdef", "overlaps"),
    (_header([(ARK, 48, 4)]) + b"abcdXX", "trailing bytes"),
    (_header([(ARK, 49, 4)]) + b"_abcd", "belong to no entry"),
    (bytes(16) + struct.pack("<II", 1, 0), "terminator must be 24 zero bytes"),
    (b"".join(uuid.UUID(int=i + 1).bytes + b"\0" * 8 for i in range(70)), "more than 64 entries"),
])
def test_malformed_named(buf, needle):
    with pytest.raises(TableError) as ei:
        table.decode(buf)
    assert needle in str(ei.value)


def test_unknown_guid_kept_and_reported():
    g = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")
    t = table.decode(table.encode([Entry.of(Role.ARK, b"a"), Entry(g, b"x")]))
    assert [e.guid for e in t.unknown] == [g]
    assert "unknown" in t.unknown[0].label


def test_encode_refuses_duplicates_and_empty():
    with pytest.raises(TableError, match="duplicate VCEK"):
        table.encode([Entry.of(Role.VCEK, b"a"), Entry.of(Role.VCEK, b"b")])
    with pytest.raises(TableError, match="empty"):
        table.encode([Entry.of(Role.VCEK, b"")])
    with pytest.raises(TableError, match="terminator"):
        table.encode([Entry(uuid.UUID(int=0), b"a")])


def test_fuzz_decoder_100k_mutations():
    """≥100,000 mutated blobs: the decoder raises nothing but TableError."""
    rng = random.Random(0xC0FFEE)
    seeds = [real_blob()[0], table.encode([Entry.of(Role.VLEK, b"v" * 40)]), bytes(24)]
    ok = bad = 0
    for i in range(100_000):
        buf = bytearray(rng.choice(seeds))
        op = i % 5
        if op == 0:  # bit flips, biased to the header where the structure lives
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(min(len(buf), 160))
                buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 2:  # random u32 into an offset/length field
            slot = rng.randrange(6) * 24 + 16 + rng.choice((0, 4))
            if slot + 4 <= len(buf):
                buf[slot:slot + 4] = struct.pack("<I", rng.choice(
                    (0, 1, 23, 24, 48, 72, len(buf), len(buf) + 1, 2**31, 2**32 - 1, rng.getrandbits(32))))
        elif op == 3:  # splice garbage
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 48))
        else:  # entirely random short input
            buf = bytearray(rng.randbytes(rng.randint(0, 200)))
        try:
            table.decode(bytes(buf))
            ok += 1
        except TableError:
            bad += 1
    assert ok + bad == 100_000 and bad > 50_000 and ok > 0
