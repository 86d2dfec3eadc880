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


def pytest_terminal_summary(terminalreporter) -> None:
    """Show the figures tests measure (waits, stalls, counts, exposure) in every run's
    output, CI included, without -s: the lines passing tests printed, minus log lines."""
    lines = []
    for rep in terminalreporter.stats.get("passed", []):
        if rep.when != "call":
            continue
        for line in rep.capstdout.splitlines():
            text = line.strip()
            # Skip log lines (JSON, console) and pretty-printed JSON documents.
            if text and not text.startswith(("{", "}", '"', "20")):
                lines.append(f"{rep.nodeid.split('::')[-1]}: {text}")
    if lines:
        terminalreporter.write_sep("=", "measured figures")
        for line in lines:
            terminalreporter.write_line(line)
