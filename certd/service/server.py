"""The socket face: where a VMM's request enters certd.

``Connection`` is thin asyncio glue (BufferedProtocol: the platform notes measured it at
2-3x a plain Protocol) around the sans-IO codec in :mod:`certd.abi.wire`. ``CertServer``
holds what connections share: profiles, leases, limits, counters.

A GET is answered synchronously when a hold is available (the common case); only when an
updater is at work does it become a task that waits, without blocking the loop, until the
request deadline and then answers EAGAIN. EIO is never sent: nothing here is permanent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from certd import __version__, faults, logs
from certd.abi import table, wire
from certd.service import access, health, metrics
from certd.service.leases import Lease, LeaseTable, SharedHold
from certd.service.profiles import BUSY, EMPTY, Profile, ProfileSet

log = structlog.get_logger("certd.server")

#: One receive buffer for every connection: asyncio fills it and calls buffer_updated at
#: once, whose decoder copies what it gets, so no connection needs a buffer of its own
#: (an idle VM then costs a few KiB, not 64 KiB).
_RECV_BUFFER = 65536
_SHARED_RECV = memoryview(bytearray(_RECV_BUFFER))
#: Frames one connection has answered in one loop turn (see Connection._drain). A VMM
#: sends one request per vCPU exit; only a pipelining client ever reaches this.
FRAMES_PER_TURN = 32
#: GETs over the rate limit in a row (none served in between) after which a connection's
#: reading pauses for the wait its refusals named (see Connection._cool_down).
OVER_RATE_BEFORE_COOLDOWN = 16
_PAUSED_FOR_WRITES, _PAUSED_FOR_TURN, _PAUSED_FOR_RATE = 1, 2, 4
_RELEASED, _UNKNOWN, _EXPIRED = (int(r) for r in (wire.ReleaseResult.RELEASED,
                                                  wire.ReleaseResult.UNKNOWN,
                                                  wire.ReleaseResult.EXPIRED))
_RELEASE_NAMES = {int(r): r.name.lower() for r in wire.ReleaseResult}
#: A process whose leases stopped timing out this long ago is no longer a hoarder.
HOARDER_MEMORY = 600.0
#: How many hoarding processes are remembered (the most recent).
MAX_HOARDERS = 4096

#: A GET that arrives within this long of the last decision on its profile (the loop is
#: busy) is decided together with the other such GETs of this event-loop turn, at its
#: end: one decision, with its inode check, for a turn's worth of GETs instead of one
#: each (a system call costs about 2.5 µs here, half a GET's own work), and made after
#: every one of their frames arrived, so it is as fresh for each as a decision of its own.
#: At 16 busy connections 200 µs leaves one decision per 4 GETs (50 µs: one per 3; the
#: ratio to the raw ceiling went 0.57 -> 0.61); a lone VM's GET then waits for the end of
#: its turn, a few µs (its p50 did not move measurably: about 150 µs either way).
BATCH_WINDOW = 200e-6
# The hot answers' metrics, looked up once: each is one histogram observe.
_GET_OK = metrics.recorder("get", "ok")
_RELEASE_ANSWERED = {r: metrics.recorder("release", name) for r, name in _RELEASE_NAMES.items()}


@dataclass
class Limits:
    request_deadline: float = 0.100
    lease_timeout: float = 2.0
    idle_timeout: float = 300.0
    max_frame: int = wire.MAX_REQUEST_FRAME
    max_leases_per_connection: int = 16
    max_requests_in_flight: int = 64
    max_connections: int = 1024
    #: Connections one process may have open (a VMM needs one per VM at most).
    max_connections_per_pid: int = 64
    #: Live leases one VM id may hold (a guest has one request in flight per VMPL).
    max_leases_per_vm: int = 4
    #: A connection that has sent part of a frame must complete it within this time.
    frame_timeout: float = 3.0
    #: While an update (or a hold's drain) waits for readers, a lease of a hoarder (a
    #: client process that let a lease time out before) ends after this long. See
    #: CertServer.cut_hoarders.
    hoarder_grace: float = 0.05


@dataclass
class Counters:
    gets: int = 0
    served: int = 0
    empty: int = 0
    enospc: int = 0
    eagain: int = 0
    releases: int = 0
    refused: int = 0
    rate_limited: int = 0
    cooled_down: int = 0  # connections paused for sending on over the rate limit
    protocol_errors: int = 0
    connections: int = 0


@dataclass(eq=False)
class CertServer:
    profiles: ProfileSet
    limits: Limits = field(default_factory=Limits)
    allow: access.AllowList = field(default_factory=access.AllowList)
    rate: access.RateLimiter = field(default_factory=lambda: access.RateLimiter(50, 100))
    counters: Counters = field(default_factory=Counters)
    event_loop: str = "asyncio"  # what the daemon runs on (server.event_loop), for STATUS
    connections: set["Connection"] = field(default_factory=set)
    accepting: bool = True
    #: Refusals and protocol errors log at most once a second per peer and kind.
    log_limit: logs.RateLimited = field(default_factory=logs.RateLimited)
    started: float = field(default_factory=time.monotonic)
    leases: LeaseTable = field(init=False)
    per_pid: dict[int, int] = field(default_factory=dict)
    _sweeper: asyncio.TimerHandle | None = None
    #: Processes (pid, or the connection without one) that let a lease time out: when
    #: they last did (time.monotonic()). See cut_hoarders.
    hoarders: dict[object, float] = field(default_factory=dict)
    _hoard_timer: asyncio.Handle | None = None
    #: GETs waiting for the end of this loop turn, by profile (see BATCH_WINDOW).
    _deferred: dict[Profile, list[tuple["Connection", wire.Get, float]]] = \
        field(default_factory=dict)

    def __post_init__(self) -> None:
        self.leases = LeaseTable(self.limits.lease_timeout, on_expire=self._lease_expired)

    def protocol(self) -> "Connection":
        return Connection(self)

    # -- admission: a newcomer always gets in while someone idle can make room

    def admit(self, conn: "Connection") -> str | None:
        """Register ``conn``, or say why not. At the connection limit the longest-idle
        connection without leases or waiting requests (a stalled partial frame first) is
        closed to make room: idle holders cannot lock new VMs out."""
        lim = self.limits
        pid = conn.peer.pid if conn.peer else None
        if pid is not None and self.per_pid.get(pid, 0) >= lim.max_connections_per_pid:
            return (f"process {pid} already has {lim.max_connections_per_pid} connections "
                    "(server.max_connections_per_pid)")
        if len(self.connections) >= lim.max_connections:
            victim = min((c for c in self.connections if not c.leases and not c.pending),
                         key=lambda c: (not c.partial_since, c.partial_since or c.last_active),
                         default=None)
            if victim is None:
                return (f"certd serves at most {lim.max_connections} connections and every "
                        "one has leases or requests in flight")
            victim.evict("closed to admit a new connection: this one was the longest idle")
        self.connections.add(conn)
        if pid is not None:
            self.per_pid[pid] = self.per_pid.get(pid, 0) + 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
        return None

    # -- GETs of one loop turn share one decision

    def defer(self, profile: Profile, conn: "Connection", msg: wire.Get) -> bool:
        """Decide ``msg`` at the end of this loop turn with the other GETs deferred there,
        if any are, or if the loop is busy (see BATCH_WINDOW); False: decide it now."""
        gets = self._deferred.get(profile)
        if gets is None:
            if conn.last_active - profile.decided_at >= BATCH_WINDOW:
                return False
            gets = self._deferred[profile] = []
            if len(self._deferred) == 1:
                conn.loop.call_soon(self._decide_deferred)
        gets.append((conn, msg, conn.last_active))
        return True

    def _decide_deferred(self) -> None:
        batches, self._deferred = self._deferred, {}
        for profile, gets in batches.items():
            self._decide_batch(profile, gets)

    def decide_deferred_of(self, conn: "Connection") -> None:
        """Decide ``conn``'s deferred GETs now: it is closing, and would lose the answers."""
        if not self._deferred:
            return
        for profile, gets in self._deferred.items():
            mine = [g for g in gets if g[0] is conn]
            if mine:
                gets[:] = [g for g in gets if g[0] is not conn]
                self._decide_batch(profile, mine)

    @staticmethod
    def _decide_batch(profile: Profile, gets: list[tuple["Connection", wire.Get, float]]) -> None:
        got = profile.lease_source()  # one decision, after every one of their frames arrived
        for conn, msg, started in gets:
            if conn.transport is not None:
                conn.decided(msg, profile, got, started)

    def forget(self, conn: "Connection") -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            pid = conn.peer.pid if conn.peer else None
            if pid is not None:
                n = self.per_pid.get(pid, 1) - 1
                if n:
                    self.per_pid[pid] = n
                else:
                    self.per_pid.pop(pid, None)

    def _sweep(self) -> None:
        """Once a second: close connections stuck inside a frame (slowloris)."""
        self._sweeper = None
        limit = time.monotonic() - self.limits.frame_timeout
        for c in [c for c in self.connections if c.partial_since and c.partial_since < limit]:
            c.evict(f"no whole frame within {self.limits.frame_timeout:g} s")
        if self.connections:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def _lease_expired(self, lease: Lease, cut_short: bool) -> None:
        conn = lease.owner
        if isinstance(conn, Connection):
            conn.leases -= 1
            conn.expired_ids[lease.id] = None
            if len(conn.expired_ids) > 1024:
                del conn.expired_ids[next(iter(conn.expired_ids))]
        if cut_short:
            if isinstance(conn, Connection):
                conn._note("hoard", "warning", "lease ended early", lease=lease.id,
                           vm=lease.vm_id, grace_s=self.limits.hoarder_grace,
                           why="an update or a drain waits for readers, and this process "
                               "let leases time out before (server.hoarder_grace_ms)")
            return
        log.info("lease expired", lease=lease.id, vm=lease.vm_id,
                 held_s=self.limits.lease_timeout,
                 why="no RELEASE within the lease timeout; shared lock dropped")
        if isinstance(conn, Connection):
            self._mark_hoarder(conn)

    # -- lease hoarders: what one can still do is bounded by the hoarder grace
    #
    # A VMM holds a lease until the guest's report is signed, a few milliseconds; certd
    # cannot know when that is, so an honest lease is never ended before the lease
    # timeout. A process that let a lease time out has broken that protocol once: from
    # then on (for HOARDER_MEMORY), while an update or the drain of an aged hold waits
    # for readers, its leases end after limits.hoarder_grace. So a hoarder delays an
    # update, or the GETs waiting for a drain, by at most 1.5 graces (50 ms: 75 ms, within
    # the 100 ms request deadline), not the lease timeout; honest VMMs keep the timeout.

    def _hoarder_key(self, conn: "Connection") -> object:
        return conn.peer.pid if conn.peer is not None else conn

    def is_hoarder(self, owner: object) -> bool:
        return isinstance(owner, Connection) and self._hoarder_key(owner) in self.hoarders

    def _mark_hoarder(self, conn: "Connection") -> None:
        key = self._hoarder_key(conn)
        self.hoarders.pop(key, None)
        self.hoarders[key] = time.monotonic()  # ordered: the oldest are forgotten first
        while len(self.hoarders) > MAX_HOARDERS:
            del self.hoarders[next(iter(self.hoarders))]
        if self._hoard_timer is None:  # not now: this runs inside the lease sweep
            self._hoard_timer = asyncio.get_running_loop().call_soon(self._hoard_tick)

    def _hoard_tick(self) -> None:
        """Every half grace while hoarders are remembered: cut theirs if readers are awaited."""
        self._hoard_timer = None
        now = time.monotonic()
        for key in [k for k, seen in self.hoarders.items() if now - seen > HOARDER_MEMORY]:
            del self.hoarders[key]
        if not self.hoarders:
            return
        if self.leases.live and any(p.readers_awaited() for p in self.profiles):
            self.cut_hoarders()
        self._hoard_timer = asyncio.get_running_loop().call_later(
            self.limits.hoarder_grace / 2, self._hoard_tick)

    def cut_hoarders(self) -> int:
        """End hoarders' leases older than the hoarder grace; how many."""
        if faults.unsafe("hoarder-cut"):
            return 0
        # A lease granted one grace ago has this deadline (deadline = granted + timeout).
        latest = asyncio.get_running_loop().time() - self.limits.hoarder_grace \
            + self.leases.timeout
        due = [lease for lease in self.leases.live.values()
               if lease.deadline <= latest and self.is_hoarder(lease.owner)]
        self.leases.cut(due)
        return len(due)

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "accepting": self.accepting,
            "connections": len(self.connections),
            "leases": len(self.leases.live),
            "leases_expired": self.leases.expired,
            "leases_cut_short": self.leases.cut_short,
            "event_loop": self.event_loop,
            "counters": vars(self.counters).copy(),
            "profiles": [
                {"name": p.name, "blob": p.blob_path, "generation": p.generation,
                 "size": 0 if p.served == table.EMPTY_TABLE else len(p.served),
                 "npages": table.npages(len(p.served)),
                 **health.status_fields(p),  # state, leaf_not_after, crl_next_update
                 "problems": [str(x) for x in p.problems],
                 "vms": list(p.patterns)}
                for p in self.profiles],
            "limits": vars(self.limits).copy(),
        }

    def close_all(self) -> None:
        if self._hoard_timer is not None:
            self._hoard_timer.cancel()
            self._hoard_timer = None
        for conn in list(self.connections):
            conn.close()


class Connection(asyncio.BufferedProtocol):
    __slots__ = ("server", "transport", "decoder", "peer", "allowed", "leases", "partial_since",
                 "expired_ids", "pending", "idle", "last_active", "log", "loop", "debug",
                 "_out", "_paused", "_over_rate")

    def __init__(self, server: CertServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = wire.Decoder(wire.REQUESTS, max_frame=server.limits.max_frame)
        self.peer: access.Peer | None = None
        self.allowed = False
        self.leases = 0
        self.expired_ids: dict[int, None] = {}  # ordered: the oldest are forgotten first
        self.pending: dict[int, asyncio.Task] = {}
        self.idle: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.partial_since = 0.0  # when the unfinished frame in the decoder began
        self.log = log
        self.debug = False  # whether debug lines are logged (a filtered call still costs)
        #: Answers held back while one read's several frames are handled: one write for
        #: them all, not one system call each (a pipelining client). None: write at once.
        self._out: list[bytes] | None = None
        self._paused = 0  # why reading is paused: a set of _PAUSED_FOR_* bits
        self._over_rate = 0  # GETs refused for the rate limit since the last one served
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set when connected

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self.loop = asyncio.get_running_loop()
        srv = self.server
        srv.counters.connections += 1
        try:
            self.peer = access.peer_of(transport.get_extra_info("socket"))
        except OSError as e:
            self.peer = None
            log.warning("peer credentials unavailable", error=str(e))
        self.allowed = self.peer is not None and srv.allow.permits(self.peer)
        self.log = log.bind(peer_pid=self.peer.pid if self.peer else None,
                            peer_uid=self.peer.uid if self.peer else None)
        self.debug = self.log.is_enabled_for(logging.DEBUG)
        self.last_active = time.monotonic()
        refused = srv.admit(self)
        if refused is not None:
            self._note("connections", "warning", "connection refused", why=refused)
            self._fail(0, wire.ErrorCode.TOO_MANY_CONNECTIONS, refused)
            return
        self.idle = self.loop.call_later(srv.limits.idle_timeout, self._idle_check)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED_RECV

    def buffer_updated(self, nbytes: int) -> None:
        # A timestamp per read; one idle timer per connection re-arms itself from it
        # (cheaper than cancelling and re-creating a timer on every frame).
        self.last_active = time.monotonic()
        dec = self.decoder
        data = _SHARED_RECV[:nbytes]
        try:
            msg = dec.whole(data)  # the common read, exactly one request: no buffering
        except wire.WireError as err:  # that one frame, consumed, had a bad payload
            self._wire_error(err)
            return
        if msg is not None:
            self.partial_since = 0.0
            self._request(msg)
            return
        dec.feed(data)
        self._drain()

    def _drain(self) -> None:
        """Answer the whole frames buffered, at most FRAMES_PER_TURN of them in this loop
        turn: a client pipelining thousands of frames in one read (a flood) must not make
        the turn long for every other VM. The rest wait for the next turn, with reading
        paused meanwhile (the decoder buffers no more than one read)."""
        if self.transport is None or self._cooling():
            return  # (a cool-down's end calls this again)
        dec = self.decoder
        self._out = []
        try:
            for _ in range(FRAMES_PER_TURN):
                try:
                    msg = dec.next()
                except wire.WireError as err:
                    if self._wire_error(err):
                        return
                    continue
                if msg is None:
                    if dec.buffered:
                        self.partial_since = self.partial_since or self.last_active
                    else:
                        self.partial_since = 0.0
                    self._reading(_PAUSED_FOR_TURN, True)
                    return
                if not self._request(msg) or self._cooling():
                    return
            self._reading(_PAUSED_FOR_TURN, False)
            self.loop.call_soon(self._drain)
        finally:
            self._flush()
            self._out = None

    def _request(self, msg: wire.Message) -> bool:
        """Answer one request; False once the connection is closed."""
        if not self.allowed:
            self._refuse(msg.request_id)
            return False
        try:
            if type(msg) is wire.Get:
                self._get(msg)
            elif type(msg) is wire.Release:
                self._release(msg)
            else:
                self._send(wire.encode_status_reply(msg.request_id, self.server.status()))
                metrics.request("status", "ok", time.monotonic() - self.last_active)
        except Exception as e:  # a bug: answer it and keep serving everyone else
            self.log.exception("request failed", request_id=msg.request_id,
                               type=type(msg).__name__)
            self._error(msg.request_id, wire.ErrorCode.INTERNAL,
                        f"certd failed on this request ({type(e).__name__}: {e}); "
                        "see its log")
        return self.transport is not None

    def _wire_error(self, err: wire.WireError) -> bool:
        """Answer a malformed frame; True if that closed the connection (fatal)."""
        if err.fatal:
            self.server.decide_deferred_of(self)  # the frames before it are answered first
        self.server.counters.protocol_errors += 1
        self._note("protocol", "info", "protocol error", error=str(err), fatal=err.fatal)
        self._send(wire.encode_wire_error(err))
        if err.fatal:
            self.close()
        return err.fatal

    def eof_received(self) -> bool | None:
        try:
            self.decoder.eof()
        except wire.WireError as err:
            self.server.counters.protocol_errors += 1
            self._note("protocol", "info", "protocol error", error=str(err), fatal=True)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.forget(self)
        ended = srv.leases.release_all(self)
        if ended:
            self.log.debug("connection closed with live leases", released=ended)
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()
        if self.idle is not None:
            self.idle.cancel()
        self.transport = None

    def pause_writing(self) -> None:
        # A peer that does not read its answers must not make us buffer without limit.
        self._reading(_PAUSED_FOR_WRITES, False)

    def resume_writing(self) -> None:
        self._reading(_PAUSED_FOR_WRITES, True)

    def _cool_down(self, seconds: float) -> None:
        """Read nothing more from this connection for ``seconds``: it kept sending GETs
        over its rate limit after being told to wait. Each was answered RATE_LIMITED; a
        closed-loop flood would otherwise take every CPU cycle the refusals free."""
        self._over_rate = 0
        if not self._cooling():
            self._reading(_PAUSED_FOR_RATE, False)
            self.loop.call_later(seconds, self._cooled)
            self.server.counters.cooled_down += 1

    def _cooling(self) -> bool:
        """Whether a cool-down is on: no frame of this connection is handled, not even
        those already read (a pipelining flood has thousands buffered)."""
        return bool(self._paused & _PAUSED_FOR_RATE)

    def _cooled(self) -> None:
        self._reading(_PAUSED_FOR_RATE, True)
        self._drain()  # the frames left buffered, if any

    def _reading(self, reason: int, on: bool) -> None:
        """Reading is paused while any reason (a bit) holds: the peer not reading our
        answers, frames left over for the next turn, or a cool-down."""
        was = self._paused
        self._paused = was & ~reason if on else was | reason
        if self.transport is None or bool(was) == bool(self._paused):
            return
        if self._paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- requests

    def _get(self, msg: wire.Get) -> None:
        srv = self.server
        srv.counters.gets += 1
        rid = msg.request_id
        if rid in self.pending:
            self._error(rid, wire.ErrorCode.BAD_REQUEST_ID,
                        f"request id {rid} is already in flight on this connection")
            return
        if not srv.accepting:
            self._reply_eagain(rid, msg.vm_id, "certd is shutting down")
            return
        if not srv.rate.allow(msg.vm_id, self.last_active):
            srv.counters.rate_limited += 1
            wait_ms = int(1000 / srv.rate.rate) + 1
            self._note("rate", "info", "request refused", vm=msg.vm_id, why="rate limit",
                          rate_per_s=srv.rate.rate)
            self._error(rid, wire.ErrorCode.RATE_LIMITED,
                        f"VM {msg.vm_id!r} exceeds {srv.rate.rate:g} requests/s", arg=wait_ms)
            self._over_rate += 1
            if self._over_rate >= OVER_RATE_BEFORE_COOLDOWN:
                self._cool_down(wait_ms / 1000)
            return
        self._over_rate = 0
        profile = srv.profiles.for_vm(msg.vm_id)
        if srv.defer(profile, self, msg):
            return
        self.decided(msg, profile, profile.lease_source(), self.last_active)

    def decided(self, msg: wire.Get, profile: Profile, got: SharedHold | str,
                started: float) -> None:
        """Answer ``msg`` by the decision ``got``: at once, or by waiting if BUSY."""
        srv = self.server
        rid = msg.request_id
        if got is BUSY:
            if len(self.pending) >= srv.limits.max_requests_in_flight:
                self._error(rid, wire.ErrorCode.TOO_MANY_REQUESTS,
                            "too many requests waiting on this connection",
                            arg=srv.limits.max_requests_in_flight)
                return
            deadline = srv.limits.request_deadline
            if msg.timeout_ms:
                deadline = min(deadline, msg.timeout_ms / 1000)
            task = self.loop.create_task(self._get_later(msg, profile, deadline, started))
            self.pending[rid] = task
            return
        self._answer(msg, profile, got, started)

    async def _get_later(self, msg: wire.Get, profile: Profile, wait: float,
                         started: float) -> None:
        """Wait for the decision to change (woken, not polling) until the deadline, which
        counts from when the request's frame arrived (``started``, time.monotonic)."""
        deadline = started + wait
        try:
            while True:
                await profile.changed(deadline - time.monotonic())
                got = profile.lease_source() if self.server.accepting else BUSY
                if got is not BUSY:
                    break
                if time.monotonic() >= deadline:
                    metrics.lock_wait("get", time.monotonic() - started)
                    self._reply_eagain(msg.request_id, msg.vm_id,
                                       "an update holds the certificate lock past the deadline",
                                       started)
                    return
            metrics.lock_wait("get", time.monotonic() - started)
            if self.transport is not None:
                self._answer(msg, profile, got, started)
        finally:
            self.pending.pop(msg.request_id, None)

    def _answer(self, msg: wire.Get, profile: Profile, got: SharedHold | str,
                started: float = 0.0) -> None:
        srv = self.server
        rid = msg.request_id
        took = time.monotonic() - (started or self.last_active)
        if got is EMPTY:
            srv.counters.empty += 1
            # Unconfigured or unusable: an empty table, as KVM itself writes. With no buffer
            # at all there is nothing to write, and still nothing to retry.
            empty = table.EMPTY_TABLE if msg.npages else b""
            self._send(wire.encode_get_reply(rid, wire.RET_OK, table.npages(len(empty)),
                                             profile.generation, 0, empty))
            metrics.request("get", "empty", took)
            self.log.debug("served empty table", vm=msg.vm_id, npages=msg.npages,
                           generation=profile.generation)
            return
        hold: SharedHold = got  # type: ignore[assignment]
        need = hold.npages
        if msg.npages < need:
            srv.counters.enospc += 1
            self._send(wire.encode_get_reply(rid, wire.ENOSPC, need, hold.generation))
            metrics.request("get", "enospc", took)
            self.log.debug("answered ENOSPC", vm=msg.vm_id, npages=msg.npages, need=need)
            return
        if srv.leases.per_vm.get(msg.vm_id, 0) >= srv.limits.max_leases_per_vm:
            self._note("vm-leases", "info", "request refused", vm=msg.vm_id,
                       why="too many leases for this VM", limit=srv.limits.max_leases_per_vm)
            self._error(rid, wire.ErrorCode.TOO_MANY_LEASES,
                        f"VM {msg.vm_id!r} has {srv.limits.max_leases_per_vm} live leases; "
                        "RELEASE them first", arg=srv.limits.max_leases_per_vm)
            return
        if self.leases >= srv.limits.max_leases_per_connection:
            # Here, after any wait: a GET that waited for an updater obeys the limit too.
            self._note("leases", "info", "request refused", vm=msg.vm_id, why="too many leases",
                          limit=srv.limits.max_leases_per_connection)
            self._error(rid, wire.ErrorCode.TOO_MANY_LEASES,
                        f"{self.leases} leases are live on this connection; RELEASE some first",
                        arg=srv.limits.max_leases_per_connection)
            return
        lease = srv.leases.grant(msg.vm_id, hold, self, self.loop)
        self.leases += 1
        srv.counters.served += 1
        self._sendv(wire.pack_get_reply_ok(rid, need, hold.generation, lease.id,
                                           len(hold.table)), hold.table)
        _GET_OK(took)
        if self.debug:
            self.log.debug("served", vm=msg.vm_id, npages=msg.npages, size=len(hold.table),
                           generation=hold.generation, lease=lease.id)

    def _reply_eagain(self, rid: int, vm_id: str, why: str, started: float = 0.0) -> None:
        self.server.counters.eagain += 1
        metrics.request("get", "eagain", time.monotonic() - (started or self.last_active))
        self.log.debug("answered EAGAIN", vm=vm_id, why=why)
        if self.transport is not None:
            self._send(wire.encode_get_reply(rid, wire.EAGAIN, 0, 0))

    def _release(self, msg: wire.Release) -> None:
        srv = self.server
        srv.counters.releases += 1
        lid = msg.lease_id
        if srv.leases.release(lid, self):
            self.leases -= 1
            result = _RELEASED
        elif self.expired_ids.pop(lid, 0) is None:
            result = _EXPIRED
        else:
            result = _UNKNOWN
        self._send(wire.pack_release_reply(msg.request_id, lid, result))
        _RELEASE_ANSWERED[result](time.monotonic() - self.last_active)

    # -- refusals and errors

    def _refuse(self, rid: int) -> None:
        srv = self.server
        srv.counters.refused += 1
        peer = self.peer.describe() if self.peer else "unknown peer"
        self._note("access", "warning", "connection refused", why="peer not in the allow-list",
                   allow_uids=sorted(srv.allow.uids), allow_gids=sorted(srv.allow.gids))
        self._fail(rid, wire.ErrorCode.ACCESS_DENIED,
                   f"{peer} is not allowed to use certd (see [access] in certd.toml)")

    def _error(self, rid: int, code: wire.ErrorCode, message: str, arg: int = 0) -> None:
        self._send(wire.encode_error(rid, code, message, arg=arg))
        metrics.error(code, "get", time.monotonic() - self.last_active)  # only GETs get here

    def _fail(self, rid: int, code: wire.ErrorCode, message: str) -> None:
        self._send(wire.encode_error(rid, code, message, closing=True))
        metrics.error(code)
        self.close()

    # -- plumbing

    def _note(self, kind: str, level: str, event: str, **kw: Any) -> None:
        """Log a refusal or protocol error at most once a second per peer and kind, with
        the count of lines suppressed since: a flooding client cannot flood the log."""
        p = self.peer
        suppressed = self.server.log_limit.allow((kind, p.pid if p else None,
                                                  p.uid if p else None))
        if suppressed is not None:
            getattr(self.log, level)(event, **kw, **({"suppressed": suppressed}
                                                      if suppressed else {}))

    def _send(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _sendv(self, head: bytes, body: bytes) -> None:
        if self._out is not None:
            self._out += (head, body)
        elif self.transport is not None:
            self.transport.writelines((head, body))

    def _flush(self) -> None:
        """Write the answers held back so far (before a close, which drops later writes)."""
        out = self._out
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            out.clear()

    def _idle_check(self) -> None:
        if self.transport is None:
            return
        limit = self.server.limits.idle_timeout
        left = self.last_active + limit - time.monotonic()
        if left > 0 or self.leases or self.pending:  # a VMM holding leases is not idle
            self.idle = self.loop.call_later(max(left, 1.0), self._idle_check)
            return
        self.log.info("closing idle connection", idle_s=self.server.limits.idle_timeout)
        self._fail(0, wire.ErrorCode.IDLE_TIMEOUT,
                   f"no request for {self.server.limits.idle_timeout:g} s")

    def evict(self, why: str) -> None:
        self._note("evict", "info", "closing connection", why=why)
        self._fail(0, wire.ErrorCode.IDLE_TIMEOUT, why)

    def close(self) -> None:
        if self.transport is not None:
            self.server.decide_deferred_of(self)
            self._flush()
            self.transport.close()
            # A closing connection no longer counts against the connection caps (its
            # transport may live on until its last answer is written: uvloop's does).
            self.server.forget(self)
