"""certd.abi.wire: round trips, every malformed frame class, a 100k-mutation fuzz."""

from __future__ import annotations

import random
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certd.abi import table as tablemod
from certd.abi import wire
from certd.abi.wire import ErrorCode, WireError

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
rid = st.integers(1, 2**32 - 1)
vm_ids = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64)


get_replies = st.one_of(
    st.builds(wire.GetReply, rid, st.just(0), u64, u64, u64, st.binary(max_size=wire.MAX_TABLE)),
    st.builds(wire.GetReply, rid, st.sampled_from([wire.EIO, wire.EAGAIN, wire.ENOSPC]),
              u64, u64, st.just(0), st.just(b"")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
requests = st.one_of(
    st.builds(wire.Get, rid, vm_ids, u64, u32),
    st.builds(wire.Release, rid, st.integers(1, 2**64 - 1)),
    st.builds(wire.Status, rid),
)
replies = st.one_of(
    get_replies,
    st.builds(wire.ReleaseReply, rid, u64, st.sampled_from(list(wire.ReleaseResult))),
    st.builds(wire.StatusReply, rid, st.dictionaries(st.text(max_size=8), json_values, max_size=6)),
    st.builds(wire.Error, st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
              st.text(max_size=200).map(lambda s: s.encode("utf-8", "replace").decode()),
              u32, st.booleans()),
)


def decode_all(data: bytes, accept: str, chunk: int | None = None) -> list:
    dec = wire.Decoder(accept, max_frame=wire.MAX_FRAME)
    out = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        out.extend(dec)
    dec.eof()
    return out


# ------------------------------------------------------------------ round trips

@given(requests)
def test_request_round_trip(msg):
    assert decode_all(wire.encode(msg), wire.REQUESTS) == [msg]


@given(replies)
def test_reply_round_trip(msg):
    assert decode_all(wire.encode(msg), wire.REPLIES) == [msg]


@given(st.lists(requests, min_size=1, max_size=20), st.integers(1, 50))
def test_stream_of_requests_any_chunking(msgs, chunk):
    data = b"".join(wire.encode(m) for m in msgs)
    assert decode_all(data, wire.REQUESTS, chunk) == msgs


def test_header_layout_is_what_the_doc_says():
    frame = wire.encode_get(0x01020304, "vm1", 4, 100)
    assert frame[:4] == b"CRTD"
    assert frame[4] == 1 and frame[5] == 0x01
    assert frame[6:8] == b"\0\0"
    assert frame[8:12] == bytes([4, 3, 2, 1])
    assert struct.unpack_from("<I", frame, 12)[0] == len(frame) - 16 == 16 + 3
    assert struct.unpack_from("<QIHH", frame, 16) == (4, 100, 0, 3)
    assert frame[32:] == b"vm1"


def test_doc_example_bytes():
    # The hex dump in docs/protocol.md §9 is generated from these calls; keep them in step.
    get = wire.encode_get(1, "vm-42", 1, 0)
    assert get.hex() == ("43525444" "01" "01" "0000" "01000000" "15000000"
                         "0100000000000000" "00000000" "0000" "0500" "766d2d3432")
    reply = wire.encode_get_reply(1, 0, 1, 7, 0x2A, tablemod.EMPTY_TABLE)
    assert reply.hex() == ("43525444" "01" "81" "0000" "01000000" "40000000"
                           "00000000" "00000000" "0100000000000000" "0700000000000000"
                           "2a00000000000000" "18000000" "00000000" + "00" * 24)
    rel = wire.encode_release(2, 0x2A)
    assert rel.hex() == "43525444" "01" "02" "0000" "02000000" "08000000" "2a00000000000000"
    ack = wire.encode_release_reply(2, 0x2A)
    assert ack.hex() == ("43525444" "01" "82" "0000" "02000000" "10000000"
                         "2a00000000000000" "00000000" "00000000")


def test_get_reply_prefix_plus_table_equals_full_encoding():
    table = bytes(range(256)) * 10
    assert (wire.get_reply_prefix(5, 0, 1, 2, 3, len(table)) + table
            == wire.encode_get_reply(5, 0, 1, 2, 3, table))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_enospc_npages_is_exact_at_page_boundaries(k):
    # A server answers ENOSPC with table.npages(len); the reply must carry it verbatim.
    for length, want in ((4096 * k - 1, k), (4096 * k, k), (4096 * k + 1, k + 1)):
        n = tablemod.npages(length)
        assert n == want
        reply = wire.decode_one(wire.encode_get_reply(9, wire.ENOSPC, n, 1))
        assert (reply.ret, reply.npages, reply.lease_id, reply.table) == (wire.ENOSPC, want, 0, b"")


# ------------------------------------------------------------------ encoder refusals

@pytest.mark.parametrize("call, code", [
    (lambda: wire.encode_get(0, "vm", 1), ErrorCode.BAD_REQUEST_ID),
    (lambda: wire.encode_get(2**32, "vm", 1), ErrorCode.BAD_REQUEST_ID),
    (lambda: wire.encode_get(1, "", 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, "x" * 65, 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, "vm\n", 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, "vmé", 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, b"\x7f", 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, 42, 1), ErrorCode.BAD_VM_ID),
    (lambda: wire.encode_get(1, "vm", -1), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get(1, "vm", 2**64), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get(1, "vm", 1, 2**32), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_release(1, 0), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get_reply(1, 22, 1, 1), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get_reply(1, wire.ENOSPC, 1, 1, 0, b"x"), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get_reply(1, wire.EAGAIN, 0, 1, 5), ErrorCode.BAD_PAYLOAD),
    (lambda: wire.encode_get_reply(1, 0, 1, 1, 1, bytes(wire.MAX_TABLE + 1)),
     ErrorCode.FRAME_TOO_LARGE),
    (lambda: wire.encode_status_reply(1, {"x": "y" * wire.MAX_FRAME}), ErrorCode.FRAME_TOO_LARGE),
    (lambda: wire.encode_status_reply(1, [1]), ErrorCode.BAD_PAYLOAD),
])
def test_encoders_refuse_bad_arguments(call, code):
    with pytest.raises(WireError) as ei:
        call()
    assert ei.value.code == code


def test_max_sizes_encode_and_decode():
    wire.decode_one(wire.encode_get(1, "x" * 64, 1), wire.REQUESTS)
    big = wire.encode_get_reply(1, 0, 16, 1, 1, bytes(wire.MAX_TABLE))
    assert len(big) == wire.MAX_FRAME
    assert wire.decode_one(big).table == bytes(wire.MAX_TABLE)


def test_error_message_is_cut_on_a_utf8_boundary():
    frame = wire.encode_error(3, ErrorCode.INTERNAL, "é" * 1000, closing=True)
    msg = wire.decode_one(frame)
    assert msg.message == "é" * 512 and msg.closing and msg.code_name == "INTERNAL"


def test_encode_wire_error_marks_fatal_as_closing_and_carries_versions():
    dec = wire.Decoder()
    dec.feed(b"XXXX" + bytes(12))
    with pytest.raises(WireError) as ei:
        dec.next()
    e = wire.decode_one(wire.encode_wire_error(ei.value))
    assert e.code == ErrorCode.BAD_MAGIC and e.closing and e.request_id == 0
    dec = wire.Decoder()
    dec.feed(bytearray(wire.encode_status(77)).replace(b"CRTD\x01", b"CRTD\x09"))
    with pytest.raises(WireError) as ei:
        dec.next()
    e = wire.decode_one(wire.encode_wire_error(ei.value))
    assert (e.code, e.request_id, e.arg, e.closing) == (ErrorCode.UNSUPPORTED_VERSION, 77, 0b10, False)


# ------------------------------------------------------------------ malformed input

def patched(frame: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(frame)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def with_payload(mtype: int, payload: bytes, rid_: int = 7, version: int = 1, flags: int = 0):
    return wire.HEADER.pack(wire.MAGIC, version, mtype, flags, rid_, len(payload)) + payload


GET = wire.encode_get(7, "vm-1", 2)
REL = wire.encode_release(7, 5)
STA = wire.encode_status(7)
GREP = wire.encode_get_reply(7, 0, 1, 1, 5, b"tbl")
RREP = wire.encode_release_reply(7, 5)
ERR = wire.encode_error(7, ErrorCode.RATE_LIMITED, "slow down", arg=100)

NONFATAL_REQUESTS = [
    ("version 2", patched(GET, 4, "<B", 2), ErrorCode.UNSUPPORTED_VERSION),
    ("version 0", patched(STA, 4, "<B", 0), ErrorCode.UNSUPPORTED_VERSION),
    ("flags", patched(GET, 6, "<H", 1), ErrorCode.BAD_FLAGS),
    ("unknown type", patched(STA, 5, "<B", 0x42), ErrorCode.UNKNOWN_TYPE),
    ("reply sent to server", GREP, ErrorCode.UNKNOWN_TYPE),
    ("error sent to server", ERR, ErrorCode.UNKNOWN_TYPE),
    ("get rid 0", patched(GET, 8, "<I", 0), ErrorCode.BAD_REQUEST_ID),
    ("release rid 0", patched(REL, 8, "<I", 0), ErrorCode.BAD_REQUEST_ID),
    ("status rid 0", patched(STA, 8, "<I", 0), ErrorCode.BAD_REQUEST_ID),
    ("get short", with_payload(1, bytes(15)), ErrorCode.BAD_PAYLOAD),
    ("get reserved", patched(GET, 28, "<H", 1), ErrorCode.BAD_PAYLOAD),
    ("get idlen too long", patched(GET, 30, "<H", 5), ErrorCode.BAD_PAYLOAD),
    ("get idlen too short", patched(GET, 30, "<H", 3), ErrorCode.BAD_PAYLOAD),
    ("get empty vm id", with_payload(1, struct.pack("<QIHH", 1, 0, 0, 0)), ErrorCode.BAD_VM_ID),
    ("get vm id 65", with_payload(1, struct.pack("<QIHH", 1, 0, 0, 65) + b"a" * 65),
     ErrorCode.BAD_VM_ID),
    ("get vm id NUL", with_payload(1, struct.pack("<QIHH", 1, 0, 0, 2) + b"a\0"),
     ErrorCode.BAD_VM_ID),
    ("get vm id utf8", with_payload(1, struct.pack("<QIHH", 1, 0, 0, 2) + "é".encode()),
     ErrorCode.BAD_VM_ID),
    ("release short", with_payload(2, bytes(7)), ErrorCode.BAD_PAYLOAD),
    ("release long", with_payload(2, bytes(9)), ErrorCode.BAD_PAYLOAD),
    ("release lease 0", with_payload(2, bytes(8)), ErrorCode.BAD_PAYLOAD),
    ("status payload", with_payload(3, b"x"), ErrorCode.BAD_PAYLOAD),
]

NONFATAL_REPLIES = [
    ("request sent to client", GET, ErrorCode.UNKNOWN_TYPE),
    ("unknown type", patched(RREP, 5, "<B", 0x84), ErrorCode.UNKNOWN_TYPE),
    ("version", patched(RREP, 4, "<B", 3), ErrorCode.UNSUPPORTED_VERSION),
    ("get_reply short", with_payload(0x81, bytes(39)), ErrorCode.BAD_PAYLOAD),
    ("get_reply bad ret 22", patched(GREP, 16, "<I", 22), ErrorCode.BAD_PAYLOAD),
    ("get_reply bad ret 2^32-1", patched(GREP, 16, "<I", 2**32 - 1), ErrorCode.BAD_PAYLOAD),
    ("get_reply reserved1", patched(GREP, 20, "<I", 1), ErrorCode.BAD_PAYLOAD),
    ("get_reply reserved2", patched(GREP, 52, "<I", 1), ErrorCode.BAD_PAYLOAD),
    ("get_reply table_len > payload", patched(GREP, 48, "<I", 4), ErrorCode.BAD_PAYLOAD),
    ("get_reply table_len < payload", patched(GREP, 48, "<I", 2), ErrorCode.BAD_PAYLOAD),
    ("get_reply ENOSPC with table", patched(GREP, 16, "<I", 28), ErrorCode.BAD_PAYLOAD),
    ("get_reply EAGAIN with lease",
     patched(wire.encode_get_reply(7, 11, 0, 1), 40, "<Q", 9), ErrorCode.BAD_PAYLOAD),
    ("release_reply short", with_payload(0x82, bytes(15)), ErrorCode.BAD_PAYLOAD),
    ("release_reply bad result", patched(RREP, 24, "<I", 3), ErrorCode.BAD_PAYLOAD),
    ("release_reply reserved", patched(RREP, 28, "<I", 1), ErrorCode.BAD_PAYLOAD),
    ("status_reply not json", with_payload(0x83, b"{nope"), ErrorCode.BAD_PAYLOAD),
    ("status_reply not utf8", with_payload(0x83, b'{"a":"\xff"}'), ErrorCode.BAD_PAYLOAD),
    ("status_reply array", with_payload(0x83, b"[1]"), ErrorCode.BAD_PAYLOAD),
    ("status_reply empty", with_payload(0x83, b""), ErrorCode.BAD_PAYLOAD),
    ("status_reply deep", with_payload(0x83, b"[" * 30000), ErrorCode.BAD_PAYLOAD),
    ("status_reply huge int", with_payload(0x83, b'{"a":' + b"9" * 5000 + b"}"),
     ErrorCode.BAD_PAYLOAD),
    ("error short", with_payload(0xFF, bytes(7)), ErrorCode.BAD_PAYLOAD),
    ("error flags", patched(ERR, 18, "<B", 2), ErrorCode.BAD_PAYLOAD),
    ("error reserved", patched(ERR, 19, "<B", 1), ErrorCode.BAD_PAYLOAD),
    ("error message too long", with_payload(0xFF, bytes(8) + b"x" * 1025), ErrorCode.BAD_PAYLOAD),
]


@pytest.mark.parametrize("accept, frame, code", [
    pytest.param(wire.REQUESTS, f, c, id=f"request:{n}") for n, f, c in NONFATAL_REQUESTS
] + [
    pytest.param(wire.REPLIES, f, c, id=f"reply:{n}") for n, f, c in NONFATAL_REPLIES
])
def test_malformed_frame_is_a_recoverable_wire_error(accept, frame, code):
    """A bad but complete frame is consumed; the next frame still decodes."""
    good = STA if accept == wire.REQUESTS else RREP
    dec = wire.Decoder(accept, max_frame=wire.MAX_FRAME)
    dec.feed(frame + good)
    with pytest.raises(WireError) as ei:
        dec.next()
    err = ei.value
    assert err.code == code, str(err)
    assert not err.fatal
    assert err.request_id == struct.unpack_from("<I", frame, 8)[0]
    assert dec.next() == wire.decode_one(good, accept)
    assert dec.next() is None


@pytest.mark.parametrize("accept, data, code", [
    (wire.REQUESTS, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.BAD_MAGIC),
    (wire.REQUESTS, b"crtd" + GET[4:], ErrorCode.BAD_MAGIC),
    (wire.REQUESTS, STA + b"\0" * 16, ErrorCode.BAD_MAGIC),
    (wire.REQUESTS, patched(GET, 12, "<I", wire.MAX_REQUEST_FRAME - 15), ErrorCode.FRAME_TOO_LARGE),
    (wire.REQUESTS, patched(GET, 12, "<I", 2**32 - 1), ErrorCode.FRAME_TOO_LARGE),
    (wire.REPLIES, patched(GREP, 12, "<I", wire.MAX_FRAME - 15), ErrorCode.FRAME_TOO_LARGE),
])
def test_framing_error_is_fatal_and_sticky(accept, data, code):
    dec = wire.Decoder(accept)
    dec.feed(data)
    msgs = []
    with pytest.raises(WireError) as ei:
        msgs.extend(dec)
    assert ei.value.code == code and ei.value.fatal
    dec.feed(STA)  # ignored: the stream is lost
    with pytest.raises(WireError) as again:
        dec.next()
    assert again.value is ei.value
    dec.eof()  # already dead: eof adds nothing


def test_oversized_frame_is_refused_from_the_header_alone():
    """The decoder must not wait for (and buffer) a payload it will refuse."""
    dec = wire.Decoder(wire.REQUESTS)
    dec.feed(wire.HEADER.pack(wire.MAGIC, 1, 1, 0, 9, 10_000_000))
    with pytest.raises(WireError) as ei:
        dec.next()
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE and ei.value.request_id == 9
    assert ei.value.arg == wire.MAX_REQUEST_FRAME


@pytest.mark.parametrize("cut", [1, 15, 16, 17, len(GET) - 1])
def test_truncated_stream_is_fatal_at_eof(cut):
    dec = wire.Decoder()
    dec.feed(GET[:cut])
    assert dec.next() is None
    with pytest.raises(WireError) as ei:
        dec.eof()
    assert ei.value.code == ErrorCode.TRUNCATED and ei.value.fatal


def test_clean_eof_and_buffered():
    dec = wire.Decoder()
    dec.feed(GET + STA[:5])
    assert isinstance(dec.next(), wire.Get)
    assert dec.next() is None and dec.buffered == 5
    dec.feed(STA[5:])
    assert dec.next() == wire.Status(7) and dec.buffered == 0
    dec.eof()


def test_decode_one_refuses_trailing_and_empty():
    with pytest.raises(WireError) as ei:
        wire.decode_one(RREP + b"x")
    assert ei.value.code == ErrorCode.BAD_PAYLOAD
    with pytest.raises(WireError) as ei:
        wire.decode_one(b"")
    assert ei.value.code == ErrorCode.TRUNCATED


def test_decoder_arguments_are_checked():
    with pytest.raises(ValueError):
        wire.Decoder("both")
    with pytest.raises(ValueError):
        wire.Decoder(max_frame=wire.MAX_FRAME + 1)


def test_unknown_error_code_from_a_newer_peer_still_decodes():
    e = wire.decode_one(wire.encode_error(1, 999, "new"))
    assert e.code == 999 and e.code_name == "code 999"


# ------------------------------------------------------------------ fuzz

SEEDS_REQ = [GET, REL, STA, wire.encode_get(3, "x" * 64, 2**64 - 1, 2**32 - 1)]
SEEDS_REP = [GREP, RREP, ERR, wire.encode_status_reply(4, {"leases": 3, "gen": [1, 2]}),
             wire.encode_get_reply(8, wire.ENOSPC, 5, 9)]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op == 0 and data:  # bit flips
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # truncation
            del data[rng.randrange(len(data)):]
        elif op == 2:  # splice with another frame
            other = rng.choice(seeds)
            data[rng.randrange(len(data) + 1):] = other[rng.randrange(len(other) + 1):]
        elif op == 3 and len(data) >= 16:  # random payload length
            struct.pack_into("<I", data, 12, rng.choice(
                [rng.randrange(2**32), rng.randrange(200), len(data) - 16 + rng.randint(-3, 3)]
                ) & 0xFFFFFFFF)
        elif op == 4 and len(data) >= 16:  # random type / version / field bytes
            data[rng.choice([4, 5, 6, 7]) if rng.random() < 0.5 else rng.randrange(len(data))] = \
                rng.randrange(256)
        else:  # random bytes appended
            data += rng.randbytes(rng.randint(1, 40))
    return bytes(data)


@pytest.mark.parametrize("accept, seeds", [(wire.REQUESTS, SEEDS_REQ), (wire.REPLIES, SEEDS_REP)])
def test_fuzz_decoder_raises_only_wire_error(accept, seeds):
    rng = random.Random(0xC0DE + len(accept))
    n = 60_000  # x2 parametrizations = 120k mutated inputs
    kinds: dict[str, int] = {}
    deadline = time.monotonic() + 30
    for i in range(n):
        data = mutate(rng, seeds)
        dec = wire.Decoder(accept, max_frame=wire.MAX_FRAME if rng.random() < 0.5 else None)
        # Deliver in random chunks, and keep going after non-fatal errors like a server does.
        pos = 0
        try:
            while pos < len(data):
                step = rng.randint(1, len(data))
                dec.feed(data[pos:pos + step])
                pos += step
                while True:
                    try:
                        msg = dec.next()
                    except WireError as e:
                        assert isinstance(e.code, ErrorCode)
                        kinds[e.code.name] = kinds.get(e.code.name, 0) + 1
                        if e.fatal:
                            raise
                        continue
                    if msg is None:
                        break
                    kinds["ok"] = kinds.get("ok", 0) + 1
                    wire.encode(msg)  # anything decoded must re-encode
            dec.eof()
        except WireError as e:
            assert e.fatal
            if e.code == ErrorCode.TRUNCATED:
                kinds["TRUNCATED"] = kinds.get("TRUNCATED", 0) + 1
        if i % 5000 == 0:
            assert time.monotonic() < deadline, "fuzz too slow"
    # The mutator must actually reach the interesting paths, not just bad magic.
    for name in ("ok", "BAD_MAGIC", "TRUNCATED", "FRAME_TOO_LARGE", "UNKNOWN_TYPE",
                 "BAD_PAYLOAD", "UNSUPPORTED_VERSION"):
        assert kinds.get(name, 0) > 50, (name, kinds)


def test_protocol_md_hex_dumps_match_the_encoder():
    """Every hex dump in docs/protocol.md §9 is a frame the encoder produces byte for byte."""
    import pathlib
    import re
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## 9."):doc.index("## 10.")]
    frames, cur = [], bytearray()
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines() + [""]:
            if re.match(r"^[0-9a-f]{4}  [0-9a-f]{2} ", line):
                # Fixed columns: offset, 2 spaces, 16 bytes in 49 chars, then a comment.
                cur += bytes.fromhex("".join(line[6:6 + 49].split()))
            elif cur:
                frames.append(bytes(cur))
                cur = bytearray()
    assert frames == [
        wire.encode_get(1, "vm-42", 1, 0),
        wire.encode_get_reply(1, 0, 1, 7, 0x2A, tablemod.EMPTY_TABLE),
        wire.encode_release(2, 0x2A),
        wire.encode_release_reply(2, 0x2A),
        wire.encode_get_reply(3, wire.ENOSPC, 3, 7),
        wire.encode_error(4, ErrorCode.RATE_LIMITED, "rate", arg=250),
    ]


def test_whole_takes_exactly_one_frame_and_defers_the_rest_to_next():
    get = wire.encode_get(7, "vm-1", 4)
    dec = wire.Decoder(wire.REQUESTS)
    msg = dec.whole(memoryview(bytearray(get)))
    assert msg == wire.Get(7, "vm-1", 4, 0)
    assert dec.buffered == 0
    # Not exactly one frame, or not one certd accepts as is: None, and next() decides.
    for data in (get[:-1], get + get, b"XXXX" + get[4:], wire.encode_release(1, 5)[:10]):
        assert wire.Decoder(wire.REQUESTS).whole(data) is None
    dec.feed(get[:5])
    assert dec.whole(get) is None, "something is buffered: the stream goes through next()"
    # A whole frame with a bad payload raises like next() and is consumed.
    bad = bytearray(wire.encode_get(9, "vm-1", 4))
    bad[-1] = 0x01  # a vm id byte outside printable ASCII
    fresh = wire.Decoder(wire.REQUESTS)
    with pytest.raises(wire.WireError) as e:
        fresh.whole(bytes(bad))
    assert e.value.code == wire.ErrorCode.BAD_VM_ID and e.value.request_id == 9
    assert fresh.buffered == 0 and fresh.next() is None
