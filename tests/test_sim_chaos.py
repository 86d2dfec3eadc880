"""The end-to-end property under chaos (issue 9): no guest ever gets certificates that do
not match the key that signed its report, and no guest loses its ability to attest, while
firmware updates change the key and certd and updaters are SIGKILLed at random moments.

Each scenario has its negative control: the same run with the updater releasing the lock
too early (``CERTD_FAULT=early-release``) must show mismatches, and an updater holding the
lock past the request deadline must cost SVSM guests their VMPCK. The runs are real: a
certd process on a socket-activated listener, VMM processes, updater processes.
"""

from __future__ import annotations

import pytest

from certd import exitcodes
from certd.sim import chaos, report

SHORT = dict(vms=40, updates=5, daemon_kills=1, updater_kills=1, update_gap=1.0, max_run=90)


def run(**kw) -> chaos.RunResult:
    r = chaos.run(chaos.Params(**{**SHORT, **kw}))
    print(f"\n{report.text(r)}")
    return r


def assert_ran(r: chaos.RunResult, updates: int) -> None:
    """Preconditions: the run did what it claims, or its zeros would prove nothing."""
    assert r.aborted is None, r.aborted
    assert r.counters.errors == 0, r.counters.mismatch_details
    assert sum(u.exit_code == 0 for u in r.updates) >= updates - SHORT["updater_kills"]
    assert set(r.by_kind) == {"linux", "svsm"} and set(r.by_face) == {"socket", "file"}
    for part in (*r.by_kind.values(), *r.by_face.values()):
        assert part["attestations"] > 0 and part["verified"] > 0, part


@pytest.mark.xfail(strict=False, reason=(
    "on current main certd reads the platform once at start and updaters are not "
    "crash-safe (issue 7): an updater SIGKILLed between the firmware step and the install "
    "leaves the old blob in place, which file-face readers (and certd, validating against "
    "its start-up platform) then serve with the new key"))
def test_short_chaos_run_is_never_wrong():
    r = run(seed=None)
    assert_ran(r, SHORT["updates"])
    assert r.daemon_kills == 1
    assert sum(u.killed_after_ms is not None for u in r.updates) == 1
    c = r.counters
    assert (c.mismatches, c.torn, c.eio, c.vmpck_lost) == (0, 0, 0, 0), c.mismatch_details
    assert report.exit_code(r) == exitcodes.OK


def test_early_release_is_caught(monkeypatch):
    monkeypatch.setenv("CERTD_FAULT", "early-release")
    r = run(seed=None)
    assert_ran(r, SHORT["updates"])
    assert r.counters.mismatches > 0
    assert report.exit_code(r) == exitcodes.CHECK_FAILED


def test_lock_held_past_the_deadline_costs_svsm_guests_their_vmpck():
    # Linux guests wait (2 s retries for 60 s, scaled by 0.05: 3 s > the 1.5 s hold);
    # an SVSM guest retries a busy answer once and then clears its VMPCK.
    r = run(vms=16, updates=2, daemon_kills=0, updater_kills=0, hold_ms=1500,
            request_deadline_ms=300, seed=None)
    assert r.aborted is None and r.counters.errors == 0
    assert all(u.exit_code == 0 and u.held_ms >= 1500 for u in r.updates), r.updates
    assert r.by_kind["svsm"]["vmpck_lost"] > 0
    assert r.by_kind["linux"]["vmpck_lost"] == 0 and r.by_kind["linux"]["eagain"] > 0
    assert r.counters.mismatches == 0
    assert report.exit_code(r) == exitcodes.CHECK_FAILED
