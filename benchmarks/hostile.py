#!/usr/bin/env python3
"""Six hostile clients at once against a real certd, while good clients are measured
(issue 11, item 8).

One real ``certd --config`` process (tests/daemon_support.py make_daemon + DaemonProc: the
real AMD Milan vector blob, pinned roots, READY=1 on a fake NOTIFY_SOCKET), production
``[server]`` defaults (max_connections 1024, rate_per_vm 50, lease_timeout_ms 2000,
request_deadline_ms 100, ...), log level ``info``. Its fd limit is raised with
``prlimit --nofile`` on its command line (never in the unit); this process raises its own.

Phase 1, unloaded (``--baseline-seconds``): the measured clients alone. Phase 2: the six
attacks, each in its own process (``--attack KIND``), for ``--seconds`` (60 by default)
after a ramp (the idle connections opening), with the same measured clients:

attacks
  slowloris   connections sending a partial GET frame, one byte every ``--slow-interval`` s
  idle        ``--idle`` (10,000) connections that connect and send nothing
  hoard       ``--hoarders`` connections, one VM id each, taking leases up to the
              per-connection limit and never releasing them
  flood       one VM id on 4 connections, pipelined GETs as fast as they go (past the rate
              limit), leases released
  deaf        ``--deaf`` connections sending GETs and never reading the answers
  garbage     4 loops connecting and sending garbage (bad magic, bad headers, oversized
              lengths, random bytes)

measured
  good VM     one connection, GET (npages 4) + RELEASE every 25 ms (under the 50/s rate
              limit): p50/p99 per op, EAGAIN count. Unloaded vs attacked, ratio same run.
  newcomers   a new VM (new connection, new vm id) every 2 s: one GET+RELEASE; successes.
  updater     every 5 s ``certctl lock --exclusive --json -- true``: its ``waited_s``.
  deadline    every 5 s (2.5 s after the updater) ``certctl lock --exclusive`` holds the
              lock for 0.4 s and a probe VM sends one GET inside that window: the time to
              its EAGAIN answer, against request_deadline_ms (100 ms). EAGAIN answers of
              every measured client are timed too.
  log volume  bytes (and lines) per minute of the daemon's log during the attacks.

A measured GET is "explained" EAGAIN if it overlapped an exclusive-lock window of the
updater or the deadline probe (a short update); the rest are counted as unexplained.

Every process (certd, the six attackers, certctl) is stopped by its pid in ``finally``;
Unix sockets in a temporary directory only; every loop is bounded by the phase's deadline.

usage: .venv/bin/python benchmarks/hostile.py [--seconds 60] [--baseline-seconds 15]
           [--idle 10000] [--slowloris 200] [--hoarders 32] [--deaf 32]
           [--server-keys 'max_connections=20000,...'] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from certd.abi import wire  # noqa: E402

BIN = Path(sys.executable).parent
NPAGES = 4
DEADLINE_MS = 100
#: The fd limit for certd, the attackers and this process: 65536, or the hard limit if
#: lower (a container without CAP_SYS_RESOURCE cannot raise its hard limit).
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = 65536 if _HARD == resource.RLIM_INFINITY else min(65536, _HARD)
#: Also the order the attackers start in, each once it has its connections: the ones that
#: use their connections before the idle ones fill the table (otherwise which attacks run
#: at all is a race between the processes).
ATTACKS = ("hoard", "flood", "deaf", "slowloris", "idle", "garbage")


def raise_nofile(n: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE (soft and, as root, hard) to ``n``; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), max(hard, n)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- the daemon

def start_daemon(directory: Path, server_keys: dict | None = None, nofile: int = NOFILE,
                 level: str = "info"):
    """A real certd (tests/daemon_support.make_daemon) under ``prlimit --nofile``, with
    extra ``[server]`` keys; returns the started DaemonProc (stop it with ``.stop()``)."""
    from tests.daemon_support import make_daemon, with_server_keys
    d = make_daemon(directory)
    d.config_text = d.config_text.replace('level = "debug"', f'level = "{level}"', 1)
    if server_keys:
        d.config_text = with_server_keys(d.config_text, **server_keys)
    argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--",
            str(BIN / "certd"), "--config", str(d.config_path)]
    return d.start(argv=argv)


def parse_keys(text: str) -> dict:
    out: dict = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out


# --------------------------------------------------------------------------- attackers

class Attack:
    """One attack in this (attacker) process: asyncio, raw non-blocking Unix sockets."""

    def __init__(self, path: str, end: float, opts: argparse.Namespace):
        self.path, self.end, self.o = path, end, opts
        self.loop = asyncio.get_running_loop()
        self.stats: dict[str, int] = {}
        self.stopped = False

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def left(self) -> float:
        """Seconds until the attack ends (0 once stopped: every loop checks this, since on
        Python 3.11 asyncio.wait_for can swallow a task's cancellation)."""
        return 0.0 if self.stopped else self.end - time.monotonic()

    def stop(self) -> None:
        self.stopped = True

    async def connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(s, self.path), 10)
        except (OSError, asyncio.TimeoutError):
            s.close()
            self.count("connect_failed")
            return None
        self.count("connected")
        return s

    async def nap(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, min(seconds, self.left())))

    async def sessions(self, pause: float | None = None,
                       sem: asyncio.Semaphore | None = None):
        """Connected sockets, one after another until the phase ends: each is closed when
        the consumer is done with it, then the next comes ``pause`` s later (default
        ``--reconnect-s``; also after a failed connect). ``sem`` bounds concurrent connects."""
        while self.left() > 0:
            if sem is not None:
                async with sem:
                    s = await self.connect()
            else:
                s = await self.connect()
            if s is not None:
                try:
                    yield s
                finally:
                    s.close()
            await self.nap(self.o.reconnect_s if pause is None or s is None else pause)

    async def until_closed(self, s: socket.socket) -> None:
        """Read (and drop) until the daemon closes ``s`` or the phase ends."""
        while self.left() > 0:
            try:
                d = await asyncio.wait_for(self.loop.sock_recv(s, 4096), self.left())
            except asyncio.TimeoutError:
                return
            except OSError:
                d = b""
            if not d:
                self.count("closed_by_daemon")
                return

    async def reply(self, s: socket.socket, dec: wire.Decoder) -> wire.Message | None:
        """The next message on ``s``; None if the daemon closed it or the phase ended."""
        while True:
            msg = dec.next()
            if msg is not None:
                return msg
            try:
                d = await asyncio.wait_for(self.loop.sock_recv(s, 65536),
                                           max(0.01, self.left()))
            except asyncio.TimeoutError:
                return None
            if not d:
                return None
            dec.feed(d)

    # -- the six attacks

    async def idle_one(self, sem: asyncio.Semaphore) -> None:
        async for s in self.sessions(sem=sem):
            await self.until_closed(s)

    async def slowloris_one(self, i: int) -> None:
        await self.nap(random.random() * self.o.slow_interval)
        async for s in self.sessions():
            for b in wire.encode_get(1, f"slow-{i}", NPAGES):
                if self.left() <= 0:
                    break
                try:
                    await self.loop.sock_sendall(s, bytes([b]))
                    self.count("bytes_sent")
                except OSError:
                    self.count("closed_by_daemon")
                    break
                await self.nap(self.o.slow_interval)

    async def hoard_one(self, i: int) -> None:
        vm = f"hoard-{i}"
        async for s in self.sessions():
            dec = wire.Decoder(wire.REPLIES)
            rid = 0
            try:
                while self.left() > 0:
                    rid = rid % 0xFFFFFFF0 + 1
                    await self.loop.sock_sendall(s, wire.encode_get(rid, vm, NPAGES))
                    msg = await self.reply(s, dec)
                    if msg is None:
                        if self.left() > 0:
                            self.count("closed_by_daemon")
                        break
                    if isinstance(msg, wire.GetReply):
                        self.count("leases_taken" if msg.lease_id else f"ret_{msg.ret}")
                    elif isinstance(msg, wire.Error):
                        self.count(f"error_{msg.code_name}")
                        if msg.closing:
                            break
                        await self.nap(max(msg.arg, 200) / 1000 if msg.code in (
                            wire.ErrorCode.RATE_LIMITED, wire.ErrorCode.TOO_MANY_LEASES)
                            else 0.2)
            except (OSError, wire.WireError):
                self.count("closed_by_daemon")

    async def flood_one(self, i: int) -> None:
        async for s in self.sessions(pause=0.1):
            dec = wire.Decoder(wire.REPLIES)
            rid = 0
            try:
                while self.left() > 0:
                    frames = []
                    for _ in range(16):  # 16 GETs in flight, then read their answers
                        rid = rid % 0xFFFFFFF0 + 1
                        frames.append(wire.encode_get(rid, "flood-vm", NPAGES))
                    await self.loop.sock_sendall(s, b"".join(frames))
                    self.count("gets_sent", 16)
                    release = []
                    for _ in range(16):
                        msg = await self.reply(s, dec)
                        if msg is None:
                            if self.left() <= 0:
                                return
                            raise OSError("closed")
                        if isinstance(msg, wire.GetReply):
                            self.count(f"ret_{msg.ret}")
                            if msg.lease_id:
                                rid = rid % 0xFFFFFFF0 + 1
                                release.append(wire.encode_release(rid, msg.lease_id))
                        elif isinstance(msg, wire.Error):
                            self.count(f"error_{msg.code_name}")
                            if msg.closing:
                                raise OSError("closing")
                    if release:
                        await self.loop.sock_sendall(s, b"".join(release))
                        for _ in release:
                            if await self.reply(s, dec) is None:
                                raise OSError("closed")
            except (OSError, wire.WireError):
                self.count("closed_by_daemon")

    async def deaf_one(self, i: int) -> None:
        async for s in self.sessions():
            rid = 0
            try:
                while self.left() > 0:
                    rid = rid % 0xFFFFFFF0 + 1
                    frame = wire.encode_get(rid, f"deaf-{i}", NPAGES)
                    try:
                        n = s.send(frame)  # non-blocking: stops when the daemon stops reading
                    except BlockingIOError:
                        self.count("send_blocked")
                        await self.nap(0.5)
                        continue
                    self.count("bytes_sent", n)
                    if n < len(frame):
                        await self.nap(0.5)
                    elif rid % 64 == 0:
                        await asyncio.sleep(0)
            except OSError:
                self.count("closed_by_daemon")

    async def garbage_one(self, i: int) -> None:
        rng = random.Random(i)
        kinds = [
            lambda: os.urandom(rng.randrange(1, 512)),                    # random bytes
            lambda: b"XXXX" + os.urandom(60),                             # bad magic
            lambda: wire.HEADER.pack(wire.MAGIC, 1, 1, 0, 1, 0xFFFFFF),   # oversized length
            lambda: wire.HEADER.pack(wire.MAGIC, 9, 1, 0, 1, 0),          # unknown version
            lambda: wire.HEADER.pack(wire.MAGIC, 1, 0x7E, 0, 1, 0),       # unknown type
            lambda: wire.HEADER.pack(wire.MAGIC, 1, 1, 4, 1, 0),          # flags set
            lambda: wire.HEADER.pack(wire.MAGIC, 1, 1, 0, 1, 3) + b"abc",  # short GET payload
        ]
        async for s in self.sessions(pause=0.0):
            try:
                for _ in range(8):  # a few frames per connection (non-fatal ones keep it)
                    await self.loop.sock_sendall(s, rng.choice(kinds)())
                    self.count("frames_sent")
                s.shutdown(socket.SHUT_WR)
                await self.until_closed(s)
            except OSError:
                self.count("closed_by_daemon")


async def attacker_main(kind: str, path: str, seconds: float, o: argparse.Namespace) -> dict:
    a = Attack(path, time.monotonic() + seconds, o)
    stop = asyncio.Event()
    a.loop.add_signal_handler(signal.SIGTERM, lambda: (a.stop(), stop.set()))
    if kind == "idle":
        sem = asyncio.Semaphore(128)
        tasks = [asyncio.ensure_future(a.idle_one(sem)) for _ in range(o.idle)]
    elif kind == "slowloris":
        tasks = [asyncio.ensure_future(a.slowloris_one(i)) for i in range(o.slowloris)]
    elif kind == "hoard":
        tasks = [asyncio.ensure_future(a.hoard_one(i)) for i in range(o.hoarders)]
    elif kind == "flood":
        tasks = [asyncio.ensure_future(a.flood_one(i)) for i in range(4)]
    elif kind == "deaf":
        tasks = [asyncio.ensure_future(a.deaf_one(i)) for i in range(o.deaf)]
    elif kind == "garbage":
        tasks = [asyncio.ensure_future(a.garbage_one(i)) for i in range(4)]
    else:
        raise SystemExit(f"unknown attack {kind!r}; one of {', '.join(ATTACKS)}")
    want = {"idle": o.idle, "slowloris": o.slowloris, "hoard": o.hoarders, "flood": 4,
            "deaf": o.deaf, "garbage": 1}[kind]
    ready_by = time.monotonic() + 15
    while a.stats.get("connected", 0) < want and time.monotonic() < ready_by:
        await asyncio.sleep(0.05)  # connect progress: nothing signals it
    print("ready", flush=True)
    waiter = asyncio.ensure_future(stop.wait())
    everything = asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.wait([waiter, everything], timeout=seconds + 5,
                       return_when=asyncio.FIRST_COMPLETED)
    for t in tasks + [waiter]:
        t.cancel()
    results = await everything
    errors = [r for r in results if isinstance(r, BaseException)
              and not isinstance(r, asyncio.CancelledError)]
    if errors:
        a.stats["task_errors"] = len(errors)
        a.stats["first_error"] = repr(errors[0])[:200]  # type: ignore[assignment]
    return a.stats


# --------------------------------------------------------------------------- measured clients

@dataclass
class Op:
    t: float          # monotonic send time of the GET
    dt: float         # seconds from the GET to the last answer (RELEASE_REPLY if leased)
    ret: int | None   # None: refused / failed (see err)
    err: str = ""
    get_s: float = 0.0  # seconds from the GET to its answer


@dataclass
class Phase:
    name: str
    good: list[Op] = field(default_factory=list)
    newcomers: list[Op] = field(default_factory=list)
    updater: list[dict] = field(default_factory=list)
    probes: list[Op] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  # exclusive holds
    eagain_times: list[float] = field(default_factory=list)
    log_bytes: int = 0
    log_lines: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0      # the daemon's utime+stime during the phase
    rss_kib: int = 0        # the daemon's VmRSS at the end of the phase


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` (/proc/PID/stat fields 14 and 15), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def get_release(c, vm_id: str, ph: Phase) -> Op:
    """One GET on the certd.client.Client ``c`` and the RELEASE of its lease; EAGAIN answer
    times go to ``ph``. A ClientError closes ``c`` (the next call reconnects)."""
    from certd import client as clientmod
    t0 = time.monotonic()
    try:
        r = c.get(vm_id, NPAGES)
        got = time.monotonic() - t0
        if r.ret == wire.EAGAIN:
            ph.eagain_times.append(got)
        if r.lease_id:
            c.release(r.lease_id)
        return Op(t0, time.monotonic() - t0, r.ret, get_s=got)
    except clientmod.ClientError as e:
        c.close()
        return Op(t0, time.monotonic() - t0, None, type(e).__name__
                  + (f":{wire.ErrorCode(e.code).name}" if e.code else ""))


def ticks(first: float, period: float, end: float):
    """Sleep to ``first`` s from now, then every ``period`` s; yields 1, 2, ... until ``end``."""
    nxt = time.monotonic() + first
    k = 0
    while True:
        time.sleep(max(0.0, nxt - time.monotonic()))
        if time.monotonic() >= end:
            return
        nxt += period
        k += 1
        yield k


def good_vm(c, ph: Phase, end: float, period: float = 0.025) -> None:
    """``c``: the good VM's Client, connected before the attacks began (a running VM)."""
    for _ in ticks(0.0, period, end):
        ph.good.append(get_release(c, "good-vm", ph))


def newcomers(sock: str, ph: Phase, end: float, tag: str, period: float = 2.0) -> None:
    from certd import client as clientmod
    for k in ticks(0.5, period, end):
        c = clientmod.Client(sock, timeout=10)
        try:
            ph.newcomers.append(get_release(c, f"new-{tag}-{k}", ph))
        finally:
            c.close()


def _certctl_lock(blob: Path, *cmd: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "certctl"), "lock", "--blob", str(blob), "--exclusive",
                             "--timeout", "20", "--json", "--", *cmd], stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


def updater(blob: Path, ph: Phase, end: float, period: float = 5.0) -> None:
    for _ in ticks(1.0, period, end):
        t0 = time.monotonic()
        p = _certctl_lock(blob, "true")
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            ph.updater.append({"ok": False, "error": "no exit within 30 s"})
            continue
        t1 = time.monotonic()
        try:
            j = json.loads(out)
        except ValueError:
            ph.updater.append({"ok": False, "rc": p.returncode, "error": err.strip()[-200:]})
            continue
        ph.updater.append({"ok": p.returncode == 0, "waited_s": j.get("waited_s"),
                           "wall_s": t1 - t0})
        # the exclusive hold lies between the wait's end and the process's exit
        ph.windows.append((t0 + (j.get("waited_s") or 0.0), t1))


def deadline_probe(c, blob: Path, ph: Phase, end: float, period: float = 5.0) -> None:
    """``c``: the probe VM's Client, connected before the attacks (like the good VM)."""
    for k in ticks(3.5, period, end):
        p = _certctl_lock(blob, "sh", "-c", "echo held; exec sleep 0.4")
        t_held = time.monotonic()
        try:
            line = p.stdout.readline()  # "held": the exclusive lock is ours now
            t_held = time.monotonic()
            if line.strip() != "held":
                ph.probes.append(Op(t_held, 0.0, None, "certctl did not hold the lock"))
                continue
            ph.probes.append(get_release(c, f"probe-{k}", ph))
        finally:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            ph.windows.append((t_held, time.monotonic()))


def measure(d, ph: Phase, seconds: float, tag: str, good, probe) -> None:
    """Run the measured clients for ``seconds`` (threads; each bounded by the same end).
    ``good``/``probe``: the long-running VMs' Clients (kept across phases)."""
    log0 = d.log_path.stat().st_size
    cpu0 = cpu_seconds(d.proc.pid)
    t0 = time.monotonic()
    end = t0 + seconds
    threads = [threading.Thread(target=good_vm, args=(good, ph, end)),
               threading.Thread(target=newcomers, args=(d.socket, ph, end, tag)),
               threading.Thread(target=updater, args=(d.blob, ph, end)),
               threading.Thread(target=deadline_probe, args=(probe, d.blob, ph, end))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
        assert not t.is_alive(), f"a measured client of {ph.name} did not stop"
    ph.seconds = time.monotonic() - t0
    ph.cpu_s = cpu_seconds(d.proc.pid) - cpu0
    ph.rss_kib = rss_kib(d.proc.pid)
    with open(d.log_path, "rb") as f:
        f.seek(log0)
        data = f.read()
    ph.log_bytes, ph.log_lines = len(data), data.count(b"\n")


# --------------------------------------------------------------------------- report

def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def explained(op: Op, windows: list[tuple[float, float]]) -> bool:
    lo, hi = op.t, op.t + op.dt
    return any(lo <= w1 + DEADLINE_MS / 1000 and hi >= w0 for w0, w1 in windows)


def summarize(ph: Phase) -> dict:
    ok = [o.dt for o in ph.good if o.ret == wire.RET_OK]
    # the good VM's ops that did not overlap an update (updater/probe exclusive hold): what
    # the attacks alone cost
    clean = [o.dt for o in ph.good if o.ret == wire.RET_OK and not explained(o, ph.windows)]
    eagain = [o for o in ph.good if o.ret == wire.EAGAIN]
    fail = [o for o in ph.good if o.ret not in (wire.RET_OK, wire.EAGAIN)]
    new_ok = [o for o in ph.newcomers if o.ret == wire.RET_OK]
    waits = [u["waited_s"] for u in ph.updater if u.get("waited_s") is not None]
    probe = [o.get_s for o in ph.probes if o.ret == wire.EAGAIN]
    return {
        "phase": ph.name, "seconds": round(ph.seconds, 2),
        "good_ops": len(ph.good), "good_ok": len(ok),
        "good_p50_ms": pct(ok, 0.5) * 1e3, "good_p99_ms": pct(ok, 0.99) * 1e3,
        "good_max_ms": max(ok, default=float("nan")) * 1e3,
        "good_clean_ops": len(clean),
        "good_clean_p50_ms": pct(clean, 0.5) * 1e3, "good_clean_p99_ms": pct(clean, 0.99) * 1e3,
        "good_eagain": len(eagain),
        "good_eagain_unexplained": sum(not explained(o, ph.windows) for o in eagain),
        "good_failed": len(fail),
        "good_fail_kinds": sorted({o.err or f"ret {o.ret}" for o in fail}),
        "newcomers": len(ph.newcomers), "newcomers_ok": len(new_ok),
        "newcomer_fail_kinds": sorted({o.err or f"ret {o.ret}" for o in ph.newcomers
                                       if o.ret != wire.RET_OK}),
        "updater_runs": len(ph.updater), "updater_ok": sum(u.get("ok", False) for u in ph.updater),
        "updater_wait_median_ms": statistics.median(waits) * 1e3 if waits else float("nan"),
        "updater_wait_max_ms": max(waits, default=float("nan")) * 1e3,
        "probes": len(ph.probes), "probe_eagain": len(probe),
        "probe_eagain_median_ms": statistics.median(probe) * 1e3 if probe else float("nan"),
        "probe_eagain_max_ms": max(probe, default=float("nan")) * 1e3,
        "eagain_answers": len(ph.eagain_times),
        "eagain_answer_max_ms": max(ph.eagain_times, default=float("nan")) * 1e3,
        "log_bytes_per_min": ph.log_bytes / ph.seconds * 60 if ph.seconds else 0,
        "log_lines_per_min": ph.log_lines / ph.seconds * 60 if ph.seconds else 0,
        "daemon_cpu_cores": ph.cpu_s / ph.seconds if ph.seconds else 0,
        "daemon_rss_mib": ph.rss_kib / 1024,
    }


def table(base: dict, att: dict, attackers: dict) -> str:
    f = lambda x, n=2: "n/a" if x != x else f"{x:.{n}f}"  # noqa: E731  (NaN -> n/a)
    r = lambda k: att[k] / base[k] if base[k] else float("nan")  # noqa: E731
    ratio99, ratio50, clean99 = r("good_p99_ms"), r("good_p50_ms"), r("good_clean_p99_ms")
    eag = att["good_eagain"] / att["good_ops"] * 100 if att["good_ops"] else float("nan")
    late = att["eagain_answer_max_ms"] - DEADLINE_MS
    rows = [
        ("good VM GET+RELEASE p99 under the attacks / unloaded, outside updates",
         f"{f(clean99)}x ({f(att['good_clean_p99_ms'])} ms vs {f(base['good_clean_p99_ms'])} ms;"
         f" {att['good_clean_ops']} and {base['good_clean_ops']} ops)", "<= 5x"),
        ("good VM GET+RELEASE p99 under the attacks / unloaded, all ops",
         f"{f(ratio99)}x ({f(att['good_p99_ms'])} ms vs {f(base['good_p99_ms'])} ms)", "-"),
        ("good VM GET+RELEASE p50 under the attacks / unloaded",
         f"{f(ratio50)}x ({f(att['good_p50_ms'])} ms vs {f(base['good_p50_ms'])} ms)", "-"),
        ("good VM EAGAIN under the attacks",
         f"{att['good_eagain']} of {att['good_ops']} ({f(eag, 1)} %), "
         f"{att['good_eagain_unexplained']} outside an update window "
         f"(unloaded: {base['good_eagain']}, {base['good_eagain_unexplained']}); "
         f"failed {att['good_failed']} {att['good_fail_kinds'] or ''}",
         "no EAGAIN beyond what a short update causes"),
        ("new VMs connecting during the attacks (one every 2 s)",
         f"{att['newcomers_ok']} of {att['newcomers']} "
         f"{att['newcomer_fail_kinds'] or ''}", "all"),
        ("updater (certctl lock --exclusive -- true) wait, median / max",
         f"{f(att['updater_wait_median_ms'], 1)} / {f(att['updater_wait_max_ms'], 1)} ms "
         f"({att['updater_ok']} of {att['updater_runs']} ok; unloaded "
         f"{f(base['updater_wait_median_ms'], 1)} / {f(base['updater_wait_max_ms'], 1)} ms)",
         "-"),
        ("log volume under the attacks",
         f"{f(att['log_bytes_per_min'] / 1e6, 3)} MB/min, {f(att['log_lines_per_min'], 0)} "
         f"lines/min (unloaded {f(base['log_bytes_per_min'] / 1e6, 3)} MB/min)",
         "bounded: <= 1 line/s per peer and refusal class"),
        ("EAGAIN answer time vs the 100 ms deadline (probe in a 0.4 s update)",
         f"probe median {f(att['probe_eagain_median_ms'], 1)} ms, max "
         f"{f(att['probe_eagain_max_ms'], 1)} ms ({att['probe_eagain']} of {att['probes']}); "
         f"slowest EAGAIN of any measured client {f(att['eagain_answer_max_ms'], 1)} ms "
         f"({f(late, 1)} ms past the deadline; unloaded probe max "
         f"{f(base['probe_eagain_max_ms'], 1)} ms)", "within 10 ms of the deadline"),
        ("certd CPU (cores) / RSS at the end of the phase",
         f"{f(att['daemon_cpu_cores'])} / {f(att['daemon_rss_mib'], 1)} MiB (unloaded "
         f"{f(base['daemon_cpu_cores'])} / {f(base['daemon_rss_mib'], 1)} MiB)", "-"),
    ]
    w0 = max(len(r[0]) for r in rows)
    lines = [f"| {'measured':{w0}} | value | target |", f"|{'-' * (w0 + 2)}|---|---|"]
    lines += [f"| {a:{w0}} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    lines.append("attackers: " + "; ".join(f"{k}: {json.dumps(v, sort_keys=True)}"
                                             for k, v in attackers.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def run_attackers(a: argparse.Namespace, sock: str, seconds: float) -> dict[str, subprocess.Popen]:
    procs = {}
    for kind in sorted(a.attacks, key=ATTACKS.index):
        argv = [sys.executable, str(Path(__file__).resolve()), "--attack", kind,
                "--socket", sock, "--seconds", str(seconds), "--idle", str(a.idle),
                "--slowloris", str(a.slowloris), "--hoarders", str(a.hoarders),
                "--deaf", str(a.deaf), "--slow-interval", str(a.slow_interval),
                "--reconnect-s", str(a.reconnect_s)]
        procs[kind] = p = subprocess.Popen(["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--",
                                            *argv], stdout=subprocess.PIPE, text=True)
        # "ready" once it has its connections (at most 15 s); EOF if it died
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} attacker did not start (exit {p.poll()})")
    return procs


def stop_procs(procs: dict[str, subprocess.Popen], timeout: float) -> dict:
    """SIGTERM each attacker (it stops and prints its counters), then collect them; kill
    what does not exit within ``timeout`` s."""
    out = {}
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for kind, p in procs.items():
        try:
            o, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, _ = p.communicate(timeout=10)
        try:
            out[kind] = json.loads(o.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[kind] = {"rc": p.returncode}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="attack window (default 60)")
    ap.add_argument("--baseline-seconds", type=float, default=15.0,
                    help="unloaded window before the attacks (default 15)")
    ap.add_argument("--ramp-seconds", type=float, default=10.0,
                    help="attacks run this long before measuring starts (default 10)")
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--hoarders", type=int, default=32)
    ap.add_argument("--deaf", type=int, default=32)
    ap.add_argument("--slow-interval", type=float, default=2.0)
    ap.add_argument("--reconnect-s", type=float, default=5.0,
                    help="an attacker whose connection the daemon closed reconnects after this")
    ap.add_argument("--attacks", default=",".join(ATTACKS),
                    help=f"comma-separated subset of {','.join(ATTACKS)}")
    ap.add_argument("--server-keys", default="", help="extra [server] keys, k=v,k=v "
                                                      "(default: production defaults)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep", metavar="DIR", help="keep the daemon's directory (log, config)")
    ap.add_argument("--attack", choices=ATTACKS, help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.attacks = [x for x in a.attacks.split(",") if x]
    if a.attack:  # an attacker process
        raise_nofile()
        stats = asyncio.run(attacker_main(a.attack, a.socket, a.seconds, a))
        print(json.dumps(stats), flush=True)
        return 0

    print(f"fd limit {raise_nofile()}", flush=True)
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="certd-hostile-"))
    d = None
    procs: dict[str, subprocess.Popen] = {}
    try:
        d = start_daemon(tmp / "d", parse_keys(a.server_keys))
        print(f"certd pid {d.proc.pid}; unloaded {a.baseline_seconds:g} s", flush=True)
        from certd import client as clientmod
        good = clientmod.Client(d.socket, timeout=10)
        probe = clientmod.Client(d.socket, timeout=10)
        good.connect()
        probe.connect()
        base = Phase("unloaded")
        measure(d, base, a.baseline_seconds, "base", good, probe)
        print(f"attacks {','.join(a.attacks)}: ramp {a.ramp_seconds:g} s, "
              f"measure {a.seconds:g} s", flush=True)
        # they run until stopped after the measurement (the bound: 15 s per start, the ramp,
        # the window and a margin)
        procs = run_attackers(a, d.socket, 15 * len(a.attacks) + a.ramp_seconds + a.seconds
                              + 30)
        time.sleep(a.ramp_seconds)  # the attackers' own ramp (no event marks "all connected")
        from tests.daemon_support import fd_count, status_of
        try:
            st = status_of(d.socket)
            ramp = {"connections": st.get("connections"), "leases": st.get("leases")}
        except Exception as e:  # the daemon refusing us is a finding, not a crash
            ramp = {"status_error": repr(e)}
        ramp["daemon_fds"] = fd_count(d.proc.pid)
        print(f"after the ramp: {ramp}", flush=True)
        att = Phase("attacked")
        measure(d, att, a.seconds, "att", good, probe)
        good.close()
        probe.close()
        attackers = stop_procs(procs, 30)
        procs = {}
        bs, at = summarize(base), summarize(att)
        print(table(bs, at, attackers))
        if a.json:
            raw = {ph.name: {"good": [(o.t, o.dt, o.ret, o.err) for o in ph.good],
                             "windows": ph.windows} for ph in (base, att)}
            Path(a.json).write_text(json.dumps({"unloaded": bs, "attacked": at, "ramp": ramp,
                                                "attackers": attackers, "raw": raw}, indent=1))
        alive = d.proc.poll() is None
        print(f"certd still running at the end: {alive}", flush=True)
        return 0 if alive else 1
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if d is not None:
            d.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
