"""GHCB certificate table: pure encode/decode, no I/O.

Layout (GHCB spec MSG_REPORT_REQ, as implemented by the kernel, virtee/sev, go-sev-guest):

    off 0        entry[0]   GUID[16] (RFC-4122 byte order) | u32 offset LE | u32 length LE
    off 24*i     entry[i]   ...
    off 24*n     terminator 24 zero bytes
    off 24*(n+1) certificate bytes (DER), packed back to back

Offsets count from the start of the table. certd always writes entries in the canonical
order ARK, ASK (or ASVK), VCEK, VLEK, CRL, then any unknown GUIDs, with the certificates
in the same order: one input gives one byte-exact output.

The decoder is strict and total: every malformed input raises :class:`TableError` naming
the entry and what is wrong, and no other exception escapes it.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field
from typing import Iterable

ENTRY = struct.Struct("<16sII")
ENTRY_SIZE = ENTRY.size  # 24
TERMINATOR = bytes(ENTRY_SIZE)
EMPTY_TABLE = TERMINATOR
PAGE_SIZE = 4096
#: Linux guests offer at most 16 KiB for the table (SEV_FW_BLOB_MAX_SIZE).
GUEST_MAX_SIZE = 0x4000
#: More entries than this is nonsense for a certificate chain; bounds decoder work.
MAX_ENTRIES = 64


class Role(enum.Enum):
    """Certificate roles with a GUID defined for the table. ASVK uses the ASK GUID."""

    ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
    ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
    VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
    VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
    CRL = uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")

    @property
    def label(self) -> str:
        return "ASK/ASVK" if self is Role.ASK else self.name


CANONICAL_ORDER = (Role.ARK, Role.ASK, Role.VCEK, Role.VLEK, Role.CRL)
_ROLE_BY_GUID = {r.value: r for r in Role}


class TableError(ValueError):
    """A certificate table is malformed. ``entry`` is the entry index, if one is to blame."""

    def __init__(self, reason: str, entry: int | None = None):
        self.reason = reason
        self.entry = entry
        super().__init__(reason if entry is None else f"entry {entry}: {reason}")


@dataclass(frozen=True)
class Entry:
    guid: uuid.UUID
    data: bytes

    @property
    def role(self) -> Role | None:
        """The known role of this entry, or None for a GUID certd does not know."""
        return _ROLE_BY_GUID.get(self.guid)

    @property
    def label(self) -> str:
        role = self.role
        return role.label if role else f"unknown {self.guid}"

    @classmethod
    def of(cls, role: Role, data: bytes) -> "Entry":
        return cls(role.value, bytes(data))


@dataclass(frozen=True)
class CertTable:
    entries: tuple[Entry, ...] = ()
    #: (offset, length) of each entry as found by :func:`decode`; not part of equality.
    spans: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def get(self, role: Role) -> Entry | None:
        return next((e for e in self.entries if e.guid == role.value), None)

    @property
    def unknown(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.role is None)

    def __len__(self) -> int:
        return len(self.entries)


def npages(length: int) -> int:
    """Pages a guest buffer needs for ``length`` bytes: ceil(length / 4096), exactly."""
    return -(-length // PAGE_SIZE)


def _canonical_key(indexed: tuple[int, Entry]) -> tuple[int, int]:
    index, entry = indexed
    role = entry.role
    return (CANONICAL_ORDER.index(role) if role else len(CANONICAL_ORDER), index)


def encode(entries: Iterable[Entry]) -> bytes:
    """Encode entries in canonical order. An empty iterable gives the 24-byte empty table."""
    ordered = [e for _, e in sorted(enumerate(entries), key=_canonical_key)]
    seen: set[uuid.UUID] = set()
    for i, e in enumerate(ordered):
        if e.guid.int == 0:
            raise TableError("the all-zero GUID is reserved for the terminator", i)
        if e.guid in seen:
            raise TableError(f"duplicate {e.label} entry", i)
        if not e.data:
            raise TableError(f"{e.label} certificate is empty", i)
        seen.add(e.guid)
    if len(ordered) > MAX_ENTRIES:
        raise TableError(f"{len(ordered)} entries; at most {MAX_ENTRIES} are allowed")
    offset = ENTRY_SIZE * (len(ordered) + 1)
    header = bytearray()
    for e in ordered:
        header += ENTRY.pack(e.guid.bytes, offset, len(e.data))
        offset += len(e.data)
    if offset > 0xFFFFFFFF:
        raise TableError("table larger than 4 GiB")
    return bytes(header) + TERMINATOR + b"".join(e.data for e in ordered)


def decode(buf: bytes) -> CertTable:
    """Decode a table strictly. An empty buffer is an empty table (as go-sev-guest reads it)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TableError(f"expected bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    if not buf:
        return CertTable()
    raw: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + ENTRY_SIZE > len(buf):
            n = len(raw)
            raise TableError(
                f"table truncated: no terminator after {n} entr{'y' if n == 1 else 'ies'} "
                f"({len(buf)} bytes; a 24-byte all-zero entry must end the header)"
            )
        g, off, length = ENTRY.unpack_from(buf, pos)
        if g == bytes(16):
            if off or length:
                raise TableError(
                    f"zero GUID with non-zero offset {off} / length {length}: "
                    "the terminator must be 24 zero bytes",
                    len(raw),
                )
            break
        if len(raw) == MAX_ENTRIES:
            raise TableError(f"more than {MAX_ENTRIES} entries (no terminator found)")
        raw.append((uuid.UUID(bytes=g), off, length))
        pos += ENTRY_SIZE
    header_end = pos + ENTRY_SIZE

    entries: list[Entry] = []
    spans: list[tuple[int, int]] = []
    seen: dict[uuid.UUID, int] = {}
    for i, (g, off, length) in enumerate(raw):
        label = _ROLE_BY_GUID[g].label if g in _ROLE_BY_GUID else f"unknown {g}"
        if g in seen:
            raise TableError(f"duplicate {label} entry (first at entry {seen[g]})", i)
        seen[g] = i
        if length == 0:
            raise TableError(f"{label} certificate has length 0", i)
        if off < header_end:
            raise TableError(
                f"{label} offset {off} points into the header (which ends at {header_end})", i
            )
        if off + length > len(buf):
            raise TableError(
                f"{label} range {off}..{off + length} runs past the end of the table "
                f"({len(buf)} bytes)",
                i,
            )
        entries.append(Entry(g, buf[off : off + length]))
        spans.append((off, length))

    # Entries may appear in any order, but together they must tile the body exactly:
    # no overlaps, no gaps, nothing trailing.
    cursor = header_end
    for k in sorted(range(len(spans)), key=lambda k: spans[k][0]):
        off, length = spans[k]
        if off < cursor:
            other = next(j for j, (o, n) in enumerate(spans)
                         if j != k and o < off + length and off < o + n)
            raise TableError(
                f"{entries[k].label} range {off}..{off + length} overlaps entry {other} "
                f"({entries[other].label})",
                k,
            )
        if off > cursor:
            raise TableError(f"{off - cursor} bytes at offset {cursor} belong to no entry")
        cursor = off + length
    if cursor != len(buf):
        raise TableError(f"{len(buf) - cursor} trailing bytes at offset {cursor} belong to no entry")
    return CertTable(tuple(entries), tuple(spans))


def is_canonical(buf: bytes) -> bool:
    """True if ``buf`` is byte for byte what :func:`encode` makes of its own entries."""
    return encode(decode(buf).entries) == bytes(buf)
