"""A verdict runs out with the dates in the blob: a blob judged valid is not served past
its leaf's notAfter (or its CRL's nextUpdate), even with the same bytes and platform."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from certd import devpki, policy
from certd.platform import PlatformSource
from certd.service import profiles
from certd.service.profiles import EMPTY, Judge, Profile


def _profile(tmp_path):
    now = datetime.now(timezone.utc)
    pki = devpki.DevPki.generate(name="expiry-test")
    plat = devpki.make_platform()
    leaf, _ = pki.issue_vcek(plat.reported_tcb, plat.chip_id, not_after=now + timedelta(hours=1))
    path = tmp_path / "certs.blob"
    path.write_bytes(policy.build_blob(pki.ark, pki.ask, leaf, trust=pki.trust, platform=plat))
    return Profile("default", str(path), Judge(pki.trust, PlatformSource("fixed", fixed=plat))), leaf


def _later(monkeypatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(profiles.time, "time", lambda: real() + seconds)


def test_an_expired_leaf_is_not_served_from_a_cached_verdict(tmp_path, monkeypatch):
    p, leaf = _profile(tmp_path)
    try:
        hold = p.lease_source()
        assert hold not in (EMPTY, profiles.BUSY) and p.state == "serving"
        _later(monkeypatch, 2 * 3600)  # the leaf ran out an hour ago
        assert p.lease_source() is EMPTY
        assert p.state == "invalid" and any("expired" in str(x) or "valid" in str(x)
                                            for x in p.problems), p.problems
    finally:
        p.close()


def test_control_without_the_dates_the_expired_leaf_is_served(tmp_path, monkeypatch):
    """Negative control: with verdicts that never run out, the same scenario serves the
    expired leaf (so the test above can fail)."""
    monkeypatch.setattr(profiles, "valid_until", lambda blob: float("inf"))
    p, leaf = _profile(tmp_path)
    try:
        assert p.lease_source() not in (EMPTY, profiles.BUSY)
        _later(monkeypatch, 2 * 3600)
        assert p.lease_source() not in (EMPTY, profiles.BUSY)  # stale, served
    finally:
        p.close()
