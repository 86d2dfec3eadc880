"""certctl verify: check a blob (and optionally a report) and print every failed check."""

from __future__ import annotations

import argparse
import re

from certd import platform as platmod
from certd import policy
from certd.abi.tcb import Tcb
from certd.cli import certinfo
from certd import exitcodes
from certd.cli.common import CliError, add_json_flag, emit, read_input
from certd.platform import Platform
from certd.verify.chain import utc

EPILOG = """\
examples:
  certctl verify certs.blob
  certctl verify certs.blob --report report.bin            # would a guest accept both?
  certctl verify certs.blob --platform /etc/certd/platform.toml --crl milan.crl
  certctl verify certs.blob --tcb bl=3,tee=0,snp=8,ucode=115 --chip-id 3ac3fe21...
  certctl verify certs.blob --tcb fmc=1,bl=3,tee=2,snp=5,ucode=97 --product Turin
  certctl verify vlek.blob --report report.bin --at 2025-03-01   # an expired VLEK, back then

Checks: table format; roles (one ARK, one ASK/ASVK, exactly one VCEK or VLEK, optional
CRL); chain to AMD's pinned roots (RSASSA-PSS SHA-384); product agreement; validity dates
at --at; revocation by the blob's CRL and every --crl; size <= 16 KiB. With --platform,
--tcb, --chip-id or --product: the leaf's TCB and hwID against the platform (hwID not with
--mask-chip-id or a VLEK). With --report: the report's signature by the blob's leaf,
signing key type, REPORTED_TCB, CHIP_ID and product (CPUID, report v3+).
Every failed check is printed as 'check: message' (check ids are stable for scripts).
Exit code 1: the blob parses but a check failed; 65: it is malformed (an empty file, not
a table, or an entry that is not a readable certificate or CRL: check id 'format').

--tcb/--chip-id/--product override the platform file; given alone, only they are checked.
A report may be raw (1184 bytes) or hex text.

""" + exitcodes.epilog()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a blob, optionally against a report or platform",
                       description="Verify a certificate blob; print every failed check.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("blob", metavar="BLOB", help="certificate blob (GHCB table) file")
    p.add_argument("--report", metavar="FILE", help="attestation report (raw or hex)")
    p.add_argument("--platform", metavar="FILE", help=certinfo.PLATFORM_HELP)
    p.add_argument("--tcb", type=certinfo.tcb_arg, metavar="bl=N,tee=N,snp=N,ucode=N[,fmc=N]",
                   help="the platform's reported TCB")
    p.add_argument("--chip-id", type=certinfo.hex_arg, metavar="HEX",
                   help="the platform's chip id (64 bytes; Turin 8)")
    p.add_argument("--product", type=certinfo.product_arg, metavar="P",
                   help="Milan, Genoa (also Siena, Bergamo) or Turin")
    p.add_argument("--mask-chip-id", action="store_true",
                   help="the platform masks the chip id: do not compare hwID")
    p.add_argument("--at", type=certinfo.iso_time, metavar="TIME", help=certinfo.TIME_HELP)
    p.add_argument("--crl", metavar="FILE", action="append", default=[],
                   help="also check revocation with this ARK-signed CRL (repeatable)")
    certinfo.add_roots_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _read_report(path: str) -> bytes:
    data = read_input(path, "report")
    text = data.strip()
    # A hex dump (e.g. from a guest tool) is accepted: 2368 hex digits, whitespace ignored.
    if text and re.fullmatch(rb"[0-9a-fA-F\s]+", text):
        hexed = re.sub(rb"\s+", b"", text)
        if len(hexed) % 2 == 0:
            return bytes.fromhex(hexed.decode())
    return data


def _platform(args: argparse.Namespace, blob: bytes) -> Platform | None:
    plat = certinfo.load_platform(args.platform) if args.platform else None
    if args.tcb is None and args.chip_id is None and args.product is None:
        return plat
    # Fill what the user did not give from the blob's own leaf, so only the given
    # fields can disagree.
    leaf = policy.parse_blob(blob).leaf
    product = args.product or (plat.product if plat else None) or (leaf.product if leaf else None)
    if product is None:
        raise CliError("cannot tell the product: give --product", exitcodes.USAGE)
    tcb: Tcb | None = args.tcb or (plat.reported_tcb if plat else None)
    if tcb is None and leaf is not None:
        try:
            tcb = leaf.ext.tcb(product)
        except ValueError:
            tcb = None
    if tcb is None:
        raise CliError("cannot tell the reported TCB: give --tcb", exitcodes.USAGE)
    try:
        return Platform(
            product=product, reported_tcb=tcb,
            chip_id=args.chip_id if args.chip_id is not None else (plat.chip_id if plat else None),
            current_tcb=plat.current_tcb if plat else None,
            mask_chip_id=plat.mask_chip_id if plat else False,
            signing_key=plat.signing_key if plat else
            ("vlek" if leaf is not None and leaf.kind.value == "VLEK" else "vcek"))
    except platmod.PlatformError as e:
        raise CliError(f"platform arguments: {e}", exitcodes.USAGE) from None


def run(args: argparse.Namespace) -> int:
    blob = certinfo.read_blob(args.blob)
    crls = [certinfo.load_crl(path) for path in args.crl]
    trust = certinfo.trust_from_args(args)
    plat = _platform(args, blob)
    at = utc(args.at)
    kw = dict(trust=trust, platform=plat, at=at, crls=crls, mask_chip_id=args.mask_chip_id)
    if args.report:
        problems = policy.check_report(blob, _read_report(args.report), **kw)
    else:
        problems = policy.check_blob(blob, **kw)
    if not problems:
        code = exitcodes.OK
    elif any(p.check == "format" for p in problems):
        code = exitcodes.DATAERR  # malformed input, not merely a failed check
    else:
        code = exitcodes.CHECK_FAILED
    what = args.blob + (f" with report {args.report}" if args.report else "")
    when = at.strftime("%Y-%m-%dT%H:%M:%SZ")

    def text() -> str:
        if not problems:
            return (f"OK: {what}: every check passed (roots: {trust.name}; at {when}"
                    f"{'; platform checked' if plat else ''})")
        return "\n".join([f"FAILED: {what}: {len(problems)} check(s) failed (at {when}):"]
                         + [f"  {p}" for p in problems])

    emit(args, {"ok": not problems, "blob": args.blob, "report": args.report, "at": when,
                "trust": trust.name, "exit_code": code,
                "problems": [p.as_dict() for p in problems]}, text)
    return code
