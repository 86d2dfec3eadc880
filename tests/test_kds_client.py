"""certd.sources.kds against a real HTTP server on loopback serving the real vectors."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from certd import policy
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Role
from certd.abi.tcb import Tcb
from certd.amd.roots import pinned
from certd.platform import Platform
from certd.sources import kds as kdsmod
from certd.sources.kds import KdsClient, KdsUnavailable

from kds_support import VECTORS, KdsServer, Reply

# The documented URLs, written out from tests/vectors/SOURCES.md and KDS's spec (not built
# with certd's URL code): Milan/Genoa 64-byte hwid; Turin 8-byte hwid with fmcSPL first.
REPORT_CHIP_ID = slice(0x1A0, 0x1E0)
CASES = {
    "milan": (Product.MILAN, "milan_report.bin", "milan_vcek.der",
              "blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68", Tcb(bl=2, tee=0, snp=5, ucode=68)),
    "genoa-A0h": (Product.from_cpuid(0x19, 0xA0), "genoa_report.bin", "genoa_vcek.der",
                  "blSPL=10&teeSPL=0&snpSPL=27&ucodeSPL=27", Tcb(bl=10, tee=0, snp=27, ucode=27)),
    "turin": (Product.TURIN, "turin_report.bin", "turin_vcek.der",
              "fmcSPL=1&blSPL=3&teeSPL=2&snpSPL=5&ucodeSPL=97",
              Tcb(fmc=1, bl=3, tee=2, snp=5, ucode=97)),
}


def case_platform(name: str) -> tuple[Platform, str]:
    product, report_file, _, query, tcb = CASES[name]
    chip = (VECTORS / report_file).read_bytes()[REPORT_CHIP_ID]
    hwid = chip[:8] if product is Product.TURIN else chip
    return (Platform(product=product, reported_tcb=tcb, chip_id=hwid),
            f"/vcek/v1/{product.value}/{hwid.hex()}?{query}")


class Log:
    """Collects structlog-style calls."""

    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def _add(self, level, event, **kw):
        self.lines.append((level, event, kw))

    def info(self, event, **kw):
        self._add("info", event, **kw)

    def warning(self, event, **kw):
        self._add("warning", event, **kw)

    def events(self, event):
        return [kw for _, e, kw in self.lines if e == event]

    def vcek_failures(self):
        return [kw for kw in self.events("kds fetch failed")
                if not kw["url"].endswith(("/crl", "/cert_chain"))]


@pytest.fixture
def kds():
    with KdsServer() as server:
        yield server


def client(urls, cache_dir, **kw) -> KdsClient:
    opts = dict(trust=pinned(), timeout_s=5.0, min_backoff_s=0.01, max_backoff_s=0.05,
                log=Log())
    opts.update(kw)
    return KdsClient(urls, cache_dir, **opts)


def leaf_of(blob: bytes) -> bytes:
    return next(e.data for e in table.decode(blob).entries if e.role in (Role.VCEK, Role.VLEK))


@pytest.mark.parametrize("name", list(CASES))
def test_documented_url_and_leaf(kds, tmp_path, name):
    platform, expected_target = case_platform(name)
    assert platform.product is CASES[name][0]
    if name == "genoa-A0h":
        assert platform.product is Product.GENOA  # model A0h (Siena/Bergamo) is Genoa
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert [r.target for r in kds.vcek_requests()] == [expected_target]
    assert leaf_of(blob) == (VECTORS / CASES[name][2]).read_bytes()
    # The blob carries the pinned ARK/ASK and the report of that very machine verifies with it.
    report = (VECTORS / CASES[name][1]).read_bytes()
    assert policy.check_report(blob, report, trust=pinned()) == []
    # cached: no network the second time
    assert c.cached_blob(platform) == blob
    assert c.vcek_blob_sync(platform, deadline_s=5) == blob
    assert len(kds.vcek_requests()) == 1


def test_stale_real_crl_is_dropped_not_served(kds, tmp_path):
    platform, _ = case_platform("milan")
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    # KDS's real Milan CRL (nextUpdate 2026-08-08) was fetched, found stale and left out
    assert any(r.path == "/vcek/v1/Milan/crl" for r in kds.requests)
    assert Role.CRL not in {e.role for e in table.decode(blob).entries}
    assert not (tmp_path / "cache" / "crl" / "Milan.der").exists()
    assert any("stale" in kw["reason"] for kw in c.log.events("kds fetch failed")
               if kw["url"].endswith("/crl"))


def test_an_old_crl_in_the_cache_is_deleted(kds, tmp_path):
    platform, _ = case_platform("milan")
    crl_file = tmp_path / "cache" / "crl" / "Milan.der"
    crl_file.parent.mkdir(parents=True)
    crl_file.write_bytes((VECTORS / "milan_crl.der").read_bytes())
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert Role.CRL not in {e.role for e in table.decode(blob).entries}
    assert not crl_file.exists()


# --- retries --------------------------------------------------------------------------------

def gaps(reqs):
    return [b.at - a.at for a, b in zip(reqs, reqs[1:])]


def test_429_with_retry_after_seconds_is_honoured(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply(429, b"slow down", {"Retry-After": "1"}))
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    reqs = kds.vcek_requests()
    assert len(reqs) == 2
    assert gaps(reqs)[0] >= 0.95  # backoff alone would have waited <= 0.05 s
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()
    fail = c.log.vcek_failures()[0]
    assert fail["kind"] == "throttled" and fail["retry_in_s"] == 1


def test_429_with_retry_after_http_date_is_honoured(kds, tmp_path):
    platform, _ = case_platform("milan")
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    kds.script(Reply(429, b"", {"Retry-After": when}))
    c = client([kds.url], tmp_path / "cache")
    c.vcek_blob_sync(platform, deadline_s=20)
    reqs = kds.vcek_requests()
    assert len(reqs) == 2 and gaps(reqs)[0] >= 1.0  # the date has 1 s granularity


def test_429_without_retry_after_backs_off_exponentially(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply(429), Reply(429), Reply(429))
    c = client([kds.url], tmp_path / "cache", min_backoff_s=0.1, max_backoff_s=0.3,
               rng=lambda: 0.5)  # jitter factor 1.0: delays 0.1, 0.2, 0.3 (capped)
    c.vcek_blob_sync(platform, deadline_s=20)
    reqs = kds.vcek_requests()
    assert len(reqs) == 4
    assert [kw["retry_in_s"] for kw in c.log.vcek_failures()] == [0.1, 0.2, 0.3]
    g = gaps(reqs)
    assert g[0] >= 0.1 and g[1] >= 0.2 and g[2] >= 0.3


def test_backoff_delay_is_jittered_and_capped():
    assert kdsmod.backoff_delay(0, 10, 300, 0.5) == 10
    assert kdsmod.backoff_delay(3, 10, 300, 0.5) == 80
    assert kdsmod.backoff_delay(10, 10, 300, 0.5) == 300
    lo = [kdsmod.backoff_delay(n, 10, 300, 0.0) for n in range(10)]
    hi = [kdsmod.backoff_delay(n, 10, 300, 0.999) for n in range(10)]
    assert all(10 <= a < b <= 300 or a == b == 300 for a, b in zip(lo, hi))
    assert min(lo) >= 10 and max(hi) <= 300
    assert kdsmod.backoff_delay(8, 10, 300, 0.0) == 240  # jitter below the cap too


def test_parse_retry_after():
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert kdsmod.parse_retry_after("120", now) == 120
    assert kdsmod.parse_retry_after("Tue, 01 Dec 2026 12:00:30 GMT", now) == 30
    assert kdsmod.parse_retry_after("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0
    assert kdsmod.parse_retry_after("soon", now) is None
    assert kdsmod.parse_retry_after(None, now) is None
    assert kdsmod.parse_retry_after("99999999", now) == kdsmod.MAX_RETRY_AFTER_S


def test_500_is_retried(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply(500, b"<html>oops</html>"), Reply(503, b"", {"Retry-After": "0"}))
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert len(kds.vcek_requests()) == 3
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()
    assert [kw["kind"] for kw in c.log.vcek_failures()] == ["server", "server"]


def test_404_tries_the_next_source(tmp_path):
    with KdsServer(served=[]) as mirror, KdsServer() as base:
        platform, target = case_platform("milan")
        c = client([mirror.url, base.url], tmp_path / "cache")
        blob = c.vcek_blob_sync(platform, deadline_s=20)
        assert [r.target for r in mirror.vcek_requests()] == [target]
        assert [r.target for r in base.vcek_requests()] == [target]
        assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()


def test_all_sources_failing_names_every_failure(tmp_path):
    with KdsServer(served=[]) as mirror, KdsServer() as base:
        base.script(*[Reply(500)] * 100)
        platform, _ = case_platform("milan")
        c = client([mirror.url, base.url], tmp_path / "cache")
        with pytest.raises(KdsUnavailable) as e:
            c.vcek_blob_sync(platform, deadline_s=0.5)
        kinds = {f.url.split("/vcek")[0]: f.kind for f in e.value.failures}
        assert kinds == {mirror.url: "missing", base.url: "server"}
        assert mirror.url in str(e.value) and base.url in str(e.value)
        assert len(mirror.vcek_requests()) >= 2  # retried once every source had failed
        assert not list((tmp_path / "cache").rglob("*_vcek.der"))  # error bodies never cached


def test_slow_body_times_out_then_succeeds(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply(200, slow_s=0.05))  # ~1.3 KB at 20 B/s: over a minute
    c = client([kds.url], tmp_path / "cache", timeout_s=0.5)
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert len(kds.vcek_requests()) == 2
    assert c.log.vcek_failures()[0]["kind"] == "network"
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()


def test_garbage_is_refused_and_never_cached(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(*[Reply.garbage()] * 50)
    c = client([kds.url], tmp_path / "cache")
    with pytest.raises(KdsUnavailable) as e:
        c.vcek_blob_sync(platform, deadline_s=0.3)
    assert e.value.invalid
    assert not list((tmp_path / "cache").rglob("*_vcek.der"))


def test_garbage_then_the_real_answer(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply.garbage())
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()
    cached = list((tmp_path / "cache").rglob("*_vcek.der"))
    assert [p.read_bytes() for p in cached] == [(VECTORS / "milan_vcek.der").read_bytes()]


WRONG = {  # a real VCEK of another chip / another TCB, answered with 200
    "other chip, same TCB": ("milan_trustee_vcek.der", "milan_virtee"),
    "other TCB": ("milan_gcp_vcek.der", None),
}


@pytest.mark.parametrize("why", list(WRONG))
def test_a_wrong_certificate_is_never_returned(kds, tmp_path, why):
    wrong_file, _ = WRONG[why]
    platform, _ = case_platform("milan")
    kds.script(Reply(200, (VECTORS / wrong_file).read_bytes()))
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()
    reason = c.log.vcek_failures()[0]["reason"]
    assert ("chip" in reason) if why.startswith("other chip") else ("TCB" in reason)


def test_negative_control_without_validation_a_wrong_answer_is_accepted(kds, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("CERTD_UNSAFE", "kds-validate")
    platform, _ = case_platform("milan")
    wrong = (VECTORS / "milan_gcp_vcek.der").read_bytes()
    kds.script(Reply(200, wrong))
    c = client([kds.url], tmp_path / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert leaf_of(blob) == wrong  # the protection is what keeps the wrong VCEK out
    # and garbage would be cached
    platform2, _ = case_platform("turin")
    kds.script(Reply(200, b"<html>429 Too Many Requests</html>"))
    c.prefetch(platform2.product, platform2.chip_id, platform2.reported_tcb, deadline_s=5)
    assert b"<html>" in b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*_vcek.der"))


def test_cached_blob_without_network_and_a_corrupt_entry(kds, tmp_path):
    platform, _ = case_platform("turin")
    c = client([kds.url], tmp_path / "cache")
    assert c.cached_blob(platform) is None
    c.prefetch(platform.product, platform.chip_id, platform.reported_tcb, deadline_s=20)
    path = kdsmod.vcek_cache_path(tmp_path / "cache", Product.TURIN, platform.chip_id,
                                  platform.reported_tcb)
    assert path.name == "bl03_tee02_snp05_ucode97_fmc01_vcek.der"
    assert leaf_of(c.cached_blob(platform)) == (VECTORS / "turin_vcek.der").read_bytes()
    path.write_bytes(b"\x30\x03garbage")  # a corrupted entry is dropped, not served
    assert c.cached_blob(platform) is None and not path.exists()


def test_forever_mode_keeps_trying_until_the_source_answers(kds, tmp_path):
    import asyncio
    platform, _ = case_platform("milan")
    kds.script(*[Reply(503)] * 5)
    c = client([kds.url], tmp_path / "cache", min_backoff_s=0.01, max_backoff_s=0.02)
    blob = asyncio.run(c.vcek_blob(platform))  # no deadline
    assert len(kds.vcek_requests()) == 6
    assert len(c.log.vcek_failures()) == 5  # a log line per failed attempt
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()


def test_close_ends_a_forever_fetch(kds, tmp_path):
    import asyncio
    platform, _ = case_platform("milan")
    kds.script(*[Reply(404)] * 10_000)
    c = client([kds.url], tmp_path / "cache", min_backoff_s=0.05, max_backoff_s=0.05)

    async def main():
        task = asyncio.ensure_future(c.vcek_blob(platform))
        while not kds.vcek_requests():
            await asyncio.sleep(0.01)
        c.close()
        with pytest.raises(KdsUnavailable):
            await task
        assert await asyncio.to_thread(c.idle, 10)

    asyncio.run(main())


def test_vlek_platform_and_missing_chip_id_are_refused(tmp_path):
    c = client(["http://127.0.0.1:9"], tmp_path / "cache")
    platform, _ = case_platform("milan")
    with pytest.raises(ValueError, match="VLEK"):
        c.cached_blob(platform.replace(signing_key="vlek"))
    with pytest.raises(ValueError, match="chip id"):
        c.cached_blob(platform.replace(chip_id=None, mask_chip_id=True))


def test_a_fetch_nobody_waits_for_any_more_stops(kds, tmp_path):
    import asyncio
    platform, _ = case_platform("milan")
    kds.script(*[Reply(404)] * 10_000)
    c = client([kds.url], tmp_path / "cache", min_backoff_s=0.02, max_backoff_s=0.02)

    async def grows(by: int) -> None:
        n = len(kds.vcek_requests())
        for _ in range(1000):
            if len(kds.vcek_requests()) >= n + by:
                return
            await asyncio.sleep(0.01)
        pytest.fail("the fetch stopped retrying")

    async def main():
        first = asyncio.ensure_future(c.vcek_blob(platform))
        second = asyncio.ensure_future(c.vcek_blob(platform))
        await grows(1)
        first.cancel()
        # Control: one waiter is left, so the (single) fetch goes on retrying for ever
        await grows(3)
        assert len(c.fetching()) == 1
        second.cancel()
        assert await asyncio.to_thread(c.idle, 10)  # the last waiter left: the thread ends
        assert c.fetching() == []
        for t in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await t

    asyncio.run(main())
    assert any(kw["kind"] == "missing" for kw in c.log.vcek_failures())


def test_retry_after_zero_does_not_make_a_busy_loop(kds, tmp_path):
    platform, _ = case_platform("milan")
    kds.script(Reply(503, b"", {"Retry-After": "0"}), Reply(503, b"", {"Retry-After": "0"}))
    c = client([kds.url], tmp_path / "cache", min_backoff_s=0.2, max_backoff_s=0.4)
    c.vcek_blob_sync(platform, deadline_s=20)
    reqs = kds.vcek_requests()
    assert len(reqs) == 3 and all(g >= 0.2 for g in gaps(reqs))
    assert [kw["retry_in_s"] for kw in c.log.vcek_failures()] == [0.2, 0.2]


def test_each_source_backs_off_on_its_own(tmp_path):
    with KdsServer(served=[]) as mirror, KdsServer() as base:
        base.script(Reply(429, b"", {"Retry-After": "1"}))
        platform, _ = case_platform("milan")
        c = client([mirror.url, base.url], tmp_path / "cache", min_backoff_s=0.1,
                   max_backoff_s=0.8, rng=lambda: 0.5)
        c.vcek_blob_sync(platform, deadline_s=20)
        # the mirror (404, backoff 0.1, 0.2, 0.4, ...) was asked again while the base's
        # Retry-After ran; the base was asked once more, after it
        mirror_waits = [kw["retry_in_s"] for kw in c.log.vcek_failures()
                        if kw["url"].startswith(mirror.url)]
        assert mirror_waits[:3] == [0.1, 0.2, 0.4]
        assert len(base.vcek_requests()) == 2
        assert gaps(base.vcek_requests())[0] >= 0.95


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to another owner")
def test_root_keeps_the_cache_owned_by_the_cache_owner(kds, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)  # the daemon's user owns its cache directory
    platform, _ = case_platform("turin")
    c = client([kds.url], cache)
    c.vcek_blob_sync(platform, deadline_s=20)
    made = [p for p in cache.rglob("*")] + [p for p in cache.rglob(".*")]
    assert any(p.name.endswith("_vcek.der") for p in made)
    assert any(p.name.endswith(".lock") for p in made)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(65534, 65534)}


def test_an_unwritable_cache_still_gives_the_blob(kds, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    platform, _ = case_platform("milan")
    c = client([kds.url], blocker / "cache")
    blob = c.vcek_blob_sync(platform, deadline_s=20)
    assert leaf_of(blob) == (VECTORS / "milan_vcek.der").read_bytes()
    assert c.log.events("kds cache write failed") and c.log.events("kds cache lock unusable")
