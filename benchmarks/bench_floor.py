#!/usr/bin/env python3
"""The physical floor and startup time, against baselines measured in the same run (issue 9,
item 7).

* floor: a C ping-pong on the socket type certd serves (AF_UNIX SOCK_STREAM, a socketpair
  between two processes), 16-byte messages, N round trips, per-trip RTT. certd's
  1-connection GET+RELEASE (benchmarks/loadgen.c --conns 1, two round trips per op) is
  compared with twice the floor's p50: ratio = certd p50 / (2 x floor RTT p50).
* startup: ``certd --config`` (tests/daemon_support.py make_daemon on the real Milan vector
  blob) started N times, time from exec to READY=1 on a fake NOTIFY_SOCKET, against the
  time to run ``python -c pass`` from the same venv (ratio of the p50s).

Every process started here is stopped by its pid; Unix sockets only.

usage: .venv/bin/python benchmarks/bench_floor.py [--trips 100000] [--seconds 4]
           [--starts 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_server import compile_loadgen, run_loadgen  # noqa: E402
from benchmarks.hostile import start_daemon  # noqa: E402

NPAGES = 4

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/wait.h>

static void full(int fd, char *b, int write_side) {
    size_t got = 0;
    while (got < 16) {
        ssize_t n = write_side ? write(fd, b + got, 16 - got) : read(fd, b + got, 16 - got);
        if (n <= 0) { perror("pingpong"); exit(1); }
        got += (size_t)n;
    }
}
static int cmp(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b; return (x > y) - (x < y);
}
int main(int argc, char **argv) {
    long trips = argc > 1 ? atol(argv[1]) : 100000, warm = trips / 10;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror("socketpair"); return 1; }
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    char b[16];
    if (pid == 0) {  /* echo side */
        close(sv[0]);
        for (long i = 0; i < warm + trips; i++) { full(sv[1], b, 0); full(sv[1], b, 1); }
        _exit(0);
    }
    close(sv[1]);
    long *lat = malloc(sizeof(long) * trips);
    memset(b, 'x', sizeof b);
    for (long i = 0; i < warm + trips; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        full(sv[0], b, 1); full(sv[0], b, 0);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (i >= warm) lat[i - warm] = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
    }
    int st; waitpid(pid, &st, 0);
    qsort(lat, trips, sizeof *lat, cmp);
    printf("{\"trips\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, \"min_us\": %.2f}\n", trips,
           lat[trips / 2] / 1000.0, lat[trips * 99 / 100] / 1000.0, lat[0] / 1000.0);
    return 0;
}
"""


def pingpong(work: Path, trips: int, pin: bool = False) -> dict:
    """The C ping-pong; ``pin``: both processes on CPU 0 (taskset), so a wake-up is a
    context switch, not a cross-CPU interrupt to an idle vCPU."""
    src, exe = work / "pingpong.c", work / "pingpong"
    if not exe.exists():
        src.write_text(PINGPONG_C)
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-o", str(exe), str(src)],
                       check=True)
    cmd = (["taskset", "-c", "0"] if pin else []) + [str(exe), str(trips)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(r.stdout)


def startup_times(work: Path, n: int) -> list[float]:
    """exec -> READY=1 of ``certd --config``, n times (each stopped by its pid)."""
    out = []
    for i in range(n):
        d = None
        try:
            t0 = time.perf_counter()
            d = start_daemon(work / f"start-{i}", {"rate_per_vm": 1000000,
                                                   "rate_burst": 1048576})
            out.append(time.perf_counter() - t0)
        finally:
            if d is not None:
                d.stop()
    return out


def python_pass_times(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trips", type=int, default=100000, help="ping-pong round trips")
    ap.add_argument("--seconds", type=float, default=4.0, help="certd 1-connection window")
    ap.add_argument("--starts", type=int, default=5, help="certd starts to time")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="certd-floor-"))
    d = None
    try:
        load0 = os.getloadavg()[0]
        floor = pingpong(work, a.trips)
        pinned = pingpong(work, a.trips, pin=True)
        exe = compile_loadgen(work)
        d = start_daemon(work / "d", {"rate_per_vm": 1000000, "rate_burst": 1048576,
                                      "max_connections_per_pid": 4096})
        one = run_loadgen(exe, ["--socket", d.socket, "--conns", "1", "--warmup", "1",
                                "--seconds", str(a.seconds), "--npages", str(NPAGES),
                                "--cpu-pid", str(d.proc.pid)], a.seconds + 40)
        assert one["failed_ops"] == 0, one
        d.stop()
        d = None
        ratio = one["p50_us"] / (2 * floor["p50_us"])
        print(f"load average {load0:.2f}")
        print(f"floor: C ping-pong, AF_UNIX SOCK_STREAM, 16 B, {floor['trips']} trips: "
              f"RTT p50 {floor['p50_us']:.1f} µs, p99 {floor['p99_us']:.1f} µs")
        print(f"certd 1 connection GET+RELEASE: p50 {one['p50_us']:.1f} µs, p99 "
              f"{one['p99_us']:.1f} µs, {one['ops_per_s']:.0f} ops/s")
        print(f"  same, both processes pinned to CPU 0: RTT p50 {pinned['p50_us']:.1f} µs, "
              f"p99 {pinned['p99_us']:.1f} µs")
        print(f"ratio certd p50 / (2 x floor p50) = {ratio:.2f}; against the pinned floor "
              f"{one['p50_us'] / (2 * pinned['p50_us']):.2f}")

        starts = startup_times(work, a.starts)
        py = python_pass_times(a.starts)
        s50, p50 = statistics.median(starts), statistics.median(py)
        print(f"startup exec -> READY=1 ({a.starts} starts): p50 {s50 * 1000:.0f} ms, max "
              f"{max(starts) * 1000:.0f} ms; `python -c pass`: p50 {p50 * 1000:.0f} ms, max "
              f"{max(py) * 1000:.0f} ms; ratio of p50s {s50 / p50:.1f}")
        print(f"load average {os.getloadavg()[0]:.2f}")
        if a.json:
            Path(a.json).write_text(json.dumps(
                {"floor": floor, "floor_pinned": pinned, "certd_1conn": one, "ratio": ratio, "startup_s": starts,
                 "python_pass_s": py, "loadavg": [load0, os.getloadavg()[0]]}, indent=1))
        return 0
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
