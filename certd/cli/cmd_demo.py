"""certctl demo: watch certd keep guests' certificates in step with the firmware's key."""

from __future__ import annotations

import argparse
import json
import sys

from certd import exitcodes
from certd.cli.common import CliError

HELP = "run certd with simulated VMs and a firmware update, and check every report"
DESCRIPTION = """\
Runs a development certd (a generated AMD-like PKI, a development KDS and a simulated PSP,
like 'certd --dev')
with simulated VMs of both guest kinds - Linux and COCONUT SVSM - some asking through
certd's socket, some reading the blob file as a stock QEMU does. A firmware update changes
the PSP's signing key during the run. Every guest checks every report against the
certificates it received (signature, TCB, chip id, chain), as a relying party would.
Updates run 'certctl fw-update -- python -m certd.devfw PLATFORM --snp N'.

  certctl demo                 4 VMs, one firmware update (about 10 s)
  certctl demo --chaos         200 VMs, 50 updates (4 switching to a dropped VLEK or
                               back), 10 SIGKILLs of certd, 10 of updaters

The run passes when no guest got certificates that do not match the key that signed its
report (mismatches), no file reader read a table that does not decode (torn), no guest was
answered EIO and no guest lost its VMPCK (vmpck_lost). Empty tables are allowed: certd is
never wrong, sometimes empty.

--json prints one object with at least: attestations, verified, mismatches, torn, eio,
vmpck_lost, max_wait_ms (plus per guest kind, per face, updates and daemon restarts).
"""
EPILOG = """\
exit codes:
    0  passed: mismatches, torn, eio and vmpck_lost are all 0 (and the run completed)
    1  failed: one of them is not 0, the simulator hit an error, or the run was aborted
    2  usage error (a count below its minimum, an unknown --updater)
   70  internal error
"""

DEMO = {"vms": 4, "updates": 1, "daemon_kills": 0, "updater_kills": 0, "socket_share": 0.5,
        "vmm_processes": 2, "update_gap": 2.0, "settle": 2.0}
CHAOS = {"vms": 200, "updates": 50, "daemon_kills": 10, "updater_kills": 10, "vlek_drops": 4}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chaos", action="store_true",
                   help="the chaos run: hundreds of VMs, many updates, SIGKILLs of certd "
                        "(restarted on the same socket) and of updaters at random moments")
    p.add_argument("--vms", type=int, metavar="N", help="simulated VMs (demo 4, chaos 200)")
    p.add_argument("--updates", type=int, metavar="N", help="firmware updates (demo 1, chaos 50)")
    p.add_argument("--daemon-kills", type=int, metavar="N",
                   help="SIGKILLs of certd at random moments (demo 0, chaos 10)")
    p.add_argument("--updater-kills", type=int, metavar="N",
                   help="SIGKILLs of an updater at a random moment of its run (demo 0, chaos 10)")
    p.add_argument("--vlek-drops", type=int, metavar="N",
                   help="updates that also switch the signing key, VCEK to VLEK and back; "
                        "on the VLEK the CSP drops the VLEK for each new TCB into the drop "
                        "directory (demo 0, chaos 4)")
    p.add_argument("--updater", metavar="STRATEGY", default=None,
                   help="how updates are made (certd.sim.chaos.UPDATERS): fw-update "
                        "(certctl fw-update around the development firmware command; the "
                        "default)")
    p.add_argument("--hold-ms", type=float, metavar="MS",
                   help="the firmware command runs this much longer after moving the TCB, "
                        "lock held (default 0)")
    p.add_argument("--deadline-ms", type=int, metavar="MS",
                   help="certd's request deadline and the file readers' certs-timeout "
                        "(default 1000)")
    p.add_argument("--seed", type=int, help="random seed, to repeat a run")
    p.add_argument("--keep", metavar="DIR",
                   help="run in DIR and keep it (config, PKI, blob, certd.log)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def params(args: argparse.Namespace):
    from certd.sim import chaos

    values = dict(CHAOS if args.chaos else DEMO)
    for name in ("vms", "updates", "daemon_kills", "updater_kills", "vlek_drops", "updater",
                 "hold_ms", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.deadline_ms is not None:
        values["request_deadline_ms"] = args.deadline_ms
    if args.keep:
        values["directory"], values["keep"] = args.keep, True
    for name in ("vms", "updates", "daemon_kills", "updater_kills", "vlek_drops"):
        if values.get(name, 0) < 0:
            raise CliError(f"--{name.replace('_', '-')} must be >= 0", exitcodes.USAGE)
    if values["vms"] < 1:
        raise CliError("--vms must be at least 1", exitcodes.USAGE)
    if values.get("updater", chaos.DEFAULT_UPDATER) not in chaos.UPDATERS:
        raise CliError(f"--updater must be one of {', '.join(chaos.UPDATERS)}", exitcodes.USAGE)
    return chaos.Params(**values)


def run(args: argparse.Namespace) -> int:
    from certd.sim import chaos, report

    p = params(args)
    progress = (lambda s: None) if args.json else (lambda s: print(f"  .. {s}", flush=True))
    if not args.json:
        print(f"certd demo: {p.vms} simulated VMs (Linux and COCONUT SVSM guests; via certd's "
              f"socket and via the blob file like a stock QEMU), {p.updates} firmware "
              f"update{'s' if p.updates != 1 else ''}"
              + (f", {p.daemon_kills} SIGKILLs of certd, {p.updater_kills} of updaters"
                 if args.chaos or p.daemon_kills or p.updater_kills else "")
              + ". Every guest checks every report against the certificates it got.",
              flush=True)
    result = chaos.run(p, log=progress)
    if args.json:
        json.dump(report.as_json(result), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(report.text(result))
        if result.directory:
            print(f"files kept in {result.directory}")
    return report.exit_code(result)
