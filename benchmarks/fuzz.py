#!/usr/bin/env python3
"""Seeded mutation fuzzing of every certd parser of untrusted input (issue 11, item 7).

Each target is one parser (or the validation a fetched/dropped body goes through) with the
exception type(s) its docstring promises. The fuzzer mutates real inputs (tests/vectors, the
development PKI of certd.devpki, contrib/certd.toml.example, certd.platform.dumps of real
platforms, encoded frames) with bit flips, byte replacements, interesting integers,
truncation, extension, chunk insertion/deletion/duplication and splicing of two seeds, calls
the parser, and classifies each input:

* ok     the parser returned, or raised one of its documented exception types;
* crash  it raised anything else (or broke an invariant the harness checks, e.g. a decoded
         frame that does not re-encode to the same message);
* hang   it took more than ``hang_s`` seconds of this thread's CPU time on one input (the
         wall time is measured per input; an input over ``hang_s`` of wall time is re-run
         alone and judged by its CPU time, so a loaded host's scheduling stall is not a
         hang). In the main thread a SIGALRM watchdog also interrupts any input still
         running after ``budget_s`` seconds of wall time (a real infinite loop in Python).

Warnings raised while parsing are ignored (as in the daemon, where they are printed, not
raised). Deterministic: input i of a target is a function of (``--seed``, target name, i).

usage: .venv/bin/python benchmarks/fuzz.py [--inputs 1000000] [--parser NAME[,NAME]]
           [--seconds S] [--seed N] [--list] [--json FILE]

``--seconds`` is a wall-time budget per parser: fuzzing of a parser stops at whichever of
``--inputs`` or ``--seconds`` comes first (the printed ``inputs`` says how many ran).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import signal
import struct
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VECTORS = REPO / "tests" / "vectors"
CONFIG_EXAMPLE = REPO / "contrib" / "certd.toml.example"

HANG_S = 1.0     # CPU seconds on one input that count as a hang
BUDGET_S = 10.0  # wall seconds after which the watchdog interrupts an input (main thread)


# --------------------------------------------------------------------------- the engine

@dataclass
class Target:
    """One parser: ``call(data)`` feeds it one input; ``allowed`` its documented errors."""

    name: str
    doc: str
    seeds: Callable[[], Sequence[bytes]]
    call: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    #: inputs run by tests/test_fuzz_parsers.py (sized to its cost: < 2 min for the suite)
    suite_inputs: int = 2000


@dataclass
class Finding:
    kind: str         # "crash" or "hang"
    index: int
    data: bytes
    detail: str


@dataclass
class Result:
    name: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    max_wall_s: float = 0.0
    #: the first few findings (input bytes included, to reproduce them)
    findings: list[Finding] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"parser": self.name, "inputs": self.inputs, "crashes": self.crashes,
                "hangs": self.hangs, "seconds": round(self.seconds, 3),
                "inputs_per_s": round(self.rate, 1), "max_wall_s": round(self.max_wall_s, 4),
                "findings": [{"kind": f.kind, "index": f.index, "detail": f.detail,
                              "input_hex": f.data[:4096].hex()} for f in self.findings]}


class _Watchdog(BaseException):
    """Raised by SIGALRM inside an input that outran the wall budget (not an Exception, so
    a parser's ``except Exception`` cannot swallow it)."""


INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x30, 0x0A, 0x22, 0x5B, 0x3D)
INTERESTING_INT = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1000, 0x4000, 0xFFFF_FFFF_FFFF_FFFF,
                   0x8000_0000_0000_0000)


def mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes]) -> bytes:
    """1 to 4 stacked random mutations of ``data`` (splices draw from ``seeds``)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(11)
        n = len(b)
        if op == 0 and n:                       # bit flip
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                     # random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n:                     # interesting byte
            b[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif op == 3 and n:                     # interesting little/big-endian integer
            size = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING_INT) & ((1 << (8 * size)) - 1)
            if rng.random() < 0.3:
                v = (v + rng.choice((-1, 1))) & ((1 << (8 * size)) - 1)
            raw = v.to_bytes(size, rng.choice(("little", "big")))
            i = rng.randrange(max(1, n - size + 1))
            b[i:i + size] = raw
        elif op == 4 and n:                     # truncate
            del b[rng.randrange(n):]
        elif op == 5:                           # extend with random or repeated bytes
            k = rng.choice((1, 2, 4, 16, 64, 300))
            b += (bytes(rng.randrange(256) for _ in range(k)) if rng.random() < 0.5
                  else bytes([rng.randrange(256)]) * k)
        elif op == 6 and n:                     # delete a chunk
            i = rng.randrange(n)
            del b[i:i + rng.randrange(1, 64)]
        elif op == 7 and n:                     # duplicate a chunk in place
            i = rng.randrange(n)
            chunk = b[i:i + rng.randrange(1, 128)]
            j = rng.randrange(len(b) + 1)
            b[j:j] = chunk
        elif op == 8 and seeds:                 # splice: prefix of this, suffix of another
            other = rng.choice(seeds)
            i = rng.randrange(n + 1)
            j = rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif op == 9 and seeds:                 # insert a chunk of another seed
            other = rng.choice(seeds)
            if other:
                j = rng.randrange(len(other))
                i = rng.randrange(n + 1)
                b[i:i] = other[j:j + rng.randrange(1, 256)]
        elif op == 10 and n > 1:                # swap two bytes
            i, j = rng.randrange(n), rng.randrange(n)
            b[i], b[j] = b[j], b[i]
    return bytes(b)


def inputs_of(target: Target, seed: int) -> "Callable[[int], bytes]":
    """Input number i of ``target`` (pure function of seed, name, i): the seeds themselves
    first, then mutations."""
    seeds = list(target.seeds())
    if not seeds:
        raise ValueError(f"{target.name}: no seed inputs")
    base = int.from_bytes(hashlib.sha256(f"{seed}:{target.name}".encode()).digest()[:8],
                          "little")

    def make(i: int) -> bytes:
        if i < len(seeds):
            return seeds[i]
        rng = random.Random(base ^ (i * 0x9E3779B97F4A7C15))
        return mutate(rng, rng.choice(seeds), seeds)

    return make


def _classify(target: Target, data: bytes) -> str | None:
    """None if the call returned or raised a documented error; else what went wrong."""
    try:
        target.call(data)
    except target.allowed:
        return None
    except _Watchdog:
        raise
    except BaseException as e:  # anything else is a crash (KeyboardInterrupt re-raised)
        if isinstance(e, KeyboardInterrupt):
            raise
        return f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]} [{_where(e)}]"
    return None


def _where(e: BaseException) -> str:
    """The innermost certd frame the exception passed through (file:line in function)."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/certd/" in f.filename and "/benchmarks/" not in f.filename]
    if not frames:
        return "outside certd"
    f = frames[-1]
    return f"{Path(f.filename).relative_to(REPO) if REPO in Path(f.filename).parents else f.filename}:{f.lineno} in {f.name}"


def run(target: Target, *, inputs: int, seed: int = 0, seconds: float | None = None,
        hang_s: float = HANG_S, budget_s: float = BUDGET_S, keep: int = 5) -> Result:
    """Fuzz ``target`` with up to ``inputs`` inputs (and at most ``seconds`` of wall time)."""
    make = inputs_of(target, seed)
    res = Result(target.name)
    alarm = threading.current_thread() is threading.main_thread()
    old = None
    if alarm:
        def on_alarm(signum, frame):
            raise _Watchdog()
        old = signal.signal(signal.SIGALRM, on_alarm)
    t_start = time.perf_counter()
    end = t_start + seconds if seconds is not None else None
    perf = time.perf_counter
    # Warnings are not failures: the parser runs as in the daemon, where a warning (e.g.
    # cryptography's about an odd name attribute) is printed, not raised. Under pytest's
    # filterwarnings=error it would otherwise become an exception inside the parser.
    def watched(fn, *args):
        """``fn(*args)`` under the SIGALRM watchdog (main thread only): _Watchdog after
        ``budget_s`` s of wall time."""
        if not alarm:
            return fn(*args)
        signal.setitimer(signal.ITIMER_REAL, budget_s)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.simplefilter("ignore")
    try:
        for i in range(inputs):
            if end is not None and (i & 63) == 0 and perf() > end:
                break
            data = make(i)
            t0 = perf()
            try:
                problem = watched(_classify, target, data)
            except _Watchdog:
                problem = None
                res.hangs += 1
                if len(res.findings) < keep:
                    res.findings.append(Finding("hang", i, data,
                                                f"still running after {budget_s} s wall"))
            wall = perf() - t0
            res.max_wall_s = max(res.max_wall_s, wall)
            res.inputs += 1
            if problem is not None:
                res.crashes += 1
                if len(res.findings) < keep:
                    res.findings.append(Finding("crash", i, data, problem))
            elif wall > hang_s and wall < budget_s:
                try:
                    cpu = watched(_cpu_of, target, data)
                except _Watchdog:
                    cpu = budget_s
                if cpu > hang_s:
                    res.hangs += 1
                    if len(res.findings) < keep:
                        res.findings.append(Finding("hang", i, data,
                                                    f"{cpu:.2f} s CPU ({wall:.2f} s wall)"))
    finally:
        quiet.__exit__(None, None, None)
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        res.seconds = perf() - t_start
    return res


def _cpu_of(target: Target, data: bytes) -> float:
    """This thread's CPU seconds for one more call on ``data`` (the slow-input re-run)."""
    t = time.thread_time()
    try:
        target.call(data)
    except Exception:
        pass
    return time.thread_time() - t


# --------------------------------------------------------------------------- seeds

def _vec(*names: str) -> list[bytes]:
    return [(VECTORS / n).read_bytes() for n in names]


def _pem_to_der(pem: bytes) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]


@functools.cache
def _dev() -> dict:
    """A development PKI (Milan and a VLEK-capable platform) and blobs made from it."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from certd import devpki, policy
    from certd.abi.product import Product
    pki = devpki.DevPki.generate(Product.MILAN, name="fuzz")
    plat = devpki.make_platform(Product.MILAN, chip_id=bytes(range(64)))
    leaf, _ = pki.issue_vcek(plat.reported_tcb, plat.chip_id)
    vlek, _ = pki.issue_vlek(plat.reported_tcb)
    crl = pki.crl(revoked=[123456])
    blob = policy.build_blob(pki.ark, pki.ask, leaf, trust=pki.trust, platform=plat)
    blob_crl = devpki.blob(pki.ark, pki.ask, leaf, crl)
    vlek_blob = devpki.blob(pki.ark, pki.asvk, vlek, vlek=True)
    der = lambda c: c.public_bytes(Encoding.DER)  # noqa: E731
    pem = lambda c: c.public_bytes(Encoding.PEM)  # noqa: E731
    return {"pki": pki, "platform": plat, "blobs": [blob, blob_crl, vlek_blob],
            "certs_der": [der(pki.ark), der(pki.ask), der(pki.asvk), der(leaf), der(vlek)],
            "certs_pem": [pem(leaf), pem(vlek), pki.cert_chain_pem(), pki.cert_chain_pem(True),
                          pem(leaf) + crl.public_bytes(Encoding.PEM)],
            "crl_der": [crl.public_bytes(Encoding.DER)],
            "crl_pem": [crl.public_bytes(Encoding.PEM)]}


@functools.cache
def _amd() -> dict:
    """The real AMD vectors: pinned trust, the milan_gcp platform and its blob."""
    from cryptography import x509
    from certd import policy
    from certd.abi import report as reportmod
    from certd.abi.product import Product
    from certd.amd import roots
    from certd.platform import Platform
    r = reportmod.parse((VECTORS / "milan_gcp_report.bin").read_bytes())
    plat = Platform(product=Product.MILAN, reported_tcb=r.reported_tcb(Product.MILAN),
                    chip_id=r.hwid(Product.MILAN))
    trust = roots.pinned()
    ask, ark = x509.load_pem_x509_certificates((VECTORS / "milan_cert_chain.pem").read_bytes())
    leaf = (VECTORS / "milan_gcp_vcek.der").read_bytes()
    blob = policy.build_blob(ark, ask, leaf, trust=trust, platform=plat)
    return {"trust": trust, "platform": plat, "blob": blob, "vcek": leaf}


def _cert_seeds_der() -> list[bytes]:
    out = _vec("milan_gcp_vcek.der", "milan_vcek.der", "genoa_vcek.der", "turin_vcek.der",
               "milan_vlek.der")
    for pem in ("milan_cert_chain.pem", "genoa_cert_chain.pem", "turin_cert_chain.pem"):
        out += _pem_to_der((VECTORS / pem).read_bytes())
    return out + _dev()["certs_der"]


def _crl_seeds_der() -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    out = _vec("milan_crl.der")
    for pem in ("milan_crl_2025.pem", "genoa_crl_2024.pem"):
        out.append(x509.load_pem_x509_crl((VECTORS / pem).read_bytes()).public_bytes(Encoding.DER))
    return out + _dev()["crl_der"]


def _pem_seeds() -> list[bytes]:
    return _vec("milan_cert_chain.pem", "milan_msft_vcek.pem", "milan_crl_2025.pem",
                "genoa_vlek_cert_chain.pem", "turin_msft_vcek.pem") + _dev()["certs_pem"] \
        + _dev()["crl_pem"]


def _blob_seeds() -> list[bytes]:
    return [_amd()["blob"]] + _dev()["blobs"]


def _small_tables() -> list[bytes]:
    from certd.abi import table
    from certd.abi.table import Entry, Role
    return [table.encode([Entry.of(Role.ARK, b"a" * 5), Entry.of(Role.VCEK, b"v" * 9)]),
            table.encode([Entry.of(Role.ARK, b"\x30\x03\x02\x01\x01")]),
            table.encode([Entry.of(r, bytes([i]) * (i + 1)) for i, r in enumerate(Role)])]


def _wire_request_seeds() -> list[bytes]:
    from certd.abi import wire
    one = [wire.encode_get(1, "vm-1", 4), wire.encode_get(0xFFFFFFFF, "x" * 64, 0, 100),
           wire.encode_release(7, 3), wire.encode_release(2, 0xFFFF_FFFF_FFFF_FFFF),
           wire.encode_status(9)]
    return one + [one[0] + one[2] + one[4], one[1] + one[3]]


def _wire_reply_seeds() -> list[bytes]:
    from certd.abi import wire
    t = _small_tables()[0]
    one = [wire.encode_get_reply(1, wire.RET_OK, 1, 5, 9, t),
           wire.encode_get_reply(2, wire.EAGAIN, 0, 0, 0),
           wire.encode_get_reply(3, wire.ENOSPC, 5, 1, 0),
           wire.encode_release_reply(4, 9, wire.ReleaseResult.RELEASED),
           wire.encode_status_reply(5, {"generation": 3, "counters": {"get": 1}, "ok": True}),
           wire.encode_error(6, wire.ErrorCode.RATE_LIMITED, "slow down", arg=20),
           wire.encode_error(0, wire.ErrorCode.BAD_MAGIC, "bad", closing=True)]
    return one + [one[0] + one[3], one[4] + one[5] + one[6]]


def _config_seeds() -> list[bytes]:
    example = CONFIG_EXAMPLE.read_bytes()
    small = b"""[server]
socket = "/tmp/x/certd.sock"
socket_mode = "0660"
lease_timeout_ms = 2000
request_deadline_ms = 100

[access]
allow_uids = [0, 1000]
allow_groups = ["root"]

[store]
blob = "/tmp/x/certs.blob"

[platform]
source = "file"
file = "/tmp/x/platform.toml"

[kds]
base_url = ""

[log]
level = "debug"
format = "json"

[profiles.a]
vms = ["vm-*"]
blob = "/tmp/x/a.blob"
"""
    return [example, small, b"", b"[server]\n"]


def _platform_seeds() -> list[bytes]:
    from certd import devpki, platform as platformmod
    from certd.abi.product import Product
    from certd.abi.tcb import Tcb
    plats = [_amd()["platform"], _dev()["platform"],
             devpki.make_platform(Product.TURIN, chip_id=bytes(range(1, 9))),
             devpki.make_platform(Product.GENOA, vlek=True, chip_id=bytes(64)),
             devpki.make_platform(Product.MILAN, tcb=Tcb(bl=255, tee=0, snp=255, ucode=0),
                                  mask_chip_id=True, chip_id=bytes(64))]
    return [platformmod.dumps(p).encode() for p in plats]


def _sev_seeds() -> list[bytes]:
    from certd.amd import sev
    st = sev.SnpStatus(api_major=1, api_minor=55, state=1, is_rmp_initialized=True,
                       build_id=21, mask_chip_id=False, mask_chip_key=False, vlek_en=True,
                       feature_info=True, rapl_dis=False, ciphertext_hiding_cap=True,
                       ciphertext_hiding_en=False, guest_count=3,
                       current_tcb_raw=0x7300000000000803, reported_tcb_raw=0x7300000000000803)
    return [sev.encode_snp_status(st), sev.encode_issue_cmd(sev.IssueCmd(sev.SNP_COMMIT, 0x1000)),
            sev.encode_get_id2(0x7F0000001000, 64), bytes(range(64)) + b"\x40",
            bytes(range(1, 9)) + bytes(56) + b"\x08"]


# --------------------------------------------------------------------------- the parsers

def _wire_call(accept: str) -> Callable[[bytes], object]:
    from certd.abi import wire

    def drain(dec: "wire.Decoder", out: list) -> None:
        while True:
            try:
                msg = dec.next()
            except wire.WireError as e:
                if e.fatal:
                    # After a fatal error every next() raises it again (documented).
                    try:
                        dec.next()
                    except wire.WireError as again:
                        if again is not e and again.code != e.code:
                            raise AssertionError("a second next() after a fatal error "
                                                 "raised a different error") from None
                    else:
                        raise AssertionError("next() after a fatal error returned")
                    raise
                continue  # non-fatal: the frame is consumed, keep reading
            if msg is None:
                return
            out.append(msg)

    def call(data: bytes) -> object:
        # The server's one-read fast path must agree with the stream decoder.
        try:
            single = wire.Decoder(accept).whole(memoryview(data))
            single_failed = False
        except wire.WireError:
            single, single_failed = None, True
        dec = wire.Decoder(accept)
        out: list = []
        k = len(data) * 7 // 13  # two feeds: a frame split across reads
        dec.feed(data[:k])
        drain(dec, out)
        dec.feed(memoryview(data)[k:])
        drain(dec, out)
        dec.eof()
        if (single is not None and out != [single]) or (single_failed and out):
            raise AssertionError(f"Decoder.whole gave {single!r} (failed: {single_failed}), "
                                 f"the stream {out!r}")
        for msg in out:  # what decodes re-encodes to the same message
            again = wire.decode_one(wire.encode(msg), accept)
            if again != msg:
                raise AssertionError(f"{msg!r} re-decodes as {again!r}")
        return out

    return call


def _table_call(data: bytes) -> object:
    from certd.abi import table
    t = table.decode(data)
    table.is_canonical(data)
    return t


def _report_call(data: bytes) -> object:
    from certd.abi import report as reportmod
    from certd.abi.product import Product
    from certd.abi.tcb import TcbError
    r = reportmod.parse(data)
    r.product()
    for p in Product:
        r.hwid(p)
        for f in (r.reported_tcb, r.current_tcb, r.committed_tcb, r.launch_tcb):
            try:
                f(p)
            except TcbError:  # a TCB of the wrong shape for p: documented
                pass
    return r


def _pki_load_bytes(data: bytes) -> object:
    from certd.verify import pki
    return pki.load_bytes(data, "fuzz")


def _pki_cert(data: bytes) -> object:
    from certd.verify import pki
    return pki.cert_from_der(data, "fuzz")


def _pki_crl(data: bytes) -> object:
    from certd.verify import pki
    return pki.crl_from_der(data, "fuzz")


def _policy_call(data: bytes) -> object:
    from certd import policy
    a, d = _amd(), _dev()
    out = policy.check_blob(data, trust=a["trust"], platform=a["platform"])
    out += policy.check_blob(data, trust=d["pki"].trust, platform=d["platform"])
    if not isinstance(out, list):
        raise AssertionError(f"check_blob returned {type(out).__name__}")
    return out


def _config_call(data: bytes) -> object:
    from certd import config
    return config.parse(data.decode("utf-8", "replace"), "fuzz.toml")


def _platform_call(data: bytes) -> object:
    from certd import platform as platformmod
    return platformmod.loads(data.decode("utf-8", "replace"), "fuzz-platform.toml")


@functools.cache
def _kds_clients():
    from certd.sources import kds
    cache = tempfile.mkdtemp(prefix="certd-fuzz-kds-")  # never written: no fetches
    return (kds.KdsClient([], cache, trust=_amd()["trust"]),
            kds.KdsClient([], cache, trust=_dev()["pki"].trust))


def _kds_client(data: bytes):
    """The KDS client to validate ``data`` with: AMD's pinned trust or the development
    PKI's, by a checksum of the input (deterministic, both used)."""
    return _kds_clients()[zlib.crc32(data) & 1]


def _kds_vcek(data: bytes) -> object:
    c = _kds_client(data)
    p = _amd()["platform"] if c is _kds_clients()[0] else _dev()["platform"]
    return c.validate_vcek(data, p.product, p.chip_id, p.reported_tcb)


def _both_trusts(validate: Callable[..., object], data: bytes) -> object:
    """Validate ``data`` with AMD's pinned trust, then (if refused) the development PKI's:
    a real seed and a development seed both go the whole way."""
    from certd.sources import kds
    amd, dev = _kds_clients()
    try:
        return validate(amd, data)
    except kds.InvalidAnswer:
        return validate(dev, data)


def _kds_crl(data: bytes) -> object:
    from certd.abi.product import Product
    return _both_trusts(lambda c, d: c.validate_crl(d, Product.MILAN), data)


def _kds_chain(data: bytes) -> object:
    from certd.abi.product import Product
    return _both_trusts(lambda c, d: c.validate_chain(d, Product.MILAN), data)


def _dropdir_call(data: bytes) -> object:
    from certd.sources import dropdir
    a, d = _amd(), _dev()
    v1 = dropdir.judge(data, "fuzz.pem", trust=a["trust"], platform=a["platform"])
    v2 = dropdir.judge(data, "fuzz.der", trust=d["pki"].trust, platform=d["platform"])
    for v in (v1, v2):
        if not isinstance(v, dropdir.Verdict):
            raise AssertionError(f"judge returned {type(v).__name__}")
        v.reason_lines()
    return v1, v2


def _sev_call(data: bytes) -> object:
    from certd.abi.product import Product
    from certd.abi.tcb import TcbError
    from certd.amd import sev
    out = []
    for decode, size in ((sev.decode_snp_status, sev.SNP_STATUS.size),
                         (sev.decode_issue_cmd, sev.ISSUE_CMD.size),
                         (sev.decode_get_id2, sev.GET_ID2.size)):
        for raw in (data, data[:size]):
            try:
                out.append(decode(raw))
            except sev.SevError:
                pass
    for s in out:
        if isinstance(s, sev.SnpStatus):
            for p in Product:
                for f in (s.current_tcb, s.reported_tcb):
                    try:
                        f(p)
                    except TcbError:
                        pass
    # GET_ID2's buffer and the length the kernel wrote back (the last byte here)
    if data:
        for p in Product:
            try:
                sev.chip_id_from_id_buffer(data[:-1], data[-1], p)
            except sev.SevError:
                pass
    return out


def _errors(*names: str) -> tuple[type[BaseException], ...]:
    import importlib
    out = []
    for n in names:
        mod, _, cls = n.rpartition(".")
        out.append(getattr(importlib.import_module(mod), cls))
    return tuple(out)


def targets() -> dict[str, Target]:
    """Every fuzzed parser by name (imports certd lazily)."""
    from certd.abi import wire
    t = [
        Target("wire-requests", "certd.abi.wire.Decoder (server side, REQUESTS) + eof()",
               _wire_request_seeds, _wire_call(wire.REQUESTS),
               _errors("certd.abi.wire.WireError"), 20000),
        Target("wire-replies", "certd.abi.wire.Decoder (client side, REPLIES) + eof()",
               _wire_reply_seeds, _wire_call(wire.REPLIES),
               _errors("certd.abi.wire.WireError"), 20000),
        Target("table", "certd.abi.table.decode + is_canonical (GHCB certificate table)",
               lambda: _blob_seeds() + _small_tables(), _table_call,
               _errors("certd.abi.table.TableError"), 20000),
        Target("report", "certd.abi.report.parse + its TCB/hwid accessors",
               lambda: [p.read_bytes() for p in sorted(VECTORS.glob("*report.bin"))],
               _report_call, _errors("certd.abi.report.ReportError"), 20000),
        Target("pki-load-bytes", "certd.verify.pki.load_bytes (PEM/DER certificates, CRLs)",
               lambda: _pem_seeds() + _cert_seeds_der()[:4] + _crl_seeds_der()[:1],
               _pki_load_bytes, _errors("certd.verify.pki.PkiError"), 3000),
        Target("pki-cert-der", "certd.verify.pki.cert_from_der", _cert_seeds_der, _pki_cert,
               _errors("certd.verify.pki.PkiError"), 4000),
        Target("pki-crl-der", "certd.verify.pki.crl_from_der", _crl_seeds_der, _pki_crl,
               _errors("certd.verify.pki.PkiError"), 3000),
        Target("policy-check-blob", "certd.policy.check_blob on whole blobs (AMD and dev "
               "trust; returns problems, raises nothing)", _blob_seeds, _policy_call, (), 1000),
        Target("config", "certd.config.parse (TOML text)", _config_seeds, _config_call,
               _errors("certd.config.ConfigError"), 2000),
        Target("platform", "certd.platform.loads (platform file text)", _platform_seeds,
               _platform_call, _errors("certd.platform.PlatformError"), 4000),
        Target("kds-vcek", "certd.sources.kds.KdsClient.validate_vcek (a fetched VCEK body; AMD or dev trust)",
               lambda: [_amd()["vcek"]] + _dev()["certs_der"][3:4] + _dev()["certs_pem"][:1]
               + _vec("milan_vcek.der"), _kds_vcek, _errors("certd.sources.kds.InvalidAnswer"), 1000),
        Target("kds-crl", "certd.sources.kds.KdsClient.validate_crl (a fetched CRL body; AMD or dev trust)",
               _crl_seeds_der, _kds_crl, _errors("certd.sources.kds.InvalidAnswer"), 1500),
        Target("kds-chain", "certd.sources.kds.KdsClient.validate_chain (a fetched "
               "cert_chain body; AMD or dev trust)", lambda: _vec("milan_cert_chain.pem", "genoa_cert_chain.pem")
               + [_dev()["pki"].cert_chain_pem()], _kds_chain, _errors("certd.sources.kds.InvalidAnswer"), 1500),
        Target("dropdir-judge", "certd.sources.dropdir.judge (a dropped file; returns a "
               "Verdict, raises nothing)", lambda: _pem_seeds() + _cert_seeds_der()
               + _blob_seeds(), _dropdir_call, (), 1000),
        Target("sev", "certd.amd.sev decoders (/dev/sev structures) + TCB accessors",
               _sev_seeds, _sev_call, _errors("certd.amd.sev.SevError"), 20000),
    ]
    return {x.name: x for x in t}


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status 0 if no parser crashed or hung, 1 if "
                                        "any did (the inputs are in --json).")
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per parser")
    ap.add_argument("--parser", default="", help="comma-separated names (default: all; "
                                                 "--list shows them)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="wall-time budget per parser (stops early; default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-s", type=float, default=HANG_S,
                    help="CPU seconds on one input that count as a hang (default 1)")
    ap.add_argument("--list", action="store_true", help="list the parsers and exit")
    ap.add_argument("--json", metavar="FILE", help="write results (and findings) as JSON")
    a = ap.parse_args(argv)
    all_t = targets()
    if a.list:
        for t in all_t.values():
            errs = ", ".join(e.__name__ for e in t.allowed) or "nothing"
            print(f"{t.name:20} {t.doc}; may raise: {errs}")
        return 0
    names = [n for n in a.parser.split(",") if n] or list(all_t)
    unknown = [n for n in names if n not in all_t]
    if unknown:
        ap.error(f"unknown parser(s) {', '.join(unknown)}; known: {', '.join(all_t)}")
    print(f"{'parser':20} {'inputs':>9} {'crashes':>8} {'hangs':>6} {'inputs/s':>10} "
          f"{'max s/input':>11}", flush=True)
    results = []
    for n in names:
        r = run(all_t[n], inputs=a.inputs, seed=a.seed, seconds=a.seconds, hang_s=a.hang_s)
        results.append(r)
        print(f"{r.name:20} {r.inputs:>9} {r.crashes:>8} {r.hangs:>6} {r.rate:>10.0f} "
              f"{r.max_wall_s:>11.4f}", flush=True)
        for f in r.findings:
            print(f"  {f.kind} at input {f.index} ({len(f.data)} bytes): {f.detail}",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return 1 if any(r.crashes or r.hangs for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
