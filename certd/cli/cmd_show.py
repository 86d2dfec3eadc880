"""certctl show: print the entries of a certificate blob."""

from __future__ import annotations

import argparse

from certd.abi import table
from certd.cli import certinfo
from certd import exitcodes
from certd.cli.common import CliError, add_json_flag, emit

EPILOG = """\
examples:
  certctl show /var/lib/certd/certs.blob
  certctl show certs.blob --json | jq '.entries[] | {role, subject, tcb}'

Columns: entry role and GUID, byte offset and length in the table, the certificate's
subject CN, product line, TCB (VCEK/VLEK: the SPLs from AMD's extensions, fmc first on
Turin), hwID (shortened; --json has it in full) and validity (CRL: thisUpdate..nextUpdate).
'show' only displays; use 'certctl verify' to check a blob. An entry that does not parse
is shown as UNPARSEABLE with the reason, and the exit code is then 65, as for a file that
is not a table at all (or is empty).

""" + exitcodes.epilog()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="show the entries of a certificate blob",
                       description="Decode a GHCB certificate table and list its entries.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("blob", metavar="BLOB", help="certificate blob (GHCB table) file")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = certinfo.read_blob(args.blob)
    try:
        t = table.decode(data)
    except table.TableError as e:
        raise CliError(f"{args.blob}: not a valid certificate table: {e}", exitcodes.DATAERR)
    entries = [certinfo.entry_info(i, e, t.spans[i] if i < len(t.spans) else None)
               for i, e in enumerate(t.entries)]
    malformed = [e for e in entries if "error" in e]
    data_out = {"ok": not malformed, "blob": args.blob, "size": len(data),
                "npages": table.npages(len(data)),
                "fits_guest_limit": len(data) <= table.GUEST_MAX_SIZE, "entries": entries}

    def text() -> str:
        limit = ("fits the 16 KiB guest limit" if data_out["fits_guest_limit"]
                 else f"EXCEEDS the {table.GUEST_MAX_SIZE}-byte guest limit")
        lines = [f"{args.blob}: {len(data)} bytes, {len(entries)} entries, "
                 f"{data_out['npages']} page(s), {limit}"]
        if not entries:
            lines.append("  (empty table)")
            return "\n".join(lines)
        rows = [("#", "ROLE", "GUID", "OFFSET", "LENGTH", "SUBJECT", "PRODUCT", "TCB", "HWID",
                 "VALIDITY")]
        for e in entries:
            subject = e.get("subject") or (f"CRL {e['issuer']}" if e.get("kind") == "CRL" else "-")
            if "error" in e:
                subject = "UNPARSEABLE"
            rows.append((str(e["index"]), e["role"], e["guid"], str(e["offset"]), str(e["length"]),
                         subject, e.get("product") or "-", e.get("tcb") or "-",
                         certinfo.short_hex(bytes.fromhex(e["hwid"])) if e.get("hwid") else "-",
                         certinfo.validity_text(e)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        for e in entries:
            if "error" in e:
                lines.append(f"  {e['error']}")  # names the entry itself
            if e.get("csp_id"):
                lines.append(f"  entry {e['index']}: cspID {e['csp_id']}")
            if e.get("revoked"):
                lines.append(f"  entry {e['index']}: revokes {', '.join(e['revoked'])}")
        return "\n".join(lines)

    emit(args, data_out, text)
    return exitcodes.DATAERR if malformed else exitcodes.OK
