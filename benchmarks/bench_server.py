#!/usr/bin/env python3
"""certd's socket face under load, against baselines measured in the same run.

For each connection count, a C epoll load generator (benchmarks/loadgen.c, compiled into a
temporary directory) runs N closed-loop connections; one op = GET (npages 4) + RELEASE of
the lease it returned, two round trips. Warm-up, then a fixed measurement window.

* certd: a real ``certd --config`` process on the real AMD Milan vector blob (same recipe as
  tests/daemon_support.py), rate limit out of the way, production log level (info).
* ceiling: a raw server on the same event loop as certd (asyncio's or uvloop, whichever
  certd's ``--event-loop`` choice gave it; BufferedProtocol, the same
  receive buffer size as certd) that frames the header just enough and answers the same
  GET_REPLY bytes (same table, written with writelines like certd) and RELEASE_REPLY: no
  locks, no leases, no policy. ratio = certd ops/s / ceiling ops/s.
* QEMU-style in-process reader (DESIGN §8): open -> F_OFD_SETLK shared (non-blocking) ->
  fstat/stat inode check -> pread the whole blob -> unlock -> close, in Python (this
  process) and in C (loadgen --qemu-reader). No socket at all: what a stock QEMU pays.

Every process started here is stopped by its pid in ``finally``; Unix sockets only.

usage: .venv/bin/python benchmarks/bench_server.py [--seconds 5] [--warmup 1]
           [--conns 1,16,256] [--reader-seconds 2] [--rounds N]
           [--event-loop auto|asyncio|uvloop] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

NPAGES = 4
TARGET_RATIO_16 = 0.6

# --------------------------------------------------------------------------- raw ceiling

# Same layouts as certd.abi.wire (header + fixed payload packed in one call).
_HDR = "<4sBBHII"
_HDR_GET_REPLY = struct.Struct(_HDR + "IIQQQII")
_HDR_RELEASE_REPLY = struct.Struct(_HDR + "QII")
_HEADER = struct.Struct(_HDR)
_U64 = struct.Struct("<Q")


def raw_server_main(sock_path: str, blob_path: str, event_loop: str = "asyncio") -> int:
    """The transport ceiling: plain asyncio + BufferedProtocol, same buffer as certd."""
    from certd.service.server import _RECV_BUFFER  # the receive buffer certd uses

    table = Path(blob_path).read_bytes()
    tlen = len(table)
    lease_ids = iter(range(1, 1 << 62))

    class Raw(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(_RECV_BUFFER)
            self.view = memoryview(self.buf)
            self.have = 0
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.view[self.have:]

        def buffer_updated(self, nbytes: int) -> None:
            buf, have, off = self.buf, self.have + nbytes, 0
            tr = self.transport
            while have - off >= 16:
                magic, ver, mtype, flags, rid, length = _HEADER.unpack_from(buf, off)
                if have - off < 16 + length:
                    break
                if mtype == 0x01:  # GET -> GET_REPLY ret 0, the table, a lease id
                    (npages,) = _U64.unpack_from(buf, off + 16)
                    tr.writelines((_HDR_GET_REPLY.pack(b"CRTD", 1, 0x81, 0, rid, 40 + tlen, 0, 0,
                                                       npages, 1, next(lease_ids), tlen, 0),
                                   table))
                elif mtype == 0x02:  # RELEASE -> RELEASE_REPLY RELEASED
                    (lease,) = _U64.unpack_from(buf, off + 16)
                    tr.write(_HDR_RELEASE_REPLY.pack(b"CRTD", 1, 0x82, 0, rid, 16, lease, 0, 0))
                off += 16 + length
            if off < have:
                buf[:have - off] = buf[off:have]
            self.have = have - off

        def connection_lost(self, exc) -> None:
            self.transport = None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock_path)
        s.listen(1024)
        srv = await loop.create_unix_server(Raw, sock=s)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("READY", flush=True)
        await stop.wait()
        srv.close()

    from certd.service.daemon import event_loop_runner  # certd's own choice of loop
    event_loop_runner(event_loop)(main())
    return 0


# --------------------------------------------------------------------------- reader baseline

def python_reader(path: str, warmup: float, seconds: float) -> dict:
    """QEMU's per-request loop, in this process: ops/s and per-op latency."""
    rd = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    un = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
    setlk = fcntl.F_OFD_SETLK
    flags = os.O_RDONLY | os.O_CLOEXEC
    clock = time.perf_counter_ns
    lat: list[int] = []
    busy = replaced = 0
    t_meas = clock() + int(warmup * 1e9)
    t_end = t_meas + int(seconds * 1e9)
    while True:
        t = clock()
        if t >= t_end:
            break
        fd = os.open(path, flags)
        try:
            fcntl.fcntl(fd, setlk, rd)
        except OSError:
            os.close(fd)
            busy += 1
            time.sleep(0.001)  # QEMU polls every 1 ms when the lock is busy
            continue
        st = os.fstat(fd)
        at = os.stat(path)
        if st.st_ino != at.st_ino or st.st_dev != at.st_dev or st.st_nlink == 0:
            os.close(fd)
            replaced += 1
            continue
        data = os.pread(fd, st.st_size, 0)
        fcntl.fcntl(fd, setlk, un)
        os.close(fd)
        if len(data) != st.st_size:
            raise RuntimeError("short read of the blob")
        if t >= t_meas:
            lat.append(clock() - t)
    lat.sort()
    n = len(lat)
    return {"mode": "python-reader", "ops": n, "ops_per_s": n / seconds,
            "p50_us": lat[n // 2] / 1000 if n else 0.0,
            "p99_us": lat[min(n - 1, int(n * 0.99))] / 1000 if n else 0.0,
            "busy": busy, "replaced": replaced}


# --------------------------------------------------------------------------- processes

def stop_pid(proc: subprocess.Popen | None) -> None:
    """SIGTERM by pid, wait, SIGKILL if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def compile_loadgen(out_dir: Path) -> Path:
    exe = out_dir / "loadgen"
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(HERE / "loadgen.c")],
                   check=True)
    return exe


def prepare_blob(d: Path) -> tuple[Path, Path]:
    """The real milan_gcp vector blob and its platform file (tests/daemon_support.py)."""
    from certd import platform as platformmod
    from tests.daemon_support import vector_blob, vector_platform

    platform = vector_platform()
    pf = d / "platform.toml"
    platformmod.save(platform, pf)
    blob = d / "certs.blob"
    blob.write_bytes(vector_blob(platform=platform))
    return blob, pf


def certd_config(d: Path, blob: Path, platform_file: Path, event_loop: str) -> Path:
    cfg = d / "certd.toml"
    cfg.write_text(f"""\
[server]
socket = "{d / 'certd.sock'}"
socket_mode = "0600"
lease_timeout_ms = 2000
request_deadline_ms = 100
max_leases_per_connection = 16
max_connections = 4096
max_connections_per_pid = 4096   # one loadgen process stands for many VMMs
# rate_per_vm must be > 0: the largest value the configuration accepts, so the token
# bucket never refuses (the bench is about the request path, not the limiter).
rate_per_vm = 1000000
rate_burst = 1048576
event_loop = "{event_loop}"

[access]
allow_uids = [{os.getuid()}]

[store]
blob = "{blob}"

[platform]
source = "file"
file = "{platform_file}"

[log]
level = "info"
format = "json"
""")
    return cfg


def start_certd(d: Path, cfg: Path, log_path: Path) -> subprocess.Popen:
    """certd --config, readiness from READY=1 on a fake NOTIFY_SOCKET (abstract dgram)."""
    name = f"certd-bench-{uuid.uuid4().hex}"
    note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    note.bind("\0" + name)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
        exe = Path(sys.executable).parent / "certd"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([str(exe), "--config", str(cfg)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise RuntimeError(f"certd did not report READY=1 (log: {log_path}):\n"
                                       + log_path.read_text()[-2000:])
                note.settimeout(min(left, 0.5))
                try:
                    if "READY=1" in note.recv(4096).decode():
                        return proc
                except socket.timeout:
                    continue
        except BaseException:
            stop_pid(proc)
            raise
    finally:
        note.close()


def start_raw(d: Path, blob: Path, event_loop: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--raw-server",
                             str(d / "raw.sock"), str(blob), event_loop],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # READY, or EOF if it died
        if line.strip() != "READY":
            raise RuntimeError(f"raw ceiling server did not start (got {line!r})")
    except BaseException:
        stop_pid(proc)
        raise
    return proc


def certd_status(sock_path: str) -> dict:
    """STATUS over the socket: counters to show the rate limiter and leases stayed quiet."""
    from certd.abi import wire

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(sock_path)
        s.sendall(wire.encode_status(1))
        dec = wire.Decoder(wire.REPLIES)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("certd closed the STATUS connection")
            dec.feed(chunk)
            msg = dec.next()
            if msg is not None:
                return msg.status if isinstance(msg, wire.StatusReply) else {"error": repr(msg)}
    finally:
        s.close()


def run_loadgen(exe: Path, args: list[str], timeout: float) -> dict:
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- report

def fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def fmt_us(x: float) -> str:
    return f"{x / 1000:.2f}ms" if x >= 10000 else f"{x:.0f}"


def cpu_per_op(r: dict, key: str = "server_cpu") -> float:
    """Server CPU microseconds per op: robust to a noisy host when the server is busy.
    ``key="server_sys"``: the kernel's share of it (system calls)."""
    return r.get(key, 0.0) / max(r["ops_per_s"], 1e-9) * 1e6


def print_table(rows: list[dict], py_reader: dict, c_reader: dict) -> None:
    head = (f"{'conns':>5} | {'certd ops/s':>11} {'p50 µs':>8} {'p99 µs':>8} {'cpu':>5} "
            f"{'µs/op':>6} | {'ceiling ops/s':>13} {'p50 µs':>8} {'p99 µs':>8} {'cpu':>5} "
            f"{'µs/op':>6} | {'ratio':>5} | {'failed':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        c, w = r["certd"], r["ceiling"]
        print(f"{r['conns']:>5} | {fmt_rate(c['ops_per_s']):>11} {fmt_us(c['p50_us']):>8} "
              f"{fmt_us(c['p99_us']):>8} {c.get('server_cpu', 0):>5.2f} {cpu_per_op(c):>6.1f} | "
              f"{fmt_rate(w['ops_per_s']):>13} {fmt_us(w['p50_us']):>8} "
              f"{fmt_us(w['p99_us']):>8} {w.get('server_cpu', 0):>5.2f} {cpu_per_op(w):>6.1f} | "
              f"{r['ratio']:>5.2f} | {c['failed_ops']:>6}")
    print()
    print("op = GET (npages 4) + RELEASE, two round trips; p50/p99 per op; cpu = server "
          "process CPU (cores) in the window; µs/op = server CPU per op; ratio = certd ops/s / "
          "ceiling ops/s; failed = certd ops without ret 0 + lease + RELEASED")
    print("QEMU-style in-process reader (open, OFD RDLCK, inode check, pread whole blob, "
          "unlock, close), no socket:")
    print(f"  Python: {fmt_rate(py_reader['ops_per_s'])} ops/s, p50 {py_reader['p50_us']:.1f} µs, "
          f"p99 {py_reader['p99_us']:.1f} µs")
    print(f"  C:      {fmt_rate(c_reader['ops_per_s'])} ops/s, p50 {c_reader['p50_us']:.1f} µs, "
          f"p99 {c_reader['p99_us']:.1f} µs")
    for r in rows:
        print(f"  certd at {r['conns']} conns = "
              f"{r['certd']['ops_per_s'] / py_reader['ops_per_s']:.2f} x the Python reader, "
              f"{r['certd']['ops_per_s'] / c_reader['ops_per_s']:.2f} x the C reader")
    r16 = next((r for r in rows if r["conns"] == 16), None)
    if r16 is not None:
        verdict = "meets" if r16["ratio"] >= TARGET_RATIO_16 else "MISSES"
        ratios = r16.get("ratios", [])
        each = f"(median of {', '.join(f'{x:.2f}' for x in ratios)}) " if len(ratios) > 1 else ""
        print(f"\nratio certd/ceiling at 16 connections: {r16['ratio']:.2f} {each}"
              f"({verdict} the {TARGET_RATIO_16} target); server CPU per op: certd "
              f"{cpu_per_op(r16['certd']):.1f} µs, ceiling {cpu_per_op(r16['ceiling']):.1f} µs "
              f"(in the kernel: {cpu_per_op(r16['certd'], 'server_sys'):.1f} and "
              f"{cpu_per_op(r16['ceiling'], 'server_sys'):.1f} µs)")
        if r16["ceiling"].get("server_cpu", 1.0) < 0.85:
            print("  caution: the ceiling server was not CPU-bound at 16 connections (host "
                  "contention or wake-up latency); this run's ratio says little, rerun")


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measurement window per case")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up per case (not counted)")
    p.add_argument("--conns", default="1,16,256", help="comma-separated connection counts")
    p.add_argument("--reader-seconds", type=float, default=2.0,
                   help="measurement window of the in-process reader baselines")
    p.add_argument("--rounds", type=int, default=1,
                   help="certd/ceiling pairs per connection count, run alternately (ABBA); "
                        "the row shows the pair with the median ratio, and all ratios")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    p.add_argument("--keep", metavar="DIR",
                   help="work in DIR and keep it (certd log, config); default: a temp dir")
    p.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="server.event_loop for certd, and the loop the ceiling runs on too "
                        "(default auto: uvloop when installed, as certd's default)")
    p.add_argument("--raw-server", nargs=3, metavar=("SOCK", "BLOB", "LOOP"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_server:
        return raw_server_main(*args.raw_server)
    conns = [int(x) for x in args.conns.split(",") if x.strip()]
    if not conns or any(not 1 <= c <= 4096 for c in conns):
        p.error("--conns: 1..4096 each")
    if not 0 < args.seconds <= 30 or not 0 <= args.warmup <= 30:
        p.error("--seconds in (0, 30], --warmup in [0, 30]")
    if not 1 <= args.rounds <= 15:
        p.error("--rounds: 1..15")

    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="certd-bench-"))
    certd_proc = raw_proc = None
    per_case = args.warmup + args.seconds + 30  # loadgen stops itself; this is a backstop
    try:
        exe = compile_loadgen(work)
        blob, pf = prepare_blob(work)
        print(f"blob: {blob.stat().st_size} bytes; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs; {args.warmup:g} s warm-up + {args.seconds:g} s per case",
              flush=True)

        py_reader = python_reader(str(blob), 0.5, args.reader_seconds)
        c_reader = run_loadgen(exe, ["--qemu-reader", str(blob), "--warmup", "0.5",
                                     "--seconds", str(args.reader_seconds)], per_case)

        cfg = certd_config(work, blob, pf, args.event_loop)
        certd_proc = start_certd(work, cfg, work / "certd.log")
        loop_name = certd_status(str(work / "certd.sock")).get("event_loop", "asyncio")
        raw_proc = start_raw(work, blob, loop_name)  # the ceiling on the loop certd got
        print(f"event loop (certd and the ceiling): {loop_name}", flush=True)
        targets = {"certd": (str(work / "certd.sock"), certd_proc, []),
                   "ceiling": (str(work / "raw.sock"), raw_proc, ["--raw"])}
        rows = []
        turn = 0
        for n in conns:
            pairs = []
            for _ in range(args.rounds):
                pair: dict = {}
                order = ("certd", "ceiling") if turn % 2 == 0 else ("ceiling", "certd")
                turn += 1
                for name in order:  # alternate who goes first: drift on a noisy host cancels
                    sock, proc, extra = targets[name]
                    pair[name] = run_loadgen(exe, ["--socket", sock, "--conns", str(n),
                                                   "--warmup", str(args.warmup),
                                                   "--seconds", str(args.seconds),
                                                   "--npages", str(NPAGES),
                                                   "--cpu-pid", str(proc.pid), *extra],
                                             per_case)
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} server exited ({proc.returncode}) "
                                           "during the run")
                pair["ratio"] = pair["certd"]["ops_per_s"] / max(pair["ceiling"]["ops_per_s"],
                                                                 1e-9)
                pairs.append(pair)
                print(f"  {n} conns: certd {fmt_rate(pair['certd']['ops_per_s'])} ops/s, "
                      f"ceiling {fmt_rate(pair['ceiling']['ops_per_s'])} ops/s, "
                      f"ratio {pair['ratio']:.2f}", flush=True)
            median = sorted(pairs, key=lambda q: q["ratio"])[len(pairs) // 2]
            rows.append({"conns": n, **median, "ratios": [q["ratio"] for q in pairs]})
        status = certd_status(str(work / "certd.sock"))
        print()
        print_table(rows, py_reader, c_reader)
        ctr = status.get("counters", {})
        print(f"certd counters: served {ctr.get('served')}, rate_limited "
              f"{ctr.get('rate_limited')}, eagain {ctr.get('eagain')}, enospc {ctr.get('enospc')},"
              f" protocol_errors {ctr.get('protocol_errors')}, leases_expired "
              f"{status.get('leases_expired')}, live leases {status.get('leases')}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"rows": rows, "python_reader": py_reader, "c_reader": c_reader,
                 "certd_status": status}, indent=2))
        return 0
    finally:
        stop_pid(raw_proc)
        stop_pid(certd_proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
