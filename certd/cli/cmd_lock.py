"""certctl lock: run a command while holding the blob's lock (flock(1) for OFD locks)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from certd import exitcodes
from certd.cli.common import (CliError, add_blob_flags, add_json_flag, blob_path, emit,
                              nonnegative, run_locked, shell_code)
from certd.store import journal, locks

HELP = "run a command while holding the blob's shared or exclusive lock"
DESCRIPTION = """\
Like flock(1), but with the locks QEMU and certd actually use: whole-file OFD fcntl locks
on the blob, the inode check (the blob is replaced by rename, so the lock is taken on the
file that is at the path), and the update gate (--exclusive takes it first, so a stream of
readers cannot starve it).

Firmware-update hooks wrap their work in 'certctl lock --exclusive': no reader gets the
old certificates while the endorsement key changes. A 'certctl install' run by CMD reuses
the held lock (over a channel named in $CERTD_LOCK_HELD) and installs the matching blob;
the new blob stays locked until CMD exits, so readers see it only once the whole hook is
done. --exclusive on a blob that does not exist yet holds the gate only.

--exclusive writes the update journal (.BLOB.journal beside the blob) before CMD runs and
leaves it when CMD is done: certctl lock does not check certificates, so the next
'certctl install'/'rollback' or certd checks the blob against the platform as it is then
(and replaces it by the empty table if it no longer fits) before it is served again.

SIGTERM, SIGINT, SIGHUP and SIGQUIT received by certctl are forwarded to CMD.
With --json, one JSON object describing the lock and CMD's exit is printed on stdout after
CMD exits (CMD's own output comes first).
"""
EPILOG = """\
exit codes:
  CMD's exit status, or 128+N if CMD was killed by signal N
    2  usage error (no CMD, or not one of --shared/--exclusive)
   66  --shared on a blob that does not exist, or the --config file is missing
   74  the lock could not be taken, or (--exclusive) the journal not written
       (directory missing, read-only, permissions)
   75  busy: the lock was not obtained within --timeout (CMD was not run)
   78  the --config file is invalid
  126  CMD could not be executed
  127  CMD was not found
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lock", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="certctl lock [--blob PATH] [--config FILE] (--shared | --exclusive) "
                             "[--timeout S] [--json] -- CMD [ARGS...]")
    add_blob_flags(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shared", action="store_true", help="take the lock shared (reader)")
    mode.add_argument("--exclusive", action="store_true", help="take the lock exclusive (updater)")
    p.add_argument("--timeout", type=nonnegative, default=2.0, metavar="S",
                   help="seconds to wait for the lock (default %(default)s)")
    add_json_flag(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)


def _acquire(args: argparse.Namespace, lk: locks.BlobLock) -> locks.Hold:
    deadline = locks.deadline_in(args.timeout)
    try:
        if args.exclusive:
            return lk.acquire_exclusive_sync(deadline, missing_ok=True)
        return lk.acquire_shared_sync(deadline)
    except locks.LockBusy as e:
        raise CliError(str(e), exitcodes.BUSY, waited_s=round(e.waited, 6), busy=e.what) from None
    except locks.BlobMissing:
        raise CliError(f"blob {lk.path} does not exist: nothing to lock shared",
                       exitcodes.NOINPUT) from None
    except OSError as e:
        raise CliError(f"cannot lock {e.filename or lk.path}: {e.strerror}",
                       exitcodes.IOERR) from None


def run(args: argparse.Namespace) -> int:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("no command given: certctl lock ... -- CMD [ARGS...]", exitcodes.USAGE)
    mode = "exclusive" if args.exclusive else "shared"
    lk = locks.BlobLock(blob_path(args))
    t0 = time.monotonic()
    hold = _acquire(args, lk)
    blob_existed = hold.stat is not None or not hold.exclusive
    journal_path = None
    try:
        waited = time.monotonic() - t0
        if hold.exclusive:
            try:
                journal.write(lk.path, f"certctl lock --exclusive -- {shlex.join(cmd)}")
            except OSError as e:
                raise CliError(f"cannot write the update journal beside {lk.path}: "
                               f"{e.strerror} ({e.filename}); CMD was not run",
                               exitcodes.IOERR) from None
            journal_path = journal.journal_path(lk.path)
        rc = run_locked(hold, cmd)
        held = time.monotonic() - t0 - waited
    finally:
        hold.release()
        lk.close()
    code = shell_code(rc)
    sys.stderr.flush()
    if args.json:
        emit(args, {"ok": code == 0, "blob": lk.path, "lock": mode, "command": cmd,
                    "exit_code": code, "signal": -rc if rc < 0 else None,
                    "waited_s": round(waited, 6), "held_s": round(held, 6),
                    "blob_existed": blob_existed, "journal": journal_path}, "")
    return code
