"""A development "firmware update": change the reported TCB in a platform file.

On an SNP host a firmware update (or SNP_COMMIT) changes what ``/dev/sev`` reports; on a
development setup the platform file stands in for it, and this is the command that moves
it, the way a firmware tool would, for ``certctl fw-update`` to wrap::

    certctl fw-update --config DIR/certd.toml -- python -m certd.devfw DIR/platform.toml --snp +1

Each of ``--bl --tee --snp --ucode --fmc`` takes a value (``7``) or a step (``+1``,
``-1``). The file is replaced atomically; the new TCB is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from certd import exitcodes, platform as platformmod

FIELDS = ("bl", "tee", "snp", "ucode", "fmc")


def change(value: int | None, spec: str) -> int:
    if spec[:1] in "+-":
        if value is None:
            raise ValueError("cannot step a field this product does not have")
        return value + int(spec)
    return int(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m certd.devfw", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("platform_file", metavar="PLATFORM_FILE")
    for f in FIELDS:
        ap.add_argument(f"--{f}", metavar="N|+N|-N", help=f"new {f} SPL, or a step")
    ap.add_argument("--stamp", metavar="FILE",
                    help="write CLOCK_MONOTONIC (ns) of the instant the TCB changed to FILE "
                         "(simulators and tests compare it with what guests received)")
    ap.add_argument("--signing-key", choices=platformmod.SIGNING_KEYS,
                    help="what the firmware signs with from now on (vcek, or vlek once loaded)")
    args = ap.parse_args(argv)
    try:
        p = platformmod.load(args.platform_file)
        tcb = p.reported_tcb
        new = {f: change(getattr(tcb, f), getattr(args, f)) for f in FIELDS
               if getattr(args, f) is not None}
        tcb = dataclasses.replace(tcb, **new)
        p = p.replace(reported_tcb=tcb, current_tcb=tcb,
                      signing_key=args.signing_key or p.signing_key)
        platformmod.save(p, args.platform_file)
        changed_ns = time.monotonic_ns()
        if args.stamp:
            with open(args.stamp, "w") as f:
                f.write(f"{changed_ns}\n")
    except (platformmod.PlatformError, ValueError) as e:
        print(f"devfw: {e}", file=sys.stderr)
        return exitcodes.DATAERR
    print(f"reported TCB now {tcb}")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
