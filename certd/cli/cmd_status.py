"""certctl status: ask the running daemon for its status document over the socket, and judge
what it serves.

Exits 0 only when every profile serves a valid blob whose leaf (VCEK/VLEK) and CRL stay
valid for more than --warn-days days. Exits 4 (degraded) when any profile serves the empty
table (no blob at its path, or a blob that failed the policy), serves a stale blob (its leaf
or CRL ran out after it was validated), or its leaf or CRL expires within --warn-days. The
reasons are printed (with --json: under "health"). For a cron job or a monitoring check:

  certctl status --warn-days 30 >/dev/null || alert "certd: $?"
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone

from certd import exitcodes
from certd.cli.cmd_fetch import add_socket_args, cli_error
from certd.cli.common import add_json_flag, emit
from certd.client import Client, ClientError

DEFAULT_WARN_DAYS = 14.0

_NOT_SERVING = {
    "empty": "serves the empty table: no blob at {blob}",
    "invalid": "serves the empty table: its blob {blob} failed the policy ({problems})",
    "stale": "serves a stale blob {blob}: its leaf or CRL ran out after it was validated",
}


def _days(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of days, got {text!r}") from None
    if not 0 <= n <= 3650:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3650 days, got {text}")
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="show the daemon's status and exit 4 if a profile is degraded",
        description=__doc__, epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_socket_args(p)
    p.add_argument("--warn-days", type=_days, default=DEFAULT_WARN_DAYS, metavar="DAYS",
                   help="degraded when a served leaf or CRL expires within this many days "
                        f"(default {DEFAULT_WARN_DAYS:g})")
    add_json_flag(p)
    p.set_defaults(func=run)


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None  # absent (an older daemon) or null (no such entry)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def verdict(status: dict, now: datetime, warn_days: float) -> list[str]:
    """Why the daemon is degraded (empty: it is not)."""
    problems = []
    horizon = now + timedelta(days=warn_days)
    for p in status.get("profiles", []):
        name, state = p.get("name"), p.get("state")
        if state != "serving":
            why = _NOT_SERVING.get(state, f"is in state {state!r}")
            problems.append(f"profile {name!r} " + why.format(
                blob=p.get("blob"), problems="; ".join(p.get("problems") or ()) or "no detail"))
        for key, what, verb in (("leaf_not_after", "leaf", "expires"),
                                ("crl_next_update", "CRL", "needs its next update")):
            t = _when(p.get(key))
            if t is not None and t <= horizon:
                left = (t - now).total_seconds() / 86400
                problems.append(
                    f"profile {name!r}: the {what} {verb} at {t:%Y-%m-%d %H:%M:%SZ} "
                    + (f"({-left:.1f} days ago)" if left < 0 else
                       f"(in {left:.1f} days, within --warn-days {warn_days:g})"))
    return problems


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, args.timeout) as client:
            status = client.status()
    except ClientError as e:
        raise cli_error(e, args.socket) from None
    problems = verdict(status, datetime.now(timezone.utc), args.warn_days)
    code = exitcodes.DEGRADED if problems else exitcodes.OK
    health = {"ok": not problems, "exit_code": code, "warn_days": args.warn_days,
              "problems": problems}
    emit(args, {**status, "health": health}, lambda: _text(status, health))
    return code


def _text(status: dict, health: dict) -> str:
    width = max((len(k) for k in status), default=0)
    lines = [f"{k:<{width}}  {v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v)}"
             for k, v in status.items()]
    lines.append(f"{'health':<{width}}  " + ("ok" if health["ok"] else
                                            f"degraded (exit {health['exit_code']})"))
    lines += [f"  - {p}" for p in health["problems"]]
    return "\n".join(lines)
