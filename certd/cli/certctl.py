"""certctl: build, inspect, verify, install and serve SEV-SNP certificate blobs.

Each subcommand lives in ``certd.cli.cmd_<name>`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Subcommands raise
:class:`certd.cli.common.CliError` for failures the user should see.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from certd import __version__, exitcodes
from certd.cli.common import CliError, report_error

#: Subcommand modules, in the order --help lists them.
COMMANDS = ("build", "show", "verify", "install", "rollback", "lock", "fw-update", "kds",
            "fetch", "status", "demo")

DESCRIPTION = """\
certctl manages the SEV-SNP certificate blob that certd serves to VMMs and that a stock
QEMU (certs-filename=) reads directly: the GHCB certificate table of ARK, ASK/ASVK,
VCEK/VLEK and optionally a CRL.

Typical flow:
  certctl build --chain cert_chain.pem --vcek vcek.der -o certs.blob
  certctl show certs.blob
  certctl verify certs.blob --report report.bin

Every subcommand takes --json for scripts. Run 'certctl COMMAND --help' for details.
'certctl' without a command prints this help on stderr and exits 2 (usage error).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certctl", description=DESCRIPTION, epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"certctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"certd.cli.cmd_{name.replace('-', '')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        return _run(args)
    finally:
        if argv is None:  # the program itself, about to exit (not a caller of main())
            # The interpreter's last collection at exit walks every object: 20-30 ms of
            # CPU (measured) that an updater would spend right after releasing the lock,
            # when certd and the guests' VMMs need it. Frozen objects are skipped.
            gc.freeze()


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        return report_error(args, err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `certctl ... | head` closed the pipe: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
