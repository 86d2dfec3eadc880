"""What every certctl subcommand shares: --json output, errors that map to exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from certd import exitcodes


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
