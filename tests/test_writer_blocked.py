"""locks.writer_blocked: a process blocked in a lock wait on the blob's inode is seen in
/proc/locks (how certd lets an updater that knows nothing of the gate in without draining
its shared hold when nobody waits)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from certd.store import locks

BLOCKED_WRITER = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
"""


def test_a_blocked_writer_is_seen_and_no_waiter_is_not(tmp_path):
    path = tmp_path / "certs.blob"
    path.write_bytes(b"x" * 24)
    other = tmp_path / "other.blob"
    other.write_bytes(b"y" * 24)
    fd = os.open(path, os.O_RDONLY)
    assert locks.try_lock(fd, False)
    st = os.fstat(fd)
    assert not locks.writer_blocked(st), "precondition: nobody waits yet"
    child = subprocess.Popen([sys.executable, "-c", BLOCKED_WRITER, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "waiting"
        end = time.monotonic() + 10
        while not locks.writer_blocked(st):  # the child enters the kernel's wait
            assert time.monotonic() < end and child.poll() is None
            time.sleep(0.005)
        assert not locks.writer_blocked(os.stat(other))  # another inode: not ours
    finally:
        os.close(fd)  # our shared lock goes: the writer gets in and exits
        assert child.wait(timeout=10) == 0
        child.stdout.close()
    assert not locks.writer_blocked(st)


def test_unreadable_proc_locks_errs_towards_letting_updaters_in(tmp_path):
    st = os.stat(tmp_path)
    assert locks.writer_blocked(st, proc_locks=str(tmp_path / "no-such-file"))
