"""The certd socket protocol, sans-IO: frame encoders and a streaming decoder, no sockets.

Every frame is a fixed 16-byte header followed by a payload (all integers little-endian)::

    off 0   magic[4]    b"CRTD"
    off 4   u8  version 1
    off 5   u8  type    MsgType
    off 6   u16 flags   0 in version 1
    off 8   u32 request_id   chosen by the client, echoed in the answer (0 = connection-level)
    off 12  u32 length       payload bytes that follow the header

The header layout is frozen for every version, so a peer can always skip a frame it does
not understand and answer it. ``docs/protocol.md`` is the normative description (offset
tables, ret semantics, leases, versioning); this module is its implementation.

Decoding is total: :class:`Decoder` raises :class:`WireError` (carrying the ERROR code the
server answers with) on any malformed input and no other exception. A *fatal* WireError
(bad magic, oversized frame, truncated stream) means the byte stream cannot be resynchronised:
answer ERROR with ``closing`` and close. A non-fatal one concerns one complete frame, which
has already been consumed: answer ERROR with ``err.request_id`` and keep reading.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

MAGIC = b"CRTD"
VERSION = 1
#: Versions this implementation speaks; ERROR UNSUPPORTED_VERSION carries them as a bitmask.
SUPPORTED_VERSIONS = frozenset({VERSION})

HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size  # 16

#: Largest frame (header + payload) either side may send. Replies carry the table, which a
#: Linux guest caps at 16 KiB; 64 KiB leaves room without letting a peer make us buffer much.
MAX_FRAME = 64 * 1024
#: Largest request frame a server accepts: GET is 16 + 16 + 64 bytes, nothing needs more.
MAX_REQUEST_FRAME = 1024
MAX_VM_ID = 64
#: ERROR messages longer than this are cut by the encoder and refused by the decoder.
MAX_ERROR_MESSAGE = 1024
MAX_REQUEST_ID = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF
PAGE_SIZE = 4096

# Kernel errno values for kvm_run.snp_req_certs.ret (Linux x86): KVM_RUN fails with EINVAL
# on any other value, so the decoder refuses any other value too.
RET_OK = 0
EIO = 5
EAGAIN = 11
ENOSPC = 28
VALID_RETS = frozenset({RET_OK, EIO, EAGAIN, ENOSPC})
RET_NAMES = {RET_OK: "OK", EIO: "EIO", EAGAIN: "EAGAIN", ENOSPC: "ENOSPC"}


class MsgType(enum.IntEnum):
    GET = 0x01
    RELEASE = 0x02
    STATUS = 0x03
    GET_REPLY = 0x81
    RELEASE_REPLY = 0x82
    STATUS_REPLY = 0x83
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """ERROR frame codes. 1-15: protocol errors, 16-31: refusals, 32+: server condition."""

    BAD_MAGIC = 1            # fatal: not a certd frame, stream cannot be resynchronised
    FRAME_TOO_LARGE = 2      # fatal: length over the limit; arg = the limit in bytes
    TRUNCATED = 3            # fatal: the stream ended inside a frame
    UNSUPPORTED_VERSION = 4  # arg = bitmask of supported versions (bit v = version v)
    UNKNOWN_TYPE = 5         # type unknown, or not one this side accepts
    BAD_FLAGS = 6            # a header flag this version does not define is set
    BAD_PAYLOAD = 7          # payload length or a field is invalid for the type
    BAD_VM_ID = 8            # vm id empty, longer than MAX_VM_ID or not printable ASCII
    BAD_REQUEST_ID = 9       # request id 0, or already in flight on this connection
    ACCESS_DENIED = 16       # SO_PEERCRED not in the allow-list (closing)
    RATE_LIMITED = 17        # arg = milliseconds to wait before retrying
    TOO_MANY_LEASES = 18     # arg = the per-connection lease limit
    TOO_MANY_REQUESTS = 19   # arg = the per-connection in-flight limit
    TOO_MANY_CONNECTIONS = 20  # the daemon's connection limit is reached (closing)
    SHUTTING_DOWN = 32       # the daemon is stopping (closing)
    IDLE_TIMEOUT = 33        # the connection was idle too long (closing)
    INTERNAL = 34            # a bug in certd; the message says what


class ReleaseResult(enum.IntEnum):
    RELEASED = 0  # the lease was live and is now released
    UNKNOWN = 1   # no such lease on this connection (never granted, or already released)
    EXPIRED = 2   # the lease timed out before RELEASE: the lock was not held to the end


class WireError(ValueError):
    """Malformed or unencodable protocol data.

    ``code`` is the ERROR code to answer with, ``request_id`` the id of the offending frame
    (0 if unknown), ``fatal`` whether the stream is lost (answer, then close).
    """

    def __init__(self, code: ErrorCode, message: str, *, request_id: int = 0,
                 fatal: bool = False, arg: int = 0):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id
        self.fatal = fatal
        self.arg = arg

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# --------------------------------------------------------------------------- messages
#
# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ goes through
# object.__setattr__ per field (0.53 µs against 0.15 µs for a GET), and the server builds
# two messages per GET+RELEASE. Treat them as values all the same.

@dataclass(slots=True)
class Get:
    request_id: int
    vm_id: str
    npages: int
    #: How long certd may wait for a valid table before answering EAGAIN; 0 = its default.
    timeout_ms: int = 0


@dataclass(slots=True)
class Release:
    request_id: int
    lease_id: int


@dataclass(slots=True)
class Status:
    request_id: int


@dataclass(slots=True)
class GetReply:
    request_id: int
    ret: int
    npages: int
    generation: int
    lease_id: int
    table: bytes = b""


@dataclass(slots=True)
class ReleaseReply:
    request_id: int
    lease_id: int
    result: ReleaseResult


@dataclass(slots=True)
class StatusReply:
    request_id: int
    status: dict


@dataclass(slots=True)
class Error:
    request_id: int
    code: int  # an ErrorCode, or an unknown int from a newer peer
    message: str
    arg: int = 0
    closing: bool = False

    @property
    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


Request = Union[Get, Release, Status]
Reply = Union[GetReply, ReleaseReply, StatusReply, Error]
Message = Union[Request, Reply]

# --------------------------------------------------------------------------- layouts

_GET = struct.Struct("<QIHH")                 # npages, timeout_ms, reserved, vm_id_len
_RELEASE = struct.Struct("<Q")                # lease_id
_GET_REPLY = struct.Struct("<IIQQQII")        # ret, rsvd, npages, generation, lease, len, rsvd
_RELEASE_REPLY = struct.Struct("<QII")        # lease_id, result, reserved
_ERROR = struct.Struct("<HBBI")               # code, flags, reserved, arg
ERROR_CLOSING = 0x01

# Header and fixed payload packed in one call: the server's hot path.
_HDR_GET_REPLY = struct.Struct(HEADER.format + _GET_REPLY.format[1:])
_HDR_RELEASE_REPLY = struct.Struct(HEADER.format + _RELEASE_REPLY.format[1:])
_HDR_GET = struct.Struct(HEADER.format + _GET.format[1:])
_HDR_RELEASE = struct.Struct(HEADER.format + _RELEASE.format[1:])

GET_FIXED_SIZE = _GET.size                  # 16
GET_REPLY_FIXED_SIZE = _GET_REPLY.size      # 40
RELEASE_SIZE = _RELEASE.size                # 8
RELEASE_REPLY_SIZE = _RELEASE_REPLY.size    # 16
ERROR_FIXED_SIZE = _ERROR.size              # 8
#: Largest table a GET_REPLY can carry.
MAX_TABLE = MAX_FRAME - HEADER_SIZE - GET_REPLY_FIXED_SIZE

# bytes.translate(None, delete=_PRINTABLE) leaves only the non-printable bytes: a C-speed
# check with no per-byte Python loop.
_PRINTABLE = bytes(range(0x20, 0x7F))


def _check_rid(request_id: int, *, allow_zero: bool) -> None:
    if not isinstance(request_id, int) or not (0 <= request_id <= MAX_REQUEST_ID):
        raise WireError(ErrorCode.BAD_REQUEST_ID, f"request id {request_id!r} is not a u32")
    if request_id == 0 and not allow_zero:
        raise WireError(ErrorCode.BAD_REQUEST_ID, "request id 0 is reserved for "
                        "connection-level errors; requests use 1..2^32-1")


def _check_u(value: Any, bits: int, what: str) -> None:
    if not isinstance(value, int) or not (0 <= value < (1 << bits)):
        raise WireError(ErrorCode.BAD_PAYLOAD, f"{what} {value!r} is not a u{bits}")


def _vm_id_bytes(vm_id: str | bytes) -> bytes:
    if isinstance(vm_id, str):
        try:
            raw = vm_id.encode("ascii")
        except UnicodeEncodeError:
            raise WireError(ErrorCode.BAD_VM_ID,
                            f"vm id {vm_id!r} is not printable ASCII") from None
    elif isinstance(vm_id, (bytes, bytearray, memoryview)):
        raw = bytes(vm_id)
    else:
        raise WireError(ErrorCode.BAD_VM_ID, f"vm id must be str or bytes, not {type(vm_id).__name__}")
    _check_vm_id(raw, 0)
    return raw


def _check_vm_id(raw: bytes, rid: int) -> None:
    if not raw:
        raise WireError(ErrorCode.BAD_VM_ID, "vm id is empty", request_id=rid)
    if len(raw) > MAX_VM_ID:
        raise WireError(ErrorCode.BAD_VM_ID,
                        f"vm id is {len(raw)} bytes; at most {MAX_VM_ID} are allowed", request_id=rid)
    if raw.translate(None, _PRINTABLE):
        raise WireError(ErrorCode.BAD_VM_ID,
                        f"vm id {raw[:MAX_VM_ID]!r} has bytes outside printable ASCII 0x20-0x7e",
                        request_id=rid)


# --------------------------------------------------------------------------- encoders

def encode_get(request_id: int, vm_id: str | bytes, npages: int, timeout_ms: int = 0) -> bytes:
    _check_rid(request_id, allow_zero=False)
    raw = _vm_id_bytes(vm_id)
    _check_u(npages, 64, "npages")
    _check_u(timeout_ms, 32, "timeout_ms")
    return _HDR_GET.pack(MAGIC, VERSION, MsgType.GET, 0, request_id,
                         GET_FIXED_SIZE + len(raw), npages, timeout_ms, 0, len(raw)) + raw


def encode_release(request_id: int, lease_id: int) -> bytes:
    _check_rid(request_id, allow_zero=False)
    _check_u(lease_id, 64, "lease id")
    if lease_id == 0:
        raise WireError(ErrorCode.BAD_PAYLOAD, "lease id 0 means 'no lease'; nothing to release")
    return _HDR_RELEASE.pack(MAGIC, VERSION, MsgType.RELEASE, 0, request_id, RELEASE_SIZE,
                             lease_id)


def encode_status(request_id: int) -> bytes:
    _check_rid(request_id, allow_zero=False)
    return HEADER.pack(MAGIC, VERSION, MsgType.STATUS, 0, request_id, 0)


def get_reply_prefix(request_id: int, ret: int, npages: int, generation: int,
                     lease_id: int, table_len: int) -> bytes:
    """Header and fixed part of a GET_REPLY whose table follows: lets a server send
    ``[prefix, table]`` with writelines() without copying the table."""
    if ret not in VALID_RETS:
        raise WireError(ErrorCode.BAD_PAYLOAD,
                        f"ret {ret!r} is not one KVM accepts (0, EIO, EAGAIN, ENOSPC)")
    if ret != RET_OK and (table_len or lease_id):
        raise WireError(ErrorCode.BAD_PAYLOAD,
                        f"a {RET_NAMES[ret]} answer carries no table and no lease")
    if table_len > MAX_TABLE:
        raise WireError(ErrorCode.FRAME_TOO_LARGE,
                        f"table of {table_len} bytes exceeds the {MAX_TABLE}-byte limit")
    _check_rid(request_id, allow_zero=False)
    _check_u(npages, 64, "npages")
    _check_u(generation, 64, "generation")
    _check_u(lease_id, 64, "lease id")
    return _HDR_GET_REPLY.pack(MAGIC, VERSION, MsgType.GET_REPLY, 0, request_id,
                               GET_REPLY_FIXED_SIZE + table_len,
                               ret, 0, npages, generation, lease_id, table_len, 0)


def encode_get_reply(request_id: int, ret: int, npages: int, generation: int,
                     lease_id: int = 0, table: bytes = b"") -> bytes:
    return get_reply_prefix(request_id, ret, npages, generation, lease_id, len(table)) + table


def encode_release_reply(request_id: int, lease_id: int,
                         result: ReleaseResult = ReleaseResult.RELEASED) -> bytes:
    _check_rid(request_id, allow_zero=False)
    _check_u(lease_id, 64, "lease id")
    result = ReleaseResult(result)
    return _HDR_RELEASE_REPLY.pack(MAGIC, VERSION, MsgType.RELEASE_REPLY, 0, request_id,
                                   RELEASE_REPLY_SIZE, lease_id, result, 0)


# Servers answer every GET and RELEASE; these two pack values the server produced itself
# (request ids it decoded, its own lease ids and page counts) without re-checking them,
# which is a measurable share of a GET+RELEASE's cost. Anything else uses the checked
# encoders above.

def pack_get_reply_ok(request_id: int, npages: int, generation: int, lease_id: int,
                      table_len: int) -> bytes:
    """Unchecked :func:`get_reply_prefix` for ``ret = 0`` (the table follows)."""
    return _HDR_GET_REPLY.pack(MAGIC, VERSION, MsgType.GET_REPLY, 0, request_id,
                               GET_REPLY_FIXED_SIZE + table_len,
                               RET_OK, 0, npages, generation, lease_id, table_len, 0)


def pack_release_reply(request_id: int, lease_id: int, result: int) -> bytes:
    """Unchecked :func:`encode_release_reply`."""
    return _HDR_RELEASE_REPLY.pack(MAGIC, VERSION, MsgType.RELEASE_REPLY, 0, request_id,
                                   RELEASE_REPLY_SIZE, lease_id, result, 0)


def encode_status_reply(request_id: int, status: dict) -> bytes:
    _check_rid(request_id, allow_zero=False)
    if not isinstance(status, dict):
        raise WireError(ErrorCode.BAD_PAYLOAD, "status must be a JSON object (dict)")
    body = json.dumps(status, separators=(",", ":"), default=str).encode("utf-8")
    if HEADER_SIZE + len(body) > MAX_FRAME:
        raise WireError(ErrorCode.FRAME_TOO_LARGE,
                        f"status document of {len(body)} bytes exceeds the frame limit")
    return HEADER.pack(MAGIC, VERSION, MsgType.STATUS_REPLY, 0, request_id, len(body)) + body


def encode_error(request_id: int, code: int, message: str = "", *, arg: int = 0,
                 closing: bool = False) -> bytes:
    """An ERROR frame. ``message`` is cut to MAX_ERROR_MESSAGE bytes on a UTF-8 boundary,
    because an error about an error helps nobody."""
    _check_rid(request_id, allow_zero=True)
    _check_u(code, 16, "error code")
    _check_u(arg, 32, "error arg")
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_ERROR_MESSAGE:
        raw = raw[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    return (HEADER.pack(MAGIC, VERSION, MsgType.ERROR, 0, request_id, ERROR_FIXED_SIZE + len(raw))
            + _ERROR.pack(code, ERROR_CLOSING if closing else 0, 0, arg) + raw)


def encode_wire_error(err: WireError) -> bytes:
    """The ERROR a server answers a decoder's WireError with (closing if it is fatal)."""
    arg = err.arg
    if err.code == ErrorCode.UNSUPPORTED_VERSION:
        arg = versions_mask(SUPPORTED_VERSIONS)
    return encode_error(err.request_id, err.code, err.message, arg=arg, closing=err.fatal)


def versions_mask(versions: frozenset[int] | set[int]) -> int:
    return sum(1 << v for v in versions if 0 < v < 32)


def encode(msg: Message) -> bytes:
    """Encode any message object (round-trip partner of :class:`Decoder`)."""
    t = type(msg)
    if t is Get:
        return encode_get(msg.request_id, msg.vm_id, msg.npages, msg.timeout_ms)
    if t is Release:
        return encode_release(msg.request_id, msg.lease_id)
    if t is Status:
        return encode_status(msg.request_id)
    if t is GetReply:
        return encode_get_reply(msg.request_id, msg.ret, msg.npages, msg.generation,
                                msg.lease_id, msg.table)
    if t is ReleaseReply:
        return encode_release_reply(msg.request_id, msg.lease_id, msg.result)
    if t is StatusReply:
        return encode_status_reply(msg.request_id, msg.status)
    if t is Error:
        return encode_error(msg.request_id, msg.code, msg.message, arg=msg.arg,
                            closing=msg.closing)
    raise TypeError(f"not a wire message: {t.__name__}")


# --------------------------------------------------------------------------- payload parsers
# Each takes (buffer, payload offset, payload length, request id) and returns a message or
# raises a non-fatal WireError. The frame is already consumed when they run.

def _bad(rid: int, what: str, code: ErrorCode = ErrorCode.BAD_PAYLOAD) -> WireError:
    return WireError(code, what, request_id=rid)


def _parse_get(buf: bytearray, off: int, n: int, rid: int) -> Get:
    if rid == 0:
        raise _bad(rid, "GET with request id 0 (reserved)", ErrorCode.BAD_REQUEST_ID)
    if n < GET_FIXED_SIZE:
        raise _bad(rid, f"GET payload is {n} bytes; at least {GET_FIXED_SIZE} are required")
    npages, timeout_ms, reserved, idlen = _GET.unpack_from(buf, off)
    if reserved:
        raise _bad(rid, f"GET reserved field is {reserved:#x}; must be 0")
    if n != GET_FIXED_SIZE + idlen:
        raise _bad(rid, f"GET payload is {n} bytes but vm_id_len {idlen} needs "
                        f"{GET_FIXED_SIZE + idlen}")
    start = off + GET_FIXED_SIZE
    raw = buf[start:start + idlen]
    if not 0 < idlen <= MAX_VM_ID or raw.translate(None, _PRINTABLE):
        _check_vm_id(bytes(raw), rid)  # raises, naming what is wrong
    return Get(rid, raw.decode("ascii"), npages, timeout_ms)


def _parse_release(buf: bytearray, off: int, n: int, rid: int) -> Release:
    if rid == 0:
        raise _bad(rid, "RELEASE with request id 0 (reserved)", ErrorCode.BAD_REQUEST_ID)
    if n != RELEASE_SIZE:
        raise _bad(rid, f"RELEASE payload is {n} bytes; must be {RELEASE_SIZE}")
    (lease,) = _RELEASE.unpack_from(buf, off)
    if lease == 0:
        raise _bad(rid, "RELEASE of lease id 0 (0 means 'no lease')")
    return Release(rid, lease)


def _parse_status(buf: bytearray, off: int, n: int, rid: int) -> Status:
    if rid == 0:
        raise _bad(rid, "STATUS with request id 0 (reserved)", ErrorCode.BAD_REQUEST_ID)
    if n:
        raise _bad(rid, f"STATUS payload is {n} bytes; must be empty")
    return Status(rid)


def _parse_get_reply(buf: bytearray, off: int, n: int, rid: int) -> GetReply:
    if rid == 0:
        raise _bad(rid, "GET_REPLY with request id 0: replies answer a request", ErrorCode.BAD_REQUEST_ID)
    if n < GET_REPLY_FIXED_SIZE:
        raise _bad(rid, f"GET_REPLY payload is {n} bytes; at least {GET_REPLY_FIXED_SIZE} "
                        "are required")
    ret, r1, npages, gen, lease, tlen, r2 = _GET_REPLY.unpack_from(buf, off)
    if r1 or r2:
        raise _bad(rid, "GET_REPLY reserved fields must be 0")
    if ret not in VALID_RETS:
        raise _bad(rid, f"GET_REPLY ret {ret} is not 0, EIO(5), EAGAIN(11) or ENOSPC(28); "
                        "KVM_RUN would fail with EINVAL")
    if n != GET_REPLY_FIXED_SIZE + tlen:
        raise _bad(rid, f"GET_REPLY payload is {n} bytes but table_len {tlen} needs "
                        f"{GET_REPLY_FIXED_SIZE + tlen}")
    if ret != RET_OK and (tlen or lease):
        raise _bad(rid, f"GET_REPLY with ret {RET_NAMES[ret]} carries a table or a lease")
    start = off + GET_REPLY_FIXED_SIZE
    return GetReply(rid, ret, npages, gen, lease, bytes(buf[start:start + tlen]))


def _parse_release_reply(buf: bytearray, off: int, n: int, rid: int) -> ReleaseReply:
    if rid == 0:
        raise _bad(rid, "RELEASE_REPLY with request id 0: replies answer a request", ErrorCode.BAD_REQUEST_ID)
    if n != RELEASE_REPLY_SIZE:
        raise _bad(rid, f"RELEASE_REPLY payload is {n} bytes; must be {RELEASE_REPLY_SIZE}")
    lease, result, reserved = _RELEASE_REPLY.unpack_from(buf, off)
    if reserved:
        raise _bad(rid, "RELEASE_REPLY reserved field must be 0")
    try:
        res = ReleaseResult(result)
    except ValueError:
        raise _bad(rid, f"RELEASE_REPLY result {result} is unknown") from None
    return ReleaseReply(rid, lease, res)


def _parse_status_reply(buf: bytearray, off: int, n: int, rid: int) -> StatusReply:
    if rid == 0:
        raise _bad(rid, "STATUS_REPLY with request id 0: replies answer a request", ErrorCode.BAD_REQUEST_ID)
    try:
        doc = json.loads(bytes(buf[off:off + n]))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _bad(rid, f"STATUS_REPLY is not valid UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _bad(rid, f"STATUS_REPLY is JSON {type(doc).__name__}, not an object")
    return StatusReply(rid, doc)


def _parse_error(buf: bytearray, off: int, n: int, rid: int) -> Error:
    if n < ERROR_FIXED_SIZE:
        raise _bad(rid, f"ERROR payload is {n} bytes; at least {ERROR_FIXED_SIZE} are required")
    if n - ERROR_FIXED_SIZE > MAX_ERROR_MESSAGE:
        raise _bad(rid, f"ERROR message is {n - ERROR_FIXED_SIZE} bytes; at most "
                        f"{MAX_ERROR_MESSAGE} are allowed")
    code, flags, reserved, arg = _ERROR.unpack_from(buf, off)
    if reserved or flags & ~ERROR_CLOSING:
        raise _bad(rid, "ERROR reserved bits must be 0")
    start = off + ERROR_FIXED_SIZE
    text = bytes(buf[start:off + n]).decode("utf-8", "replace")
    return Error(rid, code, text, arg, bool(flags & ERROR_CLOSING))


Parser = Callable[[bytearray, int, int, int], Message]
_REQUEST_PARSERS: dict[int, Parser] = {
    MsgType.GET: _parse_get, MsgType.RELEASE: _parse_release, MsgType.STATUS: _parse_status,
}
_REPLY_PARSERS: dict[int, Parser] = {
    MsgType.GET_REPLY: _parse_get_reply, MsgType.RELEASE_REPLY: _parse_release_reply,
    MsgType.STATUS_REPLY: _parse_status_reply, MsgType.ERROR: _parse_error,
}

REQUESTS = "requests"  # a server's decoder
REPLIES = "replies"    # a client's decoder


def _type_name(t: int) -> str:
    try:
        return f"{MsgType(t).name} ({t:#04x})"
    except ValueError:
        return f"{t:#04x}"


# --------------------------------------------------------------------------- decoder

class Decoder:
    """Streaming frame decoder: ``feed()`` bytes as they arrive, then call ``next()`` until
    it returns None (more data needed). ``next()`` raises :class:`WireError` only.

    ``accept`` is REQUESTS (a server reading GET/RELEASE/STATUS) or REPLIES (a client).
    ``max_frame`` bounds header + payload; it defaults to MAX_REQUEST_FRAME for a server
    and MAX_FRAME for a client. After a fatal error every ``next()`` raises it again.
    """

    __slots__ = ("_buf", "_pos", "_base", "_parsers", "_max_payload", "_dead", "accept")

    def __init__(self, accept: str = REQUESTS, *, max_frame: int | None = None):
        if accept not in (REQUESTS, REPLIES):
            raise ValueError(f"accept must be {REQUESTS!r} or {REPLIES!r}, not {accept!r}")
        if max_frame is None:
            max_frame = MAX_REQUEST_FRAME if accept == REQUESTS else MAX_FRAME
        if not HEADER_SIZE <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be in {HEADER_SIZE}..{MAX_FRAME}")
        self.accept = accept
        self._parsers = _REQUEST_PARSERS if accept == REQUESTS else _REPLY_PARSERS
        self._max_payload = max_frame - HEADER_SIZE
        self._buf = bytearray()
        self._pos = 0      # start of the first unconsumed frame in _buf
        self._base = 0     # stream offset of _buf[0], for error messages
        self._dead: WireError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._dead is None:
            self._buf += data

    def whole(self, data: bytes | bytearray | memoryview) -> Message | None:
        """The one message ``data`` is, if nothing is buffered and ``data`` is exactly one
        well-formed frame of an accepted type; else None (then ``feed`` it, and ``next``
        says what is wrong, if anything). Most reads are one request: this skips the
        buffer. A frame with a bad payload raises like ``next``."""
        n = len(data)
        if self._buf or n < HEADER_SIZE:
            return None
        magic, version, mtype, flags, rid, length = HEADER.unpack_from(data, 0)
        if length + HEADER_SIZE != n or magic != MAGIC or version not in SUPPORTED_VERSIONS \
                or flags or length > self._max_payload:
            return None
        parser = self._parsers.get(mtype)
        if parser is None:
            return None
        self._base += n  # consumed, as next() would count it
        return parser(bytes(data), HEADER_SIZE, length, rid)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    def _need_more(self) -> None:
        # Drop consumed bytes only when we must wait anyway: one memmove per feed, not per frame.
        if self._pos:
            self._base += self._pos
            del self._buf[:self._pos]
            self._pos = 0

    def _fatal(self, code: ErrorCode, msg: str, rid: int = 0, arg: int = 0) -> WireError:
        self._dead = WireError(code, msg, request_id=rid, fatal=True, arg=arg)
        self._buf = bytearray()
        self._pos = 0
        return self._dead

    def next(self) -> Message | None:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            if self._dead is not None:  # a fatal error empties the buffer: it lands here
                raise self._dead
            self._need_more()
            return None
        magic, version, mtype, flags, rid, length = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise self._fatal(ErrorCode.BAD_MAGIC,
                              f"bad magic {bytes(magic)!r} at stream offset {self._base + pos}: "
                              f"not a certd frame (expected {MAGIC!r})")
        if length > self._max_payload:
            raise self._fatal(ErrorCode.FRAME_TOO_LARGE,
                              f"{_type_name(mtype)} frame of {HEADER_SIZE + length} bytes "
                              f"exceeds the {HEADER_SIZE + self._max_payload}-byte limit",
                              rid, HEADER_SIZE + self._max_payload)
        start = pos + HEADER_SIZE
        end = start + length
        if end > len(buf):
            self._need_more()
            return None
        self._pos = end  # consumed: errors below concern this frame only
        if version not in SUPPORTED_VERSIONS:
            raise WireError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {version} is not supported (this side speaks "
                            f"{', '.join(map(str, sorted(SUPPORTED_VERSIONS)))})",
                            request_id=rid, arg=versions_mask(SUPPORTED_VERSIONS))
        if flags:
            raise WireError(ErrorCode.BAD_FLAGS,
                            f"header flags {flags:#06x} set; version {VERSION} defines none",
                            request_id=rid)
        parser = self._parsers.get(mtype)
        if parser is None:
            expected = "requests" if self.accept == REQUESTS else "replies"
            raise WireError(ErrorCode.UNKNOWN_TYPE,
                            f"message type {_type_name(mtype)} is not one of the {expected} "
                            f"this side accepts", request_id=rid)
        return parser(buf, start, length, rid)

    def __iter__(self) -> Iterator[Message]:
        """Yield complete messages until more data is needed (errors propagate)."""
        while (msg := self.next()) is not None:
            yield msg

    def eof(self) -> None:
        """The peer closed its side: raise a fatal TRUNCATED if a frame was cut short."""
        if self._dead is None and len(self._buf) > self._pos:
            raise self._fatal(ErrorCode.TRUNCATED,
                              f"stream ended inside a frame ({len(self._buf) - self._pos} "
                              f"bytes of an incomplete frame at offset {self._base + self._pos})")


def decode_one(frame: bytes, accept: str = REPLIES) -> Message:
    """Decode exactly one complete frame (tests, tools). Raises WireError otherwise."""
    dec = Decoder(accept, max_frame=MAX_FRAME)
    dec.feed(frame)
    msg = dec.next()
    if msg is None:
        dec.eof()
        raise WireError(ErrorCode.TRUNCATED, "empty input", fatal=True)
    if dec.buffered:
        raise WireError(ErrorCode.BAD_PAYLOAD, f"{dec.buffered} bytes after the frame",
                        request_id=getattr(msg, "request_id", 0))
    return msg
