#!/usr/bin/env python3
"""certd's memory per connected VM (issue 11, item 1's measurement).

One real certd (benchmarks/hostile.py start_daemon: tests/daemon_support.py make_daemon on
the real Milan vector blob, under ``prlimit --nofile``, ``max_connections`` raised above
the largest step so none is refused; the default 300 s idle timeout is longer than a run,
the rate limit is out of the way). This process (its own RLIMIT_NOFILE raised) opens idle Unix
connections in steps (default 1, 100, 1000, 10000 in total); after each step it waits until
the daemon holds every connection (its fd count in /proc/PID/fd, then a STATUS round trip
whose ``connections`` says so), lets the allocator settle, then reads VmRSS and VmHWM from
/proc/PID/status. Each connected VM first sends one GET+RELEASE (a VM that has asked once,
then idles: what a guest that has booted looks like), unless ``--silent``.

Prints per step: connections, RSS MiB, fds, and KiB per connection (the least-squares slope
of RSS over connections across the steps, and the step-to-step increments).

usage: .venv/bin/python benchmarks/bench_memory.py [--steps 1,100,1000,10000] [--silent]
           [--settle 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.hostile import NOFILE, raise_nofile, start_daemon  # noqa: E402
from certd.abi import wire  # noqa: E402


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/VmSize (KiB) of ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "VmSize"):
            out[k] = int(v.split()[0])
    return out


def open_vm(path: str, i: int, silent: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(20)
    end = time.monotonic() + 20
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # the listen backlog is full: certd has not accepted yet
            if time.monotonic() > end:
                raise
            time.sleep(0.001)
    if not silent:
        dec = wire.Decoder(wire.REPLIES)
        s.sendall(wire.encode_get(1, f"mem-{i}", 4))
        lease = _reply(s, dec)
        if not isinstance(lease, wire.GetReply):
            raise RuntimeError(f"VM {i}: GET answered {lease!r}")
        if lease.lease_id:
            s.sendall(wire.encode_release(2, lease.lease_id))
            _reply(s, dec)
    return s


def _reply(s: socket.socket, dec: wire.Decoder) -> wire.Message:
    while (msg := dec.next()) is None:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("certd closed the connection")
        dec.feed(data)
    return msg


def wait_for_fds(pid: int, want: int, timeout: float = 60.0) -> int:
    """Bounded wait until ``pid`` holds at least ``want`` descriptors (accept() progress:
    nothing signals it)."""
    from tests.daemon_support import fd_count
    end = time.monotonic() + timeout
    while (n := fd_count(pid)) < want:
        if time.monotonic() > end:
            raise TimeoutError(f"certd holds {n} fds, expected >= {want}")
        time.sleep(0.05)
    return n


def slope(xs: list[int], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1,100,1000,10000",
                    help="total connections after each step (ascending)")
    ap.add_argument("--silent", action="store_true",
                    help="connect only (no GET+RELEASE first)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between a step's last connection and the reading")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    steps = [int(x) for x in a.steps.split(",") if x]
    assert steps == sorted(steps) and steps[0] >= 1, "steps must ascend from >= 1"
    limit = raise_nofile()
    assert limit > steps[-1] + 100, f"fd limit {limit} is too low for {steps[-1]} connections"
    tmp = Path(tempfile.mkdtemp(prefix="certd-mem-"))
    d = None
    socks: list[socket.socket] = []
    rows = []
    try:
        d = start_daemon(tmp / "d", {"max_connections": steps[-1] + 1000,
                                     # one process stands for many VMMs here
                                     "max_connections_per_pid": steps[-1] + 1000,
                                     "rate_per_vm": 1000000, "rate_burst": 1048576},
                         nofile=NOFILE)
        from tests.daemon_support import fd_count, status_of
        pid = d.proc.pid
        time.sleep(a.settle)
        base = proc_status(pid)
        base_fds = fd_count(pid)
        print(f"certd pid {pid}, fd limit {NOFILE}; no connections: "
              f"RSS {base['VmRSS'] / 1024:.1f} MiB, {base_fds} fds", flush=True)
        print(f"{'connections':>11} {'RSS MiB':>9} {'HWM MiB':>9} {'fds':>7} "
              f"{'KiB/conn (step)':>16}", flush=True)
        rows.append({"connections": 0, "rss_kib": base["VmRSS"], "hwm_kib": base["VmHWM"],
                     "vsz_kib": base["VmSize"], "fds": base_fds})
        for n in steps:
            while len(socks) < n:
                socks.append(open_vm(d.socket, len(socks), a.silent))
            wait_for_fds(pid, base_fds + n)
            st = status_of(d.socket)  # one more connection, closed again
            assert st["connections"] >= n, st["connections"]
            time.sleep(a.settle)
            m = proc_status(pid)
            fds = fd_count(pid)
            prev = rows[-1]
            step = (m["VmRSS"] - prev["rss_kib"]) / (n - prev["connections"])
            rows.append({"connections": n, "rss_kib": m["VmRSS"], "hwm_kib": m["VmHWM"],
                         "vsz_kib": m["VmSize"], "fds": fds,
                         "kib_per_conn_step": round(step, 2)})
            print(f"{n:>11} {m['VmRSS'] / 1024:>9.1f} {m['VmHWM'] / 1024:>9.1f} {fds:>7} "
                  f"{step:>16.2f}", flush=True)
        s = slope([r["connections"] for r in rows], [r["rss_kib"] for r in rows])
        v = slope([r["connections"] for r in rows], [r["vsz_kib"] for r in rows])
        print(f"KiB per connection (least-squares slope over all steps): RSS {s:.2f}, "
              f"virtual size {v:.2f} (allocated but untouched memory shows only here)")
        print(f"target: <= 8 KiB per connection; 10,000 VMs <= 150 MiB")
        if a.json:
            Path(a.json).write_text(json.dumps({"rows": rows, "kib_per_conn": s,
                                                "vsz_kib_per_conn": v,
                                                "silent": a.silent}, indent=1))
        return 0
    finally:
        for s_ in socks:
            s_.close()
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
