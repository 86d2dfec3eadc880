"""Helpers shared by the certificate subcommands (build, show, verify): argument types,
loading certificate files with errors that name the file, describing blob entries."""

from __future__ import annotations

import argparse
import os
import re
from datetime import datetime, timezone
from typing import Any

from certd import policy
from certd.abi import table
from certd.abi.product import Product
from certd.abi.tcb import Tcb, TcbError
from certd import platform as platmod
from certd.amd import roots as rootsmod
from certd import exitcodes
from certd.cli.common import CliError, read_input
from certd.verify import pki
from certd.platform import Platform
from certd.verify.pki import Cert, Crl, Kind, PkiError

TIME_HELP = ("validation time, ISO 8601 (2025-03-01, 2025-03-01T12:00:00Z); "
             "default: now. Times without a zone are UTC")
PLATFORM_HELP = ("platform file (TOML: product, chip_id hex, mask_chip_id, signing_key "
                 "vcek|vlek, [reported_tcb] bl/tee/snp/ucode[/fmc]; the stand-in for /dev/sev)")


def iso_time(text: str) -> datetime:
    """argparse type for --at."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time "
                                         "(e.g. 2025-03-01 or 2025-03-01T12:00:00Z)") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def tcb_arg(text: str) -> Tcb:
    try:
        return Tcb.parse(text)
    except TcbError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def hex_arg(text: str) -> bytes:
    try:
        return bytes.fromhex(re.sub(r"[\s:]", "", text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}… is not hex") from None


def product_arg(text: str) -> Product:
    try:
        return Product.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_blob(path: str) -> bytes:
    """A blob file's bytes for show, verify and install; a zero-byte file is refused here
    with :data:`certd.policy.EMPTY_FILE`, so the three give the same answer for it."""
    data = read_input(path, "blob")
    if not data:
        raise CliError(f"{path}: {policy.EMPTY_FILE}", exitcodes.DATAERR,
                       problems=[policy.EMPTY_FILE.as_dict()])
    return data


def load_items(path: str, what: str) -> list[Cert | Crl]:
    data = read_input(path, what)
    try:
        return pki.load_bytes(data, path)
    except PkiError as e:
        raise CliError(f"{what}: {e}", exitcodes.DATAERR) from None


def load_one(path: str, what: str, kinds: tuple[Kind, ...], hint: str = "") -> Cert:
    """Exactly one certificate of one of ``kinds`` from ``path``."""
    items = load_items(path, what)
    certs = [i for i in items if isinstance(i, Cert)]
    if len(items) != 1 or len(certs) != 1:
        raise CliError(f"{what} {path}: expected one certificate, found {len(certs)} "
                       f"certificate(s) and {len(items) - len(certs)} CRL(s)", exitcodes.DATAERR)
    c = certs[0]
    if c.kind not in kinds:
        raise CliError(f"{what} {path} holds {c.kind.value} {c.subject_cn!r}, not "
                       f"{' or '.join(k.value for k in kinds)}{hint}", exitcodes.DATAERR)
    return c


def load_crl(path: str, what: str = "--crl") -> Crl:
    items = load_items(path, what)
    if len(items) != 1 or not isinstance(items[0], Crl):
        raise CliError(f"{what} {path}: expected one CRL, found {len(items)} item(s) of which "
                       f"{sum(isinstance(i, Crl) for i in items)} CRL(s)", exitcodes.DATAERR)
    return items[0]


def load_platform(path: str) -> Platform:
    """A --platform FILE, with the two failure classes told apart (missing vs malformed)."""
    if not os.path.lexists(path):  # platform.load reports every read failure as malformed
        raise CliError(f"platform file {path!r} does not exist", exitcodes.NOINPUT)
    try:
        return platmod.load(path)
    except FileNotFoundError:
        raise CliError(f"platform file {path!r} does not exist", exitcodes.NOINPUT) from None
    except (ValueError, OSError) as e:
        raise CliError(str(e) if str(e).startswith(path) else f"platform file {path!r}: {e}",
                       exitcodes.DATAERR) from None


def add_roots_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roots", metavar="FILE", action="append", default=[],
                   help="trust the ARK/ASK/ASVK in FILE (PEM bundle) INSTEAD of AMD's pinned "
                        "roots; for the development PKI of 'certd --dev' only (repeatable)")


def trust_from_args(args: argparse.Namespace) -> rootsmod.TrustStore:
    if not args.roots:
        return rootsmod.pinned()
    by_product: dict[Product, dict[str, Any]] = {}
    for path in args.roots:
        for item in load_items(path, "--roots"):
            if not isinstance(item, Cert) or item.kind.is_leaf or item.product is None:
                raise CliError(f"--roots {path}: only ARK, ASK and ASVK certificates belong "
                               "in a roots file", exitcodes.DATAERR)
            by_product.setdefault(item.product, {})[item.kind.value] = item.cert
    out = []
    for product, d in by_product.items():
        if "ARK" not in d:
            raise CliError(f"--roots: no ARK for {product.value}", exitcodes.DATAERR)
        out.append(rootsmod.Roots(product, d["ARK"], d.get("ASK"), d.get("ASVK")))
    return rootsmod.TrustStore(out, name="--roots")


def short_hex(b: bytes | None, keep: int = 8) -> str | None:
    if b is None:
        return None
    h = b.hex()
    return h if len(h) <= 2 * keep + 2 else f"{h[:keep]}…{h[-keep:]}"


def _date(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


def entry_info(index: int, entry: table.Entry, span: tuple[int, int] | None) -> dict[str, Any]:
    """One blob entry as data: role, GUID, offset, length, and what the certificate says."""
    info: dict[str, Any] = {"index": index, "role": entry.label, "guid": str(entry.guid),
                            "offset": span[0] if span else None, "length": len(entry.data)}
    role = entry.role
    if role is None:
        return info
    source = f"entry {index} ({entry.label})"
    try:
        if role is table.Role.CRL:
            crl = pki.crl_from_der(entry.data, source)
            nxt = crl.next_update
            info.update(kind="CRL", issuer=crl.issuer_cn,
                        product=crl.product.value if crl.product else None,
                        this_update=crl.this_update.isoformat(),
                        next_update=nxt.isoformat() if nxt else None,
                        revoked=[f"0x{s:x}" for s in crl.revoked_serials()])
            return info
        c = pki.cert_from_der(entry.data, source)
    except PkiError as e:
        info["error"] = str(e)
        return info
    info.update(kind=c.kind.value, subject=c.subject_cn, issuer=c.issuer_cn,
                product=c.product.value if c.product else None, serial=f"0x{c.serial:x}",
                not_before=c.not_before.isoformat(), not_after=c.not_after.isoformat())
    if c.kind.is_leaf:
        try:
            info["tcb"] = str(c.tcb())
        except PkiError as e:
            info["tcb_error"] = str(e)
        info["hwid"] = c.hwid.hex() if c.hwid else None
        if c.ext.product_name:
            info["product_name"] = c.ext.product_name
        if c.ext.csp_id:
            info["csp_id"] = c.ext.csp_id
    return info


def validity_text(info: dict[str, Any]) -> str:
    if "not_before" in info:
        return f"{info['not_before'][:10]}..{info['not_after'][:10]}"
    if "this_update" in info:
        return f"{info['this_update'][:10]}..{(info.get('next_update') or '?')[:10]}"
    return "-"
