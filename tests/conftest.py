"""Shared fixtures. Tests read vectors from tests/vectors only (never ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Directory of the real AMD certificates, reports and CRLs (see vectors/SOURCES.md)."""
    return VECTORS


@pytest.fixture(scope="session")
def dev_pki():
    """``dev_pki(product, name="dev")``: a generated AMD-like PKI, one per (product, name)
    per session (RSA keys are also cached per process by certd.devpki)."""
    from certd.abi.product import Product
    from certd.devpki import DevPki

    made: dict = {}

    def get(product: Product = Product.MILAN, name: str = "dev") -> DevPki:
        if (product, name) not in made:
            made[(product, name)] = DevPki.generate(product, name=name)
        return made[(product, name)]

    return get
