"""Simulated firmware updates: the firmware step, the certificate install, or both.

``python -m certd.sim.updater SUBCOMMAND``:

* ``update``: one process does what a firmware-update tool must: take the blob's exclusive
  lock, run the firmware step (the PSP key changes now), build the blob for the new TCB,
  install it, release (``BlobStore.update``). Prints one JSON line with its lock wait and
  the exclusive section's length. ``--empty-first``: the empty table is installed before
  the firmware step, so that an updater killed at any moment leaves no stale blob.
* ``firmware``: the firmware step alone (the CMD of ``certctl lock -- ...`` or
  ``certctl fw-update -- ...``).
* ``install``: build and install the blob for the platform as it is now; under
  ``certctl lock --exclusive`` it adopts that lock (stand-in for ``certctl install
  --roots``, which cannot take the dev roots yet).

``CERTD_FAULT=early-release`` (test only): the lock is released right after the firmware
step, before the new blob is in place: the negative control of the chaos run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from certd import faults
from certd.abi import table
from certd.abi.tcb import Tcb
from certd.sim import psp as pspmod
from certd.store import blobstore, locks


def _tcb(psp: pspmod.SharedPsp, text: str | None) -> Tcb:
    return Tcb.parse(text) if text else pspmod.next_tcb(psp.refresh().reported_tcb)


def _release_inherited(blob: str) -> None:
    """early-release under ``certctl lock``: drop the lock the parent holds for us."""
    hold = locks.inherited_hold(blob)
    if hold is not None:
        for fd in (hold.fd, hold.gate_fd):
            if fd is not None:
                locks.unlock(fd)
        hold.release()


def firmware(args) -> dict:
    psp = pspmod.SharedPsp.open(args.pki, args.platform)
    new = _tcb(psp, args.tcb)
    pspmod.firmware_update(args.platform, new, signing_key=args.signing_key)
    if args.hold_ms:
        time.sleep(args.hold_ms / 1000)  # a slow firmware command, lock held
    if faults.fault("early-release") and args.blob:
        _release_inherited(args.blob)
    return {"tcb": str(new)}


def install(args) -> dict:
    psp = pspmod.SharedPsp.open(args.pki, args.platform)
    store = blobstore.BlobStore(args.blob, psp.validator())
    r = store.install(psp.valid_blob(), timeout=args.timeout)
    return {"tcb": str(psp.platform.reported_tcb), "lock_wait_s": r.lock_wait_s,
            "held_s": (r.released_ns - r.locked_ns) / 1e9}


def update(args) -> dict:
    psp = pspmod.SharedPsp.open(args.pki, args.platform)
    store = blobstore.BlobStore(args.blob, psp.validator())
    new = _tcb(psp, args.tcb)
    t0 = time.monotonic()

    def change(current: bytes | None) -> bytes:
        pspmod.firmware_update(args.platform, new, signing_key=args.signing_key)
        if args.hold_ms:
            time.sleep(args.hold_ms / 1000)
        return psp.valid_blob(psp.refresh())

    if faults.fault("early-release"):
        # Misbehave on purpose: lock, change the key, unlock, and only then install.
        lk = locks.BlobLock(args.blob)
        hold = lk.acquire_exclusive_sync(locks.deadline_in(args.timeout), missing_ok=True)
        waited, locked = time.monotonic() - t0, time.monotonic()
        pspmod.firmware_update(args.platform, new, signing_key=args.signing_key)
        hold.release()
        held = time.monotonic() - locked
        if args.hold_ms:
            time.sleep(args.hold_ms / 1000)  # fetching the VCEK, the lock already dropped
        store.install(psp.valid_blob(psp.refresh()), timeout=args.timeout)
        return {"tcb": str(new), "lock_wait_s": waited, "held_s": held}
    if args.empty_first:
        return _update_empty_first(args, psp, store, new)
    r = store.update(change, timeout=args.timeout)
    return {"tcb": str(new), "lock_wait_s": r.lock_wait_s,
            "held_s": (r.released_ns - r.locked_ns) / 1e9}


def _update_empty_first(args, psp: pspmod.SharedPsp, store: blobstore.BlobStore,
                        new: Tcb) -> dict:
    """A crash-safe order: under one exclusive hold, install the empty table, then run the
    firmware step, then install the new blob. Killed at any point, the path holds a blob
    that matches the key, or the empty table; never the old blob with the new key.

    The nested installs adopt our hold the way an install under ``certctl lock`` does
    (``CERTD_LOCK_HELD``)."""
    t0 = time.monotonic()
    lk = locks.BlobLock(args.blob)
    hold = lk.acquire_exclusive_sync(locks.deadline_in(args.timeout), missing_ok=True)
    locked = time.monotonic()
    os.environ[locks.HELD_ENV] = locks.held_env("exclusive", hold.gate_fd, hold.fd, lk.path)
    try:
        store.install(table.EMPTY_TABLE, timeout=args.timeout)
        pspmod.firmware_update(args.platform, new, signing_key=args.signing_key)
        if args.hold_ms:
            time.sleep(args.hold_ms / 1000)
        store.install(psp.valid_blob(psp.refresh()), timeout=args.timeout)
    finally:
        del os.environ[locks.HELD_ENV]
        hold.release()
        lk.close()
    return {"tcb": str(new), "lock_wait_s": locked - t0, "held_s": time.monotonic() - locked}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m certd.sim.updater", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, func in (("update", update), ("firmware", firmware), ("install", install)):
        s = sub.add_parser(name)
        s.add_argument("--platform", required=True, help="the simulated platform file")
        s.add_argument("--pki", required=True, help="the simulated PKI directory")
        s.add_argument("--blob", required=name != "firmware", help="the blob path")
        s.add_argument("--tcb", help="new reported TCB (default: SNP SPL + 1)")
        s.add_argument("--signing-key", choices=("vcek", "vlek"),
                       help="switch the signing key (a VLEK load) with the update")
        s.add_argument("--hold-ms", type=float, default=0,
                       help="keep the lock this much longer after the firmware step")
        s.add_argument("--timeout", type=float, default=30.0, help="lock timeout (s)")
        s.add_argument("--quiet", action="store_true", help="print nothing")
        s.add_argument("--empty-first", action="store_true",
                       help="update: install the empty table before the firmware step "
                            "(crash-safe order)")
        s.set_defaults(func=func)
    args = p.parse_args(argv)
    try:
        out = args.func(args)
    except (locks.LockBusy, blobstore.StoreError) as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 75 if isinstance(e, locks.LockBusy) else 1
    if not args.quiet:
        print(json.dumps({"ok": True, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
