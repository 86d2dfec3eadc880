"""The simulator's parts on their own: a PSP shared between processes, guest models that
react as Linux and COCONUT SVSM do, and a QEMU-style file reader on real OFD locks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from certd import devfw, devkds, devpki, platform as platformmod, policy
from certd.abi.product import Product
from certd.abi import table, wire
from certd.sim import guests, psp as pspmod, vmm
from certd.sim.guests import Counters
from certd.store import blobstore, locks


@pytest.fixture
def sim(tmp_path):
    """A simulated platform on disk: PKI directory, platform file, installed blob."""
    devkds.open_pki_dir(tmp_path / "pki", [Product.MILAN])
    platformmod.save(devpki.make_platform(), tmp_path / "platform.toml")
    psp = pspmod.SharedPsp.open(tmp_path / "pki", tmp_path / "platform.toml")
    blob = tmp_path / "certs.blob"
    blobstore.BlobStore(blob, psp.validator()).install(psp.valid_blob())
    return psp, blob


SIGN = """
import sys
from certd.sim import psp
sys.stdout.buffer.write(psp.SharedPsp.open(sys.argv[1], sys.argv[2]).sign(b"other process"))
"""


def firmware(psp: pspmod.SharedPsp, tcb) -> None:
    assert devfw.main([str(psp.platform_path), "--snp", str(tcb.snp)]) == 0


def sign_elsewhere(psp: pspmod.SharedPsp) -> bytes:
    out = subprocess.run([sys.executable, "-c", SIGN, str(psp.platform_path.parent / "pki"),
                          str(psp.platform_path)], capture_output=True, timeout=60, check=True)
    return out.stdout


def test_every_process_signs_with_the_key_of_the_current_tcb(sim):
    psp, blob_path = sim
    old_blob = blob_path.read_bytes()
    report = sign_elsewhere(psp)
    assert len(report) == 1184
    assert policy.check_report(old_blob, report, trust=psp.pki.trust) == []

    old_tcb = psp.platform.reported_tcb
    firmware(psp, pspmod.next_tcb(old_tcb))
    after = sign_elsewhere(psp)  # the key changed when the platform file did
    problems = policy.check_report(old_blob, after, trust=psp.pki.trust)
    assert {p.check for p in problems} >= {"signature", "tcb"}, problems
    assert policy.check_report(psp.valid_blob(psp.refresh()), after, trust=psp.pki.trust) == []

    firmware(psp, old_tcb)  # back: the old key again
    assert policy.check_report(old_blob, sign_elsewhere(psp), trust=psp.pki.trust) == []


def scripted(answers: list, psp: pspmod.SharedPsp, tbl: bytes):
    """An exit answering the ret values in ``answers`` in turn (then 0 for ever)."""
    async def exit(vm_id, npages, report_data):
        ret = answers.pop(0) if answers else wire.RET_OK
        if ret != wire.RET_OK:
            return ret, b"", None
        return ret, tbl, psp.sign(report_data)
    return exit


def attest(kind: str, answers: list, psp, tbl: bytes, scale: float = 0.01) -> tuple[bool, Counters]:
    c = Counters()
    g = guests.KINDS[kind]("vm", scripted(answers, psp, tbl), psp.pki.trust, c, time_scale=scale)
    return asyncio.run(g.attest()), c


def test_linux_guest_retries_eagain_then_verifies(sim):
    psp, blob = sim
    ok, c = attest("linux", [wire.EAGAIN] * 3, psp, blob.read_bytes())
    assert ok and (c.eagain, c.attestations, c.verified, c.vmpck_lost) == (3, 1, 1, 0)
    assert c.max_wait_ms >= 3 * guests.LINUX_RETRY_S * 0.01 * 1000


def test_linux_guest_gives_up_after_its_budget_and_on_eio(sim):
    psp, blob = sim
    ok, c = attest("linux", [wire.EAGAIN] * 1000, psp, blob.read_bytes())
    assert not ok and c.vmpck_lost == 1 and c.attestations == 0
    # It kept retrying, every 2 s (scaled), for the whole 60 s budget before giving up.
    assert c.eagain > 2 and c.max_wait_ms >= guests.LINUX_BUDGET_S * 0.01 * 1000
    ok, c = attest("linux", [wire.EIO], psp, blob.read_bytes())
    assert not ok and (c.eio, c.vmpck_lost) == (1, 1)


def test_svsm_guest_retries_busy_once_only(sim):
    psp, blob = sim
    ok, c = attest("svsm", [wire.EAGAIN], psp, blob.read_bytes())
    assert ok and (c.eagain, c.verified, c.vmpck_lost) == (1, 1, 0)
    ok, c = attest("svsm", [wire.EAGAIN, wire.EAGAIN], psp, blob.read_bytes())
    assert not ok and (c.eagain, c.attestations, c.vmpck_lost) == (2, 0, 1)


def test_guest_tells_mismatch_from_empty_and_torn(sim):
    psp, blob = sim
    stale = blob.read_bytes()
    firmware(psp, pspmod.next_tcb(psp.platform.reported_tcb))
    ok, c = attest("linux", [], psp, stale)
    assert ok and (c.attestations, c.mismatches, c.verified) == (1, 1, 0)
    assert "signature" in c.details[0]["problems"][0]
    ok, c = attest("svsm", [], psp, table.EMPTY_TABLE)
    assert (c.empty, c.mismatches, c.verified) == (1, 0, 0)
    ok, c = attest("linux", [], psp, stale[:100])
    assert (c.torn, c.mismatches) == (1, 0)


def test_file_face_reader_answers_eagain_after_certs_timeout(sim):
    psp, blob = sim
    c = Counters()
    reader = vmm.FileVmm(str(blob), psp, c, certs_timeout_s=0.1, resume_delay_s=0)
    ret, tbl, report = asyncio.run(reader.exit("vm", 4, b"x"))
    assert ret == wire.RET_OK and tbl == blob.read_bytes()
    assert policy.check_report(tbl, report, trust=psp.pki.trust) == []
    lock = locks.BlobLock(blob)
    hold = lock.acquire_exclusive_sync(locks.deadline_in(5))
    try:
        t0 = time.monotonic()
        ret, tbl, report = asyncio.run(reader.exit("vm", 4, b"x"))
        waited = time.monotonic() - t0
    finally:
        hold.release()
        lock.close()
    assert (ret, tbl, report) == (wire.EAGAIN, b"", None)
    assert waited >= 0.1
    ret, tbl, _ = asyncio.run(reader.exit("vm", 0, b"x"))
    assert ret == wire.ENOSPC
