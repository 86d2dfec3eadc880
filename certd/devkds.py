"""A development KDS: KDS's URL paths on 127.0.0.1, answered from a development PKI.

    GET /vcek/v1/{Product}/{hwid}?[fmcSPL=&]blSPL=&teeSPL=&snpSPL=&ucodeSPL=
        a VCEK for that chip and TCB, minted on demand (DER). As KDS: unspecified SPLs are
        zero, the hwid is 64 bytes (Turin: 8), an all-zero or wrong-length hwid is 404.
    GET /{vcek,vlek}/v1/{Product}/cert_chain    PEM ASK (or ASVK), then ARK
    GET /{vcek,vlek}/v1/{Product}/crl           DER, signed by the ARK, fresh

The VCEK key for (chip, TCB) is derived from the PKI's ARK key (:func:`derived_vcek_key`),
so every run with the same PKI directory, and a simulated PSP using the same function,
agree on it; the certificate bytes may differ between requests, as KDS's do.

Use it as a thread (``with DevKds([pki]) as kds: kds.url``) or a process::

    python -m certd.devkds --port 0 --pki-dir DIR [--product Milan ...]

which creates the PKI in DIR if it is empty (private keys included: development only),
writes ``DIR/dev-roots.pem`` (the trust anchors for ``certctl --roots``), prints its URL on
the first line of stdout and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import signal
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certd import devpki
from certd.abi.product import Product
from certd.abi.tcb import Tcb, TcbError
from certd.devpki import DER, PEM, DevPki

HOST = "127.0.0.1"  # never any other address
_P384_ORDER = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                  "581A0DB248B0A77AECEC196ACCC52973", 16)


def derived_vcek_key(pki: DevPki, chip_id: bytes, tcb: Tcb) -> ec.EllipticCurvePrivateKey:
    """The dev VCEK private key of (chip, TCB): HMAC-SHA384 keyed by the ARK's private key,
    as a real PSP derives a VCEK from chip secrets and the TCB."""
    secret = pki.ark_key.private_bytes(DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    fields = [pki.product.value.encode(), bytes(chip_id), repr(tcb.as_dict()).encode()]
    digest = hmac.new(secret, b"certd-dev-vcek\0" + b"\0".join(fields), hashlib.sha384).digest()
    scalar = int.from_bytes(digest + hashlib.sha384(digest).digest(), "big") % (_P384_ORDER - 1)
    return ec.derive_private_key(scalar + 1, ec.SECP384R1())


# --- a PKI directory ------------------------------------------------------------------------

_ROLES = ("ark", "ask", "asvk")


def save_pki(pki: DevPki, directory: str | Path) -> None:
    """Certificates and (unencrypted, mode 0600) keys of one product line in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = pki.product.value.lower()
    for role in _ROLES:
        (d / f"{stem}_{role}.pem").write_bytes(getattr(pki, role).public_bytes(PEM))
        key = d / f"{stem}_{role}.key"
        key.touch(mode=0o600)
        key.write_bytes(getattr(pki, f"{role}_key").private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def load_pki(directory: str | Path, product: Product) -> DevPki | None:
    """The product line saved by :func:`save_pki`, or None if it is not there."""
    d = Path(directory)
    stem = product.value.lower()
    if not (d / f"{stem}_ark.key").exists():
        return None
    parts = {}
    for role in _ROLES:
        parts[role] = x509.load_pem_x509_certificate((d / f"{stem}_{role}.pem").read_bytes())
        parts[f"{role}_key"] = serialization.load_pem_private_key(
            (d / f"{stem}_{role}.key").read_bytes(), None)
    return DevPki(product=product, name=f"devkds:{d}", **parts)


def open_pki_dir(directory: str | Path, products: Iterable[Product]) -> list[DevPki]:
    """Load each product line from ``directory``, generating (and saving) missing ones;
    (re)write ``dev-roots.pem`` with every line's ARK, ASK and ASVK."""
    out = []
    for product in products:
        pki = load_pki(directory, product)
        if pki is None:
            pki = DevPki.generate(product, name=f"devkds:{Path(directory).resolve()}")
            save_pki(pki, directory)
        out.append(pki)
    roots = b"".join(p.cert_chain_pem() + p.asvk.public_bytes(PEM) for p in out)
    (Path(directory) / "dev-roots.pem").write_bytes(roots)
    return out


# --- the server -----------------------------------------------------------------------------

@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/octet-stream"


def _spl(query: dict[str, list[str]], name: str) -> int:
    values = query.get(name)
    if not values:
        return 0  # KDS: "unspecified SPL values are assumed to be zero"
    v = values[-1]
    if not v.isdigit():
        raise ValueError(f"{name}={v!r} is not a number")
    return int(v)


class DevKds:
    """The development KDS for the given product lines (one :class:`DevPki` each)."""

    def __init__(self, pkis: Iterable[DevPki], *, port: int = 0):
        self.pkis = {p.product: p for p in pkis}
        self._mutex = threading.Lock()
        self._crls: dict[tuple[Product, bool], bytes] = {}
        #: the target (path and query) of every request, in order
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer((HOST, port), self._handler())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    @property
    def trust(self):
        return devpki.trust_store(*self.pkis.values(), name="development KDS")

    def vcek_key(self, product: Product, chip_id: bytes, tcb: Tcb) -> ec.EllipticCurvePrivateKey:
        return derived_vcek_key(self.pkis[product], chip_id, tcb)

    def answer(self, target: str) -> _Answer:
        """The answer to ``GET target`` (pure apart from minting; no sockets)."""
        u = urlsplit(target)
        parts = u.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] not in ("vcek", "vlek") or parts[1] != "v1":
            return _Answer(404, b"Not Found\n", "text/plain")
        kind, _, name, leaf = parts
        product = next((p for p in self.pkis if p.value == name), None)
        if product is None:  # KDS knows Milan, Genoa, Turin by exactly these names
            return _Answer(404, b"unknown product\n", "text/plain")
        pki = self.pkis[product]
        if leaf == "cert_chain":
            return _Answer(200, pki.cert_chain_pem(vlek=kind == "vlek"), "application/x-pem-file")
        if leaf == "crl":
            with self._mutex:
                if (product, kind == "vlek") not in self._crls:
                    self._crls[product, kind == "vlek"] = pki.crl().public_bytes(DER)
                return _Answer(200, self._crls[product, kind == "vlek"], "application/pkix-crl")
        if kind != "vcek":
            return _Answer(404, b"VLEKs are provisioned to CSPs, not served here\n", "text/plain")
        try:
            hwid = bytes.fromhex(leaf)
        except ValueError:
            return _Answer(404, b"hwid is not hex\n", "text/plain")
        if len(hwid) != product.hwid_len or not any(hwid):
            return _Answer(404, f"a {product.value} hwid is {product.hwid_len} non-zero bytes\n"
                           .encode(), "text/plain")
        query = parse_qs(u.query)
        try:
            tcb = Tcb(bl=_spl(query, "blSPL"), tee=_spl(query, "teeSPL"),
                      snp=_spl(query, "snpSPL"), ucode=_spl(query, "ucodeSPL"),
                      fmc=_spl(query, "fmcSPL") if product.turin_layout else None)
        except (ValueError, TcbError) as e:
            return _Answer(400, f"{e}\n".encode(), "text/plain")
        cert, _ = pki.issue_vcek(tcb, hwid, key=derived_vcek_key(pki, hwid, tcb))
        return _Answer(200, cert.public_bytes(DER), "application/x-x509-ca-cert")

    def _handler(self):
        kds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with kds._mutex:
                    kds.requests.append(self.path)
                a = kds.answer(self.path)
                self.send_response(a.status)
                self.send_header("Content-Type", a.content_type)
                self.send_header("Content-Length", str(len(a.body)))
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.wfile.write(a.body)

        return Handler

    def start(self) -> "DevKds":
        self._thread = threading.Thread(target=self.server.serve_forever, name="devkds",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(10)
            self._thread = None
        self.server.server_close()

    def __enter__(self) -> "DevKds":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m certd.devkds",
        description="Development KDS on 127.0.0.1: mints development-PKI VCEKs for any chip "
                    "and TCB at KDS's URL paths. NOT AMD's keys: certd must be given "
                    "DIR/dev-roots.pem as its trust anchors (certctl --roots).")
    ap.add_argument("--port", type=int, default=0, help="TCP port (0: a free one; default)")
    ap.add_argument("--pki-dir", required=True, metavar="DIR",
                    help="development PKI (created on first use, keys included)")
    ap.add_argument("--product", action="append", type=Product.parse, metavar="NAME",
                    help="product line to serve (repeatable; default: all)")
    args = ap.parse_args(argv)
    pkis = open_pki_dir(args.pki_dir, args.product or list(Product))
    kds = DevKds(pkis, port=args.port)
    print(kds.url, flush=True)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        kds.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        kds.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
