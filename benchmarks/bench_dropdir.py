"""The drop directory against its baselines, measured in the same run.

    .venv/bin/python benchmarks/bench_dropdir.py [--drops 200] [--burst 1000] [--dir D] [--json F]

On the real AMD Milan VCEK vector with the pinned roots (RSA-4096), in a temporary
directory on real inotify, in this process (no other process is started):

- **judge**: ``judge()`` alone on the file's bytes (parse, complete, build, validate);
- **inotify**: a bare :class:`certd.inotify.Watcher`, from ``rename()`` to the event;
- **drop->accept**: a DropDir, from the ``rename()`` into the directory until the waiter
  woken by ``accept`` runs (so the file's move and log line are included), one drop at a
  time; ratio against judge + inotify. Logging is certd's production JSON, to a file;
- **burst**: ``--burst`` files written at once by another thread; files/s, and its ratio
  against the judge-only rate; the longest the loop went without running a 1 ms ticker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from certd import inotify, logs  # noqa: E402
from certd.abi import report as reportmod  # noqa: E402
from certd.abi.product import Product  # noqa: E402
from certd.amd import roots  # noqa: E402
from certd.platform import Platform  # noqa: E402
from certd.sources.dropdir import DropDir, judge  # noqa: E402

VECTORS = REPO / "tests" / "vectors"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 0.5) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3, "max_ms": max(xs) * 1e3}


async def bench(drops: int, burst: int, where: str | None = None) -> dict:
    rep = reportmod.parse((VECTORS / "milan_report.bin").read_bytes())
    plat = Platform(product=Product.MILAN, reported_tcb=rep.reported_tcb(Product.MILAN),
                    chip_id=rep.hwid(Product.MILAN))
    data = (VECTORS / "milan_vcek.der").read_bytes()
    trust = roots.pinned()
    assert judge(data, "v", trust=trust, platform=plat).accepted

    judge_s = []
    for _ in range(drops):
        t = time.perf_counter()
        judge(data, "v", trust=trust, platform=plat)
        judge_s.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory(dir=where) as tmp:
        root = Path(tmp)
        # Production logging (JSON, one line per file) into a file: a pipe to a terminal
        # would time the reader's wake-ups instead.
        log_file = open(root / "dropdir.log", "w")
        logs.configure("info", "json", stream=log_file)
        # Baseline: bare inotify event latency.
        seen = asyncio.Event()
        w = inotify.Watcher(lambda ev: seen.set())
        (root / "bare").mkdir()
        w.add(str(root / "bare"), inotify.MOVED_TO)
        inotify_s = []
        for i in range(drops):
            (root / "bare" / ".t").write_bytes(data)
            seen.clear()
            t = time.perf_counter()
            os.rename(root / "bare" / ".t", root / "bare" / f"f{i}")
            await asyncio.wait_for(seen.wait(), 10)
            inotify_s.append(time.perf_counter() - t)
        w.close()

        # The drop directory, one file at a time.
        accepted = asyncio.Event()
        count = 0

        def accept(blob: bytes, name: str) -> None:
            nonlocal count
            count += 1
            accepted.set()

        drop = root / "drop"
        dd = DropDir(drop, trust=trust, platform=lambda: plat, accept=accept,
                     loop=asyncio.get_running_loop())
        await dd.drained()
        drop_s = []
        for i in range(drops):
            (drop / ".t.tmp").write_bytes(data)
            accepted.clear()
            t = time.perf_counter()
            os.rename(drop / ".t.tmp", drop / f"d{i}.der")
            await asyncio.wait_for(accepted.wait(), 10)
            drop_s.append(time.perf_counter() - t)
        await dd.drained()

        # A burst written by another thread while certd processes.
        done = asyncio.Event()
        start = count

        def burst_accept(blob: bytes, name: str) -> None:
            if count + 1 - start >= burst:
                done.set()
            accept(blob, name)

        dd.accept = burst_accept
        gaps = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        def write_all():
            for i in range(burst):
                (drop / f".b{i}.tmp").write_bytes(data)
                os.rename(drop / f".b{i}.tmp", drop / f"b{i}.der")

        tick = asyncio.create_task(ticker())
        t = time.perf_counter()
        await asyncio.to_thread(write_all)
        await asyncio.wait_for(done.wait(), 600)
        burst_s = time.perf_counter() - t
        tick.cancel()
        await dd.aclose()
        log_file.close()
        log_lines = len((root / "dropdir.log").read_text().splitlines())

    judge_mean = statistics.mean(judge_s)
    base = pct(judge_s, 0.5) + pct(inotify_s, 0.5)
    return {
        "judge": summary(judge_s),
        "inotify": summary(inotify_s),
        "drop_to_accept": summary(drop_s),
        "drop_to_accept_p50_over_baseline": pct(drop_s, 0.5) / base,
        "log_lines": log_lines,
        "burst": {"files": burst, "seconds": burst_s, "files_per_s": burst / burst_s,
                  "judge_only_files_per_s": 1 / judge_mean,
                  "ratio_to_judge_only": (burst / burst_s) * judge_mean,
                  "loop_gap_p50_ms": pct(gaps, 0.5) * 1e3, "loop_gap_max_ms": max(gaps) * 1e3},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drops", type=int, default=200, help="sequential drops (default 200)")
    ap.add_argument("--burst", type=int, default=1000, help="files in the burst (default 1000)")
    ap.add_argument("--dir", help="where to make the temporary directory (default: $TMPDIR "
                                   "or /tmp; /dev/shm takes the disk out of the figures)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    r = asyncio.run(bench(args.drops, args.burst, args.dir))
    for key in ("judge", "inotify", "drop_to_accept"):
        s = r[key]
        print(f"{key:15} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"max {s['max_ms']:7.2f} ms")
    print(f"drop->accept p50 / (judge p50 + inotify p50) = "
          f"{r['drop_to_accept_p50_over_baseline']:.2f}")
    b = r["burst"]
    print(f"burst {b['files']} files: {b['seconds']:.2f} s, {b['files_per_s']:.0f} files/s "
          f"= {b['ratio_to_judge_only']:.2f} of judge-only ({b['judge_only_files_per_s']:.0f}/s); "
          f"loop gap p50 {b['loop_gap_p50_ms']:.1f} ms, max {b['loop_gap_max_ms']:.1f} ms "
          f"(1 ms ticker)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
