#!/usr/bin/env python3
"""Writer starvation under back-to-back OFD readers: naive readers vs certd's gated readers.

N reader processes hold a shared lock on the blob for HOLD ms, release, and take it again
at once, overlapping each other, so some shared lock is held at every instant.

* naive readers: open + F_OFD_SETLK(F_RDLCK) + inode check, no gate (what a VMM does).
* gated readers: certd.store.locks (gate shared -> blob shared -> gate released).

Against each set, an updater asks for the exclusive lock TRIALS times with a TIMEOUT:
certd's updater (gate exclusive, then blob) and a plain polling updater (F_OFD_SETLK
F_WRLCK every 1 ms, like the kernel docs' test program, no gate). The script prints the
waits (p50/max), how many trials got the lock, and ratios against the gated case.

Bounded: at most 2 * TRIALS * TIMEOUT seconds of waiting; readers are stopped by pid.
usage: bench_starvation.py [--readers 4] [--hold-ms 5] [--trials 10] [--timeout 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from certd.store import locks  # noqa: E402

READER = textwrap.dedent("""
    import os, signal, sys, time
    from certd.store import locks
    path, hold, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    n = 0
    def stop(*_):
        print(n, flush=True); os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    lk = locks.BlobLock(path)
    print('ready', flush=True)
    while True:
        if mode == 'gated':
            try:
                h = lk.acquire_shared_sync(locks.deadline_in(10))
            except locks.LockBusy:
                continue
            time.sleep(hold); h.release()
        else:  # naive: the VMM's loop, no gate
            fd = os.open(path, os.O_RDONLY)
            if locks.try_lock(fd, False) and locks.same_file(fd, path) is not None:
                time.sleep(hold); n += 1
            else:
                time.sleep(0.001)
            os.close(fd)
            continue
        n += 1
""")


def start_readers(path: str, count: int, hold_s: float, mode: str) -> list[subprocess.Popen]:
    procs = []
    try:
        for _ in range(count):
            p = subprocess.Popen([sys.executable, "-c", READER, path, str(hold_s), mode],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("reader did not start")
    except BaseException:
        stop_readers(procs)
        raise
    return procs


def stop_readers(procs: list[subprocess.Popen]) -> int:
    total = 0
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            out, _ = p.communicate(timeout=5)
            total += int(out.strip().splitlines()[-1]) if out.strip() else 0
        except (subprocess.TimeoutExpired, ValueError):
            p.kill()
            p.wait()
    return total


def certd_writer(path: str, timeout: float) -> float | None:
    t0 = time.monotonic()
    try:
        h = locks.BlobLock(path).acquire_exclusive_sync(locks.deadline_in(timeout))
    except locks.LockBusy:
        return None
    waited = time.monotonic() - t0
    h.release()
    return waited


def polling_writer(path: str, timeout: float) -> float | None:
    t0 = time.monotonic()
    end = t0 + timeout
    fd = os.open(path, os.O_RDWR)
    try:
        while time.monotonic() < end:
            if locks.try_lock(fd, True):
                return time.monotonic() - t0
            time.sleep(0.001)
        return None
    finally:
        os.close(fd)


def run_case(path, mode, writer, args) -> dict:
    readers = start_readers(path, args.readers, args.hold_ms / 1000, mode)
    t0 = time.monotonic()
    waits: list[float | None] = []
    try:
        time.sleep(0.2)  # let the readers settle into back-to-back holds
        for _ in range(args.trials):
            waits.append(writer(path, args.timeout))
            time.sleep(0.02)
    finally:
        reads = stop_readers(readers)
    elapsed = time.monotonic() - t0
    got = [w for w in waits if w is not None]
    return {"mode": mode, "writer": writer.__name__, "ok": len(got), "trials": len(waits),
            "p50": statistics.median(got) if got else None, "max": max(got) if got else None,
            "reads": reads, "reads_per_s": reads / elapsed}


def fmt(v: float | None) -> str:
    return "   -   " if v is None else f"{v * 1000:7.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--hold-ms", type=float, default=5.0)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="certd-bench-") as d:
        path = os.path.join(d, "certs.blob")
        with open(path, "wb") as f:
            f.write(b"\0" * 24)
        cases = [run_case(path, "gated", certd_writer, args),
                 run_case(path, "naive", certd_writer, args),
                 run_case(path, "naive", polling_writer, args)]
    print(f"{args.readers} readers, {args.hold_ms} ms holds back to back, {args.trials} trials, "
          f"timeout {args.timeout} s")
    print(f"{'readers':8} {'updater':15} {'got lock':>9} {'p50 ms':>8} {'max ms':>8} {'reads/s':>8}")
    for c in cases:
        print(f"{c['mode']:8} {c['writer']:15} {c['ok']:>4}/{c['trials']:<4} {fmt(c['p50'])} "
              f"{fmt(c['max'])} {c['reads_per_s']:>8.0f}")
    base = cases[0]
    for c in cases[1:]:
        ratio = (c["ok"] / c["trials"]) / (base["ok"] / base["trials"]) if base["ok"] else float("nan")
        p50 = (f"{c['p50'] / base['p50']:.1f}x the gated p50" if c["p50"] and base["p50"]
               else "no successful trial to compare")
        print(f"ratio {c['mode']}/{c['writer']} vs gated/certd_writer: success rate {ratio:.2f}; {p50}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
