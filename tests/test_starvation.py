"""Updaters are not starved: 4 processes take shared locks back to back through certd's
reader API, and 'certctl lock --exclusive --timeout 2' gets in every time."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

from certd.store import locks

CERTCTL = [sys.executable, "-c", textwrap.dedent("""
    import importlib.util, sys
    from certd.cli import certctl
    # run with whatever subcommands this checkout has (others are written concurrently)
    certctl.COMMANDS = tuple(c for c in certctl.COMMANDS
                             if importlib.util.find_spec('certd.cli.cmd_' + c))
    sys.exit(certctl.main())
""")]

READER = textwrap.dedent("""
    import os, signal, sys, time
    from certd.store import locks
    path, hold = sys.argv[1], float(sys.argv[2])
    n = 0
    def stop(*_):
        print(n, flush=True); os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    lk = locks.BlobLock(path)
    print('ready', flush=True)
    while True:
        try:
            h = lk.acquire_shared_sync(locks.deadline_in(10))
        except locks.LockBusy:
            continue
        time.sleep(hold); h.release(); n += 1
""")


def test_exclusive_lock_gets_in_past_back_to_back_readers(tmp_path):
    path = tmp_path / "certs.blob"
    path.write_bytes(bytes(24))
    readers: list[subprocess.Popen] = []
    waits, walls, trials = [], [], 20
    try:
        for _ in range(4):
            p = subprocess.Popen([sys.executable, "-c", READER, str(path), "0.005"],
                                 stdout=subprocess.PIPE, text=True)
            readers.append(p)
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        # Precondition: the readers really do keep a shared lock held (a plain polling
        # writer without the gate cannot get in for 0.5 s).
        fd = os.open(path, os.O_RDWR)
        try:
            end, naive_got_in = time.monotonic() + 0.5, False
            while time.monotonic() < end and not naive_got_in:
                naive_got_in = locks.try_lock(fd, True)
                time.sleep(0.001)
        finally:
            os.close(fd)
        assert not naive_got_in, "precondition: the readers must keep a shared lock held"
        for _ in range(trials):
            t0 = time.monotonic()
            r = subprocess.run(CERTCTL + ["lock", "--blob", str(path), "--exclusive",
                                          "--timeout", "2", "--json", "--", "true"],
                               capture_output=True, text=True, timeout=30)
            walls.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stdout + r.stderr
            waits.append(json.loads(r.stdout)["waited_s"])
    finally:
        counts = []
        for p in readers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in readers:
            try:
                out, _ = p.communicate(timeout=10)
                counts.append(int(out.strip() or 0))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    ms = sorted(w * 1000 for w in waits)
    print(f"\nstarvation: 4 gated readers (5 ms holds, back to back, {sum(counts)} reads); "
          f"certctl lock --exclusive --timeout 2 succeeded {len(waits)}/{trials}: lock wait "
          f"p50 {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms "
          f"(process wall p50 {statistics.median(walls) * 1000:.0f} ms); "
          f"a polling writer without the gate got in within 0.5 s: {naive_got_in}")
    assert len(waits) == trials
    assert max(waits) < 2.0
    assert sum(counts) > 100  # the readers kept reading between the updates
