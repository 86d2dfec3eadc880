"""Trust anchors from PEM files: the development PKI's ARK/ASK/ASVK instead of AMD's.

``certd --dev`` writes its generated roots to ``dev-roots.pem``; ``[trust] roots`` in the
daemon's configuration and ``--roots`` on certctl load them here. Only ARK, ASK and ASVK
certificates belong in such a file, each with a product, and each product needs an ARK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from cryptography import x509

from certd.abi.product import Product
from certd.amd import roots as rootsmod
from certd.verify import pki


class TrustFileError(ValueError):
    pass


def load(paths: Iterable[str | Path], *, name: str = "roots file") -> rootsmod.TrustStore:
    """A TrustStore of the ARK/ASK/ASVK found in ``paths`` (PEM or DER, bundles allowed)."""
    by_product: dict[Product, dict[str, x509.Certificate]] = {}
    paths = [Path(p) for p in paths]
    for path in paths:
        try:
            items = pki.load_file(path)
        except pki.PkiError as e:
            raise TrustFileError(str(e)) from None
        for c in items:
            if not isinstance(c, pki.Cert) or c.kind.is_leaf or c.product is None:
                what = c.describe() if isinstance(c, pki.Cert) else "a CRL"
                raise TrustFileError(f"{path}: only ARK, ASK and ASVK certificates belong in a "
                                     f"roots file, found {what}")
            by_product.setdefault(c.product, {})[c.kind.value] = c.cert
    out = []
    for product, d in by_product.items():
        if "ARK" not in d:
            raise TrustFileError(f"{', '.join(map(str, paths))}: no ARK for {product.value}")
        out.append(rootsmod.Roots(product, d["ARK"], d.get("ASK"), d.get("ASVK")))
    if not out:
        raise TrustFileError(f"{', '.join(map(str, paths))}: no certificates")
    return rootsmod.TrustStore(out, name=name)
