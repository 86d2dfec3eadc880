"""Crash safety: SIGKILL the installing process at every step and at random moments.

Whatever the moment, the blob path holds a complete valid blob (old or new), .prev is
absent or a complete blob, the dead process's locks are gone, and recover() (which every
install also runs) removes exactly the temp files it left.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from certd.abi import table
from certd.abi.table import Entry, Role
from certd.store import locks
from certd.store.blobstore import FAULT_ENV, STEPS, BlobStore
from store_support import table_only

A = table.encode([Entry.of(Role.ARK, b"A" * 64), Entry.of(Role.VCEK, b"a" * 3000)])
B = table.encode([Entry.of(Role.ARK, b"B" * 64), Entry.of(Role.VCEK, b"b" * 3500)])
TESTS = str(pathlib.Path(__file__).parent)

INSTALL_ONCE = textwrap.dedent("""
    import sys
    from certd.store.blobstore import BlobStore
    from store_support import table_only
    BlobStore(sys.argv[1], table_only).install(open(sys.argv[2], 'rb').read())
""")

INSTALL_LOOP = textwrap.dedent("""
    import sys
    from certd.store.blobstore import BlobStore
    from store_support import table_only
    s = BlobStore(sys.argv[1], table_only)
    blobs = [open(p, 'rb').read() for p in sys.argv[2:]]
    print('ready', flush=True)
    n = 0
    while True:
        s.install(blobs[n % len(blobs)]); n += 1
""")


def check_state(path: str, allowed: set[bytes]) -> None:
    data = pathlib.Path(path).read_bytes()
    assert data in allowed, f"blob is neither old nor new ({len(data)} bytes)"
    table.decode(data)
    prev = pathlib.Path(path + ".prev")
    if prev.exists():
        assert prev.read_bytes() in allowed
    # The dead updater's locks died with it: an updater gets in at once.
    locks.BlobLock(path).acquire_exclusive_sync(None).release()


def recover_and_check(store: BlobStore) -> list[str]:
    removed = store.recover(timeout=1)
    names = sorted(os.listdir(store.dir))
    assert set(names) <= {".certs.blob.gate", "certs.blob", "certs.blob.prev", "new.blob", "a.blob"}, names
    return removed


@pytest.fixture
def files(tmp_path):
    (tmp_path / "new.blob").write_bytes(B)
    return tmp_path / "certs.blob", tmp_path / "new.blob"


@pytest.mark.parametrize("first_install", [False, True], ids=["replace", "first-install"])
def test_kill_at_every_step(files, first_install):
    path, new = files
    store = BlobStore(path, table_only)
    if not first_install:
        store.install(A)
    expect_new_from = STEPS.index("renamed")
    for i, step in enumerate(STEPS):
        env = dict(os.environ, **{FAULT_ENV: step}, PYTHONPATH=TESTS)
        r = subprocess.run([sys.executable, "-c", INSTALL_ONCE, str(path), str(new)],
                           env=env, capture_output=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, (step, r.stderr)
        if first_install and i < expect_new_from:
            assert not path.exists(), step  # still unconfigured, not a partial file
        else:
            want = B if i >= expect_new_from else A
            assert path.read_bytes() == want, step
            check_state(str(path), {A, B})
        removed = recover_and_check(store)
        if step in ("temp_written", "temp_synced", "temp_locked", "prev_saved"):
            assert len(removed) == 1, (step, removed)  # the temp file, and nothing else
        # reset for the next step
        if path.exists():
            BlobStore(path, table_only).install(A)
        if first_install:
            for p in (path, pathlib.Path(str(path) + ".prev")):
                p.unlink(missing_ok=True)


def test_kill_at_random_moments(files):
    path, new = files
    (path.parent / "a.blob").write_bytes(A)
    store = BlobStore(path, table_only)
    store.install(A)
    rng = random.Random(1234)
    runs, leftovers, old_seen, new_seen = 40, 0, 0, 0
    for _ in range(runs):
        child = subprocess.Popen(
            [sys.executable, "-c", INSTALL_LOOP, str(path), str(path.parent / "a.blob"), str(new)],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=TESTS))
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, 0.03))
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        check_state(str(path), {A, B})
        data = path.read_bytes()
        old_seen += data == A
        new_seen += data == B
        leftovers += len(recover_and_check(store))
    (path.parent / "a.blob").unlink()
    print(f"\n{runs} random kills: blob was A {old_seen}x, B {new_seen}x; "
          f"{leftovers} leftover temp files removed by recover(); 0 torn blobs")
    assert old_seen + new_seen == runs
