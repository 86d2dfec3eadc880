"""certctl fetch: act as a VMM against the daemon's socket (GET, write the table, RELEASE).

This is the socket face exercised end to end from a shell: it sends GET for a VM id and a
guest buffer size, writes the table where the VMM would copy it into guest memory, keeps
the lease for ``--hold`` seconds (the time KVM would take to have the report signed), then
sends RELEASE, as a VMM does when KVM_RUN returns -EINTR after immediate_exit.
"""

from __future__ import annotations

import argparse
import sys
import time

from certd.abi import wire
from certd.abi.table import GUEST_MAX_SIZE, PAGE_SIZE
from certd.abi.wire import ErrorCode
from certd import exitcodes, fileio
from certd.cli.common import CliError, add_json_flag, emit, positive
from certd.client import (DEFAULT_SOCKET, DEFAULT_TIMEOUT, Client, ClientError,
                          InvalidRequest, ProtocolError, Refused, Unavailable)

#: Exit code for each ret a GET can answer with.
RET_EXIT = {wire.RET_OK: exitcodes.OK, wire.ENOSPC: exitcodes.NOSPACE,
            wire.EAGAIN: exitcodes.BUSY, wire.EIO: exitcodes.UNAVAILABLE}
#: Refusals that mean "retry later" rather than "you may not".
_BUSY_REFUSALS = {ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_LEASES, ErrorCode.TOO_MANY_REQUESTS,
                  ErrorCode.TOO_MANY_CONNECTIONS}


def cli_error(err: ClientError, socket_path: str) -> CliError:
    """Turn a client failure into the CliError with the documented exit code."""
    details = {"socket": socket_path}
    if err.code is not None:
        try:
            details["error_code"] = ErrorCode(err.code).name
        except ValueError:
            details["error_code"] = err.code  # a code from a newer daemon
    if isinstance(err, InvalidRequest):
        return CliError(err.message, exitcodes.USAGE, **details)
    if isinstance(err, Refused):
        code = exitcodes.BUSY if err.code in _BUSY_REFUSALS else exitcodes.NOPERM
        return CliError(err.message, code, **details)
    if isinstance(err, Unavailable):
        return CliError(err.message, exitcodes.UNAVAILABLE, **details)
    if isinstance(err, ProtocolError):
        return CliError(err.message, exitcodes.SOFTWARE, **details)
    return CliError(err.message, exitcodes.SOFTWARE, **details)


def add_socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"certd's Unix socket (default {DEFAULT_SOCKET})")
    p.add_argument("--timeout", type=positive, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fetch", help="act as a VMM: GET the certificate table over the socket, then RELEASE",
        description=__doc__, epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_socket_args(p)
    p.add_argument("--vm", required=True, metavar="ID",
                   help=f"VM id (1..{wire.MAX_VM_ID} printable ASCII characters)")
    p.add_argument("--npages", type=int, default=GUEST_MAX_SIZE // PAGE_SIZE, metavar="N",
                   help="guest buffer size in 4 KiB pages (default 4 = 16 KiB, the most a "
                        "Linux guest offers); too few gives ENOSPC with the pages needed")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the table here (the bytes a VMM copies to the guest buffer)")
    p.add_argument("--hold", type=float, default=0.0, metavar="S",
                   help="keep the lease this many seconds before RELEASE (default 0)")
    p.add_argument("--wait-ms", type=int, default=0, metavar="MS",
                   help="how long certd may wait for a valid table before EAGAIN "
                        "(default 0: the daemon's own deadline)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _write_output(path: str, table: bytes) -> None:
    # A reader of FILE never sees half a table.
    try:
        fileio.write_atomic(path, table)
    except OSError as e:
        raise CliError(f"cannot write table to {path!r}: {e.strerror}", exitcodes.IOERR) from None

def run(args: argparse.Namespace) -> int:
    if args.npages < 0:
        raise CliError(f"--npages must be >= 0, not {args.npages}", exitcodes.USAGE)
    if args.hold < 0:
        raise CliError(f"--hold must be >= 0, not {args.hold}", exitcodes.USAGE)
    if not 0 <= args.wait_ms < 2**32:
        raise CliError(f"--wait-ms must be 0..{2**32 - 1}, not {args.wait_ms}", exitcodes.USAGE)
    try:  # refuse a bad --vm before touching the socket
        wire.encode_get(1, args.vm, args.npages, args.wait_ms)
    except wire.WireError as e:
        raise CliError(f"--vm/--npages: {e.message}", exitcodes.USAGE) from None
    try:
        with Client(args.socket, args.timeout) as client:
            result = client.get(args.vm, args.npages, wait_ms=args.wait_ms)
            data = {"ok": result.ok, **result.to_dict(), "vm": args.vm,
                    "guest_npages": args.npages, "output": None, "release": None,
                    "held_s": None}
            write_error: CliError | None = None
            if result.ok:
                if args.output:
                    try:
                        _write_output(args.output, result.table)
                        data["output"] = args.output
                    except CliError as e:
                        write_error = e  # still release below: never leave a lease behind
                if result.lease_id:
                    started = time.monotonic()
                    if args.hold and write_error is None:
                        time.sleep(args.hold)
                    released = client.release(result.lease_id)
                    data["release"] = released.name.lower()
                    data["held_s"] = round(time.monotonic() - started, 3)
            if write_error is not None:
                raise write_error
    except ClientError as e:
        raise cli_error(e, args.socket) from None

    code = RET_EXIT[result.ret]
    data["exit_code"] = code
    emit(args, data, lambda: _text(args, result, data))
    if data["release"] == "expired":
        print(f"certctl: warning: lease {result.lease_id} expired before RELEASE "
              f"(held {data['held_s']} s): the daemon no longer held the lock", file=sys.stderr)
    return code


def _text(args: argparse.Namespace, r, data: dict) -> str:
    head = f"ret={r.ret} ({r.ret_name}) npages={r.npages} generation={r.generation}"
    if r.ret == wire.ENOSPC:
        return (f"{head}\nthe guest buffer of {args.npages} page(s) is too small; "
                f"{r.npages} page(s) are needed")
    if r.ret == wire.EAGAIN:
        return f"{head}\ncertd is busy (update in progress or no valid table yet); retry"
    if r.ret == wire.EIO:
        return f"{head}\ncertd reports a fatal condition (EIO); see its log"
    lines = [f"{head} lease={r.lease_id} table={len(r.table)} bytes"]
    if data["output"]:
        lines.append(f"wrote {len(r.table)} bytes to {data['output']}")
    if data["release"]:
        lines.append(f"RELEASE lease {r.lease_id}: {data['release']} after {data['held_s']} s")
    return "\n".join(lines)

