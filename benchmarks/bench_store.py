#!/usr/bin/env python3
"""What never-wrong costs the store: the journal, settle, and the journal check.

Measured in one run, in a temp directory on the filesystem of --dir (default: the
system temp dir):

* exclusive section of ``install`` (a pure change: no journal) against ``update`` with a
  change (journal written with two fsyncs, removed after the settle);
* ``settle`` of a blob that still fits (lock, read, validate, unlock);
* ``BlobStore.journal()`` when there is none (what certd checks before a new shared
  hold) against one ``os.stat`` of the blob.

A format-only validator is used so that the figures show the store's own cost (the real
policy check adds about 5-8 ms to both install and update).
usage: bench_store.py [--n 200] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from certd.abi import table  # noqa: E402
from certd.abi.table import Entry, Role  # noqa: E402
from certd.store.blobstore import BlobStore  # noqa: E402


def table_only(blob: bytes) -> list:
    table.decode(blob)
    return []


def ms(ns: list[int]) -> str:
    q = statistics.quantiles(ns, n=100)
    return f"p50 {statistics.median(ns) / 1e6:.2f} ms, p99 {q[98] / 1e6:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    blobs = [table.encode([Entry.of(Role.ARK, bytes([i]) * 600), Entry.of(Role.VCEK, b"v" * 1300)])
             for i in range(2)]
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        store = BlobStore(os.path.join(d, "certs.blob"), table_only)
        store.install(blobs[0])
        install, update, change, settle = [], [], [], []
        for i in range(a.n):
            r = store.install(blobs[i % 2])
            install.append(r.released_ns - r.locked_ns)
            u = store.update(lambda cur, b=blobs[(i + 1) % 2]: b)
            update.append(u.released_ns - u.locked_ns)
            change.append(u.change_ended_ns - u.change_started_ns)
            s = store.settle()
            settle.append(s.released_ns - s.locked_ns)
        k = a.n * 20
        t0 = time.perf_counter_ns()
        for _ in range(k):
            store.journal()
        journal_ns = (time.perf_counter_ns() - t0) / k
        t0 = time.perf_counter_ns()
        for _ in range(k):
            os.stat(store.path)
        stat_ns = (time.perf_counter_ns() - t0) / k
    print(f"{a.n} rounds in {d}")
    print(f"install (no journal)       exclusive section {ms(install)}")
    print(f"update (journal, 2 fsyncs) exclusive section {ms(update)}; "
          f"ratio to install {statistics.median(update) / statistics.median(install):.2f}")
    print(f"  of which the change step {ms(change)}")
    print(f"settle (blob still fits)   exclusive section {ms(settle)}; "
          f"ratio to install {statistics.median(settle) / statistics.median(install):.2f}")
    print(f"journal() with none pending {journal_ns / 1e3:.2f} µs; os.stat {stat_ns / 1e3:.2f} µs;"
          f" ratio {journal_ns / stat_ns:.2f}")


if __name__ == "__main__":
    main()
