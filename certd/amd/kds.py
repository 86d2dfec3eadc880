"""AMD Key Distribution Service URLs (building only; fetching is someone else's job).

    {base}/vcek/v1/{Product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..
    {base}/vcek/v1/Turin/{8-byte hwid}?fmcSPL=..&blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..
    {base}/{vcek|vlek}/v1/{Product}/cert_chain      PEM: ASK (or ASVK), then ARK
    {base}/{vcek|vlek}/v1/{Product}/crl             DER, signed by the ARK

The VCEK is selected by the platform's REPORTED TCB (not CURRENT: the classic bug behind
"VCEK did not sign the report"). Turin wants the 8-byte hwid (the 64-byte form gives 404)
and fmcSPL first. Siena/Bergamo use ``Genoa`` (Product already maps them). hwid is lower
case hex and SPLs unpadded, as go-sev-guest and pysnputils send them.
"""

from __future__ import annotations

from certd.abi.product import Product
from certd.abi.tcb import Tcb

DEFAULT_BASE = "https://kdsintf.amd.com"


def _base(base: str) -> str:
    base = base.rstrip("/")
    if not base.startswith(("https://", "http://")):
        raise ValueError(f"KDS base URL {base!r} must start with https:// or http://")
    return base


def hwid_for_url(product: Product, hwid: bytes) -> bytes:
    """The hwid as KDS wants it. Accepts a 64-byte report CHIP_ID for Turin (first 8 bytes,
    the rest must be zero); refuses an all-zero id (a masked chip id: KDS answers 404)."""
    hwid = bytes(hwid)
    if product.turin_layout and len(hwid) == 64:
        if any(hwid[8:]):
            raise ValueError("a Turin chip id has only 8 significant bytes; bytes 8..63 are not zero")
        hwid = hwid[:8]
    if len(hwid) != product.hwid_len:
        raise ValueError(f"{product.value} hwid is {product.hwid_len} bytes, got {len(hwid)}")
    if not any(hwid):
        raise ValueError("hwid is all zero (MASK_CHIP_ID): KDS has no VCEK for it")
    return hwid


def vcek_url(product: Product, hwid: bytes, reported_tcb: Tcb, *, base: str = DEFAULT_BASE) -> str:
    """VCEK URL for a chip at its REPORTED TCB."""
    hwid = hwid_for_url(product, hwid)
    if product.turin_layout and reported_tcb.fmc is None:
        raise ValueError("a Turin VCEK URL needs the fmc SPL")
    if not product.turin_layout and reported_tcb.fmc is not None:
        raise ValueError(f"{product.value} has no fmc SPL")
    query = "&".join(f"{k}={v}" for k, v in reported_tcb.as_dict().items())  # fmcSPL first
    return f"{_base(base)}/vcek/v1/{product.value}/{hwid.hex()}?{query}"


def cert_chain_url(product: Product, *, vlek: bool = False, base: str = DEFAULT_BASE) -> str:
    return f"{_base(base)}/{'vlek' if vlek else 'vcek'}/v1/{product.value}/cert_chain"


def crl_url(product: Product, *, vlek: bool = False, base: str = DEFAULT_BASE) -> str:
    return f"{_base(base)}/{'vlek' if vlek else 'vcek'}/v1/{product.value}/crl"
