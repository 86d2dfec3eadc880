"""certctl install: validate a blob and make it the current one, atomically and under lock."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from certd.cli import certinfo
from certd import exitcodes
from certd.cli.common import (CliError, add_blob_flags, add_json_flag, blob_path, emit,
                              nonnegative)
from certd.store import blobstore, locks
from certd.verify.problems import Problem

HELP = "validate a certificate blob and install it atomically at the blob path"
DESCRIPTION = """\
Validate NEW and make it the blob at --blob, the way every reader expects:
take the update gate and the blob's exclusive OFD lock (waiting at most --timeout),
validate, write a temp file in the same directory, fsync, lock it, rename it over the
blob, fsync the directory. The replaced blob is kept as BLOB.prev ('certctl rollback').
A crash at any point leaves the old or the new blob, whole.

If NEW is refused, the current blob is checked too, under the same lock: if it no longer
fits the platform it is replaced by the empty table (never wrong, only empty), and the
JSON says "blob_outcome": "emptied". A journal (.BLOB.journal) left by an updater that
died, or by 'certctl lock --exclusive', is settled the same way before NEW is installed.

Checks (certd.policy): the GHCB table format and the 16 KiB guest limit, the roles, the
chain to a pinned AMD root, product agreement, dates (at --at, default now), revocation by
the blob's CRL, and the match with the platform: product, reported TCB, chip id, signing
key (--platform FILE, else /dev/sev). --force skips only the platform match, never the
format or chain checks.

Run inside 'certctl lock --exclusive -- ...' it reuses that lock instead of waiting for
it, and hands the lock on the new blob to 'certctl lock', so readers stay out until the
whole hook is done. A stale $CERTD_LOCK_HELD (a job that outlived its hook) is ignored.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG)
    add_blob_flags(p)
    p.add_argument("new", metavar="NEW", help="the blob file to install")
    add_policy_flags(p)
    p.add_argument("--timeout", type=nonnegative, default=blobstore.DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for the locks (default %(default)s)")
    add_json_flag(p)
    p.set_defaults(func=run)


EPILOG = """\
exit codes:
    0  installed
    2  usage error, or run inside 'certctl lock --shared' (an update needs --exclusive)
   65  NEW is not a valid blob or fails a check (problems are listed), or the
       --platform file is malformed
   66  NEW, the --platform file or the --config file cannot be read
   69  no --platform and no /dev/sev: the platform to match is unknown
   74  the blob directory is missing, read-only, full, or not writable
   75  busy: the locks were not obtained within --timeout
   78  the --config file is invalid
"""


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", metavar="FILE",
                   help="platform file to match the blob against (default: /dev/sev)")
    p.add_argument("--at", metavar="TIME",
                   help="check certificate dates at this ISO 8601 time (default: now)")
    p.add_argument("--force", action="store_true",
                   help="skip the platform match (never the format or chain checks)")


def _parse_time(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--at {text!r} is not an ISO 8601 time", exitcodes.USAGE) from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _platform(args: argparse.Namespace):
    """The platform to match: --platform FILE, else /dev/sev; None with --force."""
    from certd import platform as platmod
    if args.force:
        return None
    if args.platform:
        return certinfo.load_platform(args.platform)
    try:
        return platmod.read_dev_sev()
    except (ValueError, OSError) as e:
        raise CliError(f"cannot tell which platform the blob must match: {e}; give "
                       "--platform FILE, or --force to skip the platform match",
                       exitcodes.UNAVAILABLE) from None


def make_validator(args: argparse.Namespace) -> tuple[blobstore.Validator, str]:
    """The validator for install/rollback, and a word describing it.

    Exactly ``certd.policy.check_blob`` with the pinned AMD roots, the platform (unless
    --force) and the time --at. The platform is read at every call: the check that
    settles the blob after a change step sees the platform as it is then. It is read
    once here too, so that an unreadable platform is reported before anything is locked.
    """
    from certd import policy
    from certd.amd import roots

    at = _parse_time(getattr(args, "at", None))
    platform = _platform(args)
    trust = roots.pinned()

    def validate(blob: bytes) -> list[Problem]:
        return policy.check_blob(blob, trust=trust, platform=_platform(args), at=at)

    return validate, "policy" if platform is not None else "policy (platform match skipped)"


def store_error(e: Exception) -> CliError:
    """Map a store/lock failure to the CLI error and exit code."""
    if isinstance(e, blobstore.InvalidBlob):
        return CliError(str(e), exitcodes.DATAERR,
                        problems=[p.as_dict() for p in e.problems],
                        blob_outcome=None if e.result is None else e.result.outcome)
    if isinstance(e, locks.LockBusy):
        return CliError(str(e), exitcodes.BUSY, waited_s=round(e.waited, 6), busy=e.what)
    if isinstance(e, blobstore.NothingToRollBack):
        return CliError(str(e), exitcodes.NOINPUT)
    if isinstance(e, blobstore.StoreIOError):
        return CliError(str(e), exitcodes.IOERR, errno=e.errno, file=e.filename)
    if isinstance(e, blobstore.StoreError):
        return CliError(str(e), exitcodes.USAGE)
    raise e


def result_dict(r: blobstore.InstallResult, checks: str) -> dict[str, Any]:
    d = r.as_dict()
    d["locked_monotonic_ns"] = d.pop("locked_ns")
    d["released_monotonic_ns"] = d.pop("released_ns")
    return {"ok": True, "checks": checks, **d}


def run(args: argparse.Namespace) -> int:
    new = certinfo.read_blob(args.new)  # the same answer as show and verify for an empty file
    validate, checks = make_validator(args)
    store = blobstore.BlobStore(blob_path(args), validate)
    try:
        r = store.install(new, timeout=args.timeout)
    except (blobstore.StoreError, locks.LockBusy) as e:
        raise store_error(e) from None
    emit(args, {**result_dict(r, checks), "source": args.new},
         lambda: (f"installed {args.new} as {r.path} ({r.size} bytes, sha256 {r.sha256}; "
                  f"{checks} checks passed)"
                  + (f"\nprevious blob kept as {r.prev_path}" if r.prev_path else
                     "\nfirst install: there was no previous blob")))
    return exitcodes.OK
