"""Which blob a VM gets, and the one place that decides whether it may be served now.

A profile is one blob file served to the VMs whose ids match its patterns (for example a
VLEK blob for some VMs, the host VCEK blob for the rest). Leases hang on a
:class:`~certd.service.leases.SharedHold`: one shared OFD lock on one blob inode plus the
bytes read and judged under it.

:meth:`Profile.lease_source` is the single decision point: every new lease, whether its
GET was answered at once or waited for an updater, asks it, and it joins the current hold
only if all of these still hold *now*:

* no updater holds the gate (so the hold drains and the updater gets in);
* the hold was judged by the current :class:`Judge` under the current platform epoch (a
  reload, a firmware update, a TCB change or a VLEK load seen since makes it stale);
* the inode it locked is still the file at the path, with the same size, mtime and
  ctime (a file replaced, deleted or rewritten in place behind certd's back);
* no updater that knows only the kernel's scheme (a blocking exclusive OFD lock, no gate)
  is waiting for its inode (looked up in /proc/locks every ``max_age``), and it is younger
  than ``drain_every`` max ages: otherwise new leases wait for it to drain and the profile
  leaves a short gap before locking again, so such an updater gets in under any load.

Otherwise the hold is retired (no lease joins it again; it closes when its last lease
ends) and a new one is made: platform observed again, the blob locked, read (bounded) and
judged. Never wrong, sometimes empty: a missing blob is an unconfigured host and an
unusable one (malformed, unreadable, failing the policy) is served as the empty table;
bytes judged under another identity are never served.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence

import structlog

from certd import faults, policy
from certd.abi import table
from certd.amd.roots import TrustStore
from certd.platform import PlatformSource
from certd.service.leases import SharedHold
from certd.store import blobstore, journal, locks
from certd.verify.problems import Problem

log = structlog.get_logger("certd.profiles")

#: lease_source() answers besides a hold: BUSY (an updater is at work, or a hold is
#: draining: wait, then EAGAIN at the deadline) or EMPTY (serve the empty table).
BUSY = "busy"
EMPTY = "empty"

#: How long a hold that saw no updater at the gate takes leases without asking the gate
#: again (one F_OFD_GETLK): under load dozens of leases arrive per millisecond. Everything
#: that decides whether the bytes are right (epoch, judge, dates, the inode and content at
#: the path) is still checked on every lease.
RECHECK_S = 0.001

#: OS errors that pass by themselves (answer EAGAIN, try again) rather than mean the blob
#: cannot be used (serve the empty table and say why).
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN,
                        errno.ENOBUFS})


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(eq=False)
class Judge:
    """What may be served: exactly :func:`certd.policy.check_blob` (as ``certctl verify``
    runs it) against the trust anchors and the platform as observed now."""

    trust: TrustStore
    platform: PlatformSource | None  # None: no identity (TCB and chip checks skipped)

    @property
    def epoch(self) -> int:
        return 0 if self.platform is None else self.platform.epoch

    def observe(self, force: bool = False) -> bool:
        """Look at the platform again; True if it changed."""
        return self.platform is not None and self.platform.observe(force)

    def problems(self, blob: bytes) -> list[Problem]:
        """Every reason ``blob`` must not be served on the platform as it is now (observed
        at call time: an updater's validator sees the firmware its change just moved)."""
        self.observe()
        if self.platform is not None and self.platform.current is None:
            return [Problem("platform", f"platform identity unreadable "
                                        f"({self.platform.error}); nothing can be checked")]
        plat = None if self.platform is None else self.platform.current
        at = datetime.fromtimestamp(time.time(), timezone.utc)  # the clock verdicts expire by
        return policy.check_blob(blob, trust=self.trust, platform=plat, at=at)


def valid_until(blob: bytes) -> float:
    """The wall-clock time (epoch seconds) at which a verdict on ``blob`` runs out: the
    earliest notAfter of its certificates and nextUpdate of its CRL (inf: none)."""
    if blob == table.EMPTY_TABLE:
        return float("inf")
    c = policy.parse_blob(blob)
    ends = [x.not_after.timestamp() for x in (c.ark, c.intermediate, c.leaf) if x is not None]
    if c.crl is not None and c.crl.crl.next_update_utc is not None:
        ends.append(c.crl.crl.next_update_utc.timestamp())
    return min(ends, default=float("inf"))


@dataclass
class HoldPolicy:
    """How long one shared hold may take new leases, and the gap left after draining it."""

    max_age: float = 0.100
    gap: float = 0.002
    #: Without a blocked updater in sight, a hold still drains after this many max_ages.
    drain_every: int = 10
    #: A hold with no lease is kept this long for the next request, then closed.
    idle: float = 0.005


@dataclass(eq=False)
class Profile:
    name: str
    blob_path: str
    judge: Judge
    patterns: tuple[str, ...] = ()
    #: Called when what this profile serves changes (new generation or new problems).
    on_change: Callable[["Profile"], None] = lambda profile: None
    holds: HoldPolicy = field(default_factory=HoldPolicy)
    generation: int = 0
    problems: Sequence[Problem] = ()
    current: SharedHold | None = None
    #: "serving", "empty" (no blob), "invalid" (blob refused), "stale" (the platform or
    #: judge changed since the bytes were judged; the next look decides again).
    state: str = "empty"
    #: True once a look at the path reached a verdict (serve, empty or invalid); an update
    #: holding the lock at every look so far leaves it False (/readyz waits for it).
    decided: bool = False
    store: blobstore.BlobStore = field(init=False)
    _served: bytes = table.EMPTY_TABLE
    #: (judge, epoch, bytes, valid until (wall clock), problems) of the last verdict.
    _judged: tuple | None = None
    _draining: SharedHold | None = None  # retired by age: wait for it, then the gap
    _gap_until: float = 0.0
    _settling: bool = False
    #: Futures of requests waiting for the decision to change (see :meth:`changed`).
    _waiters: list = field(default_factory=list)
    _watch: object = None  # certd.inotify.Watcher on the blob's directory, made on demand
    #: How often waiting requests were woken (tests count it: waits are not polls).
    wakeups: int = 0
    #: When lease_source last decided (time.monotonic()).
    decided_at: float = float("-inf")

    def __post_init__(self) -> None:
        self.store = blobstore.BlobStore(self.blob_path, self.judge.problems)
        self._off = faults.unsafe_now()  # test-only switches, read once: this is the hot path

    @property
    def lock(self) -> locks.BlobLock:
        return self.store.lock

    @property
    def served(self) -> bytes:
        """The bytes the last decision allowed (the empty table when none)."""
        return self._served

    def use(self, judge: Judge) -> None:
        """Judge with ``judge`` from now on (a reload): no lease joins a hold judged before."""
        self.judge = judge
        self.store.validate = judge.problems
        if self.state == "serving":
            self.state = "stale"

    def matches(self, vm_id: str) -> bool:
        return any(fnmatch.fnmatchcase(vm_id, p) for p in self.patterns)

    # -- the decision ----------------------------------------------------------------

    def lease_source(self) -> SharedHold | str:
        """Without waiting: the hold a new lease may join now, BUSY, or EMPTY."""
        now = self.decided_at = time.monotonic()
        hold = self.current
        # The gate only keeps updaters from starving (the blob's own locks keep the bytes
        # right): a hold that saw no updater RECHECK_S ago skips that system call.
        if (hold is None or now >= hold.fresh_until) and self.lock.updater_waiting():
            self._retire(self.current)
            return BUSY  # join no hold: let it drain so the updater gets in
        if hold is not None:
            why = self._unfit(hold, now)
            if why is None:
                if now >= hold.fresh_until:
                    hold.fresh_until = now + RECHECK_S
                return hold
            self._retire(hold, by_age=why == "age")
        if self._draining is not None or now < self._gap_until:
            return BUSY
        return self._new_hold(now)

    def readers_awaited(self) -> bool:
        """Whether something waits for this blob's readers to leave: an updater holding
        the gate, a kernel-scheme updater seen blocked on a hold's inode, or the drain of
        an aged hold (new GETs wait for it)."""
        return self._draining is not None or self.lock.updater_waiting() or (
            self.current is not None and self.current.writer_seen)

    def _unfit(self, hold: SharedHold, now: float) -> str | None:
        """Why ``hold`` may take no new lease now, or None if it may."""
        off = self._off
        if (hold.judge is not self.judge or hold.epoch != self.judge.epoch) \
                and "hold-epoch" not in off:
            return "judged under another platform or configuration"
        if now - hold.checked > self.holds.max_age and "hold-age" not in off:
            # Every max_age: drain if an updater waits in the kernel for this inode, and
            # at the latest every drain_every max_ages (an updater that polls is not seen).
            hold.checked = now
            if now - hold.opened > self.holds.max_age * self.holds.drain_every:
                return "age"
            self._look_for_writer(hold)
        if hold.writer_seen and "hold-age" not in off:
            return "age"
        if time.time() >= hold.valid_until:
            return "a certificate or the CRL in it is no longer valid"
        if "inode-check" in off:
            return None
        # The held inode itself says whether it is still the file at the path and what
        # it was: a rename over it or an unlink drops its link count and, like any write
        # or attribute change, moves its ctime (fstat: no path walk, on every lease). The
        # path itself is looked up again every RECHECK_S (a parent directory swapped).
        st = hold.lock.stat
        try:
            now_st = os.fstat(hold.lock.fd)
        except (OSError, TypeError):
            return "the held blob cannot be examined"
        if now_st.st_nlink != st.st_nlink:
            return "another file is at the path, or none"
        if (now_st.st_size, now_st.st_mtime_ns, now_st.st_ctime_ns) != \
                (st.st_size, st.st_mtime_ns, st.st_ctime_ns) and "content-check" not in off:
            return "the file was changed in place"
        if now >= hold.fresh_until:
            try:
                at = os.stat(self.blob_path)
            except OSError:
                return "the blob is gone from its path"
            if (at.st_ino, at.st_dev) != (st.st_ino, st.st_dev):
                return "another file is at the path"
        return None

    def _look_for_writer(self, hold: SharedHold) -> None:
        """Set ``hold.writer_seen`` if a kernel-scheme updater is blocked on its inode.

        In a thread, never on the loop: reading /proc/locks takes the kernel's file-lock
        rwsem for writing, which waits for an RCU grace period (5-8 ms measured here,
        while the loop would serve nobody)."""
        if hold.looking or hold.closed:
            return
        loop = hold.loop
        if loop is None or loop.is_closed():
            hold.writer_seen = locks.writer_blocked(hold.lock.stat)
            return
        hold.looking = True

        def seen(fut: asyncio.Future) -> None:
            hold.looking = False
            if not fut.cancelled():
                hold.writer_seen = fut.exception() is not None or bool(fut.result())
                if hold.writer_seen:
                    self._wake()  # waiting requests re-decide: the hold drains

        loop.run_in_executor(None, locks.writer_blocked, hold.lock.stat).add_done_callback(seen)

    def _retire(self, hold: SharedHold | None, by_age: bool = False) -> None:
        if hold is None:
            return
        if self.current is hold:
            self.current = None
        if by_age:
            self._draining = hold  # when it closes, the gap begins (see _closed)
        if hold.leases == 0:
            hold.close()

    def _new_hold(self, now: float) -> SharedHold | str:
        try:
            pending = self.store.journal()
        except OSError as e:
            return self._io_failure(e, "looking for an update journal")
        if pending is not None:
            # An updater died between announcing a change and finishing it: the firmware
            # may have moved. Look again before judging, and fix the file on disk.
            self.judge.observe(force=True)
            self._settle_later(f"an updater left {pending}")
        else:
            self.judge.observe()
        try:
            lock = self.lock.acquire_shared_sync(None)
        except locks.BlobMissing:
            self._decide(table.EMPTY_TABLE, (), "empty")
            return EMPTY
        except locks.LockBusy:
            return BUSY
        except OSError as e:
            return self._io_failure(e, "locking")
        try:
            blob = lock.read()
        except OSError as e:
            lock.release()
            return self._io_failure(e, "reading")
        judge = self.judge
        problems = self._verdict(blob)
        epoch, until = judge.epoch, self._judged[3]
        if problems or blob == table.EMPTY_TABLE:
            lock.release()
            self._decide(table.EMPTY_TABLE, problems, "invalid" if problems else "empty")
            return EMPTY
        self._decide(blob, (), "serving")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self.current = SharedHold(lock, blob, self.generation, judge=judge, epoch=epoch,
                                  opened=now, checked=now, valid_until=until,
                                  on_idle=self._idle, on_close=self._closed, loop=loop)
        self._arm_idle(self.current)  # a hold no lease takes must not keep the lock
        return self.current

    def _verdict(self, blob: bytes) -> list[Problem]:
        """The judge's problems with ``blob`` now, from the last verdict when that was on
        the same bytes, by the same judge, under the same platform epoch, and still in
        date (one verdict is kept: judging costs a chain check, serving must not)."""
        judge, j = self.judge, self._judged
        if j is not None and j[:3] == (judge, judge.epoch, blob) and time.time() < j[3]:
            return list(j[4])
        problems = judge.problems(blob) if blob != table.EMPTY_TABLE else []
        self._judged = (judge, judge.epoch, blob, valid_until(blob), tuple(problems))
        return problems

    def prejudge(self, path: str | None = None) -> None:
        """Judge the file at the path (or an updater's temp file at ``path``) now, without
        a lock (its updater may still hold it): a blob about to be or just renamed into
        place is then served from the verdict the moment the updater releases, with no
        chain check on the request path. Only the bytes read are judged; what is served
        is read again under the lock and must equal them."""
        path = path or self.blob_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            blob = locks.read_blob(fd, path)
        except OSError:
            return
        finally:
            os.close(fd)
        self._verdict(blob)

    def _io_failure(self, e: OSError, doing: str) -> str:
        transient = e.errno in _TRANSIENT
        log.warning("cannot use the blob", profile=self.name, blob=self.blob_path,
                    doing=doing, error=str(e),
                    answer="EAGAIN (transient)" if transient else "the empty table")
        if transient:
            return BUSY
        self._decide(table.EMPTY_TABLE, [Problem("io", f"{doing} {self.blob_path}: {e}")],
                     "invalid")
        return EMPTY

    def _decide(self, served: bytes, problems: Sequence[Problem], state: str) -> None:
        changed = served != self._served or list(problems) != list(self.problems)
        if served != self._served:
            self.generation += 1
        self._served, self.problems, self.state = served, list(problems), state
        if changed:
            self.on_change(self)  # sees decided still False on the first verdict
        self.decided = True

    # -- hold life -------------------------------------------------------------------

    def _idle(self, hold: SharedHold) -> None:
        """The last lease of ``hold`` ended."""
        if hold is not self.current or not self._arm_idle(hold):
            hold.close()

    def _arm_idle(self, hold: SharedHold) -> bool:
        """Close ``hold`` once it has had no lease for ``holds.idle``; False if there is
        no event loop to time it (the caller decides)."""
        loop = hold.loop
        if loop is None or loop.is_closed():
            return False
        hold.idle_since = time.monotonic()
        if hold.idle_timer is None:
            hold.idle_timer = loop.call_later(self.holds.idle, self._idle_check, hold, loop)
        return True

    def _idle_check(self, hold: SharedHold, loop: asyncio.AbstractEventLoop) -> None:
        hold.idle_timer = None
        if hold.closed or hold.leases:
            return
        left = hold.idle_since + self.holds.idle - time.monotonic()
        if left > 0 and hold is self.current:
            hold.idle_timer = loop.call_later(left, self._idle_check, hold, loop)
            return
        self._retire(hold)

    def _closed(self, hold: SharedHold) -> None:
        if self.current is hold:
            self.current = None
        if self._draining is hold:
            self._draining = None
            # Leave no shared lock for a moment: a blocked kernel-scheme updater wakes up
            # and takes its exclusive lock before the next hold is made.
            self._gap_until = time.monotonic() + self.holds.gap
        self._wake()  # waiters re-decide (and arm a timer for the gap)

    # -- background repair -----------------------------------------------------------

    def _settle_later(self, why: str) -> None:
        """Make the file on disk fit the platform (or empty it) in a thread: it needs the
        exclusive lock, which may take until our own holds drain."""
        if self._settling:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._settling = True
        log.warning("re-validating the blob on disk", profile=self.name, why=why)

        def done(fut: asyncio.Future) -> None:
            self._settling = False
            exc = fut.exception()
            if exc is not None:
                log.error("could not settle the blob on disk", profile=self.name,
                          error=str(exc), serving="what fits the platform now, or the "
                          "empty table")
            else:
                log.info("blob on disk settled", profile=self.name, result=str(fut.result()))

        loop.run_in_executor(None, lambda: self.store.settle(self.judge.problems)
                             ).add_done_callback(done)

    # -- waiting without polling -----------------------------------------------------

    async def changed(self, timeout: float) -> None:
        """Return when the decision may have changed, or after ``timeout`` seconds.

        Waits are woken by what ends a BUSY answer, not by polling: the updater closing
        the gate or the blob it held (inotify ``IN_CLOSE_WRITE``), a blob renamed into
        place, the gap after a drained hold elapsing, a hold closing. The caller decides
        again after each return. Call it right after a BUSY decision, with no await in
        between, so no wake-up can be missed."""
        loop = asyncio.get_running_loop()
        if self._watch is None:
            self._watch_directory(loop)
        fut = loop.create_future()
        self._waiters.append(fut)
        # The waiter awaits its future itself (asyncio.wait would add two loop turns
        # between the wake-up and the new decision); a timer ends the wait at ``timeout``.
        timers = [loop.call_later(max(timeout, 0), _resolve, fut)]
        if self._draining is None and self._gap_until > time.monotonic():
            timers.append(loop.call_later(self._gap_until - time.monotonic(), self._wake))
        elif self._watch is False:  # no inotify here: fall back to a short poll
            timers.append(loop.call_later(0.002, self._wake))
        try:
            await fut
        finally:
            for timer in timers:
                timer.cancel()
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _watch_directory(self, loop: asyncio.AbstractEventLoop) -> None:
        from certd import inotify  # only a daemon with waiting requests needs it
        directory, blob_name = os.path.split(self.blob_path)
        names = {blob_name, os.path.basename(self.lock.gate)}
        # certctl writes the new blob to a temp file and sets its mode (IN_ATTRIB) a
        # millisecond or two before renaming it into place: judged then, its verdict is
        # ready before the updater releases.
        new_temp = journal.temp_pattern(blob_name, ("tmp",)).match

        def event(ev: "inotify.Event") -> None:
            if ev.mask & inotify.ATTRIB:
                if new_temp(ev.name):
                    self.prejudge(os.path.join(directory, ev.name))
                return
            if ev.name == blob_name and ev.mask & inotify.MOVED_TO:
                self.prejudge()  # a new blob is in place; its updater still holds it
            if ev.overflow or ev.gone or ev.name in names:
                self._wake()

        try:
            w = inotify.Watcher(event, loop=loop)
            w.add(directory,
                  inotify.CLOSE_WRITE | inotify.MOVED_TO | inotify.DELETE | inotify.ATTRIB)
        except (OSError, inotify.WatchError) as e:
            log.warning("cannot watch the blob directory; waiting requests poll",
                        profile=self.name, error=str(e))
            self._watch = False
            return
        self._watch = w

    def _wake(self) -> None:
        if not self._waiters:
            return
        self.wakeups += 1
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            _resolve(fut)

    def look(self) -> str:
        """Decide now, for status and logs: the profile's state, or "busy" while an
        updater is at work (nothing is kept that the decision did not keep anyway)."""
        got = self.lease_source()
        return "busy" if got is BUSY else self.state

    def close(self) -> None:
        for hold in (self.current, self._draining):
            if hold is not None:
                hold.close()
        if self._watch:
            self._watch.close()
        self._watch = None
        self._wake()
        self.lock.close()


@dataclass
class ProfileSet:
    """The default profile plus per-VM ones; the first whose patterns match wins."""

    default: Profile
    others: tuple[Profile, ...] = ()
    _cache: dict[str, Profile] = field(default_factory=dict)

    def for_vm(self, vm_id: str) -> Profile:
        p = self._cache.get(vm_id)
        if p is None:
            p = next((o for o in self.others if o.matches(vm_id)), self.default)
            if len(self._cache) >= 65536:  # bounded: VM ids come from clients
                self._cache.clear()
            self._cache[vm_id] = p
        return p

    def __iter__(self) -> Iterator[Profile]:
        yield self.default
        yield from self.others

    def close(self) -> None:
        for p in self:
            p.close()
