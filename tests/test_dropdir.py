"""The drop directory: judge() on real and dev certificates, and DropDir on real inotify.

Every file dropped ends in accepted/ or rejected/ (with a .reason naming each problem),
exactly once; only valid certificates reach ``accept``. Negative controls: the judge
switched off (CERTD_UNSAFE=dropdir-judge) lets a wrong-TCB VCEK through; an overflow
without the rescan leaves files unprocessed; without the parent watch a re-created
directory is never watched again; without the claim (CERTD_UNSAFE=dropdir-claim) a file
written under the same name during an install is moved in place of the judged one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives.serialization import Encoding

from certd import devpki, faults, policy
from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd import roots
from certd.platform import Platform
from certd.sources import dropdir
from certd.sources.dropdir import DropDir, judge
from tests.inotify_support import flood, max_queued

PEM, DER = Encoding.PEM, Encoding.DER
BOUND = 60  # seconds: generous bound for a whole scenario on a loaded machine


# --- material -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def milan(dev_pki):
    return dev_pki(Product.MILAN)


@pytest.fixture(scope="module")
def plat():
    return devpki.make_platform(Product.MILAN, tcb=Tcb(bl=3, tee=0, snp=8, ucode=115))


@pytest.fixture(scope="module")
def vcek(milan, plat):
    return milan.issue_vcek(plat.reported_tcb, plat.chip_id)[0]


def other_tcb(plat: Platform) -> Tcb:
    t = plat.reported_tcb
    return Tcb(bl=t.bl, tee=t.tee, snp=t.snp + 1, ucode=t.ucode)


def problem_checks(verdict) -> set[str]:
    return {p.check for p in verdict.problems}


# --- judge(): pure ------------------------------------------------------------------------

def test_vcek_pem_and_der_accepted(milan, plat, vcek):
    want = policy.build_blob(milan.ark, milan.ask, vcek, trust=milan.trust, platform=plat)
    for data in (vcek.public_bytes(PEM), vcek.public_bytes(DER)):
        v = judge(data, "vcek.pem", trust=milan.trust, platform=plat)
        assert v.accepted and v.problems == [] and v.blob == want, v.reason
        assert policy.check_blob(v.blob, trust=milan.trust, platform=plat) == []
    assert "VCEK" in v.reason and str(plat.reported_tcb) in v.reason


def test_bundle_and_whole_blob_accepted(milan, plat, vcek):
    want = policy.build_blob(milan.ark, milan.ask, vcek, trust=milan.trust, platform=plat)
    bundle = milan.cert_chain_pem() + vcek.public_bytes(PEM)
    assert judge(bundle, "bundle.pem", trust=milan.trust, platform=plat).blob == want
    # A whole GHCB table, even a non-canonical one without its ASK, gives the canonical blob.
    assert judge(devpki.blob(milan.ark, milan.ask, vcek), "certs.blob", trust=milan.trust,
                 platform=plat).blob == want
    no_ask = table.encode([table.Entry.of(table.Role.VCEK, vcek.public_bytes(DER))])
    assert judge(no_ask, "leaf-only.blob", trust=milan.trust, platform=plat).blob == want


def test_vlek_completed_with_the_asvk(milan, plat):
    vplat = plat.replace(signing_key="vlek")
    vlek = milan.issue_vlek(vplat.reported_tcb)[0]
    v = judge(vlek.public_bytes(PEM), "vlek.pem", trust=milan.trust, platform=vplat)
    assert v.accepted, v.reason
    assert v.blob == policy.build_blob(milan.ark, milan.asvk, vlek, trust=milan.trust,
                                       platform=vplat)
    # ... and refused while the platform signs with its VCEK (and a VCEK on a VLEK platform).
    v = judge(vlek.public_bytes(PEM), "vlek.pem", trust=milan.trust, platform=plat)
    assert not v.accepted and problem_checks(v) == {"signing_key"}
    assert "signs reports with its VCEK" in v.reason
    vc = milan.issue_vcek(plat.reported_tcb, plat.chip_id)[0]
    assert problem_checks(judge(vc.public_bytes(DER), "vcek.der", trust=milan.trust,
                                platform=vplat)) == {"signing_key"}


def test_real_vlek_vector(vectors):
    """milan_vlek.der (AWS) with its report's TCB, completed with AMD's pinned ASVK."""
    rep = reportmod.parse((vectors / "milan_vlek_report.bin").read_bytes())
    vplat = Platform(product=Product.MILAN, reported_tcb=rep.reported_tcb(Product.MILAN),
                     signing_key="vlek")
    data = (vectors / "milan_vlek.der").read_bytes()
    when = datetime(2024, 12, 1, tzinfo=timezone.utc)  # inside its one-year validity
    v = judge(data, "milan_vlek.der", trust=roots.pinned(), platform=vplat, at=when)
    assert v.accepted, v.reason
    asvk = roots.pinned().roots(Product.MILAN).asvk
    assert policy.check_report(v.blob, rep, trust=roots.pinned(), platform=vplat, at=when) == []
    assert asvk.public_bytes(DER) in v.blob
    # Today it has expired (VLEKs are one-year certificates).
    v = judge(data, "milan_vlek.der", trust=roots.pinned(), platform=vplat)
    assert not v.accepted and problem_checks(v) == {"validity"} and "expired" in v.reason
    # Another TCB: refused, and the reason says which.
    v = judge(data, "milan_vlek.der", trust=roots.pinned(),
              platform=vplat.replace(reported_tcb=other_tcb(vplat)), at=when)
    assert problem_checks(v) == {"tcb"}


def test_real_vcek_vector(vectors):
    rep = reportmod.parse((vectors / "milan_report.bin").read_bytes())
    p = Platform(product=Product.MILAN, reported_tcb=rep.reported_tcb(Product.MILAN),
                 chip_id=rep.hwid(Product.MILAN))
    data = (vectors / "milan_vcek.der").read_bytes()
    v = judge(data, "milan_vcek.der", trust=roots.pinned(), platform=p)
    assert v.accepted, v.reason
    assert policy.check_report(v.blob, rep, trust=roots.pinned(), platform=p) == []
    other_chip = (vectors / "milan_trustee_vcek.der").read_bytes()  # another Milan chip
    v = judge(other_chip, "trustee.der", trust=roots.pinned(), platform=p)
    assert "chip_id" in problem_checks(v)
    # A dev certificate never chains to AMD's pinned roots.
    genoa = (vectors / "genoa_vcek.der").read_bytes()
    assert "product" in problem_checks(judge(genoa, "genoa.der", trust=roots.pinned(), platform=p))


@pytest.mark.parametrize("case", ["garbage", "empty", "pem-garbage", "ark-only", "two-leaves",
                                  "another-product", "another-product-unpinned", "expired",
                                  "not-yet-valid", "wrong-chip", "wrong-tcb", "vlek-on-vcek",
                                  "foreign-pki", "no-platform"])
def test_refusals_name_the_problem(dev_pki, milan, plat, vcek, case):
    genoa = dev_pki(Product.GENOA)
    trust = milan.trust
    data, want = {
        "garbage": (b"\x00garbage\xff" * 40, "format"),
        "empty": (b"", "format"),
        "pem-garbage": (b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n", "format"),
        "ark-only": (milan.ark.public_bytes(PEM), "role"),
        "two-leaves": (vcek.public_bytes(PEM) * 2, "role"),
        "expired": (milan.issue_vcek(plat.reported_tcb, plat.chip_id,
                                     not_before=datetime(2020, 1, 1, tzinfo=timezone.utc),
                                     not_after=datetime(2021, 1, 1, tzinfo=timezone.utc)
                                     )[0].public_bytes(PEM), "validity"),
        "not-yet-valid": (milan.issue_vcek(plat.reported_tcb, plat.chip_id,
                                           not_before=datetime.now(timezone.utc) + timedelta(days=3)
                                           )[0].public_bytes(PEM), "validity"),
        "wrong-chip": (milan.issue_vcek(plat.reported_tcb, os.urandom(64))[0].public_bytes(PEM),
                       "chip_id"),
        "wrong-tcb": (milan.issue_vcek(other_tcb(plat), plat.chip_id)[0].public_bytes(PEM), "tcb"),
        "vlek-on-vcek": (milan.issue_vlek(plat.reported_tcb)[0].public_bytes(PEM), "signing_key"),
        "foreign-pki": (devpki.DevPki.generate(Product.MILAN, name="foreign").issue_vcek(
            plat.reported_tcb, plat.chip_id)[0].public_bytes(PEM), "chain"),
        "no-platform": (vcek.public_bytes(PEM), "platform"),
    }.get(case, (None, None))
    if case.startswith("another-product"):
        gplat = devpki.make_platform(Product.GENOA, tcb=plat.reported_tcb, chip_id=plat.chip_id)
        data = genoa.issue_vcek(gplat.reported_tcb, gplat.chip_id)[0].public_bytes(PEM)
        want = "product"
        if case == "another-product":  # both lines trusted: only the product differs
            trust = devpki.trust_store(milan, genoa)
    v = judge(data, case, trust=trust, platform=None if case == "no-platform" else plat)
    assert not v.accepted and v.blob is None
    assert want in problem_checks(v), v.reason
    # One line naming every problem.
    assert "\n" not in v.reason and all(str(p) in v.reason for p in v.problems)


def test_reason_names_every_problem(milan, plat):
    bad = milan.issue_vcek(other_tcb(plat), os.urandom(64),
                           not_before=datetime(2020, 1, 1, tzinfo=timezone.utc),
                           not_after=datetime(2021, 1, 1, tzinfo=timezone.utc))[0]
    v = judge(bad.public_bytes(DER), "bad.der", trust=milan.trust, platform=plat)
    assert problem_checks(v) == {"tcb", "chip_id", "validity"}
    assert all(f"{c}:" in v.reason for c in ("tcb", "chip_id", "validity"))


def test_judge_at(plat):
    """``at`` is the only clock: a certificate valid then is accepted then, not now."""
    old = devpki.DevPki.generate(Product.MILAN, not_before=datetime(2019, 1, 1, tzinfo=timezone.utc))
    c = old.issue_vcek(plat.reported_tcb, plat.chip_id,
                       not_before=datetime(2020, 1, 1, tzinfo=timezone.utc),
                       not_after=datetime(2021, 1, 1, tzinfo=timezone.utc))[0]
    data = c.public_bytes(PEM)
    assert judge(data, "c", trust=old.trust, platform=plat,
                 at=datetime(2020, 6, 1, tzinfo=timezone.utc)).accepted
    assert problem_checks(judge(data, "c", trust=old.trust, platform=plat)) == {"validity"}


# --- DropDir on real inotify --------------------------------------------------------------

@dataclass
class Harness:
    """Runs a DropDir in ``root/drop`` and records what it does."""

    root: Path
    trust: roots.TrustStore
    plat: Platform | None
    install_failure: str | None = None
    accepted: list[tuple[str, bytes]] = field(default_factory=list)
    results: list[dropdir.Outcome] = field(default_factory=list)
    dd: DropDir | None = None

    def __post_init__(self) -> None:
        self.dir = self.root / "drop"
        self.changed = asyncio.Event()
        self.accept_seen = asyncio.Event()

    def accept(self, blob: bytes, name: str) -> str | None:
        self.accepted.append((name, blob))
        self.accept_seen.set()
        return self.install_failure

    def on_result(self, outcome: dropdir.Outcome) -> None:
        self.results.append(outcome)
        self.changed.set()

    def start(self) -> DropDir:
        self.dd = DropDir(self.dir, trust=self.trust, platform=lambda: self.plat,
                          accept=self.accept, loop=asyncio.get_running_loop(),
                          on_result=self.on_result)
        return self.dd

    async def results_count(self, n: int) -> None:
        async with asyncio.timeout(BOUND):
            while len(self.results) < n:
                self.changed.clear()
                await self.changed.wait()

    def drop(self, name: str, data: bytes, *, rename: bool = True) -> None:
        """Write as a careful writer does (temp file, then rename) or in place."""
        if rename:
            tmp = self.dir / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.dir / name)
        else:
            (self.dir / name).write_bytes(data)

    def rejected_reason(self, name: str) -> str:
        assert os.path.lexists(self.dir / "rejected" / name), sorted(os.listdir(self.dir))
        return (self.dir / "rejected" / f"{name}.reason").read_text()

    def files(self, sub: str) -> set[str]:
        d = self.dir / sub
        return set(os.listdir(d)) if d.exists() else set()


@pytest.fixture
async def harness(tmp_path, milan, plat):
    h = Harness(tmp_path, milan.trust, plat)
    yield h
    if h.dd is not None:
        await h.dd.aclose()


async def bounded(aw):
    async with asyncio.timeout(BOUND):
        return await aw


async def events_delivered(dd: DropDir, scratch: Path) -> None:
    """Wait until every inotify event queued before now has reached the DropDir: events of
    one inotify instance arrive in order, so seeing a fresh one on a scratch watch is enough."""
    scratch.mkdir(exist_ok=True)
    seen = asyncio.Event()
    inner = dd.watcher.callback

    def spy(ev):
        if ev.directory == str(scratch):
            seen.set()
        else:
            inner(ev)

    dd.watcher.callback = spy
    dd.watcher.add(str(scratch), dropdir.inotify.CLOSE_WRITE)
    try:
        (scratch / "ping").write_bytes(b"x")
        async with asyncio.timeout(BOUND):
            await seen.wait()
    finally:
        dd.watcher.remove(str(scratch))
        dd.watcher.callback = inner


async def barrier(dd: DropDir, scratch: Path) -> None:
    """... and has been processed."""
    await events_delivered(dd, scratch)
    await bounded(dd.drained())


async def test_vcek_accepted_within_one_second(harness, milan, plat, vcek):
    structlog.reset_defaults()
    dd = harness.start()
    await dd.drained()
    with structlog.testing.capture_logs() as logs:
        t0 = time.monotonic()
        harness.drop("vcek.pem", vcek.public_bytes(PEM))
        await asyncio.wait_for(harness.accept_seen.wait(), 1.0)  # the issue's bound: 1 s
        latency = time.monotonic() - t0
        await harness.results_count(1)
    print(f"drop-to-accept latency {latency * 1000:.1f} ms")
    assert harness.accepted == [("vcek.pem", policy.build_blob(
        milan.ark, milan.ask, vcek, trust=milan.trust, platform=plat))]
    assert harness.files("accepted") == {"vcek.pem"} and harness.files("rejected") == set()
    assert not (harness.dir / "vcek.pem").exists()
    lines = [e for e in logs if e.get("component") == "certd.dropdir" and "file" in e]
    assert [(e["event"], e["file"]) for e in lines] == [("drop-dir file accepted", "vcek.pem")]
    assert "VCEK" in lines[0]["reason"]


async def test_vlek_accepted(harness, milan, plat):
    harness.plat = plat.replace(signing_key="vlek")
    vlek = milan.issue_vlek(plat.reported_tcb)[0]
    harness.start()
    harness.drop("vlek.der", vlek.public_bytes(DER), rename=False)  # IN_CLOSE_WRITE
    await harness.results_count(1)
    assert [n for n, _ in harness.accepted] == ["vlek.der"]
    assert harness.results[0].accepted and harness.files("accepted") == {"vlek.der"}
    assert milan.asvk.public_bytes(DER) in harness.accepted[0][1]


async def test_real_vlek_expired_in_the_drop_dir(tmp_path, vectors):
    """AMD's real VLEK (AWS) on the platform of its own report, with the pinned roots:
    everything matches except that it expired in 2025, and the .reason says exactly that."""
    rep = reportmod.parse((vectors / "milan_vlek_report.bin").read_bytes())
    vplat = Platform(product=Product.MILAN, reported_tcb=rep.reported_tcb(Product.MILAN),
                     signing_key="vlek")
    h = Harness(tmp_path, roots.pinned(), vplat)
    h.start()
    try:
        h.drop("aws-vlek.der", (vectors / "milan_vlek.der").read_bytes())
        await h.results_count(1)
    finally:
        await h.dd.aclose()
    reason = h.rejected_reason("aws-vlek.der").splitlines()
    assert len(reason) == 1 and reason[0].startswith("validity: ") and "expired" in reason[0]
    assert h.accepted == []


def _bad_files(dev_pki, milan, plat, vectors) -> dict[str, tuple[bytes, str]]:
    genoa = dev_pki(Product.GENOA)
    gplat = devpki.make_platform(Product.GENOA, tcb=plat.reported_tcb, chip_id=plat.chip_id)
    return {
        "garbage.pem": (b"this is not a certificate\n", "format"),
        "genoa.pem": (genoa.issue_vcek(gplat.reported_tcb, gplat.chip_id)[0].public_bytes(PEM),
                      "product"),
        "expired.pem": (milan.issue_vcek(plat.reported_tcb, plat.chip_id,
                                         not_before=datetime(2020, 1, 1, tzinfo=timezone.utc),
                                         not_after=datetime(2021, 1, 1, tzinfo=timezone.utc)
                                         )[0].public_bytes(PEM), "validity"),
        "wrong-chip.der": (milan.issue_vcek(plat.reported_tcb, os.urandom(64))[0].public_bytes(DER),
                           "chip_id"),
        "wrong-tcb.pem": (milan.issue_vcek(other_tcb(plat), plat.chip_id)[0].public_bytes(PEM),
                          "tcb"),
        "vlek.pem": (milan.issue_vlek(plat.reported_tcb)[0].public_bytes(PEM), "signing_key"),
        "aws-vlek.der": ((vectors / "milan_vlek.der").read_bytes(), "chain"),  # AMD's, not dev
    }


async def test_bad_files_rejected_with_reason(harness, dev_pki, milan, plat, vcek, vectors):
    harness.dd = harness.start()
    with (harness.dir / "empty-file").open("wb"):
        pass
    bad = _bad_files(dev_pki, milan, plat, vectors)
    for name, (data, _) in bad.items():
        harness.drop(name, data)
    await harness.results_count(len(bad) + 1)  # + the empty file
    assert harness.accepted == []  # the caller's served blob is never touched
    for name, (_, check) in bad.items():
        reason = harness.rejected_reason(name)
        lines = reason.splitlines()
        assert lines and any(line.startswith(f"{check}: ") for line in lines), (name, reason)
    assert harness.files("accepted") == set()
    assert dd_counts(harness) == {"accepted": 0, "rejected": len(bad) + 1}


def dd_counts(h: Harness) -> dict[str, int]:
    return {k: h.dd.counts[k] for k in ("accepted", "rejected")}


async def wrong_tcb_is_refused(harness: Harness, milan, plat) -> None:
    """The invariant: a VCEK for another TCB never reaches accept and lands in rejected/."""
    harness.start()
    harness.drop("wrong-tcb.pem",
                 milan.issue_vcek(other_tcb(plat), plat.chip_id)[0].public_bytes(PEM))
    await harness.results_count(1)
    assert harness.accepted == [], "a wrong-TCB VCEK reached accept"
    assert harness.rejected_reason("wrong-tcb.pem").startswith("tcb: ")


async def test_wrong_tcb_refused(harness, milan, plat):
    assert not faults.unsafe(dropdir.UNSAFE_JUDGE)
    await wrong_tcb_is_refused(harness, milan, plat)


async def test_negative_control_judge_bypassed(harness, milan, plat, monkeypatch):
    monkeypatch.setenv(faults.UNSAFE_ENV, dropdir.UNSAFE_JUDGE)
    with pytest.raises(AssertionError, match="reached accept"):
        await wrong_tcb_is_refused(harness, milan, plat)
    assert [n for n, _ in harness.accepted] == ["wrong-tcb.pem"]


async def test_install_failure_and_no_overwrite(harness, vcek):
    harness.install_failure = "the exclusive lock is busy"
    harness.start()
    for i in range(3):
        harness.drop("vcek.pem", vcek.public_bytes(PEM))
        await harness.results_count(i + 1)
    assert harness.files("rejected") == {"vcek.pem", "vcek.pem.reason", "vcek.1.pem",
                                         "vcek.1.pem.reason", "vcek.2.pem", "vcek.2.pem.reason"}
    assert "install: vcek.pem is valid, but installing it failed: the exclusive lock is busy" \
        in harness.rejected_reason("vcek.2.pem")
    # An operator retries by moving it back; once installing works it is accepted.
    harness.install_failure = None
    os.replace(harness.dir / "rejected" / "vcek.1.pem", harness.dir / "vcek.pem")
    await harness.results_count(4)
    assert harness.results[-1].accepted and harness.files("accepted") == {"vcek.pem"}
    assert len(harness.accepted) == 4


async def test_initial_scan_and_what_is_left_alone(harness, milan, plat, vcek):
    d = harness.dir
    (d / "rejected").mkdir(parents=True)
    (d / "rejected" / "old.pem").write_bytes(b"kept")
    (d / "rejected" / "old.pem.reason").write_text("format: old\n")
    (d / ".processing").mkdir()
    (d / ".processing" / "crashed.pem").write_bytes(vcek.public_bytes(PEM))  # claimed, then a crash
    (d / "old.pem").write_bytes(b"garbage")
    (d / "present.der").write_bytes(vcek.public_bytes(DER))
    for ignored in (".hidden.pem", "partial.pem.tmp", "download.part", "editor~"):
        (d / ignored).write_bytes(vcek.public_bytes(PEM))
    (d / "subdir").mkdir()
    (d / "subdir" / "inner.pem").write_bytes(vcek.public_bytes(PEM))
    (d / "link.pem").symlink_to(d / "present.der")
    os.mkfifo(d / "fifo.pem")  # must not block the loop
    harness.start()
    await harness.results_count(5)
    await harness.dd.drained()
    assert sorted(n for n, _ in harness.accepted) == ["crashed.pem", "present.der"]
    assert harness.files("accepted") == {"crashed.pem", "present.der"}
    assert harness.files("rejected") == {"old.pem", "old.pem.reason", "old.1.pem",
                                         "old.1.pem.reason", "link.pem", "link.pem.reason",
                                         "fifo.pem", "fifo.pem.reason"}
    assert (d / "rejected" / "old.pem").read_bytes() == b"kept"  # never overwritten
    assert "symbolic link" in harness.rejected_reason("link.pem")
    assert "not a regular file" in harness.rejected_reason("fifo.pem")
    assert (d / "rejected" / "link.pem").is_symlink()
    left = set(os.listdir(d)) - {"accepted", "rejected", ".processing"}
    assert left == {".hidden.pem", "partial.pem.tmp", "download.part", "editor~", "subdir"}
    assert os.listdir(d / ".processing") == []


async def test_platform_unknown_refuses(harness, vcek):
    harness.plat = None
    harness.start()
    harness.drop("vcek.pem", vcek.public_bytes(PEM))
    await harness.results_count(1)
    assert harness.accepted == [] and harness.rejected_reason("vcek.pem").startswith("platform: ")


async def test_thousand_files_at_once(harness, vcek):
    """1,000 files written by another thread while certd processes: each ends in
    accepted/ or rejected/ exactly once, none lost, and the loop keeps turning."""
    harness.start()
    await harness.dd.drained()
    good, bad = vcek.public_bytes(PEM), b"not a certificate"
    names = {f"f{i:04d}.pem": (good if i % 2 else bad) for i in range(1000)}

    def writer():
        for i, (name, data) in enumerate(names.items()):
            harness.drop(name, data, rename=bool(i % 3))

    stalls = []

    async def ticker():
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            stalls.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(writer)
        await harness.results_count(1000)
    finally:
        tick.cancel()
    elapsed = time.monotonic() - t0
    await harness.dd.drained()
    accepted = harness.files("accepted")
    rejected = {n for n in harness.files("rejected") if not n.endswith(".reason")}
    assert accepted | rejected == set(names) and not accepted & rejected
    assert accepted == {n for n, d in names.items() if d is good}
    assert sorted(n for n, _ in harness.accepted) == sorted(accepted)  # once each
    assert len(harness.results) == 1000 and dd_counts(harness) == {"accepted": 500, "rejected": 500}
    assert set(os.listdir(harness.dir)) == {"accepted", "rejected", ".processing"}
    stalls.sort()
    print(f"1000 files in {elapsed:.2f} s ({1000 / elapsed:.0f} files/s); loop stalls "
          f"p50 {stalls[len(stalls) // 2] * 1000:.1f} ms, max {stalls[-1] * 1000:.1f} ms "
          f"over {len(stalls)} ticks of 1 ms")


async def test_rescan_while_events_are_held(harness, vcek, tmp_path):
    """The overflow path, called directly: files whose events are still unread are found
    by rescan(); the events arriving afterwards do not process anything twice."""
    dd = harness.start()
    await dd.drained()
    dd.watcher.pause()
    for i in range(5):
        harness.drop(f"v{i}.pem", vcek.public_bytes(PEM) if i % 2 else b"junk")
    dd.rescan()
    await harness.results_count(5)
    dd.watcher.resume()
    await barrier(dd, tmp_path / "scratch")
    assert len(harness.results) == 5 and len(harness.accepted) == 2
    assert {n for n in harness.files("rejected") if not n.endswith(".reason")} == {"v0.pem", "v2.pem", "v4.pem"}


async def real_overflow(harness: Harness, vcek, tmp_path: Path) -> None:
    limit = max_queued()
    dd = harness.start()
    await dd.drained()
    dd.watcher.pause()

    def fill():
        flood(harness.dir, limit + 100)  # names the drop directory ignores
        for i in range(3):  # their events are lost in the overflow
            harness.drop(f"after{i}.pem", vcek.public_bytes(PEM), rename=False)

    await asyncio.to_thread(fill)
    overflowed = asyncio.Event()
    inner = dd.watcher.callback

    def spy(ev):
        inner(ev)
        if ev.overflow:
            overflowed.set()

    dd.watcher.callback = spy
    dd.watcher.resume()
    async with asyncio.timeout(BOUND):
        await overflowed.wait()  # precondition: the kernel did overflow
    dd.watcher.callback = inner
    await barrier(dd, tmp_path / "scratch")  # the queue has room again
    assert dd.counts["overflows"] == 1


async def test_real_overflow_triggers_rescan(harness, vcek, tmp_path):
    await real_overflow(harness, vcek, tmp_path)
    await harness.results_count(3)
    assert sorted(n for n, _ in harness.accepted) == ["after0.pem", "after1.pem", "after2.pem"]


async def test_negative_control_overflow_without_rescan(harness, vcek, tmp_path, monkeypatch):
    """Same flood with the rescan switched off after start: the three files are never seen."""
    original = DropDir.rescan
    started = []

    def rescan_once(self):
        if not started:
            started.append(1)
            original(self)

    monkeypatch.setattr(DropDir, "rescan", rescan_once)
    await real_overflow(harness, vcek, tmp_path)
    assert harness.results == [] and len(os.listdir(harness.dir)) > 3


async def test_directory_removed_and_recreated(harness, vcek, tmp_path):
    dd = harness.start()
    await dd.drained()
    # 1. Removed and re-created at once (before certd hears of it), a file inside.
    shutil.rmtree(harness.dir)
    harness.dir.mkdir()
    harness.drop("one.pem", vcek.public_bytes(PEM))
    await harness.results_count(1)
    # 2. Removed; certd notices and waits; re-created later.
    shutil.rmtree(harness.dir)
    await bounded(dd.wait_watching(False))
    harness.dir.mkdir()
    await bounded(dd.wait_watching(True))
    harness.drop("two.pem", vcek.public_bytes(PEM))
    await harness.results_count(2)
    # 3. Moved away: the old directory is no longer watched; a new one is.
    os.rename(harness.dir, tmp_path / "moved")
    await bounded(dd.wait_watching(False))
    (tmp_path / "moved" / "stray.pem").write_bytes(vcek.public_bytes(PEM))
    harness.dir.mkdir()
    await bounded(dd.wait_watching(True))
    harness.drop("three.pem", vcek.public_bytes(PEM))
    await harness.results_count(3)
    await barrier(dd, tmp_path / "scratch")
    assert [r.name for r in harness.results] == ["one.pem", "two.pem", "three.pem"]
    assert all(r.accepted for r in harness.results)
    assert (tmp_path / "moved" / "stray.pem").exists()
    assert harness.files("accepted") == {"three.pem"}


async def test_negative_control_without_parent_watch(harness, vcek, tmp_path):
    """Without the parent watch a re-created drop directory is never watched again."""
    dd = harness.start()
    await dd.drained()
    dd.watcher.remove(str(tmp_path))
    shutil.rmtree(harness.dir)
    await bounded(dd.wait_watching(False))
    harness.dir.mkdir()
    harness.drop("lost.pem", vcek.public_bytes(PEM))
    await barrier(dd, tmp_path / "scratch")
    assert not dd.watching and harness.results == []
    assert (harness.dir / "lost.pem").exists()


async def test_async_accept_one_at_a_time(harness, vcek, tmp_path):
    """``accept`` may await (the rotation waits for leases to drain): the loop stays free,
    files wait their turn, and an exception from it counts as a failed install."""
    gate, started = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def accept(blob: bytes, name: str) -> str | None:
        calls.append(name)
        started.set()
        await gate.wait()
        if name == "b.pem":
            raise OSError("disk full")
        return None

    harness.accept = accept
    structlog.reset_defaults()
    dd = harness.start()
    with structlog.testing.capture_logs() as logs:
        harness.drop("a.pem", vcek.public_bytes(PEM))
        harness.drop("b.pem", vcek.public_bytes(PEM))
        await bounded(started.wait())
        await events_delivered(dd, tmp_path / "scratch")  # b.pem's event is in, and waits
        assert calls == ["a.pem"] and harness.results == []
        gate.set()
        await harness.results_count(2)
    assert "installing a drop-dir certificate failed" in [e["event"] for e in logs]
    assert calls == ["a.pem", "b.pem"]
    assert [(r.name, r.accepted) for r in harness.results] == [("a.pem", True), ("b.pem", False)]
    assert "installing it failed: OSError: disk full" in harness.rejected_reason("b.pem")


async def judged_file_is_the_one_moved(harness: Harness, vcek, tmp_path: Path) -> None:
    """A file written again under the same name while the first is being installed is a
    new file: the valid one lands in accepted/, the garbage one in rejected/."""
    gate, started = asyncio.Event(), asyncio.Event()

    async def accept(blob: bytes, name: str) -> str | None:
        started.set()
        await gate.wait()
        return None

    harness.accept = accept
    dd = harness.start()
    good = vcek.public_bytes(PEM)
    harness.drop("a.pem", good)
    await bounded(started.wait())
    harness.drop("a.pem", b"garbage written while the first was installed")
    await events_delivered(dd, tmp_path / "scratch")
    gate.set()
    await bounded(dd.drained())
    assert (harness.dir / "accepted" / "a.pem").read_bytes() == good, "another file was moved"
    assert harness.rejected_reason("a.pem").startswith("format: ")
    assert [r.accepted for r in harness.results] == [True, False]


async def test_judged_file_is_the_one_moved(harness, vcek, tmp_path):
    assert not faults.unsafe(dropdir.UNSAFE_CLAIM)
    await judged_file_is_the_one_moved(harness, vcek, tmp_path)


async def test_negative_control_without_claim(harness, vcek, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.UNSAFE_ENV, dropdir.UNSAFE_CLAIM)
    with pytest.raises(AssertionError, match="another file was moved"):
        await judged_file_is_the_one_moved(harness, vcek, tmp_path)
