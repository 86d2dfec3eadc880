"""Who may talk to certd, and how often: SO_PEERCRED allow-list and per-VM rate limits.

Credentials are read once per connection. They are those of the process that called
connect(), which is what we want: the connector vouches for the connection.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

_UCRED = struct.Struct("3i")
# Not exported by Python 3.11's socket module; value from <asm-generic/socket.h>.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    size = 64 * 4
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == 34:  # ERANGE: the peer is in more groups than fit
                size *= 4
                continue
            return ()  # kernel without SO_PEERGROUPS: primary gid only
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


@dataclass(frozen=True)
class AllowList:
    uids: frozenset[int] = frozenset({0})
    gids: frozenset[int] = frozenset()

    def permits(self, peer: Peer) -> bool:
        if peer.uid in self.uids:
            return True
        return peer.gid in self.gids or any(g in self.gids for g in peer.groups)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """Token bucket per VM id: ``rate`` requests per second, bursts up to ``burst``.

    A guest retries every 2 s on EAGAIN, so a sane VMM stays far below any sensible rate;
    the limit exists to keep one misbehaving VMM from crowding out the others.
    """

    rate: float
    burst: float
    max_keys: int = 100_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        if now is None:
            now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            b = self._buckets[key] = _Bucket(self.burst, now)
        else:
            tokens = b.tokens + (now - b.stamp) * self.rate
            b.tokens = tokens if tokens < self.burst else self.burst
            b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def _forget_full(self, now: float) -> None:
        # Buckets that have refilled carry no information: drop them to bound memory.
        refill = self.burst / self.rate
        for k in [k for k, b in self._buckets.items() if now - b.stamp >= refill]:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()
