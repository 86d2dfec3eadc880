"""certd.store.blobstore: atomic install, .prev, rollback, recover, and every refusal
leaving the current blob untouched."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess

import pytest

from certd.abi import table
from certd.store import locks
from certd.store.blobstore import (STEPS, BlobStore, InvalidBlob, NothingToRollBack,
                                   StoreIOError, check)
from store_support import fake_blob, real_blob, table_only, tmpfs


A, B, C = fake_blob(b"A"), fake_blob(b"B"), fake_blob(b"C")


@pytest.fixture
def store(tmp_path):
    s = BlobStore(tmp_path / "certs.blob", table_only)
    s.install(A)
    return s


def snapshot(path: str) -> tuple[bytes, int]:
    return pathlib.Path(path).read_bytes(), os.stat(path).st_ino


def leftovers(store: BlobStore) -> list[str]:
    return [n for n in os.listdir(store.dir) if ".tmp." in n or ".prevtmp." in n]


def test_first_install_then_replace_keeps_prev(tmp_path):
    s = BlobStore(tmp_path / "certs.blob", table_only)
    assert s.read() is None  # unconfigured
    r1 = s.install(A)
    assert r1.previous_sha256 is None and r1.prev_path is None
    assert s.read() == A
    assert os.stat(s.path).st_mode & 0o777 == 0o644
    assert not os.path.exists(s.prev_path)
    r2 = s.install(B)
    assert s.read() == B
    assert pathlib.Path(s.prev_path).read_bytes() == A
    assert r2.previous_sha256 == r1.sha256 and r2.prev_path == s.prev_path
    assert r2.locked_ns <= r2.released_ns
    assert sorted(os.listdir(tmp_path)) == [".certs.blob.gate", "certs.blob", "certs.blob.prev"]
    assert s.journal() is None  # every update removes its journal once settled


def test_prev_is_the_old_inode(store):
    old_ino = os.stat(store.path).st_ino
    store.install(B)
    assert os.stat(store.prev_path).st_ino == old_ino  # hard link, no copy


def test_rollback_swaps_and_a_second_rollback_undoes_it(store):
    store.install(B)
    store.rollback()
    assert store.read() == A and pathlib.Path(store.prev_path).read_bytes() == B
    store.rollback()
    assert store.read() == B and pathlib.Path(store.prev_path).read_bytes() == A


def test_rollback_without_prev(tmp_path):
    s = BlobStore(tmp_path / "certs.blob", table_only)
    s.install(A)
    with pytest.raises(NothingToRollBack, match="certs.blob.prev does not exist"):
        s.rollback()
    assert s.read() == A


def test_mode_and_owner_are_kept(store):
    os.chmod(store.path, 0o640)
    if os.geteuid() == 0:
        os.chown(store.path, 65534, 65534)
    store.install(B)
    st = os.stat(store.path)
    assert st.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)


@pytest.mark.parametrize("bad, words", [
    (b"", "empty file"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "not a valid certificate table"),
    (A[:-1], "runs past the end"),
    (A[:30], "truncated"),
    (fake_blob(b"D", 20000), "at most 16384 bytes"),
])
def test_bad_blobs_are_refused_and_change_nothing(store, bad, words):
    before = snapshot(store.path)
    with pytest.raises(InvalidBlob) as e:
        store.install(bad)
    assert words in str(e.value)
    assert e.value.problems
    assert snapshot(store.path) == before
    assert not os.path.exists(store.prev_path)
    assert leftovers(store) == []


def test_blob_for_another_product_is_refused_by_policy(tmp_path):
    """Uses the real validator (certd.policy.check_blob) with a Milan platform."""
    policy = pytest.importorskip("certd.policy")
    from certd.abi.product import Product
    from certd.abi.tcb import Tcb
    from certd.amd import roots
    from certd.platform import Platform

    milan = real_blob("milan", "milan_vcek.der")
    genoa = real_blob("genoa", "genoa_vcek.der")
    leaf = policy.parse_blob(milan).leaf
    platform = Platform(product=Product.MILAN, reported_tcb=leaf.ext.tcb(Product.MILAN),
                        chip_id=leaf.hwid)

    def validate(blob):
        return policy.check_blob(blob, trust=roots.pinned(), platform=platform)

    s = BlobStore(tmp_path / "certs.blob", validate)
    s.install(milan)  # the matching blob passes the full policy
    before = snapshot(s.path)
    with pytest.raises(InvalidBlob) as e:
        s.install(genoa)
    assert any(p.check == "product" and "Genoa" in p.message for p in e.value.problems)
    assert snapshot(s.path) == before
    other_tcb = platform.replace(reported_tcb=Tcb(bl=0, tee=0, snp=0, ucode=0))
    s2 = BlobStore(s.path, lambda b: policy.check_blob(b, trust=roots.pinned(), platform=other_tcb))
    with pytest.raises(InvalidBlob) as e:
        s2.install(real_blob("milan", "milan_gcp_vcek.der"))
    assert any(p.check in ("tcb", "chip_id") for p in e.value.problems)
    # Refused, and the current blob does not fit this platform either: it is emptied.
    assert e.value.result.outcome == "emptied" and "empty table" in str(e.value)
    assert pathlib.Path(s.path).read_bytes() == table.EMPTY_TABLE
    assert pathlib.Path(s.prev_path).read_bytes() == before[0]


def test_missing_directory(tmp_path):
    s = BlobStore(tmp_path / "nope" / "certs.blob", table_only)
    with pytest.raises(StoreIOError) as e:
        s.install(A)
    assert e.value.errno == errno.ENOENT
    assert "directory" in str(e.value) and "does not exist" in str(e.value)


def test_busy_when_a_reader_holds_the_blob(store):
    with locks.acquire_shared_sync(store.path, None):
        with pytest.raises(locks.LockBusy) as e:
            store.install(B, timeout=0.05)
        assert e.value.what == "blob"
    assert store.read() == A
    assert leftovers(store) == []


@pytest.mark.parametrize("step", ["temp_written", "temp_synced", "temp_locked", "prev_saved"])
def test_io_error_at_any_step_before_rename_changes_nothing(store, step):
    def fault(at):
        if at == step:
            raise OSError(errno.ENOSPC, "No space left on device")
    store.install(C)
    before, prev_before = snapshot(store.path), snapshot(store.prev_path)
    s = BlobStore(store.path, table_only, fault=fault)
    with pytest.raises(StoreIOError) as e:
        s.install(B)
    assert e.value.errno == errno.ENOSPC
    assert "disk full (ENOSPC)" in str(e.value) and "untouched" in str(e.value)
    assert snapshot(store.path) == before
    if step != "prev_saved":
        assert snapshot(store.prev_path) == prev_before
    assert leftovers(store) == []
    assert not locks.updater_waiting(store.path)  # the gate was released


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only); unmounted afterwards."""
    with tmpfs(tmp_path / "mnt", "size=64k") as mnt:
        try:
            yield mnt
        finally:
            locks._LOCKS.clear()


def test_full_disk_for_real(tiny_tmpfs):
    s = BlobStore(tiny_tmpfs / "certs.blob", table_only)
    s.install(A)
    before = snapshot(s.path)
    # Fill the filesystem so the next blob cannot be written.
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(StoreIOError) as e:
        s.install(fake_blob(b"E", 12000))
    print(f"\nfull disk: {e.value}")
    assert e.value.errno == errno.ENOSPC and "disk full" in str(e.value)
    assert snapshot(s.path) == before
    assert leftovers(s) == []
    os.unlink(tiny_tmpfs / "filler")
    s.install(B)
    assert s.read() == B


def test_read_only_filesystem_for_real(tiny_tmpfs):
    s = BlobStore(tiny_tmpfs / "certs.blob", table_only)
    s.install(A)
    before = snapshot(s.path)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(StoreIOError) as e:
        s.install(B)
    print(f"\nread-only: {e.value}")
    assert e.value.errno == errno.EROFS and "read-only file system" in str(e.value)
    assert snapshot(s.path) == before
    assert s.read() == A  # readers still work on a read-only filesystem
    assert s.recover() == []


def test_recover_removes_only_our_temp_files(store):
    d = pathlib.Path(store.dir)
    ours = [d / ".certs.blob.tmp.1234.0123456789abcdef",
            d / ".certs.blob.prevtmp.99.fedcba9876543210"]
    theirs = [d / ".certs.blob.tmp.junk", d / ".other.blob.tmp.1.0123456789abcdef",
              d / "certs.blob.tmp.1.0123456789abcdef", d / ".certs.blob.tmp.1.0123456789abcdef.x"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    removed = store.recover()
    assert sorted(removed) == sorted(map(str, ours))
    assert all(p.exists() for p in theirs)
    assert store.read() == A


def test_install_cleans_up_leftovers_too(store):
    p = pathlib.Path(store.dir) / ".certs.blob.tmp.1.0123456789abcdef"
    p.write_bytes(b"half")
    r = store.install(B)
    assert r.removed_temps == [str(p)] and not p.exists()


def test_recover_waits_for_a_live_updater(store):
    with locks.BlobLock(store.path).acquire_exclusive_sync(None):
        with pytest.raises(locks.LockBusy):
            store.recover(timeout=0.05)


def test_fault_steps_are_all_visited(store):
    seen = []
    BlobStore(store.path, table_only, fault=seen.append).install(B)
    assert tuple(seen) == STEPS


def test_the_empty_table_is_always_installable(store):
    def refuse_all(blob):
        raise AssertionError("the validator must not be asked about the empty table")

    assert check(table.EMPTY_TABLE, refuse_all) == []
    store.install(table.EMPTY_TABLE, validate=refuse_all)
    assert store.read() == table.EMPTY_TABLE


def test_a_validator_that_raises_refuses(store):
    def broken(blob):
        raise ValueError("lazy field parse")

    problems = check(A, broken)
    assert [p.check for p in problems] == ["validator"] and "lazy field parse" in problems[0].message
