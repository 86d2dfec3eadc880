"""Logs that cannot become the attack (issue "10,000 VMs", item 5): a client flooding
refusals makes certd write a bounded number of lines, each saying how many it stood for;
the standard library's own messages come out in the same JSON format."""

from __future__ import annotations

import json
import logging
import time

from certd import client as clientmod, logs
from certd.abi import wire
from tests.daemon_support import make_daemon

FLOOD_S = 1.6  # long enough for a second line with the count of the first second


def _flood(tmp_path, env=None):
    d = make_daemon(tmp_path / "d").start(extra_env=env)
    try:
        with clientmod.Client(d.socket) as c:
            refused = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < FLOOD_S:
                try:
                    r = c.get("flood-vm", 4)
                    if r.lease_id:
                        c.release(r.lease_id)
                except clientmod.Refused:
                    refused += 1
            took = time.monotonic() - t0
    finally:
        assert d.stop() == 0
    lines = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
    rate_lines = [x for x in lines if x.get("why") == "rate limit"]
    return refused, took, rate_lines


def test_a_refusal_flood_writes_a_bounded_number_of_lines(tmp_path):
    refused, took, lines = _flood(tmp_path)
    assert refused > 500, "precondition: the flood is refused by the rate limit"
    bound = int(took) + 2  # one line a second, plus the first
    print(f"\nlog flood: {refused} refusals in {took:.2f} s -> {len(lines)} log lines; "
          f"suppressed counts {[x.get('suppressed', 0) for x in lines]}")
    assert 2 <= len(lines) <= bound
    assert sum(x.get("suppressed", 0) for x in lines) + len(lines) <= refused
    assert lines[1].get("suppressed", 0) > 0


def test_control_without_the_limit_every_refusal_is_a_line(tmp_path):
    """Negative control: with the limit off (CERTD_UNSAFE=log-limit) the same flood writes
    one line per refusal, which the bound above would catch."""
    refused, took, lines = _flood(tmp_path, {"CERTD_UNSAFE": "log-limit"})
    assert len(lines) == refused > int(took) + 2


def test_rate_limited_counts_what_it_suppressed():
    now = [0.0]
    rl = logs.RateLimited(interval=1.0, clock=lambda: now[0])
    assert rl.allow("k") == 0
    assert [rl.allow("k") for _ in range(5)] == [None] * 5
    assert rl.allow("other") == 0
    now[0] = 1.5
    assert rl.allow("k") == 5


def test_stdlib_messages_come_out_as_json(capsys):
    import io
    out = io.StringIO()
    logs.configure("info", "json", out, cache=False)
    try:
        logging.getLogger("asyncio").error("Fatal error: protocol.buffer_updated() call failed.")
        line = json.loads(out.getvalue().strip().splitlines()[-1])
        assert line["event"].startswith("Fatal error") and line["level"] == "error"
        assert line["component"] == "asyncio"
    finally:
        logging.getLogger().handlers.clear()
        import structlog
        structlog.reset_defaults()
