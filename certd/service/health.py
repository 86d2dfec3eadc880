"""How what a profile serves looks to an operator: its state, when its leaf and CRL run out,
and whether the daemon is ready. STATUS, /metrics and /readyz all ask here.

States: ``serving`` a blob that passed the policy; ``stale`` serving one whose leaf has
expired or whose CRL's nextUpdate has passed since it was validated; ``empty`` no blob (the
empty table is served); ``invalid`` a blob that failed the policy (the empty table is served).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from certd import policy
from certd.abi import table
from certd.service.profiles import Profile

STATES = ("serving", "empty", "invalid", "stale")


@dataclass(frozen=True)
class Dates:
    """The end of validity of a served blob's leaf and CRL (None: no such entry)."""

    leaf_not_after: datetime | None = None
    crl_next_update: datetime | None = None


def blob_dates(blob: bytes) -> Dates:
    """Read the dates from a blob (the empty table has none)."""
    if blob == table.EMPTY_TABLE:
        return Dates()
    c = policy.parse_blob(blob)
    return Dates(c.leaf.not_after if c.leaf is not None else None,
                 c.crl.crl.next_update_utc if c.crl is not None else None)


#: profile -> (generation, its dates): parsed once per generation, not per STATUS or scrape.
_dates: "weakref.WeakKeyDictionary[Profile, tuple[int, Dates]]" = weakref.WeakKeyDictionary()


def dates(profile: Profile) -> Dates:
    """The dates of what ``profile`` serves now."""
    hit = _dates.get(profile)
    if hit is not None and hit[0] == profile.generation:
        return hit[1]
    d = blob_dates(profile.served)
    _dates[profile] = (profile.generation, d)
    return d


def state(profile: Profile, now: datetime | None = None) -> str:
    """One of :data:`STATES`: the profile's own decision (serving, empty, invalid, or stale
    when the platform or configuration changed since it judged), and "stale" too when a
    date in what it serves has passed since."""
    if profile.state != "serving" or profile.served == table.EMPTY_TABLE:
        return profile.state
    d = dates(profile)
    now = now or datetime.now(timezone.utc)
    if any(t is not None and t < now for t in (d.leaf_not_after, d.crl_next_update)):
        return "stale"
    return "serving"


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_fields(profile: Profile) -> dict[str, Any]:
    """The STATUS keys for one profile that this module decides."""
    d = dates(profile)
    return {"state": state(profile), "leaf_not_after": _iso(d.leaf_not_after),
            "crl_next_update": _iso(d.crl_next_update)}


def not_ready(profiles: Iterable[Profile], *, listening: bool, accepting: bool) -> list[str]:
    """Why the daemon is not ready to serve (empty: ready): its socket must be listening,
    it must not be stopping, and it must have decided what each profile serves."""
    why = []
    if not listening:
        why.append("the certd socket is not listening")
    if not accepting:
        why.append("certd is shutting down")
    for p in profiles:
        if not p.decided:
            why.append(f"profile {p.name!r}: blob {p.blob_path} not looked at yet "
                       "(an update held its lock)")
    return why
