#!/usr/bin/env python3
"""certctl fw-update under load: the exclusive section, what waiting clients see, and how
soon the new blob is served after the release, against a QEMU-style reader in the same run.

A real certd (development PKI, a development KDS on loopback), VMM clients doing GET →
(report signed) → RELEASE continuously over the socket, and a QEMU-style file reader
(open, non-blocking OFD shared lock, inode check, read, unlock, close; 1 ms sleep when the
lock is busy, as QEMU's certs-timeout loop polls). Each hook is
``certctl fw-update --expect-tcb NEXT -- python -m certd.devfw PLATFORM --snp +1``
(the VCEK is prefetched before locking, so the section holds no network wait).

Printed: the exclusive section without CMD's own time (p50/p99/max over the hooks), the
EAGAIN answers clients got during the hooks, and the time from each release to the first
GET answered with the new blob and to the QEMU-style reader's first read of it (medians,
and their ratio). Every process is stopped by its pid.

usage: .venv/bin/python benchmarks/bench_fwupdate.py [--hooks 30] [--clients 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import multiprocessing as mp
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from certd import devkds, devpki, platform as platformmod, policy  # noqa: E402
from certd.abi import wire  # noqa: E402
from certd.client import AsyncClient  # noqa: E402
from certd.store import locks  # noqa: E402
from tests.daemon_support import BIN, DaemonProc, config_text  # noqa: E402

PY = sys.executable


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Recorder:
    """(monotonic ns, sha256 of the table, ret) of every answer / read."""

    def __init__(self, seen=None):
        self.seen: list[tuple[int, str, int]] = list(seen or [])

    def first_after(self, t_ns: int, sha: str) -> int | None:
        return next((ns for ns, h, ret in self.seen if ns >= t_ns and h == sha), None)

    def count(self, ret: int, t0: int, t1: int) -> int:
        return sum(1 for ns, _h, r in self.seen if r == ret and t0 <= ns <= t1)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def clients(sock: str, n: int, stop, rec: Recorder) -> None:
    async def one(i: int) -> None:
        async with AsyncClient(sock) as c:
            while not stop.is_set():
                r = await c.get(f"vm-{i}", 4)
                rec.seen.append((time.monotonic_ns(), sha(r.table) if r.ret == 0 else "", r.ret))
                if r.lease_id:
                    await c.release(r.lease_id)
    await asyncio.gather(*(one(i) for i in range(n)))


def qemu_reader(path: str, stop, rec: Recorder) -> None:
    while not stop.is_set():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not locks.try_lock(fd, False):
                time.sleep(0.001)
                continue
            if locks.same_file(fd, path) is None:
                continue
            data = os.pread(fd, 1 << 16, 0)
            rec.seen.append((time.monotonic_ns(), sha(data), 0))
        finally:
            os.close(fd)


def run_clients(sock: str, n: int, stop, out) -> None:
    """A process of its own: the clients must not share a GIL with the reader."""
    rec = Recorder()
    asyncio.run(clients(sock, n, stop, rec))
    out.put(rec.seen)


def run_reader(path: str, stop, out) -> None:
    rec = Recorder()
    qemu_reader(path, stop, rec)
    out.put(rec.seen)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", type=int, default=30)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="certd-bench-fw-"))
    pki = devpki.DevPki.generate(name="bench-fw")
    kds = devkds.DevKds([pki]).start()
    pf = tmp / "platform.toml"
    platformmod.save(devpki.make_platform(), pf)
    roots = tmp / "dev-roots.pem"
    roots.write_bytes(pki.cert_chain_pem() + pki.asvk.public_bytes(devpki.PEM))
    text = config_text(tmp, platform_file=pf).replace(
        '[kds]\nbase_url = ""', f'[kds]\nbase_url = "{kds.url}"\ncache_dir = "{tmp / "kds"}"')
    text = text.replace('level = "debug"', 'level = "info"')
    text = text.replace("[server]\n", "[server]\nrate_per_vm = 100000\nrate_burst = 100000\n", 1)
    text += f'\n[trust]\nroots = ["{roots}"]\n'
    (tmp / "certd.toml").write_text(text)
    d = DaemonProc(tmp, text)
    d.start()
    ctx = mp.get_context("fork")
    stop, q_sock, q_file = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=run_clients, args=(d.socket, args.clients, stop, q_sock)),
             ctx.Process(target=run_reader, args=(str(d.blob), stop, q_file))]
    hooks, raw = [], []
    try:
        end = time.monotonic() + 30
        while policy.parse_blob(d.blob.read_bytes()).leaf is None:  # the first rotation
            assert time.monotonic() < end, "certd never fetched its first VCEK"
            time.sleep(0.05)
        for pr in procs:
            pr.start()
        time.sleep(0.5)  # clients and reader running
        for i in range(args.hooks):
            plat = platformmod.load(pf)
            t = plat.reported_tcb
            nxt = f"bl={t.bl},tee={t.tee},snp={t.snp + 1},ucode={t.ucode}"
            t0 = time.monotonic_ns()
            r = subprocess.run([str(BIN / "certctl"), "fw-update", "--config", str(tmp / "certd.toml"),
                                "--expect-tcb", nxt, "--json", "--", PY, "-m", "certd.devfw",
                                str(pf), "--snp", "+1"], capture_output=True, text=True, timeout=120)
            t1 = time.monotonic_ns()
            out = r.stdout[r.stdout.index("{"):]
            res = json.loads(out)
            assert r.returncode == 0 and not res["empty_table"], r.stdout + r.stderr
            raw.append((t0, t1, res, sha(d.blob.read_bytes())))
            time.sleep(0.05)  # let both see it
    finally:
        stop.set()
        via_socket = Recorder(q_sock.get(timeout=60)) if procs[0].pid else Recorder()
        via_file = Recorder(q_file.get(timeout=60)) if procs[1].pid else Recorder()
        for pr in procs:
            pr.join(10)
            if pr.is_alive():
                pr.kill()
        d.stop()
        kds.stop()
    for t0, t1, res, new in raw:
        rel = res["released_monotonic_ns"]
        s_first, f_first = via_socket.first_after(rel, new), via_file.first_after(rel, new)
        hooks.append({"exclusive_without_cmd_ms": res["exclusive_without_cmd_s"] * 1000,
                      "cmd_ms": res["cmd_s"] * 1000,
                      "eagain": via_socket.count(wire.EAGAIN, t0, t1),
                      "socket_after_release_ms": None if s_first is None else (s_first - rel) / 1e6,
                      "file_after_release_ms": None if f_first is None else (f_first - rel) / 1e6})
    ex = [h["exclusive_without_cmd_ms"] for h in hooks]
    sock_ms = [h["socket_after_release_ms"] for h in hooks if h["socket_after_release_ms"] is not None]
    file_ms = [h["file_after_release_ms"] for h in hooks if h["file_after_release_ms"] is not None]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{len(hooks)} hooks, {args.clients} socket clients + 1 QEMU-style reader (1 ms poll)")
    print(f"exclusive section without CMD: p50 {pct(ex, .5):.1f} ms, p99 {pct(ex, .99):.1f} ms, "
          f"max {max(ex):.1f} ms   (CMD itself p50 {statistics.median(h['cmd_ms'] for h in hooks):.0f} ms)")
    print(f"EAGAIN answers during the hooks: {sum(h['eagain'] for h in hooks)} "
          f"(per hook max {max(h['eagain'] for h in hooks)}); socket answers in all: {len(via_socket.seen)}")
    if sock_ms and file_ms:
        sm, fm = statistics.median(sock_ms), statistics.median(file_ms)
        print(f"release -> first answer with the new blob: certd p50 {sm:.2f} ms (max {max(sock_ms):.2f}), "
              f"QEMU-style reader p50 {fm:.2f} ms (max {max(file_ms):.2f}); reader/certd = {fm / sm:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(hooks, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
