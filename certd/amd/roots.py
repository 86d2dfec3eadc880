"""Trust anchors: the pinned AMD ARK, ASK and ASVK per product line.

The roots ship as package data (``certd/amd/roots/<product>_{vcek,vlek}_chain.pem``, the
KDS ``cert_chain`` bodies: ASK or ASVK first, then ARK). They are public and never fetched:
a blob whose ARK/ASK/ASVK is not one of these does not chain, whatever its names say.

A :class:`TrustStore` is just that table. :func:`pinned` is AMD's; the development PKI
(:mod:`certd.devpki`) makes its own, so the same checks run against generated roots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Iterator, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd.abi.product import Product


class TrustError(ValueError):
    pass


def spki(cert: x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo: what "the same key" compares."""
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Roots:
    """One product line's anchors. ``asvk`` is None if the line has no VLEK chain."""

    product: Product
    ark: x509.Certificate
    ask: x509.Certificate | None
    asvk: x509.Certificate | None = None

    def intermediate(self, vlek: bool) -> x509.Certificate | None:
        return self.asvk if vlek else self.ask


class TrustStore:
    """Pinned anchors by product. Lookups answer "is this exactly (or the same key as) the
    pinned ARK/ASK/ASVK of that product?"; nothing else is trusted."""

    def __init__(self, roots: Mapping[Product, Roots] | list[Roots], *, name: str = "pinned"):
        items = roots.values() if isinstance(roots, Mapping) else roots
        self._roots = {r.product: r for r in items}
        self.name = name
        self._keys = {(p, role): spki(c) for p, r in self._roots.items()
                      for role, c in (("ARK", r.ark), ("ASK", r.ask), ("ASVK", r.asvk))
                      if c is not None}

    def __repr__(self) -> str:
        return f"TrustStore({self.name!r}, {[p.value for p in self._roots]})"

    def __iter__(self) -> Iterator[Roots]:
        return iter(self._roots.values())

    @property
    def products(self) -> tuple[Product, ...]:
        return tuple(self._roots)

    def get(self, product: Product) -> Roots | None:
        return self._roots.get(product)

    def roots(self, product: Product) -> Roots:
        try:
            return self._roots[product]
        except KeyError:
            raise TrustError(f"the {self.name} trust store has no roots for "
                             f"{product.value}") from None

    def anchor(self, product: Product, role: str) -> x509.Certificate | None:
        """The pinned certificate for ``role`` in ARK/ASK/ASVK, or None."""
        r = self._roots.get(product)
        if r is None:
            return None
        return {"ARK": r.ark, "ASK": r.ask, "ASVK": r.asvk}[role]

    def key(self, product: Product, role: str) -> bytes | None:
        """DER SubjectPublicKeyInfo of the pinned ``role`` (ARK/ASK/ASVK), or None."""
        return self._keys.get((product, role))

    def is_pinned(self, product: Product, role: str, cert: x509.Certificate | bytes) -> bool:
        """True if ``cert`` (or a DER SubjectPublicKeyInfo) has the key of the pinned
        ``role`` of ``product``.

        Same key is enough: AMD could reissue a root with new dates, and the key is what
        signatures chain through. Names alone never count.
        """
        key = self._keys.get((product, role))
        return key is not None and (cert if isinstance(cert, bytes) else spki(cert)) == key

    def merged(self, other: "TrustStore", *, name: str | None = None) -> "TrustStore":
        return TrustStore({**self._roots, **other._roots}, name=name or f"{self.name}+{other.name}")


def _load_chain(pem: bytes, what: str) -> tuple[x509.Certificate, x509.Certificate]:
    certs = x509.load_pem_x509_certificates(pem)
    if len(certs) != 2:
        raise TrustError(f"{what}: expected 2 certificates (intermediate, ARK), got {len(certs)}")
    return certs[0], certs[1]


def from_chains(chains: Mapping[Product, tuple[bytes, bytes | None]], *, name: str) -> TrustStore:
    """Build a store from per-product (vcek cert_chain PEM, vlek cert_chain PEM or None)."""
    out = []
    for product, (vcek_pem, vlek_pem) in chains.items():
        ask, ark = _load_chain(vcek_pem, f"{product.value} VCEK chain")
        asvk = None
        if vlek_pem is not None:
            asvk, ark2 = _load_chain(vlek_pem, f"{product.value} VLEK chain")
            if spki(ark2) != spki(ark):
                raise TrustError(f"{product.value}: the VCEK and VLEK chains have different ARKs")
        out.append(Roots(product, ark, ask, asvk))
    return TrustStore(out, name=name)


@functools.lru_cache(maxsize=1)
def pinned() -> TrustStore:
    """AMD's anchors for Milan, Genoa and Turin, from package data (loaded once)."""
    base = resources.files("certd.amd") / "roots"
    chains = {}
    for p in Product:
        stem = p.value.lower()
        vcek = (base / f"{stem}_vcek_chain.pem").read_bytes()
        vlek_res = base / f"{stem}_vlek_chain.pem"
        chains[p] = (vcek, vlek_res.read_bytes() if vlek_res.is_file() else None)
    return from_chains(chains, name="pinned AMD")
