"""Issue 7, store side: every boundary where the blob changes leaves it fitting the
platform as it is now (or empty), against real processes: certctl subprocesses, updaters
killed with SIGKILL, the QEMU-style C reader.

Every invariant test has a negative control (``*_control``): the same scenario with the
protection switched off (``CERTD_UNSAFE=<name>``, see certd/faults.py) must break the
invariant, which the control asserts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from certd import platform as platformmod, policy
from certd.abi import table
from certd.amd import roots
from certd.store import journal, locks, nested
from certd.store.blobstore import ENSURE_CHECKED, FAULT_ENV, STEPS, BlobStore
from store_support import (CERTCTL, Fifo, build_qemu_reader, certctl, certctl_runner,
                           fake_blob, milan_platform, moved_tcb, parse_reads, real_blob,
                           table_only)

TESTS = str(pathlib.Path(__file__).parent)
EMPTY = table.EMPTY_TABLE


def child_env(unsafe: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CERTD_UNSAFE", "CERTD_FAULT")}
    env["PYTHONPATH"] = TESTS
    if unsafe:
        env["CERTD_UNSAFE"] = unsafe
    env.update(extra)
    return env


def wait_until(cond, what: str, timeout: float = 20.0) -> None:
    """Poll a condition another process brings about (a file it appends to)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class Milan:
    """A real Milan blob at ``blob`` and the platform file it fits; ``moved`` is the same
    platform after a firmware update (another TCB): the blob no longer fits it."""

    def __init__(self, d: pathlib.Path):
        self.dir = d
        self.blob = d / "certs.blob"
        self.m1 = d / "m1.blob"
        self.m2 = d / "m2.blob"
        self.m1.write_bytes(real_blob("milan", "milan_vcek.der"))
        self.m2.write_bytes(real_blob("milan", "milan_gcp_vcek.der"))
        self.platform = milan_platform(self.m1.read_bytes())
        self.pfile = d / "platform.toml"
        self.moved = d / "moved.toml"
        platformmod.save(self.platform, self.pfile)
        platformmod.save(moved_tcb(self.platform), self.moved)
        # preconditions: m1 fits the platform, not the moved one
        trust = roots.pinned()
        assert policy.check_blob(self.m1.read_bytes(), trust=trust, platform=self.platform) == []
        moved = platformmod.load(self.moved)
        assert {p.check for p in policy.check_blob(self.m1.read_bytes(), trust=trust,
                                                   platform=moved)} == {"tcb"}

    def validate(self, blob: bytes):
        """What certctl passes: the policy, reading the platform file when called."""
        return policy.check_blob(blob, trust=roots.pinned(), platform=platformmod.load(self.pfile))

    def store(self, **kw) -> BlobStore:
        return BlobStore(self.blob, self.validate, **kw)

    def install_m1(self) -> None:
        r = certctl("install", "--blob", str(self.blob), str(self.m1), "--platform",
                    str(self.pfile))
        assert r.returncode == 0, r.stderr
        assert self.blob.read_bytes() == self.m1.read_bytes()


@pytest.fixture
def milan(tmp_path) -> Milan:
    return Milan(tmp_path)


@pytest.fixture(scope="module")
def qemu_reader(tmp_path_factory):
    exe = build_qemu_reader(tmp_path_factory.mktemp("cc"))
    if exe is None:
        pytest.skip("no C compiler")
    return exe


# --- item 1: a failed or interrupted update never leaves stale certificates ----------------

FW_UPDATER = textwrap.dedent("""
    import os, signal, sys
    from certd import platform, policy
    from certd.amd import roots
    from certd.store.blobstore import BlobStore
    blob, pfile, moved, how = sys.argv[1:5]
    trust = roots.pinned()
    store = BlobStore(blob, lambda b: policy.check_blob(b, trust=trust,
                                                        platform=platform.load(pfile)))
    def change(current):
        os.replace(moved, pfile)   # the firmware step moved the TCB (SNP_COMMIT done) ...
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("firmware step failed after the commit")   # ... then failed
    store.update(change, what="test firmware update")
""")


def failed_firmware_update(milan: Milan, unsafe: str | None = None) -> subprocess.CompletedProcess:
    milan.install_m1()
    r = subprocess.run([sys.executable, "-c", FW_UPDATER, str(milan.blob), str(milan.pfile),
                        str(milan.moved), "raise"], capture_output=True, text=True,
                       timeout=60, env=child_env(unsafe))
    assert r.returncode == 1 and "firmware step failed" in r.stderr, r.stderr
    assert platformmod.load(milan.pfile) == moved_tcb(milan.platform)  # the TCB did move
    return r


def test_failed_change_leaves_the_empty_table(milan):
    r = failed_firmware_update(milan)
    assert milan.blob.read_bytes() == EMPTY
    assert "no longer fit (tcb:" in r.stderr and "replaced by the empty table" in r.stderr
    assert milan.store().journal() is None  # settled: nothing left pending
    assert not locks.updater_waiting(milan.blob)


def test_failed_change_leaves_the_empty_table_control(milan):
    failed_firmware_update(milan, unsafe="settle")
    assert milan.blob.read_bytes() == milan.m1.read_bytes()  # stale certificates stay


def test_refused_blob_after_the_tcb_moved_empties_the_stale_one(milan):
    """A change that returns a blob the new platform refuses: nothing stale stays either."""
    milan.install_m1()
    store = milan.store()

    def change(current):
        assert current == milan.m1.read_bytes()
        os.replace(milan.moved, milan.pfile)
        return milan.m2.read_bytes()  # another chip's VCEK: refused

    r = store.update(change)
    assert r.outcome == "emptied" and r.installed is None
    assert {p.check for p in r.refused} >= {"chip_id"}
    assert [p.check for p in r.settled.problems] == ["tcb"]
    assert milan.blob.read_bytes() == EMPTY
    assert r.locked_ns <= r.change_started_ns <= r.change_ended_ns <= r.released_ns
    assert r.journal is not None and r.journal.what == "update" and store.journal() is None


def kill_in_the_change_by_certctl_lock(milan: Milan, unsafe: str | None = None) -> int:
    """'certctl lock --exclusive' whose hook moves the TCB, then SIGKILLs certctl."""
    milan.install_m1()
    hook = f"mv '{milan.moved}' '{milan.pfile}' && kill -KILL $PPID"
    p = subprocess.Popen(certctl_cmd("lock", "--blob", str(milan.blob), "--exclusive", "--",
                                     "sh", "-c", hook),
                         env=child_env(unsafe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        stop(p)
    assert p.returncode == -signal.SIGKILL, err
    assert platformmod.load(milan.pfile) == moved_tcb(milan.platform)
    assert milan.blob.read_bytes() == milan.m1.read_bytes()  # stale, until settled
    return p.pid


def certctl_cmd(*args: str) -> list[str]:
    return CERTCTL + list(args)


def daemon_protocol(store: BlobStore):
    """What certd does (the lead wires it): a pending journal -> settle before serving."""
    if store.journal() is None:
        return None
    return store.settle()


def test_updater_killed_in_the_change_leaves_a_journal(milan):
    pid = kill_in_the_change_by_certctl_lock(milan)
    store = milan.store()
    j = store.journal()
    assert j is not None and j.pid == pid and j.problem is None
    assert j.what.startswith("certctl lock --exclusive -- sh -c")
    assert j.boot_id and j.started_monotonic_ns <= time.monotonic_ns()
    s = daemon_protocol(store)
    assert s.outcome == "emptied" and [p.check for p in s.problems] == ["tcb"]
    assert s.journal == j and store.journal() is None
    assert milan.blob.read_bytes() == EMPTY


def test_updater_killed_in_the_change_leaves_a_journal_control(milan):
    kill_in_the_change_by_certctl_lock(milan, unsafe="journal")
    store = milan.store()
    assert daemon_protocol(store) is None
    assert milan.blob.read_bytes() == milan.m1.read_bytes()  # stale certificates stay


def test_the_next_updater_settles_a_dead_updaters_journal(milan):
    """A python updater SIGKILLed in its change; the next install finds the journal and
    empties the stale blob before it even looks at its own new bytes."""
    milan.install_m1()
    r = subprocess.run([sys.executable, "-c", FW_UPDATER, str(milan.blob), str(milan.pfile),
                        str(milan.moved), "kill"], capture_output=True, text=True, timeout=60,
                       env=child_env())
    assert r.returncode == -signal.SIGKILL, r.stderr
    store = milan.store()
    assert store.journal().what == "test firmware update"
    with pytest.raises(Exception) as e:  # m1 no longer fits: refused
        store.install(milan.m1.read_bytes())
    res = e.value.result
    # The dead updater had emptied the blob before its change (never stale, even for a
    # reader that ignores the journal); the next one settles and clears its journal.
    assert res.recovered.outcome in ("emptied", "kept") and \
        res.recovered.journal.what == "test firmware update"
    assert milan.blob.read_bytes() == EMPTY and store.journal() is None


UPDATE_ONCE = textwrap.dedent("""
    import sys
    from certd.store.blobstore import BlobStore
    from store_support import table_only
    new = open(sys.argv[2], 'rb').read()
    BlobStore(sys.argv[1], table_only).update(lambda current: new)
""")


def test_update_killed_at_every_step_leaves_the_journal_until_settled(tmp_path):
    a, b = fake_blob(b"A"), fake_blob(b"B")
    path, new = tmp_path / "certs.blob", tmp_path / "new.blob"
    new.write_bytes(b)
    store = BlobStore(path, table_only)
    first, last = STEPS.index("journaled"), STEPS.index("released")
    for i, step in enumerate(STEPS):
        store.install(a)
        r = subprocess.run([sys.executable, "-c", UPDATE_ONCE, str(path), str(new)],
                           env=child_env(**{FAULT_ENV: step}), capture_output=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, (step, r.stderr)
        # The old blob, the new one, or (killed between emptying first and installing)
        # the empty table: whole, and never stale.
        assert path.read_bytes() in (a, b, EMPTY), step
        pending = store.journal()
        assert (pending is not None) == (first <= i < last), step
        if pending is not None:
            s = store.settle()
            assert s.outcome == "kept" and s.journal == pending
            assert store.journal() is None


def test_journal_garbage_is_pending_and_settle_clears_it(tmp_path):
    store = BlobStore(tmp_path / "certs.blob", table_only)
    assert store.journal() is None
    store.install(fake_blob(b"A"))
    jp = pathlib.Path(journal.journal_path(store.path))
    for junk in (b"not json", b"[1, 2]", b'{"pid": "x"}', b"\xff" * 10, b"{}" + b" " * 5000):
        jp.write_bytes(junk)
        j = store.journal()
        assert j is not None and j.pid is None and str(jp) in j.problem, junk
        s = store.settle()
        assert s.outcome == "kept" and s.journal == j and store.journal() is None
    assert "larger than 4096" in j.problem


def test_settle_outcomes_and_the_empty_table(tmp_path):
    path = tmp_path / "certs.blob"

    def refuse(blob):
        assert blob != EMPTY, "the validator must never be asked about the empty table"
        return [table_only(b"")[0]]

    store = BlobStore(path, refuse)
    s = store.settle()
    assert s.outcome == "missing" and not path.exists()
    store.install(EMPTY)
    assert store.settle().outcome == "kept"
    BlobStore(path, table_only).install(fake_blob(b"A"))
    s = store.settle()
    assert s.outcome == "emptied" and s.emptied.size == len(EMPTY) and s.problems
    assert path.read_bytes() == EMPTY and s.locked_ns <= s.released_ns
    with locks.BlobLock(path).acquire_exclusive_sync(None):  # a live updater
        with pytest.raises(locks.LockBusy):
            store.settle(timeout=0.05)


def test_early_release_fault_lets_readers_in_during_the_change(tmp_path, monkeypatch):
    """Issue 9's test-only fault: the only difference is that the locks go before the change."""
    path = tmp_path / "certs.blob"
    store = BlobStore(path, table_only)
    store.install(fake_blob(b"A"))
    probe = ("import sys; from certd.store import locks\n"
             "try: locks.BlobLock(sys.argv[1]).acquire_shared_sync(None).release()\n"
             "except locks.LockBusy: sys.exit(1)\n")

    def change(current):
        seen.append(subprocess.run([sys.executable, "-c", probe, str(path)], timeout=60,
                                   env=child_env()).returncode)
        return fake_blob(b"B")

    seen: list[int] = []
    store.update(change)
    monkeypatch.setenv("CERTD_FAULT", "early-release")
    store.update(change)
    assert seen == [1, 0]  # busy while locked; with the fault a reader got in
    assert path.read_bytes() == fake_blob(b"B")


# --- item 4: a nested install keeps the new blob locked until the hook ends -----------------

def nested_install_window(milan: Milan, qemu_reader, unsafe: str | None = None):
    """A QEMU-style reader polls while a hook installs m2, then keeps working. Returns the
    reads of m2 that began before the hook's lock was let go (must be none)."""
    r = certctl("install", "--blob", str(milan.blob), str(milan.m1), "--force")
    assert r.returncode == 0, r.stderr
    m1, m2 = milan.m1.read_bytes(), milan.m2.read_bytes()
    ready, go = Fifo(milan.dir / "ready"), Fifo(milan.dir / "go")
    out = milan.dir / "reader.out"
    cli = certctl_runner(milan.dir)
    hook = (f"{cli} install --blob '{milan.blob}' '{milan.m2}' --force --timeout 5 >/dev/null"
            f" || exit 9; echo installed > '{ready.path}'; read x < '{go.path}'")
    reader = subprocess.Popen([str(qemu_reader), str(milan.blob), str(out), "100", "0", "0", "1"])
    hook_p = None
    try:
        wait_until(lambda: out.exists() and any(d == m1 for *_, d in parse_reads(out)),
                   "the reader to read the first blob")
        hook_p = subprocess.Popen(certctl_cmd("lock", "--blob", str(milan.blob), "--exclusive",
                                              "--timeout", "5", "--", "sh", "-c", hook),
                                  env=child_env(unsafe))
        assert ready.read_line() == "installed"
        assert milan.blob.read_bytes() == m2  # installed, the hook still at work
        t0 = time.monotonic_ns()
        # the exposure window: until the reader has finished two attempts after the install
        wait_until(lambda: sum(1 for line in out.read_text().splitlines()
                               if int(line.split()[1]) >= t0) >= 2, "two reader attempts")
        t_go = time.monotonic_ns()
        go.write_line("go")
        assert hook_p.wait(timeout=30) == 0
        wait_until(lambda: any(d == m2 for *_, d in parse_reads(out)), "the reader to read m2")
    finally:
        reader.send_signal(signal.SIGTERM)
        try:
            reader.wait(timeout=10)
        finally:
            stop(reader)
            if hook_p is not None:
                stop(hook_p)
    early = [acq for acq, _rel, d in parse_reads(out) if d == m2 and acq < t_go]
    print(f"\nnested install ({unsafe or 'protected'}): {len(parse_reads(out))} reads; "
          f"{len(early)} of the new blob while the hook still held the lock")
    return early


def test_nested_install_keeps_the_new_blob_locked(milan, qemu_reader):
    assert nested_install_window(milan, qemu_reader) == []


def test_nested_install_keeps_the_new_blob_locked_control(milan, qemu_reader):
    assert nested_install_window(milan, qemu_reader, unsafe="nested-keep") != []


def test_second_nested_install_adopts_the_parents_lock_on_the_new_blob(milan):
    """Two installs in one hook: the second adopts the lock on the inode the first put in
    place (it would time out otherwise), and the blob stays locked after both."""
    r = certctl("install", "--blob", str(milan.blob), str(milan.m1), "--force")
    assert r.returncode == 0, r.stderr
    cli = certctl_runner(milan.dir)
    probe = (f"{sys.executable} -c \"import fcntl, os, sys; from certd.store import locks; "
             f"fd = os.open('{milan.blob}', os.O_RDONLY); "
             f"sys.exit(0 if locks.conflicting_lock(fd) == fcntl.F_WRLCK else 4)\"")
    hook = (f"{cli} install --blob '{milan.blob}' '{milan.m2}' --force --timeout 1 --json "
            f"&& {cli} install --blob '{milan.blob}' '{milan.m1}' --force --timeout 1 --json "
            f"&& {probe}")
    r = certctl("lock", "--blob", str(milan.blob), "--exclusive", "--json", "--",
                "sh", "-c", hook)
    assert r.returncode == 0, r.stdout + r.stderr
    outs, text, dec = [], r.stdout.strip(), json.JSONDecoder()
    while text:  # three JSON documents: two installs, then the lock
        doc, end = dec.raw_decode(text)
        outs.append(doc)
        text = text[end:].strip()
    assert [o["ok"] for o in outs[:2]] == [True, True]
    assert outs[2]["lock"] == "exclusive" and outs[2]["journal"]
    assert milan.blob.read_bytes() == milan.m1.read_bytes()
    assert pathlib.Path(str(milan.blob) + ".prev").read_bytes() == milan.m2.read_bytes()
    # certctl lock checks no certificates: its journal stays for the next settle
    assert milan.store().journal() is not None


# --- item 5: a stale $CERTD_LOCK_HELD adopts nothing ---------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from certd.store import locks
    h = locks.BlobLock(sys.argv[1]).acquire_exclusive_sync(locks.deadline_in(10))
    print('held', flush=True)
    sys.stdin.read()
""")


def stale_env_install(milan: Milan, unsafe: str | None = None) -> int:
    """A background job of a hook outlives it and installs while another updater holds the
    exclusive lock. Returns the job's install exit code."""
    r = certctl("install", "--blob", str(milan.blob), str(milan.m1), "--force")
    assert r.returncode == 0, r.stderr
    go, rc = Fifo(milan.dir / "go"), Fifo(milan.dir / "rc")
    cli = certctl_runner(milan.dir)
    job = (f"( read x < '{go.path}'; {cli} install --blob '{milan.blob}' '{milan.m2}' --force "
           f"--timeout 0.5 > '{milan.dir}/job.log' 2>&1; echo $? > '{rc.path}' ) "
           f"</dev/null >/dev/null 2>&1 &")
    r = certctl("lock", "--blob", str(milan.blob), "--exclusive", "--", "sh", "-c", job,
                env=child_env(unsafe))
    assert r.returncode == 0, r.stderr  # the hook is over; its job lives on
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(milan.blob)], env=child_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        go.write_line("go")
        code = int(rc.read_line())
    finally:
        holder.stdin.close()
        stop(holder)
        holder.stdout.close()
    print(f"\nstale $CERTD_LOCK_HELD ({unsafe or 'protected'}): install exit {code}; "
          f"{(milan.dir / 'job.log').read_text().strip()[:160]}")
    return code


def test_stale_lock_env_waits_and_times_out(milan):
    code = stale_env_install(milan)
    log = (milan.dir / "job.log").read_text()
    assert code == 75, log
    assert milan.blob.read_bytes() == milan.m1.read_bytes()
    assert "not obtained after" in log and "another updater holds the update gate" in log


def test_stale_lock_env_waits_and_times_out_control(milan):
    assert stale_env_install(milan, unsafe="adopt-check") == 0
    assert milan.blob.read_bytes() == milan.m2.read_bytes()  # installed under another's lock


def test_adopt_refuses_what_is_not_a_live_certctl_lock(tmp_path, monkeypatch):
    path = str(tmp_path / "certs.blob")
    pathlib.Path(path).write_bytes(fake_blob(b"A"))
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for value in (f"1:exclusive:{os.getpid()}:{r}:{path}",           # not a socket
                      f"1:exclusive:{os.getpid() + 1}:{b.fileno()}:{path}",  # another pid's
                      f"1:exclusive:{os.getpid()}:{b.fileno()}:{path}.other",  # other path
                      "garbage", f"0:exclusive:{os.getpid()}:{b.fileno()}:{path}"):
            assert nested.adopt(path, None, {nested.HELD_ENV: value}) is None, value
        # our own pair, but nobody answers: not adopted (after the bounded wait)
        assert nested.adopt(path, locks.deadline_in(0.05),
                            {nested.HELD_ENV: f"1:exclusive:{os.getpid()}:{b.fileno()}:{path}"}) is None
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


# --- item 14: reading the blob is bounded --------------------------------------------------

READ_CHILD = textwrap.dedent("""
    import sys
    from certd.store import locks
    def rchar():
        with open('/proc/self/io') as f:
            return int(next(l for l in f if l.startswith('rchar')).split()[1])
    lk = locks.BlobLock(sys.argv[1])
    before = rchar()
    print('opening', flush=True)
    try:
        with lk.acquire_shared_sync(locks.deadline_in(1)) as h:
            n, what = len(h.read()), 'read'
    except locks.BlobUnusable as e:
        n, what = -1, str(e)
    print(rchar() - before, n, what, flush=True)
""")


def read_in_child(path: pathlib.Path, unsafe: str | None = None) -> tuple[int, int, str]:
    r = subprocess.run([sys.executable, "-c", READ_CHILD, str(path)], capture_output=True,
                       text=True, timeout=60, env=child_env(unsafe))
    assert r.returncode == 0, r.stderr
    read_bytes, n, what = r.stdout.splitlines()[1].split(" ", 2)
    return int(read_bytes), int(n), what


def test_huge_blob_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "certs.blob"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse
    read_bytes, n, what = read_in_child(path)
    print(f"\n1 GiB blob: refused after reading {read_bytes} bytes: {what}")
    assert n == -1 and f"is {1 << 30} bytes; a certificate table is at most {locks.MAX_BLOB}" in what
    assert read_bytes < 1 << 20
    # settling replaces it by the empty table (the daemon would serve that meanwhile)
    s = BlobStore(path, table_only).settle()
    assert s.outcome == "emptied" and "at most" in s.problems[0].message
    assert path.read_bytes() == EMPTY


def test_huge_blob_is_refused_without_reading_it_control(tmp_path):
    path = tmp_path / "certs.blob"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # 64 MiB is enough to show the unbounded read
    read_bytes, n, what = read_in_child(path, unsafe="bounded-read")
    assert n == 64 << 20 and read_bytes >= 64 << 20


def test_fifo_at_the_path_is_refused_without_blocking(tmp_path):
    path = tmp_path / "certs.blob"
    os.mkfifo(path)
    read_bytes, n, what = read_in_child(path)
    assert n == -1 and what.endswith("is a FIFO, not a regular file"), what
    s = BlobStore(path, table_only).settle()  # an updater's O_RDWR open must not block either
    assert s.outcome == "emptied" and path.read_bytes() == EMPTY


def test_fifo_at_the_path_is_refused_without_blocking_control(tmp_path):
    path = tmp_path / "certs.blob"
    os.mkfifo(path)
    p = subprocess.Popen([sys.executable, "-c", READ_CHILD, str(path)], env=child_env("bounded-read"),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "opening"
        wchan = pathlib.Path(f"/proc/{p.pid}/wchan")
        wait_until(lambda: p.poll() is not None or wchan.read_text() == "wait_for_partner",
                   "the reader to block in open()")
        assert p.poll() is None  # blocked opening the FIFO (no writer will ever come)
    finally:
        stop(p)
        p.stdout.close()


# --- item 15: the blob path exists whenever certd is ready ----------------------------------

def test_ensure_exists_writes_the_empty_table_once(tmp_path):
    path = tmp_path / "certs.blob"
    store = BlobStore(path, lambda b: pytest.fail("the empty table needs no validator"))
    old = os.umask(0o077)
    try:
        r = store.ensure_exists()
    finally:
        os.umask(old)
    assert r is not None and r.size == len(EMPTY) and r.prev_path is None
    st = os.stat(path)
    assert path.read_bytes() == EMPTY and st.st_mode & 0o777 == 0o644
    assert store.ensure_exists() is None and os.stat(path).st_ino == st.st_ino
    assert sorted(os.listdir(tmp_path)) == [".certs.blob.gate", "certs.blob"]


def ensure_against_a_concurrent_install(milan: Milan, monkeypatch, unsafe: str | None = None):
    """A real 'certctl install' gets in between ensure_exists() finding no blob and taking
    the gate."""
    def hook(step):
        if step == ENSURE_CHECKED:
            r = certctl("install", "--blob", str(milan.blob), str(milan.m1), "--force")
            assert r.returncode == 0, r.stderr

    if unsafe:
        monkeypatch.setenv("CERTD_UNSAFE", unsafe)
    assert not milan.blob.exists()
    return BlobStore(milan.blob, milan.validate, fault=hook).ensure_exists()


def test_ensure_exists_never_overwrites_a_concurrent_install(milan, monkeypatch):
    assert ensure_against_a_concurrent_install(milan, monkeypatch) is None
    assert milan.blob.read_bytes() == milan.m1.read_bytes()


def test_ensure_exists_never_overwrites_a_concurrent_install_control(milan, monkeypatch):
    assert ensure_against_a_concurrent_install(milan, monkeypatch, "ensure-recheck") is not None
    assert milan.blob.read_bytes() == EMPTY  # the installed blob was lost


def test_concurrent_nested_installs_take_turns(milan):
    """Two nested installs at once in one hook: the parent serves one session at a time,
    so the second adopts the lock on the first one's new inode instead of sharing it."""
    m3 = milan.dir / "m3.blob"
    m3.write_bytes(real_blob("milan", "milan_virtee_vcek.der"))
    r = certctl("install", "--blob", str(milan.blob), str(m3), "--force")
    assert r.returncode == 0, r.stderr
    cli = certctl_runner(milan.dir)
    inst = f"{cli} install --blob '{milan.blob}' '{{}}' --force --timeout 5 --json > '{{}}'"
    hook = (inst.format(milan.m2, milan.dir / "a.json") + " & "
            + inst.format(milan.m1, milan.dir / "b.json") + " & "
            "wait %1 && wait %2")
    r = certctl("lock", "--blob", str(milan.blob), "--exclusive", "--", "sh", "-c", hook)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (json.loads((milan.dir / n).read_text()) for n in ("a.json", "b.json"))
    # One ran after the other: the second replaced what the first installed. Had they
    # shared the lock, both would have replaced m3.
    r3 = hashlib.sha256(m3.read_bytes()).hexdigest()
    first, second = (a, b) if a["previous_sha256"] == r3 else (b, a)
    assert first["previous_sha256"] == r3 and second["previous_sha256"] == first["sha256"], (a, b)
    assert milan.blob.read_bytes() in (milan.m1.read_bytes(), milan.m2.read_bytes())


def test_an_update_can_run_a_command_that_installs_under_its_lock(milan):
    """What 'certctl fw-update -- CMD' needs: CMD's nested install adopts the update's
    lock, its new blob stays locked until the update ends, and the update settles it."""
    r = certctl("install", "--blob", str(milan.blob), str(milan.m1), "--force")
    assert r.returncode == 0, r.stderr
    cli = certctl_runner(milan.dir)
    store = BlobStore(milan.blob, table_only)
    probe = ("import fcntl, os, sys; from certd.store import locks; "
             "fd = os.open(sys.argv[1], os.O_RDONLY); "
             "sys.exit(0 if locks.conflicting_lock(fd) == fcntl.F_WRLCK else 4)")

    def change(current):
        cmd = f"{cli} install --blob '{milan.blob}' '{milan.m2}' --force --timeout 1 >/dev/null"
        assert nested.run_command(store.hold, ["sh", "-c", cmd], env=child_env()) == 0
        assert milan.blob.read_bytes() == milan.m2.read_bytes()
        # still locked after CMD ended: the update holds the nested install's inode
        assert subprocess.run([sys.executable, "-c", probe, str(milan.blob)], timeout=60,
                              env=child_env()).returncode == 0
        return None

    r = store.update(change)
    assert r.outcome == "kept" and r.settled.outcome == "kept" and store.hold is None
    assert milan.blob.read_bytes() == milan.m2.read_bytes()
    assert not locks.updater_waiting(milan.blob)
