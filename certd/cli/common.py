"""What every certctl subcommand shares: --json output, errors that map to exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from certd import config as configmod, exitcodes


class CliError(Exception):
    """A failure to report to the user: ``message`` says what went wrong, ``code`` is the
    exit code (see :mod:`certd.cli.exitcodes`), ``details`` is extra data for ``--json``."""

    def __init__(self, message: str, code: int = exitcodes.DATAERR, **details: Any):
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of text")


def emit(args: argparse.Namespace, data: dict[str, Any], text: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON with --json, else the human text (a string or a callable)."""
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
        sys.stdout.write("\n")
    else:
        out = text() if callable(text) else text
        if out:
            print(out)
    sys.stdout.flush()


def report_error(args: argparse.Namespace, err: CliError) -> int:
    if getattr(args, "json", False):
        emit(args, {"ok": False, "error": err.message, "exit_code": err.code, **err.details}, "")
    else:
        print(f"certctl: error: {err.message}", file=sys.stderr)
    return err.code


def nonnegative(text: str) -> float:
    """argparse type for a --timeout in seconds: a number, 0 or more."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more seconds")
    return v


def positive(text: str) -> float:
    """argparse type for a socket --timeout in seconds: a number above 0."""
    try:
        v = nonnegative(text)
    except argparse.ArgumentTypeError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds above 0")
    return v


def load_config(path: str | Path) -> configmod.Config:
    """A configuration named on the command line: 66 when it is missing, 78 when invalid."""
    if not Path(path).exists():
        raise CliError(f"configuration {path} does not exist (give --config FILE)",
                       exitcodes.NOINPUT)
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        raise CliError(str(e), exitcodes.CONFIG) from None


#: The blob path when neither --blob nor a configuration says otherwise.
DEFAULT_BLOB = str(configmod.StoreConfig().blob)


def add_blob_flags(p: argparse.ArgumentParser) -> None:
    """--blob PATH and --config FILE (whose store.blob is the default --blob)."""
    p.add_argument("--blob", metavar="PATH",
                   help="the blob path readers use (default: store.blob of --config, else "
                        f"{DEFAULT_BLOB})")
    p.add_argument("--config", metavar="FILE",
                   help="certd configuration whose store.blob is the default --blob "
                        f"(default {configmod.DEFAULT_PATH} when it exists)")


def blob_path(args: argparse.Namespace) -> str:
    """--blob, else store.blob of --config (or of the default configuration if it
    exists), else /var/lib/certd/certs.blob."""
    if args.blob:
        return args.blob
    if args.config:
        return str(load_config(args.config).store.blob)
    if configmod.DEFAULT_PATH.exists():
        return str(load_config(configmod.DEFAULT_PATH).store.blob)
    return DEFAULT_BLOB


def read_input(path: str, what: str) -> bytes:
    """Read an input file, turning OS errors into a CliError that names file and cause."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CliError(f"{what} {path!r} does not exist", exitcodes.NOINPUT) from None
    except IsADirectoryError:
        raise CliError(f"{what} {path!r} is a directory", exitcodes.NOINPUT) from None
    except OSError as e:
        raise CliError(f"cannot read {what} {path!r}: {e.strerror}", exitcodes.NOINPUT) from None


def run_locked(hold: Any, cmd: list[str]) -> int:
    """Run CMD while ``hold`` (an exclusive or shared lock) is held, serving nested
    ``certctl install`` runs (:func:`certd.store.nested.run_command`); SIGTERM, SIGINT,
    SIGHUP and SIGQUIT are forwarded. Returns CMD's status as Popen reports it (negative:
    killed by that signal; :func:`shell_code` turns it into 128+N). Raises CliError 127
    (not found) or 126 (cannot be executed)."""
    from certd.store import nested
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("no command given: ... -- CMD [ARGS...]", exitcodes.USAGE)
    try:
        rc = nested.run_command(hold, cmd)
    except FileNotFoundError:
        raise CliError(f"command not found: {cmd[0]}", 127) from None
    except PermissionError:
        raise CliError(f"command cannot be executed: {cmd[0]}", 126) from None
    except OSError as e:
        raise CliError(f"cannot run {cmd[0]}: {e.strerror}", 126) from None
    return rc


def shell_code(rc: int) -> int:
    """A Popen status as a shell's exit code: 128+N for a command killed by signal N."""
    return 128 - rc if rc < 0 else rc
