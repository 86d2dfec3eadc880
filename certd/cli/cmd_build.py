"""certctl build: make a validated, canonical certificate blob from PEM/DER files."""

from __future__ import annotations

import argparse
from pathlib import Path

from certd import policy
from certd.abi import table
from certd.cli import certinfo
from certd import exitcodes, fileio
from certd.cli.common import CliError, add_json_flag, emit
from certd.verify.pki import Cert, Kind

EPILOG = """\
examples:
  # VCEK host: KDS cert_chain (ASK then ARK) + the VCEK for the platform's reported TCB
  certctl build --chain cert_chain.pem --vcek vcek.der -o certs.blob
  # the same from separate files, with the CRL and a check against this platform
  certctl build --ark ark.pem --ask ask.pem --vcek vcek.der --crl crl.der \\
      --platform /etc/certd/platform.toml -o certs.blob
  # CSP-provisioned VLEK: ASVK chain (vlek/v1/<Product>/cert_chain) + VLEK
  certctl build --chain vlek_cert_chain.pem --vlek vlek.der -o certs.blob

The blob holds ARK, ASK/ASVK, VCEK or VLEK, CRL, in that order (one input, one byte-exact
output). Nothing is written unless the chain verifies to AMD's pinned roots, dates hold at
--at, nothing is revoked, and the blob fits the 16 KiB Linux guest limit; every failed
check is printed. OUT is replaced atomically (temporary file + rename).

""" + exitcodes.epilog()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a validated certificate blob",
                       description="Build the GHCB certificate table (ARK, ASK/ASVK, VCEK/VLEK, "
                                   "optional CRL) and refuse invalid chains.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("certificates (PEM or DER)")
    src.add_argument("--chain", metavar="FILE",
                     help="KDS cert_chain bundle: ASK (or ASVK) and ARK; replaces --ark/--ask")
    src.add_argument("--ark", metavar="FILE", help="AMD root key certificate (ARK-<Product>)")
    src.add_argument("--ask", "--asvk", dest="ask", metavar="FILE",
                     help="AMD SEV key (SEV-<Product>) or, for a VLEK, the ASVK (SEV-VLEK-<Product>)")
    leaf = src.add_mutually_exclusive_group(required=True)
    leaf.add_argument("--vcek", metavar="FILE", help="the chip's VCEK for its reported TCB")
    leaf.add_argument("--vlek", metavar="FILE", help="the CSP-provisioned VLEK")
    src.add_argument("--crl", metavar="FILE", help="ARK-signed CRL to include (optional)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="blob file to write")
    p.add_argument("--at", type=certinfo.iso_time, metavar="TIME", help=certinfo.TIME_HELP)
    p.add_argument("--platform", metavar="FILE", help="also check against this "
                                                      + certinfo.PLATFORM_HELP)
    certinfo.add_roots_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _chain(args: argparse.Namespace) -> tuple[Cert, Cert]:
    if args.chain and (args.ark or args.ask):
        raise CliError("give either --chain or --ark/--ask, not both", exitcodes.USAGE)
    if args.chain:
        items = certinfo.load_items(args.chain, "--chain")
        certs = [i for i in items if isinstance(i, Cert)]
        arks = [c for c in certs if c.kind is Kind.ARK]
        mids = [c for c in certs if c.kind in (Kind.ASK, Kind.ASVK)]
        if len(arks) != 1 or len(mids) != 1 or len(items) != 2:
            raise CliError(f"--chain {args.chain}: expected an ASK (or ASVK) and an ARK, found "
                           + (", ".join(f"{c.kind.value} {c.subject_cn!r}" for c in certs)
                              or "no certificates"), exitcodes.DATAERR)
        return arks[0], mids[0]
    if not (args.ark and args.ask):
        raise CliError("need --chain FILE, or both --ark FILE and --ask FILE", exitcodes.USAGE)
    ark = certinfo.load_one(args.ark, "--ark", (Kind.ARK,))
    ask = certinfo.load_one(args.ask, "--ask", (Kind.ASK, Kind.ASVK))
    return ark, ask


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old or the new file, whole (:func:`certd.fileio.write_atomic`)."""
    try:
        fileio.write_atomic(path, data)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}", exitcodes.IOERR) from None

def run(args: argparse.Namespace) -> int:
    ark, ask = _chain(args)
    if args.vcek:
        leaf = certinfo.load_one(args.vcek, "--vcek", (Kind.VCEK,),
                                 " (a VLEK goes in with --vlek)")
    else:
        leaf = certinfo.load_one(args.vlek, "--vlek", (Kind.VLEK,),
                                 " (a VCEK goes in with --vcek)")
    crl = certinfo.load_crl(args.crl) if args.crl else None
    plat = certinfo.load_platform(args.platform) if args.platform else None
    trust = certinfo.trust_from_args(args)
    try:
        blob = policy.build_blob(ark, ask, leaf, crl, trust=trust, at=args.at, platform=plat)
    except policy.PolicyError as e:
        lines = "\n".join(f"  {p}" for p in e.problems)
        raise CliError(f"refusing to build {args.output}: {len(e.problems)} check(s) failed:\n"
                       f"{lines}", exitcodes.CHECK_FAILED,
                       problems=[p.as_dict() for p in e.problems]) from None
    out = Path(args.output)
    write_atomic(out, blob)
    t = table.decode(blob)
    entries = [certinfo.entry_info(i, e, t.spans[i]) for i, e in enumerate(t.entries)]
    leaf_info = entries[2]
    emit(args, {"ok": True, "output": str(out), "size": len(blob),
                "npages": table.npages(len(blob)), "trust": trust.name, "entries": entries},
         f"wrote {out}: {len(blob)} bytes ({table.npages(len(blob))} page(s)); "
         f"{ark.subject_cn} / {ask.subject_cn} / {leaf.kind.value} "
         f"{leaf_info.get('tcb', '')} hwID {certinfo.short_hex(leaf.hwid) or '-'}"
         f"{' / CRL' if crl else ''}; chain verified against the {trust.name} roots")
    return exitcodes.OK
