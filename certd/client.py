"""Python clients for the certd socket: blocking :class:`Client` and :class:`AsyncClient`.

Both speak :mod:`certd.abi.wire` over a Unix socket and act like a VMM would::

    with Client("/run/certd/certd.sock") as c:
        r = c.get("vm-42", npages=4)
        if r.ret == 0:
            ...write r.table to the guest buffer, let the report be signed...
            c.release(r.lease_id)

Leases belong to the connection that got them: closing the client releases every lease it
still holds (the daemon sees the close). A reply that arrives after its request timed out is
dropped, and if it granted a lease the client releases that lease at once, so an abandoned
request never pins the daemon's lock until the lease timeout.

Errors form one hierarchy under :class:`ClientError`:

- :class:`Unavailable`: no daemon at the path, the connection broke, the daemon is stopping
  or idle-closed us; :class:`RequestTimeout` (a subclass) when no answer came in time.
- :class:`Refused`: the daemon understood and said no (access control, rate or lease
  limits). ``code`` is the :class:`~certd.abi.wire.ErrorCode`, ``arg`` its argument
  (e.g. retry-after milliseconds for RATE_LIMITED).
- :class:`ProtocolError`: the daemon sent something malformed or unexpected, or refused our
  frame as malformed (a version mismatch or a bug on one side).
- :class:`InvalidRequest`: the arguments cannot be encoded (e.g. a vm id with a newline);
  also a ValueError.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass
from typing import Any

from certd.abi import wire
from certd.abi.wire import ErrorCode, ReleaseResult

DEFAULT_SOCKET = "/run/certd/certd.sock"
#: Seconds a request may take end to end before RequestTimeout.
DEFAULT_TIMEOUT = 5.0
_RECV_SIZE = 65536  # not 256 KiB: see python-platform-notes §5 on glibc and large recv()

__all__ = [
    "DEFAULT_SOCKET", "DEFAULT_TIMEOUT", "Client", "AsyncClient", "GetResult", "ReleaseResult",
    "ClientError", "Unavailable", "RequestTimeout", "Refused", "ProtocolError", "InvalidRequest",
]


class ClientError(Exception):
    def __init__(self, message: str, *, code: int | None = None, arg: int = 0):
        super().__init__(message)
        self.message = message
        self.code = code
        self.arg = arg


class Unavailable(ClientError):
    """The daemon cannot be reached or dropped the connection."""


class RequestTimeout(Unavailable):
    """No answer within the timeout."""


class Refused(ClientError):
    """The daemon refused the request (access control, rate limit, lease/request limits)."""


class ProtocolError(ClientError):
    """Malformed or unexpected data on the wire, from either side."""


class InvalidRequest(ClientError, ValueError):
    """The request's arguments cannot be put on the wire."""


_REFUSALS = frozenset({ErrorCode.ACCESS_DENIED, ErrorCode.RATE_LIMITED,
                       ErrorCode.TOO_MANY_LEASES, ErrorCode.TOO_MANY_REQUESTS,
                       ErrorCode.TOO_MANY_CONNECTIONS})
_UNAVAILABLE = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.IDLE_TIMEOUT, ErrorCode.INTERNAL})


def error_from_reply(err: wire.Error) -> ClientError:
    """Map a daemon ERROR frame to the ClientError subclass a caller acts on."""
    text = f"certd refused the request: {err.code_name}: {err.message}"
    if err.code in _REFUSALS:
        return Refused(text, code=err.code, arg=err.arg)
    if err.code in _UNAVAILABLE:
        return Unavailable(f"certd: {err.code_name}: {err.message}", code=err.code, arg=err.arg)
    return ProtocolError(f"certd rejected our frame: {err.code_name}: {err.message}",
                         code=err.code, arg=err.arg)


@dataclass(frozen=True)
class GetResult:
    """The answer to GET. ``ret`` is the value for kvm_run.snp_req_certs.ret; ``npages`` is
    the pages the table needs (for ENOSPC: the value for kvm_run.snp_req_certs.npages);
    ``lease_id`` is 0 when there is nothing to release."""

    ret: int
    npages: int
    generation: int
    lease_id: int
    table: bytes

    @property
    def ok(self) -> bool:
        return self.ret == wire.RET_OK

    @property
    def ret_name(self) -> str:
        return wire.RET_NAMES.get(self.ret, str(self.ret))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["table_len"] = len(d.pop("table"))
        d["ret_name"] = self.ret_name
        return d


_EXPECTED = {wire.Get: wire.GetReply, wire.Release: wire.ReleaseReply,
             wire.Status: wire.StatusReply}


def _connect_error(path: str, e: OSError) -> ClientError:
    if isinstance(e, PermissionError):
        return Refused(f"permission denied connecting to {path} (socket mode/group)",
                       code=ErrorCode.ACCESS_DENIED)
    if isinstance(e, FileNotFoundError):
        return Unavailable(f"no certd socket at {path} (is certd running?)")
    if isinstance(e, ConnectionRefusedError) and os.path.exists(path) \
            and not stat.S_ISSOCK(os.stat(path).st_mode):
        return Unavailable(f"{path} is not a socket (give certd's socket, e.g. {DEFAULT_SOCKET})")
    if isinstance(e, ConnectionRefusedError):
        return Unavailable(f"nothing listens on {path} (connection refused)")
    return Unavailable(f"cannot connect to {path}: {e.strerror or e}")


def _check_reply(reply: wire.Message, expected: type) -> Any:
    if isinstance(reply, wire.Error):
        raise error_from_reply(reply)
    if type(reply) is not expected:
        raise ProtocolError(f"expected {expected.__name__} for request {reply.request_id}, "
                            f"got {type(reply).__name__}")
    return reply


def _to_result(r: wire.GetReply) -> GetResult:
    return GetResult(r.ret, r.npages, r.generation, r.lease_id, r.table)


class _Ids:
    """Request ids 1..2^32-1, wrapping; ids still in flight are skipped."""

    def __init__(self) -> None:
        self._it = itertools.cycle(range(1, wire.MAX_REQUEST_ID + 1))

    def next(self, *busy: Any) -> int:
        while True:
            rid = next(self._it)
            if not any(rid in b for b in busy):
                return rid


def _encode(build, *args) -> bytes:
    try:
        return build(*args)
    except wire.WireError as e:
        raise InvalidRequest(f"invalid request: {e.message}", code=e.code) from None


# --------------------------------------------------------------------------- sync

class Client:
    """Blocking client, one request at a time. Connects on first use (or ``connect()``)."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = DEFAULT_TIMEOUT):
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._dec = wire.Decoder(wire.REPLIES)
        self._ids = _Ids()
        self._abandoned: set[int] = set()  # timed-out GETs whose lease must be released

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
        except OSError as e:
            s.close()
            if isinstance(e, TimeoutError):
                raise RequestTimeout(f"connecting to {self.path} timed out") from None
            raise _connect_error(self.path, e) from None
        self._sock = s
        self._dec = wire.Decoder(wire.REPLIES)
        self._abandoned.clear()

    def close(self) -> None:
        """Close the connection; the daemon releases every lease it still holds for us."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, vm_id: str, npages: int, timeout: float | None = None, *,
            wait_ms: int = 0) -> GetResult:
        """GET the table for ``vm_id`` into a guest buffer of ``npages`` pages. ``wait_ms``
        is how long certd may wait for a valid table before EAGAIN (0: its default)."""
        rid = self._ids.next(self._abandoned)
        frame = _encode(wire.encode_get, rid, vm_id, npages, wait_ms)
        return _to_result(self._roundtrip(rid, frame, wire.GetReply, timeout))

    def release(self, lease_id: int, timeout: float | None = None) -> ReleaseResult:
        rid = self._ids.next(self._abandoned)
        frame = _encode(wire.encode_release, rid, lease_id)
        return self._roundtrip(rid, frame, wire.ReleaseReply, timeout).result

    def status(self, timeout: float | None = None) -> dict:
        rid = self._ids.next(self._abandoned)
        return self._roundtrip(rid, wire.encode_status(rid), wire.StatusReply, timeout).status

    def _roundtrip(self, rid: int, frame: bytes, expected: type, timeout: float | None) -> Any:
        self.connect()
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(frame)
        except OSError as e:
            # A half-sent frame would desynchronise the stream: drop the connection.
            self.close()
            if isinstance(e, TimeoutError):
                raise RequestTimeout(f"sending to {self.path} timed out") from None
            raise Unavailable(f"connection to {self.path} lost while sending: "
                              f"{e.strerror or e}") from None
        while True:
            reply = self._next_reply(rid, deadline, expected)
            if reply is not None:
                return _check_reply(reply, expected)

    def _next_reply(self, rid: int, deadline: float, expected: type) -> wire.Message | None:
        """One decoded frame for ``rid`` or a connection-level ERROR; None for frames that
        belong to abandoned requests (handled here)."""
        sock = self._sock
        assert sock is not None
        try:
            msg = self._dec.next()
        except wire.WireError as e:
            if e.fatal:
                self.close()
                raise ProtocolError(f"malformed data from certd: {e}", code=e.code) from None
            if e.request_id in (rid, 0):
                raise ProtocolError(f"malformed reply from certd: {e}", code=e.code) from None
            return None
        if msg is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abandoned.add(rid)
                raise RequestTimeout(f"no answer from certd at {self.path} in time "
                                     f"({expected.__name__} for request {rid})")
            try:
                sock.settimeout(remaining)
                data = sock.recv(_RECV_SIZE)
            except TimeoutError:
                self._abandoned.add(rid)
                raise RequestTimeout(f"no answer from certd at {self.path} in time "
                                     f"({expected.__name__} for request {rid})") from None
            except OSError as e:
                self.close()
                raise Unavailable(f"connection to {self.path} lost: {e.strerror or e}") from None
            if not data:
                self.close()
                raise Unavailable(f"certd closed the connection at {self.path}")
            self._dec.feed(data)
            return None
        if msg.request_id == rid or (msg.request_id == 0 and isinstance(msg, wire.Error)):
            if isinstance(msg, wire.Error) and msg.closing:
                self.close()
            return msg
        self._late_reply(msg)
        return None

    def _late_reply(self, msg: wire.Message) -> None:
        if msg.request_id not in self._abandoned:
            return  # e.g. the ack of a release we sent for an abandoned lease
        self._abandoned.discard(msg.request_id)
        if isinstance(msg, wire.GetReply) and msg.lease_id and self._sock is not None:
            rid = self._ids.next(self._abandoned)
            try:
                self._sock.sendall(wire.encode_release(rid, msg.lease_id))
            except OSError:
                self.close()


# --------------------------------------------------------------------------- async

class AsyncClient:
    """asyncio client; any number of requests may be in flight on the one connection
    (``asyncio.gather(c.get(...), c.get(...))``): answers are matched by request id."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = DEFAULT_TIMEOUT):
        self.path = str(path)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, type]] = {}
        self._abandoned: set[int] = set()
        self._ids = _Ids()
        self._broken: ClientError | None = None
        self._connecting: asyncio.Lock | None = None

    async def connect(self) -> None:
        if self._writer is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # concurrent first requests share one connection
            if self._writer is None:
                await self._open()

    async def _open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"connecting to {self.path} timed out") from None
        except OSError as e:
            raise _connect_error(self.path, e) from None
        self._broken = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        task, writer = self._task, self._writer
        self._task = self._writer = self._reader = None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass  # the peer reset first: nothing left to close
        self._fail_all(Unavailable("client closed"))
        self._broken = None  # a closed client may connect again

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get(self, vm_id: str, npages: int, timeout: float | None = None, *,
                  wait_ms: int = 0) -> GetResult:
        rid = self._ids.next(self._pending, self._abandoned)
        frame = _encode(wire.encode_get, rid, vm_id, npages, wait_ms)
        return _to_result(await self._roundtrip(rid, frame, wire.GetReply, timeout))

    async def release(self, lease_id: int, timeout: float | None = None) -> ReleaseResult:
        rid = self._ids.next(self._pending, self._abandoned)
        frame = _encode(wire.encode_release, rid, lease_id)
        return (await self._roundtrip(rid, frame, wire.ReleaseReply, timeout)).result

    async def status(self, timeout: float | None = None) -> dict:
        rid = self._ids.next(self._pending, self._abandoned)
        reply = await self._roundtrip(rid, wire.encode_status(rid), wire.StatusReply, timeout)
        return reply.status

    async def _roundtrip(self, rid: int, frame: bytes, expected: type,
                         timeout: float | None) -> Any:
        if self._broken is not None:
            # The connection is gone (its requests and leases failed with the reason):
            # start a fresh one, as the blocking client does.
            await self.close()
        await self.connect()
        assert self._writer is not None
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, expected)
        try:
            self._writer.write(frame)
            await asyncio.wait_for(self._drain_then(fut),
                                   self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            self._abandoned.add(rid)
            raise RequestTimeout(f"no answer from certd at {self.path} in time "
                                 f"({expected.__name__} for request {rid})") from None
        except (ConnectionError, BrokenPipeError) as e:
            raise Unavailable(f"connection to {self.path} lost: {e}") from None
        finally:
            self._pending.pop(rid, None)
        return _check_reply(fut.result(), expected)

    async def _drain_then(self, fut: asyncio.Future) -> None:
        assert self._writer is not None
        await self._writer.drain()
        await asyncio.shield(fut)

    def _fail_all(self, exc: ClientError) -> None:
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        dec = wire.Decoder(wire.REPLIES)
        final: ClientError = Unavailable(f"certd closed the connection at {self.path}")
        try:
            while True:
                try:
                    data = await reader.read(_RECV_SIZE)
                except OSError as e:
                    final = Unavailable(f"connection to {self.path} lost: {e.strerror or e}")
                    break
                if not data:
                    try:
                        dec.eof()
                    except wire.WireError as e:
                        final = ProtocolError(f"malformed data from certd: {e}", code=e.code)
                    break
                dec.feed(data)
                stop = self._dispatch(dec)
                if stop is not None:
                    final = stop
                    break
        finally:
            self._broken = final
            self._fail_all(final)
            if self._writer is not None:
                self._writer.close()

    def _dispatch(self, dec: wire.Decoder) -> ClientError | None:
        """Hand every complete reply to its waiter; return an error if the stream is over."""
        while True:
            try:
                msg = dec.next()
            except wire.WireError as e:
                err = ProtocolError(f"malformed reply from certd: {e}", code=e.code)
                if e.fatal:
                    return err
                entry = self._pending.get(e.request_id)
                if entry and not entry[0].done():
                    entry[0].set_exception(err)
                continue
            if msg is None:
                return None
            entry = self._pending.get(msg.request_id)
            if entry is not None:
                if not entry[0].done():
                    entry[0].set_result(msg)
            elif isinstance(msg, wire.Error) and msg.request_id == 0:
                exc = error_from_reply(msg)
                if msg.closing:
                    return exc
                self._fail_all(exc)
            elif msg.request_id in self._abandoned:
                self._abandoned.discard(msg.request_id)
                if isinstance(msg, wire.GetReply) and msg.lease_id and self._writer:
                    # Nobody will use this lease: give it back now rather than at timeout.
                    rid = self._ids.next(self._pending, self._abandoned)
                    self._writer.write(wire.encode_release(rid, msg.lease_id))
            if isinstance(msg, wire.Error) and msg.closing:
                return error_from_reply(msg)


#: The ret values a GetResult can carry (Linux x86 errno numbers, as KVM reads them).
RET_OK, ENOSPC, EAGAIN, EIO = wire.RET_OK, wire.ENOSPC, wire.EAGAIN, wire.EIO
