"""SEV-SNP product lines, as far as byte layouts care.

The TCB_VERSION layout, the hwID length and the KDS product name all follow the product
line. Siena and Bergamo parts are ``Genoa`` for every purpose here.
"""

from __future__ import annotations

import enum


class Product(enum.Enum):
    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @property
    def turin_layout(self) -> bool:
        """Turin and later put FMC first in TCB_VERSION and use an 8-byte hwID."""
        return self is Product.TURIN

    @property
    def hwid_len(self) -> int:
        return 8 if self.turin_layout else 64

    @classmethod
    def parse(cls, name: str) -> "Product":
        """Accept KDS names, productName extensions (``Milan-B0``) and Siena/Bergamo."""
        base = name.strip().split("-")[0].lower()
        if base in ("siena", "bergamo"):
            base = "genoa"
        for p in cls:
            if p.value.lower() == base:
                return p
        raise ValueError(f"unknown SEV-SNP product {name!r} (expected Milan, Genoa or Turin)")

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> "Product | None":
        """Map CPUID family/model (as in report v3+) to a product line, or None if unknown."""
        if family == 0x19:
            if model <= 0x0F:
                return cls.MILAN
            if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
                return cls.GENOA  # Genoa 0x1x; Bergamo/Siena 0xAx
        if family == 0x1A and model <= 0x1F:
            return cls.TURIN
        return None
