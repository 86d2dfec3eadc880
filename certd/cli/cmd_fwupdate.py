"""certctl fw-update: run a firmware-update step and install the matching blob before any
guest can see the new key."""

from __future__ import annotations

import argparse
import time
from typing import Any

from certd import config as configmod, exitcodes
from certd.abi import table
from certd.cli import certinfo
from certd.cli.common import (CliError, add_json_flag, emit, load_config, nonnegative,
                               run_locked, shell_code)
from certd.store import blobstore, locks

HELP = "run a firmware-update command under the exclusive lock and install the matching blob"
DESCRIPTION = """\
The firmware-update hook. A firmware update, SNP_COMMIT, SNP_SET_CONFIG or SNP_VLEK_LOAD
changes the key that signs guests' reports; the certificates guests receive must change at
the same instant. certctl fw-update makes that so:

  1. with --expect-tcb, fetch the VCEK for that TCB into the cache BEFORE locking
     (so the exclusive section does not wait for the network);
  2. take the update gate and the blob's exclusive OFD lock: certd grants no new lease and
     QEMU-style readers wait;
  3. run CMD;
  4. read the platform again (/dev/sev or the platform file, as certd.toml says);
  5. get the certificate for the new reported TCB: the cache, else KDS within --timeout;
  6. install the matching blob, or the empty table if it cannot be had in time (never the
     stale one: guests retry, certd keeps fetching in the background and rotates the right
     blob in when it arrives);
  7. release.

If CMD fails and the platform did not change, nothing changes. If CMD fails after moving
the firmware, the blob on disk is checked against the new platform and emptied if stale.
COCONUT SVSM guests retry a busy answer only once and QEMU's certs-timeout is 100 ms:
keep the work under the lock short (--expect-tcb). The JSON output gives the exclusive
section's length apart from CMD's own time.
"""
EPILOG = """\
exit codes:
    0  CMD succeeded and the blob matches the platform (or is the empty table: see "blob")
    2  usage error
   66  the configuration or platform file is missing
   69  --expect-tcb given and its VCEK could not be fetched (nothing was locked or run)
   74  the blob could not be written
   75  busy: the lock was not obtained within --lock-timeout (CMD was not run)
   78  the configuration is invalid
  other  CMD's own exit status (128+N if killed by signal N); the blob was still settled
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fw-update", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="certctl fw-update [--config FILE] [--expect-tcb TCB] "
                             "[--timeout S] [--json] -- CMD [ARGS...]")
    p.add_argument("--config", metavar="FILE", default=str(configmod.DEFAULT_PATH),
                   help="certd configuration: blob path, platform source, [kds], [trust] "
                        "(default %(default)s)")
    p.add_argument("--expect-tcb", metavar="TCB", type=certinfo.tcb_arg,
                   help="the reported TCB CMD will install, bl=N,tee=N,snp=N,ucode=N[,fmc=N]: "
                        "its VCEK is fetched before locking")
    p.add_argument("--timeout", type=nonnegative, default=0.05, metavar="S",
                   help="how long to wait for the new certificate under the lock before "
                        "installing the empty table (default %(default)s s)")
    p.add_argument("--lock-timeout", type=nonnegative, default=10.0, metavar="S",
                   help="how long to wait for the exclusive lock (default %(default)s s)")
    certinfo.add_roots_flag(p)
    add_json_flag(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from certd.service import rotation  # the source and judge wiring the daemon uses too

    cfg = load_config(args.config)
    try:
        setup = rotation.Setup.from_config(cfg, trust=certinfo.trust_from_args(args)
                                           if args.roots else None)
    except rotation.SetupError as e:
        raise CliError(str(e), e.code) from None
    prefetched = None
    if args.expect_tcb is not None:
        try:
            prefetched = setup.prefetch(args.expect_tcb)  # before anything is locked
        except rotation.SetupError as e:
            raise CliError(f"{e}; nothing was locked or run", e.code) from None
    store = blobstore.BlobStore(cfg.store.blob, setup.judge.problems)
    outcome: dict[str, Any] = {}

    def change(current: bytes | None) -> bytes | None:
        before = setup.platform.current
        t0 = time.monotonic()
        rc = shell_code(run_locked(store.hold, list(args.command)))  # nested installs adopt it
        outcome["cmd_s"] = time.monotonic() - t0
        outcome["cmd_exit"] = rc
        setup.platform.observe(force=True)
        after = setup.platform.current
        outcome["platform_changed"] = after != before
        if rc != 0 and after == before:
            outcome["source"] = "unchanged"
            return None  # nothing to install: the store keeps the blob if it still fits
        got, source = setup.blob_for(after, deadline_s=args.timeout)
        outcome["source"] = source
        # None: the store keeps the current blob if it fits the platform now (a no-op CMD
        # on a host without KDS keeps serving), else installs the empty table.
        return got

    try:
        r = store.update(change, timeout=args.lock_timeout, what="certctl fw-update")
    except locks.LockBusy as e:
        raise CliError(str(e), exitcodes.BUSY, waited_s=round(e.waited, 6)) from None
    except blobstore.StoreError as e:
        raise CliError(str(e), exitcodes.IOERR) from None
    held = (r.released_ns - r.locked_ns) / 1e9
    plat = setup.platform.current
    current = store.read()
    data = {"ok": outcome.get("cmd_exit") == 0 and not r.refused, "blob": r.path,
            "cmd_exit": outcome.get("cmd_exit"), "outcome": r.outcome,
            "platform_changed": outcome.get("platform_changed"),
            "reported_tcb": None if plat is None else str(plat.reported_tcb),
            "source": outcome.get("source"), "prefetched": prefetched,
            "refused": [p.as_dict() for p in r.refused],
            "empty_table": current in (None, table.EMPTY_TABLE),
            "lock_wait_s": round(r.lock_wait_s, 6), "exclusive_s": round(held, 6),
            "cmd_s": round(outcome.get("cmd_s", 0.0), 6),
            "exclusive_without_cmd_s": round(held - outcome.get("cmd_s", 0.0), 6),
            "released_monotonic_ns": r.released_ns}
    emit(args, data, lambda: (
        f"CMD exited {data['cmd_exit']}; platform {'changed' if data['platform_changed'] else 'unchanged'}"
        f" (reported TCB {data['reported_tcb']}); blob {r.outcome}"
        + (" — the EMPTY table: the certificate could not be had in time; certd keeps trying"
           if data["empty_table"] else f" (certificate from {data['source']})")
        + "".join(f"\nrefused: {p}" for p in r.refused)
        + f"\nexclusive section {held * 1000:.1f} ms, of which CMD {data['cmd_s'] * 1000:.1f} ms"))
    if outcome.get("cmd_exit"):
        return outcome["cmd_exit"]
    return exitcodes.DATAERR if r.refused else exitcodes.OK
