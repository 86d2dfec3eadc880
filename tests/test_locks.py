"""certd.store.locks: OFD semantics, the gate, the inode-verified reader, async waits."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from certd.store import locks
from certd.store.locks import BlobLock, BlobMissing, LockBusy


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "certs.blob"
    p.write_bytes(b"version-1")
    return str(p)


def raw_fd(path, flags=os.O_RDONLY):
    return os.open(path, flags | os.O_CLOEXEC)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_flock_struct_is_32_bytes_with_pid_zero():
    assert locks.FLOCK.size == 32
    assert locks.FLOCK.unpack(locks._SHARED) == (fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)


def test_ofd_locks_belong_to_the_open_file_description(blob):
    a, b = raw_fd(blob), raw_fd(blob, os.O_RDWR)
    try:
        assert locks.try_lock(a, False)
        assert locks.try_lock(raw := raw_fd(blob), False)  # shared + shared: granted
        os.close(raw)
        assert not locks.try_lock(b, True)  # same process, other description: conflict
        assert locks.conflicting_lock(b, True) == fcntl.F_RDLCK
        locks.unlock(a)
        assert locks.try_lock(b, True)
        assert locks.conflicting_lock(a, False) == fcntl.F_WRLCK
        assert not locks.try_lock(a, False)
    finally:
        os.close(a)
        os.close(b)


def test_posix_lock_from_another_process_conflicts(blob):
    """A classic POSIX lock (what QEMU falls back to without OFD support) conflicts too."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            f = open({blob!r}, 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)
            print('held', flush=True); sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy) as e:
            BlobLock(blob).acquire_shared_sync(locks.deadline_in(0.05))
        assert e.value.what == "blob"
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_shared_hold_reads_and_keys(blob):
    lk = BlobLock(blob)
    with lk.acquire_shared_sync(None) as h:
        st = os.stat(blob)
        assert h.read() == b"version-1"
        assert h.ident == (st.st_dev, st.st_ino)
        assert h.key == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        assert not h.exclusive
        assert h.fd is not None
    assert h.fd is None
    h.release()  # idempotent
    lk.close()


def test_read_of_the_largest_blob(tmp_path):
    p = tmp_path / "big"
    data = os.urandom(locks.MAX_BLOB)
    p.write_bytes(data)
    with locks.acquire_shared_sync(p, None) as h:
        assert h.read() == data
    p.write_bytes(data + b"x")
    with locks.acquire_shared_sync(p, None) as h:
        with pytest.raises(locks.BlobUnusable, match=f"at most {locks.MAX_BLOB}"):
            h.read()


def test_missing_blob_is_unconfigured(tmp_path):
    with pytest.raises(BlobMissing) as e:
        BlobLock(tmp_path / "none").acquire_shared_sync(None)
    assert isinstance(e.value, FileNotFoundError)
    assert "unconfigured" in str(e.value)


def test_exclusive_blocks_readers_through_the_gate(blob):
    lk = BlobLock(blob)
    ex = BlobLock(blob).acquire_exclusive_sync(locks.deadline_in(1))
    try:
        assert ex.exclusive and ex.gate_fd is not None
        assert lk.updater_waiting()
        t0 = time.monotonic()
        with pytest.raises(LockBusy) as e:
            lk.acquire_shared_sync(locks.deadline_in(0.05))
        assert 0.045 < time.monotonic() - t0 < 0.5
        assert e.value.what == "gate"
        assert ".certs.blob.gate" in str(e.value)
    finally:
        ex.release()
    assert not lk.updater_waiting()
    lk.acquire_shared_sync(None).release()
    lk.close()


def test_exclusive_waits_for_readers_with_the_gate_already_taken(blob):
    reader = BlobLock(blob).acquire_shared_sync(None)
    lk = BlobLock(blob)
    with pytest.raises(LockBusy) as e:
        lk.acquire_exclusive_sync(locks.deadline_in(0.05))
    assert e.value.what == "blob" and e.value.exclusive
    # The failed attempt must have dropped the gate again.
    assert not lk.updater_waiting()
    reader.release()
    with lk.acquire_exclusive_sync(None) as h:
        assert h.read() == b"version-1"


def test_exclusive_missing_ok_gives_a_gate_only_hold(tmp_path):
    path = tmp_path / "first.blob"
    lk = BlobLock(path)
    with pytest.raises(BlobMissing):
        lk.acquire_exclusive_sync(None)
    assert not lk.updater_waiting()
    with lk.acquire_exclusive_sync(None, missing_ok=True) as h:
        assert h.fd is None and h.gate_fd is not None
        assert lk.updater_waiting()
    assert not lk.updater_waiting()
    lk.close()


def test_reader_never_holds_a_replaced_inode(blob, tmp_path):
    """A correct updater (BlobStore) replaces the blob in a tight loop in another process:
    every shared hold must be on the inode at the path, for as long as it is held."""
    script = textwrap.dedent(f"""
        import sys, time
        from certd.store.blobstore import BlobStore
        s = BlobStore({blob!r}, validate=lambda b: [])
        end = time.monotonic() + 1.0; n = 0
        print('go', flush=True)
        while time.monotonic() < end:
            s.install(b'version-%d' % n); n += 1
        print(n, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "go"
        lk = BlobLock(blob)
        holds = mismatches = 0
        while child.poll() is None:
            try:
                h = lk.acquire_shared_sync(locks.deadline_in(0.5))
            except LockBusy:
                continue
            with h:
                st = os.stat(blob)
                if (st.st_dev, st.st_ino) != h.ident or not h.read().startswith(b"version-"):
                    mismatches += 1
                holds += 1
        installs = int(child.stdout.read().strip())
        print(f"\nreader: {holds} holds, {mismatches} on a replaced inode; updater: {installs} "
              "installs in 1 s")
        assert child.wait() == 0
        assert holds > 50 and installs > 20
        assert mismatches == 0
        lk.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_handoff_after_release_is_short(blob):
    """The backoff is capped at 2 ms: a waiter gets the lock soon after the holder lets go."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from certd.store import locks
            h = locks.BlobLock({blob!r}).acquire_exclusive_sync(None)
            print('held', flush=True); sys.stdin.readline()
            h.release(); print(time.monotonic_ns(), flush=True); sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lk = BlobLock(blob)

        async def wait_then_release():
            waiter = asyncio.ensure_future(lk.acquire_shared(locks.deadline_in(5)))
            await asyncio.sleep(0.05)
            child.stdin.write("go\n")
            child.stdin.flush()
            return await waiter

        h = asyncio.run(wait_then_release())
        got = time.monotonic_ns()
        released = int(child.stdout.readline())
        h.release()
        lk.close()
        handoff_ms = (got - released) / 1e6
        print(f"\nhand-off release -> shared acquire: {handoff_ms:.2f} ms")
        assert handoff_ms < 20
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


async def _ticker(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


async def _longest_stall(work) -> float:
    """The longest gap a 1 ms ticker saw while ``work()`` ran on the same loop."""
    gaps: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(gaps, stop))
    try:
        await work()
    finally:
        stop.set()
        await tick
    return max(gaps)


async def test_async_wait_never_stalls_the_loop_and_times_out(blob):
    holder = BlobLock(blob).acquire_exclusive_sync(None)
    lk = BlobLock(blob)
    waited = []

    async def waits():
        t0 = time.monotonic()
        with pytest.raises(LockBusy):
            await lk.acquire_shared(locks.deadline_in(0.3))
        waited.append(time.monotonic() - t0)
        # the same for an updater waiting on the gate
        with pytest.raises(LockBusy):
            await BlobLock(blob).acquire_exclusive(locks.deadline_in(0.2))

    try:
        # baseline in the same run: the ticker alone, as long, on this (shared) machine
        baseline = await _longest_stall(lambda: asyncio.sleep(0.5))
        stall = await _longest_stall(waits)
    finally:
        holder.release()
        lk.close()
    print(f"\nasync wait on a held lock: timed out after {waited[0] * 1000:.1f} ms; "
          f"longest event-loop stall {stall * 1000:.2f} ms (ticker alone: "
          f"{baseline * 1000:.2f} ms)")
    assert 0.29 < waited[0] < 0.6
    # A blocking wait would stall the loop for the whole 300 ms; scheduling noise on a
    # loaded machine shows in the baseline too.
    assert stall < max(0.010, 3 * baseline)


async def test_async_waits_are_cancellable_and_leak_nothing(blob):
    holder = BlobLock(blob).acquire_exclusive_sync(None)
    lk = BlobLock(blob)
    lk.updater_waiting()  # opens the cached gate fd now, so the fd count below is stable
    before = open_fds()
    try:
        for coro in (lk.acquire_shared(locks.deadline_in(10)),
                     BlobLock(blob).acquire_exclusive(locks.deadline_in(10))):
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0.03)
            assert not task.done()
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 0.01
        assert open_fds() == before
    finally:
        holder.release()
    # nothing left behind: an exclusive lock is free at once
    BlobLock(blob).acquire_exclusive_sync(None).release()
    lk.close()


def test_cancelled_exclusive_wait_drops_the_gate(blob):
    """Readers must not stay shut out by an updater that gave up (on timeout or cancel)."""
    reader = BlobLock(blob).acquire_shared_sync(None)
    lk = BlobLock(blob)

    async def main():
        task = asyncio.ensure_future(BlobLock(blob).acquire_exclusive(locks.deadline_in(10)))
        await asyncio.sleep(0.03)
        assert lk.updater_waiting()  # it holds the gate while waiting for the blob
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not lk.updater_waiting()

    asyncio.run(main())
    reader.release()
    lk.close()


def test_reader_cost_is_small(blob):
    lk = BlobLock(blob)
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        lk.acquire_shared_sync(None).release()
    per = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        lk.updater_waiting()
    check = (time.perf_counter() - t0) / n * 1e6
    lk.close()
    print(f"\nshared acquire+release (gate, open, lock, inode check, unlock, close): {per:.1f} µs;"
          f" updater_waiting(): {check:.2f} µs")
    assert per < 200 and check < 50  # generous: shared CI machines


def test_gate_deleted_by_hand_is_reopened(blob):
    lk = BlobLock(blob)
    lk.acquire_shared_sync(None).release()
    os.unlink(locks.gate_path(blob))
    lk._rgate_checked = 0.0  # skip the 1 s re-check interval
    ex = BlobLock(blob).acquire_exclusive_sync(None)  # creates a new gate
    try:
        assert lk.updater_waiting()
    finally:
        ex.release()
    lk.close()


def test_signal_during_wait_does_not_break_it(blob):
    """EINTR-free design: a signal arriving while a sync wait sleeps is harmless."""
    holder = BlobLock(blob).acquire_exclusive_sync(None)
    got = []
    old = signal.signal(signal.SIGALRM, lambda *a: got.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(LockBusy):
            BlobLock(blob).acquire_shared_sync(locks.deadline_in(0.1))
        assert got == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        holder.release()
