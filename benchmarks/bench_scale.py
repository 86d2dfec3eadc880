#!/usr/bin/env python3
"""certd with many connected VMs, most idle, against the 1-idle-VM row of the same run
(issue 9, item 7).

One real certd (benchmarks/hostile.py start_daemon: tests/daemon_support.py make_daemon on
the real Milan vector blob, under ``prlimit --nofile``; ``max_connections`` and
``max_connections_per_pid`` raised, the rate limit out of the way). Per step, this process
(its RLIMIT_NOFILE raised) holds IDLE open connections that sent nothing
(benchmarks/bench_memory.py open_vm --silent), then runs 16 saturating closed-loop
connections (benchmarks/loadgen.c, GET npages 4 + RELEASE) and, meanwhile, a probe client
that sends one GET+RELEASE every 10 ms on its own connection. Printed per step: the 16 busy
connections' ops/s, the probe's p50/p99, certd's VmRSS and fds after the window, each as a
ratio to the first row.

usage: .venv/bin/python benchmarks/bench_scale.py [--idle 1,100,1000,5000] [--seconds 5]
           [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_memory import _reply, open_vm, proc_status  # noqa: E402
from benchmarks.bench_server import compile_loadgen, stop_pid  # noqa: E402
from benchmarks.hostile import NOFILE, pct, raise_nofile, start_daemon  # noqa: E402
from certd.abi import wire  # noqa: E402
from tests.daemon_support import fd_count, status_of  # noqa: E402

BUSY = 16
NPAGES = 4
PROBE_PERIOD = 0.010


def probe(path: str, seconds: float) -> list[float]:
    """One GET+RELEASE every 10 ms on one connection; per-op latency in µs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(10)
    s.connect(path)
    dec = wire.Decoder(wire.REPLIES)
    lat: list[float] = []
    rid = 0
    try:
        nxt = time.monotonic()
        end = nxt + seconds
        while (now := time.monotonic()) < end:
            if now < nxt:
                time.sleep(nxt - now)
            nxt += PROBE_PERIOD
            t0 = time.perf_counter()
            rid += 2
            s.sendall(wire.encode_get(rid - 1, "probe", NPAGES))
            g = _reply(s, dec)
            if not isinstance(g, wire.GetReply) or g.ret != 0 or not g.lease_id:
                raise RuntimeError(f"probe GET answered {g!r}")
            s.sendall(wire.encode_release(rid, g.lease_id))
            r = _reply(s, dec)
            if not isinstance(r, wire.ReleaseReply):
                raise RuntimeError(f"probe RELEASE answered {r!r}")
            lat.append((time.perf_counter() - t0) * 1e6)
    finally:
        s.close()
    return lat


def wait_connected(path: str, n: int, timeout: float = 60.0) -> None:
    """Bounded wait until certd has accepted ``n`` idle connections (STATUS ``connections``
    counts the STATUS connection too); accept() progress signals nothing."""
    end = time.monotonic() + timeout
    while (have := status_of(path)["connections"]) < n + 1:
        if time.monotonic() > end:
            raise TimeoutError(f"certd holds {have} connections, expected >= {n + 1}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", default="1,100,1000,5000", help="idle VMs per step (ascending)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per step")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    steps = [int(x) for x in a.idle.split(",") if x]
    assert steps == sorted(steps) and steps[0] >= 1, "steps must ascend from >= 1"
    limit = raise_nofile()
    assert limit > steps[-1] + 200, f"fd limit {limit} is too low for {steps[-1]} connections"
    tmp = Path(tempfile.mkdtemp(prefix="certd-scale-"))
    d = lg = None
    socks: list[socket.socket] = []
    rows = []
    try:
        exe = compile_loadgen(tmp)
        cap = steps[-1] + 1000
        d = start_daemon(tmp / "d", {"max_connections": cap, "max_connections_per_pid": cap,
                                     "rate_per_vm": 1000000, "rate_burst": 1048576},
                         nofile=NOFILE)
        pid = d.proc.pid
        print(f"certd pid {pid}, fd limit {NOFILE}; {BUSY} busy loadgen connections + 1 probe "
              f"(GET+RELEASE every {PROBE_PERIOD * 1000:.0f} ms) per step", flush=True)
        for n in steps:
            while len(socks) < n:
                socks.append(open_vm(d.socket, len(socks), silent=True))
            wait_connected(d.socket, n)
            load = os.getloadavg()[0]
            lg = subprocess.Popen([str(exe), "--socket", d.socket, "--conns", str(BUSY),
                                   "--warmup", str(a.warmup), "--seconds", str(a.seconds),
                                   "--npages", str(NPAGES), "--cpu-pid", str(pid)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(a.warmup)  # the loadgen's warm-up: the probe measures its window only
            lat = probe(d.socket, a.seconds)
            out, err = lg.communicate(timeout=a.seconds + 40)
            if lg.returncode != 0:
                raise RuntimeError(f"loadgen failed ({lg.returncode}): {err}")
            lg = None
            busy = json.loads(out)
            assert busy["failed_ops"] == 0, busy
            m = proc_status(pid)
            fds = fd_count(pid)
            row = {"idle": n, "busy_ops_per_s": busy["ops_per_s"], "busy_p99_us": busy["p99_us"],
                   "server_cpu": busy.get("server_cpu"), "probe_ops": len(lat),
                   "probe_p50_us": pct(lat, 0.50), "probe_p99_us": pct(lat, 0.99),
                   "rss_kib": m["VmRSS"], "fds": fds, "loadavg": load}
            rows.append(row)
            b = rows[0]
            print(f"{n:>5} idle: busy {row['busy_ops_per_s']:>8.0f} ops/s "
                  f"(x{row['busy_ops_per_s'] / b['busy_ops_per_s']:.2f}), probe p50 "
                  f"{row['probe_p50_us']:.0f} µs p99 {row['probe_p99_us']:.0f} µs "
                  f"(x{row['probe_p99_us'] / b['probe_p99_us']:.2f}), RSS "
                  f"{row['rss_kib'] / 1024:.1f} MiB (x{row['rss_kib'] / b['rss_kib']:.2f}), "
                  f"fds {fds} (x{fds / b['fds']:.1f}), load {load:.2f}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
        return 0
    finally:
        stop_pid(lg)
        for s_ in socks:
            s_.close()
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
