"""certctl status: ask the running daemon for its status document over the socket."""

from __future__ import annotations

import argparse
import json

from certd import exitcodes
from certd.cli.cmd_fetch import add_socket_args, cli_error
from certd.cli.common import add_json_flag, emit
from certd.client import Client, ClientError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="show the daemon's status (generation, leases, limits)",
        description=__doc__, epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_socket_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, args.timeout) as client:
            status = client.status()
    except ClientError as e:
        raise cli_error(e, args.socket) from None
    emit(args, status, lambda: _text(status))
    return exitcodes.OK


def _text(status: dict) -> str:
    width = max((len(k) for k in status), default=0)
    return "\n".join(
        f"{k:<{width}}  {v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v)}"
        for k, v in status.items())
