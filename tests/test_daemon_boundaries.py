"""The daemon's limits and resources at its boundaries (issue 7), against real certd
processes: limits after a wait, errors in the request path, descriptors over reloads, and a
plain kernel-scheme updater under saturating load."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certd import client as clientmod
from certd.abi import table, wire
from certd.client import AsyncClient
from tests.daemon_support import (BIN, NO_RATE_LIMIT, DaemonProc, fd_count, make_daemon,
                                  reload, status_of, with_server_keys)


def stopped(d: DaemonProc) -> str:
    rc = d.stop()
    log = d.log()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    return log


class HeldUpdater:
    """``certctl lock --exclusive -- CMD`` whose CMD says it runs, then waits until told:
    the exclusive lock (gate and blob) is held from ``__enter__`` until :meth:`release`."""

    def __init__(self, blob: Path):
        self.proc = subprocess.Popen(
            [str(BIN / "certctl"), "lock", "--blob", str(blob), "--exclusive", "--timeout",
             "15", "--", "sh", "-c", "echo held; read x"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> "HeldUpdater":
        assert self.proc.stdout.readline().strip() == "held"
        return self

    def release(self) -> int:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=20)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if not f.closed:
                f.close()


# --- item 10: limits hold for requests that waited ---------------------------------------

def test_gets_that_waited_for_an_updater_obey_the_lease_limit(tmp_path):
    d = make_daemon(tmp_path / "d", deadline_ms=10000, lease_timeout_ms=20000)
    d.config_text = with_server_keys(d.config_text, **NO_RATE_LIMIT)
    d.start()

    async def scenario() -> tuple[list, dict]:
        async with AsyncClient(d.socket, timeout=30) as c:
            with HeldUpdater(d.blob) as up:
                tasks = [asyncio.create_task(c.get(f"vm-{i}", 4)) for i in range(60)]
                await asyncio.sleep(0)  # one yield: every task writes its GET
                # Answered in order after the 60 GETs on the same connection: all of them
                # were read by the daemon and are waiting.
                st = await c.status()
                assert st["counters"]["gets"] == 60 and st["counters"]["eagain"] == 0, st
                assert not any(t.done() for t in tasks)
                assert await asyncio.to_thread(up.release) == 0
                got = await asyncio.gather(*tasks, return_exceptions=True)
            return got, await c.status()

    try:
        got, st = asyncio.run(scenario())
    finally:
        stopped(d)
    leases = [g for g in got if isinstance(g, clientmod.GetResult) and g.lease_id]
    refused = [g for g in got if isinstance(g, clientmod.Refused)
               and g.code == wire.ErrorCode.TOO_MANY_LEASES]
    print(f"60 GETs waiting on one connection for an updater: {len(leases)} leases, "
          f"{len(refused)} TOO_MANY_LEASES (limit 16)")
    assert len(leases) == 16 and len(refused) == 44, got
    assert st["leases"] == 16
