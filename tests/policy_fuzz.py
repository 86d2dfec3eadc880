"""Fuzzing certd.policy with corrupted blobs: the corpus, the corruption, the loop.

Shared by tests/test_policy_fuzz.py and benchmarks/fuzz_policy.py. Each case is a blob
that passes check_blob and check_report as it is (asserted when the corpus is built), so
a corruption is the only reason for any problem and the checks behind the parser run too.

The corruption changes 1-4 bytes (a bit flip or a new value, never a no-op) inside the
certificate and CRL bytes, never the table header: a broken header is the table decoder's
business (tests/test_table.py) and stops before any certificate is parsed. The stream of
corruptions is seeded; the real-vector cases are byte-for-byte the same in every run, the
dev-PKI cases are not (their RSA keys and PSS signatures are random per process).
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from certd import devpki, policy
from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Entry, Role
from certd.amd.roots import TrustStore, pinned
from certd.platform import Platform
from certd.verify import pki

VECTORS = Path(__file__).parent / "vectors"


@dataclass(frozen=True)
class Case:
    name: str
    blob: bytes
    trust: TrustStore
    at: datetime
    platform: Platform
    report: bytes
    #: (offset, length) of ARK, ASK/ASVK, leaf and CRL (if any) inside ``blob``.
    spans: tuple[tuple[int, int], ...]

    @property
    def body(self) -> int:
        """Where the certificate bytes start (the end of the table header)."""
        return min(off for off, _ in self.spans)


def _encode(ark: bytes, ask: bytes, leaf: bytes, crl: bytes | None, vlek: bool) -> bytes:
    entries = [Entry.of(Role.ARK, ark), Entry.of(Role.ASK, ask),
               Entry.of(Role.VLEK if vlek else Role.VCEK, leaf)]
    if crl is not None:
        entries.append(Entry.of(Role.CRL, crl))
    return table.encode(entries)


def _case(name: str, blob: bytes, trust: TrustStore, at: datetime, platform: Platform,
          report: bytes) -> Case:
    case = Case(name, blob, trust, at, platform, report, table.decode(blob).spans)
    kw = dict(trust=trust, at=at, platform=platform)
    assert policy.check_blob(blob, **kw) == [], name  # precondition: a clean original
    assert policy.check_report(blob, report, **kw) == [], name
    return case


def _real(name: str, chain: str, leaf: str, report: str, at: datetime,
          crl: str | None = None) -> Case:
    mid, ark = pki.load_bytes((VECTORS / chain).read_bytes(), chain)
    cert = pki.load_certificate((VECTORS / leaf).read_bytes(), leaf)
    crl_der = pki.load_crl((VECTORS / crl).read_bytes(), crl).der if crl else None
    vlek = cert.kind is pki.Kind.VLEK
    raw = (VECTORS / report).read_bytes()
    r = reportmod.parse(raw)
    product = cert.product
    platform = Platform(product=product, reported_tcb=r.reported_tcb(product),
                        chip_id=None if vlek else r.hwid(product),
                        signing_key="vlek" if vlek else "vcek")
    return _case(name, _encode(ark.der, mid.der, cert.der, crl_der, vlek), pinned(), at,
                 platform, raw)


def _dev(name: str, product: Product, vlek: bool) -> Case:
    pk = devpki.DevPki.generate(product, name="fuzz")
    psp = devpki.FakePsp(pk, devpki.make_platform(product, vlek=vlek))
    # A CRL with entries, so the revoked-entry fields are parsed (and corrupted) too.
    crl = pk.crl([7, 0x1234, 0xABCDEF])
    return _case(name, psp.blob(crl), pk.trust, datetime.now(timezone.utc), psp.platform,
                 psp.report(b"fuzz"))


def corpus() -> list[Case]:
    """Milan, Genoa and Turin VCEKs and a Milan VLEK (real, AMD-signed, the Milan one with
    AMD's CRL), and dev-PKI blobs with CRLs: Milan VCEK, Genoa VLEK, Turin VCEK."""
    vcek_at = datetime(2026, 9, 1, tzinfo=timezone.utc)
    return [
        # milan_crl.der is current 2026-06-22..2026-08-08, inside the VCEK's validity.
        _real("milan-vcek+crl", "milan_cert_chain.pem", "milan_vcek.der", "milan_report.bin",
              datetime(2026, 7, 1, tzinfo=timezone.utc), crl="milan_crl.der"),
        # No Genoa CRL here: the one in tests/vectors went stale before this VCEK was issued.
        _real("genoa-vcek", "genoa_cert_chain.pem", "genoa_vcek.der", "genoa_report.bin",
              vcek_at),
        _real("turin-vcek", "turin_cert_chain.pem", "turin_vcek.der", "turin_report.bin",
              vcek_at),
        _real("milan-vlek", "milan_vlek_cert_chain.pem", "milan_vlek.der",
              "milan_vlek_report.bin", datetime(2025, 3, 1, tzinfo=timezone.utc)),
        _dev("dev-milan-vcek+crl", Product.MILAN, vlek=False),
        _dev("dev-genoa-vlek+crl", Product.GENOA, vlek=True),
        _dev("dev-turin-vcek+crl", Product.TURIN, vlek=False),
    ]


def corrupt(rng: random.Random, data: bytes, start: int) -> bytes:
    """``data`` with 1-4 bytes at or after ``start`` flipped or replaced (each one changed)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(start, len(buf))
        if rng.random() < 0.5:
            buf[pos] ^= 1 << rng.randrange(8)
        else:
            buf[pos] = (buf[pos] + rng.randrange(1, 256)) % 256
    return bytes(buf)


@dataclass
class Result:
    inputs: int = 0
    seconds: float = 0.0
    #: (input index, function, "Type: message @ file:line") of every exception.
    exceptions: list[tuple[int, str, str]] = field(default_factory=list)
    #: Inputs whose problems include a ``format`` problem / an unreadable or malformed field
    #: (the lazily parsed fields this fuzz is after).
    format_problems: int = 0
    unreadable_fields: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, other: "Result") -> None:
        self.inputs += other.inputs
        self.seconds += other.seconds
        self.exceptions += other.exceptions
        self.format_problems += other.format_problems
        self.unreadable_fields += other.unreadable_fields
        for k, v in other.calls.items():
            self.calls[k] = self.calls.get(k, 0) + v

    def summary(self, what: str) -> str:
        per_k = 1e6 * self.seconds / self.inputs if self.inputs else 0.0
        return (f"{what}: {self.inputs} inputs, {len(self.exceptions)} exceptions, "
                f"{self.format_problems} with format problems ({self.unreadable_fields} "
                f"naming an unreadable/malformed field), {per_k:.0f} ms per 1000 inputs "
                f"({self.seconds:.1f} s); calls {self.calls}")


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e)[:100]} @ {Path(frame.filename).name}:{frame.lineno}"


def _check_result(fn: str, out) -> list[policy.Problem]:
    assert isinstance(out, list) and all(isinstance(p, policy.Problem) for p in out), \
        f"{fn} returned {out!r}"
    return out


def run(case: Case, n: int, seed: int) -> Result:
    """Feed ``n`` corrupted copies of ``case`` to the policy; record every exception.

    Input i goes to check_report (i % 16 == 0; the report itself corrupted every other
    time), to build_blob with the corrupted DER of each entry (i % 16 == 1), and to
    check_blob otherwise; all three call parse_blob. Results must be lists of Problem
    (build_blob: bytes, or PolicyError carrying them)."""
    rng = random.Random(f"{seed}:{case.name}")
    kw = dict(trust=case.trust, at=case.at, platform=case.platform)
    res = Result(inputs=n)
    t0 = time.perf_counter()
    for i in range(n):
        blob = corrupt(rng, case.blob, case.body)
        fn = ("check_report", "build_blob")[i % 16] if i % 16 < 2 else "check_blob"
        res.calls[fn] = res.calls.get(fn, 0) + 1
        try:
            if fn == "check_blob":
                problems = _check_result(fn, policy.check_blob(blob, **kw))
            elif fn == "check_report":
                rep = corrupt(rng, case.report, 0) if i % 32 == 0 else case.report
                problems = _check_result(fn, policy.check_report(blob, rep, **kw))
            else:
                parts = [blob[off:off + length] for off, length in case.spans]
                try:
                    out = policy.build_blob(*parts[:3], parts[3] if len(parts) > 3 else None,
                                            **kw)
                    assert isinstance(out, bytes), f"build_blob returned {out!r}"
                    problems = []
                except policy.PolicyError as e:
                    problems = _check_result(fn, e.problems)
                    assert problems, "PolicyError without problems"
        except Exception as e:  # noqa: BLE001 - counting them is the point
            res.exceptions.append((i, fn, _where(e)))
            continue
        if any(p.check == "format" for p in problems):
            res.format_problems += 1
        if any(": unreadable " in p.message or ": malformed " in p.message for p in problems):
            res.unreadable_fields += 1
    res.seconds = time.perf_counter() - t0
    return res

