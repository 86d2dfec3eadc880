#!/usr/bin/env python3
"""How long a plain kernel-scheme updater waits under saturating load, against the gated
updater in the same run, and what the hold's maximum age costs in throughput (issue 7,
item 13).

* certd: a real ``certd --config`` process on the real AMD Milan vector blob, the recipe of
  bench_server.py (same config, rate limiter out of the way), with ``hold_max_age_ms`` set
  per case.
* load: benchmarks/loadgen.c, 16 closed-loop connections, each GET (npages 4) -> RELEASE as
  fast as it can: leases overlap all the time, so without a maximum hold age the shared
  lock never drops.
* plain updater: a separate process that opens the blob and takes an exclusive OFD lock
  with a blocking ``F_OFD_SETLKW``, no gate (tests/daemon_support.PLAIN_UPDATER); its wait
  is measured inside it, from just before the fcntl to its return.
* gated updater: ``certctl lock --exclusive --json -- true``; its wait is the ``waited_s``
  it reports (gate plus blob).
  Attempts alternate plain / gated under the same load, a pause between attempts.
* throughput: loadgen ops/s (GET+RELEASE pairs) with no updater, at the default
  ``hold_max_age_ms`` (100) and at 60000 (a hold practically never retired by age),
  windows alternating between the two daemons, median of ``--rounds``; ratio = default /
  60000, in ops/s and in certd CPU per op.

Every process started here is stopped by its pid in ``finally``; Unix sockets only.

usage: .venv/bin/python benchmarks/bench_plain_updater.py [--attempts 20] [--seconds 5]
           [--warmup 1] [--rounds 3] [--ages 100] [--timeout 10] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402  (the certd recipe, loadgen, status, stop by pid)
from tests.daemon_support import BIN, plain_updater  # noqa: E402

CONNS = 16
NO_AGE_MS = 60000


def with_hold_age(cfg: Path, age_ms: int) -> None:
    """bench_server's config with ``hold_max_age_ms`` and, as the tests do, no KDS (the
    blob is valid: nothing to fetch)."""
    text = cfg.read_text()
    assert "[server]\n" in text and "[kds]" not in text
    cfg.write_text(text.replace("[server]\n", f"[server]\nhold_max_age_ms = {age_ms}\n", 1)
                   + '\n[kds]\nbase_url = ""\n')


def start(work: Path, blob: Path, pf: Path, age_ms: int, tag: str):
    d = work / tag
    d.mkdir()
    cfg = bs.certd_config(d, blob, pf)
    with_hold_age(cfg, age_ms)
    return d, bs.start_certd(d, cfg, d / "certd.log")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5) * 1000,
            "p99_ms": percentile(xs, 0.99) * 1000, "max_ms": max(xs) * 1000 if xs else 0.0}


class PlainUpdater:
    """One PLAIN_UPDATER process in ``--repeat`` mode: an attempt per request, its wait
    measured inside it; one not in within the timeout is killed (and replaced)."""

    def __init__(self, blob: Path):
        self.blob = blob
        self.proc = plain_updater(blob, repeat=True)

    def attempt(self, timeout: float) -> float | None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        # Lines read from the raw descriptor: a buffered readline could hold the second
        # line while select() waits on the descriptor for it.
        fd, buf = self.proc.stdout.fileno(), b""
        end = time.monotonic() + timeout
        while buf.count(b"\n") < 2:
            ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                self.close()
                self.proc = plain_updater(self.blob, repeat=True)
                return None
            buf += chunk
        lines = buf.decode().split()
        assert lines[0] == "waiting" and len(lines) == 2, lines
        return float(lines[1])

    def close(self) -> None:
        bs.stop_pid(self.proc)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


def gated_attempt(blob: Path, timeout: float) -> float | None:
    r = subprocess.run([str(BIN / "certctl"), "lock", "--blob", str(blob), "--exclusive",
                        "--timeout", str(timeout), "--json", "--", "true"],
                       capture_output=True, text=True, timeout=timeout + 30)
    if r.returncode != 0:
        return None
    return float(json.loads(r.stdout)["waited_s"])  # CMD (true) prints nothing


class Load:
    """loadgen's 16 connections, started again whenever it ends (it stops itself after at
    most 30 s); :meth:`on` returns once leases are being served."""

    def __init__(self, exe: Path, sock: str):
        self.exe, self.sock, self.proc = exe, sock, None

    def on(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.off()
        served = bs.certd_status(self.sock)["counters"]["served"]
        self.proc = subprocess.Popen([str(self.exe), "--socket", self.sock, "--conns",
                                      str(CONNS), "--warmup", "0", "--seconds", "30",
                                      "--npages", str(bs.NPAGES)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while bs.certd_status(self.sock)["counters"]["served"] < served + 1000:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("the load did not start")
            time.sleep(0.05)

    def off(self) -> None:
        bs.stop_pid(self.proc)
        self.proc = None


def waits_under_load(exe: Path, work: Path, blob: Path, pf: Path, age_ms: int,
                     attempts: int, timeout: float) -> dict:
    d, proc = start(work, blob, pf, age_ms, f"waits-{age_ms}")
    sock = str(d / "certd.sock")
    load = Load(exe, sock)
    plain_up = None
    try:
        plain_up = PlainUpdater(blob)
        load.on()
        waits: dict[str, list[float]] = {"plain": [], "gated": []}
        missed = {"plain": 0, "gated": 0}
        missed_load_off = {"plain": 0, "gated": 0}  # the load had ended meanwhile
        served0 = bs.certd_status(sock)["counters"]["served"]
        t0 = time.monotonic()
        for _ in range(attempts):
            for kind in ("plain", "gated"):
                load.on()
                w = plain_up.attempt(timeout) if kind == "plain" else gated_attempt(blob, timeout)
                if w is None:
                    missed[kind] += 1
                    if load.proc.poll() is not None:
                        missed_load_off[kind] += 1
                else:
                    waits[kind].append(w)
                time.sleep(0.05)  # let the leases pile up again
        elapsed = time.monotonic() - t0
        st = bs.certd_status(sock)
        return {"hold_max_age_ms": age_ms, "plain": summary(waits["plain"]),
                "gated": summary(waits["gated"]), "missed": missed, "missed_load_off": missed_load_off, "timeout_s": timeout,
                "leases_served_during": st["counters"]["served"] - served0,
                "leases_per_s_during": (st["counters"]["served"] - served0) / elapsed,
                "eagain": st["counters"]["eagain"]}
    finally:
        load.off()
        if plain_up is not None:
            plain_up.close()
        bs.stop_pid(proc)


def throughput(exe: Path, work: Path, blob: Path, pf: Path, ages: list[int], warmup: float,
               seconds: float, rounds: int) -> dict[int, dict]:
    """loadgen windows against one certd per hold age, alternating ages round by round (so
    a noisy host's drift hits every age alike); per age the median window by ops/s."""
    procs = {}
    try:
        for a in ages:
            procs[a] = start(work, blob, pf, a, f"tput-{a}")
        runs: dict[int, list[dict]] = {a: [] for a in ages}
        for i in range(rounds):
            for a in (ages if i % 2 == 0 else ages[::-1]):
                d, proc = procs[a]
                runs[a].append(bs.run_loadgen(
                    exe, ["--socket", str(d / "certd.sock"), "--conns", str(CONNS),
                          "--warmup", str(warmup), "--seconds", str(seconds), "--npages",
                          str(bs.NPAGES), "--cpu-pid", str(proc.pid)], warmup + seconds + 30))
        out = {}
        for a, rs in runs.items():
            rs.sort(key=lambda r: r["ops_per_s"])
            out[a] = {**rs[len(rs) // 2], "hold_max_age_ms": a,
                      "ops_per_s_all": [r["ops_per_s"] for r in rs]}
        return out
    finally:
        for _, proc in procs.values():
            bs.stop_pid(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attempts", type=int, default=20, help="plain and gated attempts each")
    p.add_argument("--seconds", type=float, default=5.0, help="throughput window per case")
    p.add_argument("--warmup", type=float, default=1.0, help="throughput warm-up per case")
    p.add_argument("--rounds", type=int, default=3, help="throughput windows per hold age")
    p.add_argument("--ages", default="100",
                   help="comma-separated hold_max_age_ms values to measure (100 = default)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="an attempt not in within this many seconds counts as missed")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (certd logs)")
    args = p.parse_args(argv)
    ages = [int(x) for x in args.ages.split(",") if x.strip()]
    if not 1 <= args.attempts <= 200 or not 0 < args.seconds <= 30 or not ages \
            or not 1 <= args.rounds <= 20:
        p.error("--attempts 1..200, --seconds in (0, 30], --rounds 1..20, --ages non-empty")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="certd-plain-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        exe = bs.compile_loadgen(work)
        blob, pf = bs.prepare_blob(work)
        print(f"{CONNS} leasing connections (loadgen), {args.attempts} attempts each of the "
              f"plain and the gated updater per hold age; python {sys.version.split()[0]}",
              flush=True)
        waits = [waits_under_load(exe, work, blob, pf, a, args.attempts, args.timeout)
                 for a in ages]
        tput = throughput(exe, work, blob, pf, sorted(set(ages) | {NO_AGE_MS}), args.warmup,
                          args.seconds, args.rounds)
        print()
        print(f"{'hold age':>9} | {'updater':>7} | {'n':>3} {'missed':>6} | {'p50 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} | leases/s meanwhile")
        for w in waits:
            for kind in ("plain", "gated"):
                s = w[kind]
                print(f"{w['hold_max_age_ms']:>7}ms | {kind:>7} | {s['n']:>3} "
                      f"{w['missed'][kind]:>6} | {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} "
                      f"{s['max_ms']:>8.1f} | {w['leases_per_s_during']:.0f}")
            pl, ga = w["plain"], w["gated"]
            print(f"  plain / gated: p50 {pl['p50_ms'] / max(ga['p50_ms'], 1e-6):.1f}x, "
                  f"p99 {pl['p99_ms'] / max(ga['p99_ms'], 1e-6):.1f}x, max "
                  f"{pl['max_ms'] / max(ga['max_ms'], 1e-6):.1f}x (missed attempts, not in "
                  f"within {w['timeout_s']:g} s, are not in these figures)")
            off = sum(w["missed_load_off"].values())
            if off:
                print(f"  {off} of the missed attempts saw the load end meanwhile (an idle "
                      "daemon may keep a lease-less hold: BUGS.md #2)")
        print()
        base = tput[NO_AGE_MS]
        print(f"throughput, {CONNS} connections, no updater, median of {args.rounds} "
              f"windows of {args.seconds:g} s (GET+RELEASE pairs/s):")
        for a, r in tput.items():
            print(f"  hold_max_age_ms {a:>6}: {bs.fmt_rate(r['ops_per_s']):>7} ops/s "
                  f"(windows {', '.join(bs.fmt_rate(x) for x in r['ops_per_s_all'])}), p99 "
                  f"{bs.fmt_us(r['p99_us'])}, cpu {r.get('server_cpu', 0):.2f}, "
                  f"{bs.cpu_per_op(r):.1f} µs CPU/op, failed {r['failed_ops']}; ratio to "
                  f"{NO_AGE_MS}: ops/s {r['ops_per_s'] / base['ops_per_s']:.2f}, CPU/op "
                  f"{bs.cpu_per_op(r) / max(bs.cpu_per_op(base), 1e-9):.2f}")
        if min(r.get("server_cpu", 1.0) for r in tput.values()) < 0.85:
            print("  caution: certd was not CPU-bound in every window (host contention or "
                  "wake-up latency); read CPU/op rather than ops/s, or rerun")
        if args.json:
            Path(args.json).write_text(json.dumps({"waits": waits, "throughput": tput},
                                                  indent=2))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
