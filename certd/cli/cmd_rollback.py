"""certctl rollback: make the previous blob (BLOB.prev) current again."""

from __future__ import annotations

import argparse

from certd import exitcodes
from certd.cli.cmd_install import add_policy_flags, make_validator, result_dict, store_error
from certd.cli.common import add_blob_flags, add_json_flag, blob_path, emit, nonnegative
from certd.store import blobstore, locks

HELP = "put the previous blob (BLOB.prev) back in place"
DESCRIPTION = """\
Swap BLOB.prev back in with the same locks and crash-safe steps as 'certctl install';
the blob it replaces becomes the new BLOB.prev, so a second rollback undoes the first.
The previous blob is checked like a new one (certd.policy, as for install), and the
blob is settled the same way if it is refused.
"""
EPILOG = """\
exit codes:
    0  rolled back
    2  usage error, or run inside 'certctl lock --shared' (an update needs --exclusive)
   65  the previous blob fails a check, or the --platform file is malformed
   66  there is no previous blob, or the --platform or --config file cannot be read
   69  no --platform and no /dev/sev: the platform to match is unknown
   74  the blob directory is missing, read-only, full, or not writable
   75  busy: the locks were not obtained within --timeout
   78  the --config file is invalid
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_blob_flags(p)
    add_policy_flags(p)
    p.add_argument("--timeout", type=nonnegative, default=blobstore.DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for the locks (default %(default)s)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    validate, checks = make_validator(args)
    store = blobstore.BlobStore(blob_path(args), validate)
    try:
        r = store.rollback(timeout=args.timeout)
    except (blobstore.StoreError, locks.LockBusy) as e:
        raise store_error(e) from None
    emit(args, result_dict(r, checks),
         f"rolled back {r.path} to the previous blob ({r.size} bytes, sha256 {r.sha256}); "
         f"the replaced blob is now {r.prev_path}")
    return exitcodes.OK
