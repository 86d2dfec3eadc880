"""What a run proved, for people (:func:`text`) and scripts (:func:`as_json`).

The run passes (:func:`passed`) only when no guest got certificates that do not match the
key that signed its report (``mismatches``), no file-face reader read a table that does not
decode (``torn``), no guest was answered EIO (``eio``) and no guest lost its VMPCK
(``vmpck_lost``); and the simulator itself completed without errors.
"""

from __future__ import annotations

from certd import exitcodes
from certd.sim.chaos import RunResult

#: The keys that must be 0 for a run to pass (JSON names are contracts).
MUST_BE_ZERO = ("mismatches", "torn", "eio", "vmpck_lost")


def _stats(values: list[float]) -> dict | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return {"n": len(v), "p50": round(v[len(v) // 2], 1), "max": round(v[-1], 1)}


def as_json(r: RunResult) -> dict:
    c = r.counters
    ups = r.updates
    return {
        "ok": passed(r),
        "attestations": c.attestations,
        "verified": c.verified,
        "mismatches": c.mismatches,
        "torn": c.torn,
        "eio": c.eio,
        "vmpck_lost": c.vmpck_lost,
        "max_wait_ms": round(c.max_wait_ms, 1),
        "empty": c.empty,
        "eagain": c.eagain,
        "enospc": c.enospc,
        "errors": c.errors,
        "leases_lost": c.leases_lost,
        "leases_expired": c.leases_expired,
        "by_kind": r.by_kind,
        "by_face": r.by_face,
        "updates": {
            "run": len(ups),
            "completed": sum(u.exit_code == 0 for u in ups),
            "killed": sum(u.killed_after_ms is not None for u in ups),
            "killed_after_firmware": sum(bool(u.after_firmware) for u in ups),
            "vlek_drops": sum(u.dropped for u in ups),
            "stale_after_kill": sum(bool(u.stale) for u in ups),
            "lock_wait_ms": _stats([u.lock_wait_ms for u in ups]),
            "exclusive_ms": _stats([u.held_ms for u in ups]),
            "exclusive_without_cmd_ms": _stats([u.held_ms - u.cmd_ms for u in ups
                                                if u.held_ms is not None and u.cmd_ms is not None]),
            "total_ms": _stats([u.total_ms for u in ups]),
            "records": [vars(u) for u in ups],
        },
        "daemon": {"kills": r.daemon_kills, "restart_ms": _stats(r.daemon_restart_ms)},
        "duration_s": r.duration_s,
        "aborted": r.aborted,
        "unavailable": c.unavailable,
        "details": c.details[:10],
        "params": r.params,
    }


def passed(r: RunResult) -> bool:
    c = r.counters
    return (all(getattr(c, k) == 0 for k in MUST_BE_ZERO) and c.errors == 0
            and r.aborted is None and c.attestations > 0)


def exit_code(r: RunResult) -> int:
    return exitcodes.OK if passed(r) else exitcodes.CHECK_FAILED


def text(r: RunResult) -> str:
    j = as_json(r)
    c = r.counters
    u = j["updates"]
    kinds = ", ".join(f"{k} {v['attestations']}" for k, v in sorted(r.by_kind.items()))
    faces = ", ".join(f"{k} {v['attestations']}" for k, v in sorted(r.by_face.items()))

    def mark(n: int) -> str:
        return "ok" if n == 0 else "FAIL"

    excl, nocmd = u["exclusive_ms"], u["exclusive_without_cmd_ms"]
    wait = u["lock_wait_ms"]
    lines = [
        f"{'PASS' if j['ok'] else 'FAIL'}: {c.attestations} attestations by "
        f"{r.params.get('vms')} VMs "
        f"in {r.duration_s:.1f} s; {c.verified} reports verified against the certificates "
        f"the guest received.",
        f"  mismatches  {c.mismatches:6}  {mark(c.mismatches):4}  certificates that do not match "
        f"the key that signed the report",
        f"  torn        {c.torn:6}  {mark(c.torn):4}  tables a file reader could not decode",
        f"  eio         {c.eio:6}  {mark(c.eio):4}  answers that make a guest give up (EIO)",
        f"  vmpck_lost  {c.vmpck_lost:6}  {mark(c.vmpck_lost):4}  guests that can no longer attest",
        f"  empty       {c.empty:6}        empty tables (allowed: never wrong, sometimes empty)",
        f"  eagain      {c.eagain:6}        busy answers, retried by the guest",
        f"  longest wait for one report: {c.max_wait_ms:.0f} ms",
        f"by guest: {kinds}; by face: {faces}",
        f"firmware updates: {u['completed']} of {u['run']} completed, {u['killed']} killed"
        + (f" ({u['killed_after_firmware']} after the firmware step, "
           f"{u['stale_after_kill']} leaving a stale blob)" if u["killed"] else "")
        + (f"; lock wait p50 {wait['p50']} ms, max {wait['max']} ms" if wait else "")
        + (f"; exclusive section p50 {excl['p50']} ms, max {excl['max']} ms" if excl else "")
        + (f" ({nocmd['p50']} / {nocmd['max']} ms without the firmware command)"
           if nocmd else ""),
    ]
    if r.daemon_kills:
        rs = j["daemon"]["restart_ms"]
        lines.append(f"certd SIGKILLed {r.daemon_kills} times, back on the same socket in "
                     f"p50 {rs['p50']} ms, max {rs['max']} ms; {c.leases_lost} leases lost "
                     f"with it")
    if c.errors:
        lines.append(f"simulator errors: {c.errors} (see --json: details)")
    if r.aborted:
        lines.append(f"aborted: {r.aborted}")
    for d in c.details[:3]:
        lines.append(f"  e.g. {d}")
    return "\n".join(lines)
