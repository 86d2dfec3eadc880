"""TCB_VERSION (a u64 in reports, platform status and VCEK extensions): pure decode/encode.

Byte layout in memory order:

    Milan/Genoa: [BOOT_LOADER, TEE, 0, 0, 0, 0, SNP, MICROCODE]
    Turin:       [FMC, BOOT_LOADER, TEE, SNP, 0, 0, 0, MICROCODE]

The same eight bytes mean different things per generation, so decoding needs the product.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from certd.abi.product import Product

_LEGACY = {"bl": 0, "tee": 1, "snp": 6, "ucode": 7}
_TURIN = {"fmc": 0, "bl": 1, "tee": 2, "snp": 3, "ucode": 7}


class TcbError(ValueError):
    pass


@dataclass(frozen=True)
class Tcb:
    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None  # Turin and later only

    def __post_init__(self) -> None:
        for name in ("bl", "tee", "snp", "ucode", "fmc"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 255:
                raise TcbError(f"{name}SPL {v} is out of range 0..255")

    def as_dict(self) -> dict[str, int]:
        """SPL names as AMD's extensions and KDS query strings spell them, fmc first."""
        d = {} if self.fmc is None else {"fmcSPL": self.fmc}
        d.update(blSPL=self.bl, teeSPL=self.tee, snpSPL=self.snp, ucodeSPL=self.ucode)
        return d

    def __str__(self) -> str:
        parts = [] if self.fmc is None else [f"fmc={self.fmc}"]
        parts += [f"bl={self.bl}", f"tee={self.tee}", f"snp={self.snp}", f"ucode={self.ucode}"]
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Tcb":
        """Parse ``bl=2,tee=0,snp=5,ucode=68[,fmc=1]`` (commas or spaces; SPL suffix allowed)."""
        fields: dict[str, int] = {}
        for item in filter(None, re.split(r"[,\s]+", text.strip())):
            m = re.fullmatch(r"([a-zA-Z]+?)(?:SPL)?=(\d+)", item)
            if not m or m.group(1).lower() not in ("bl", "tee", "snp", "ucode", "fmc"):
                raise TcbError(f"bad TCB component {item!r}: expected NAME=NUMBER with NAME "
                               "one of bl, tee, snp, ucode, fmc")
            fields[m.group(1).lower()] = int(m.group(2))
        missing = {"bl", "tee", "snp", "ucode"} - fields.keys()
        if missing:
            raise TcbError(f"TCB {text!r} lacks {', '.join(sorted(missing))}")
        return cls(**fields)


def decode(raw: bytes | int, product: Product) -> Tcb:
    if isinstance(raw, int):
        raw = raw.to_bytes(8, "little")
    if len(raw) != 8:
        raise TcbError(f"TCB_VERSION is 8 bytes, got {len(raw)}")
    layout = _TURIN if product.turin_layout else _LEGACY
    return Tcb(**{k: raw[i] for k, i in layout.items()})


def encode(tcb: Tcb, product: Product) -> bytes:
    out = bytearray(8)
    if product.turin_layout:
        if tcb.fmc is None:
            raise TcbError("a Turin TCB needs an fmc value")
        layout = _TURIN
    else:
        if tcb.fmc is not None:
            raise TcbError(f"{product.value} TCB has no fmc component")
        layout = _LEGACY
    for k, i in layout.items():
        out[i] = getattr(tcb, k)
    return bytes(out)


def reserved_bytes_clear(raw: bytes, product: Product) -> bool:
    """True if the bytes the layout leaves reserved are zero."""
    used = set((_TURIN if product.turin_layout else _LEGACY).values())
    return all(b == 0 for i, b in enumerate(raw) if i not in used)
