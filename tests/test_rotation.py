"""Rotation end to end (issue "Rotation"): a real certd process, a real development KDS on
loopback, real certctl fw-update processes, VMM clients requesting all the while.

The firmware's state is the platform file (a stand-in for /dev/sev); `python -m
certd.devfw` moves its reported TCB as a firmware tool would. A client's GET answer is
time-stamped (CLOCK_MONOTONIC, shared by all processes) before it is released, so an
answer stamped after the firmware moved was served after the change.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certd import devkds, devpki, platform as platformmod, policy
from certd.abi import table
from certd.client import AsyncClient
from certd.verify import pki as pkimod
from tests.daemon_support import BIN, DaemonProc, config_text

PY = sys.executable


def leaf_tcb(blob: bytes):
    """The reported TCB the blob's VCEK is for, or None for the empty table."""
    if blob == table.EMPTY_TABLE:
        return None
    c = policy.parse_blob(blob)
    return c.leaf.ext.tcb(c.leaf.product)


class Rig:
    """A dev PKI, a development KDS thread, a platform file and a certd on them."""

    def __init__(self, tmp: Path, *, kds_url: str | None = None, extra: str = ""):
        self.dir = tmp
        self.pki = devpki.DevPki.generate(name="rotation-test")
        self.kds = devkds.DevKds([self.pki]).start()
        self.platform_file = tmp / "platform.toml"
        platformmod.save(devpki.make_platform(), self.platform_file)
        roots = tmp / "dev-roots.pem"
        roots.write_bytes(self.pki.cert_chain_pem() + self.pki.asvk.public_bytes(devpki.PEM))
        url = kds_url or self.kds.url
        text = config_text(tmp, platform_file=self.platform_file, extra=extra)
        text = text.replace('[kds]\nbase_url = ""', f'[kds]\nbase_url = "{url}"\n'
                            f'cache_dir = "{tmp / "kds-cache"}"\nmin_backoff_s = 0.05\n'
                            'max_backoff_s = 0.2\ntimeout_s = 2')
        text += f'\n[trust]\nroots = ["{roots}"]\n'
        text = text.replace("[server]\n", "[server]\nrate_per_vm = 100000\nrate_burst = 100000\n", 1)  # load test
        self.config = tmp / "certd.toml"
        self.config.write_text(text)
        self.daemon = DaemonProc(tmp, text)

    @property
    def platform(self):
        return platformmod.load(self.platform_file)

    def fw_update(self, *fw_args: str, extra: tuple[str, ...] = (),
                  stamp: Path | None = None, env: dict | None = None,
                  must_succeed: bool = True) -> dict:
        """certctl fw-update around a devfw TCB change; ``stamp`` gets the monotonic time
        (ns) at which the firmware moved. ``must_succeed`` False (a fault switched on): its
        exit code is not asserted, only that the firmware moved."""
        cmd = [PY, "-m", "certd.devfw", str(self.platform_file), *fw_args]
        if stamp is not None:
            cmd += ["--stamp", str(stamp)]
        r = subprocess.run([str(BIN / "certctl"), "fw-update", "--config", str(self.config),
                            "--json", *extra, "--", *cmd], capture_output=True, text=True,
                           timeout=60, env={**os.environ, **(env or {})})
        if not must_succeed:
            assert stamp is None or stamp.exists(), r.stdout + r.stderr
            return {"exit": r.returncode}
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout[r.stdout.index("\n{") + 1:] if not r.stdout.startswith("{")
                          else r.stdout)  # CMD's own output comes first

    def close(self) -> None:
        try:
            self.daemon.stop()
        finally:
            self.kds.stop()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


async def until(pred, timeout: float = 20.0, what: str = "condition"):
    """Poll an outside process's observable state (nothing to await on it)."""
    end = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def served_tcb(sock: str):
    async with AsyncClient(sock) as c:
        r = await c.get("probe", 4)
        if r.lease_id:
            await c.release(r.lease_id)
        return leaf_tcb(r.table) if r.ret == 0 else "busy"


async def clients(sock: str, n: int, stop: asyncio.Event, seen: list,
                  hold_s: float = 0.0005) -> None:
    async def one(i: int) -> None:
        async with AsyncClient(sock) as c:
            while not stop.is_set():
                r = await c.get(f"vm-{i}", 4)
                if r.ret == 0:
                    got = time.monotonic_ns()  # before RELEASE: the lease is live
                    await asyncio.sleep(hold_s)  # the guest's report is signed meanwhile
                    if r.lease_id:
                        await c.release(r.lease_id)
                    seen.append((got, time.monotonic_ns(), leaf_tcb(r.table)))
                else:
                    await asyncio.sleep(0.001)
    await asyncio.gather(*(one(i) for i in range(n)))


def test_daemon_fetches_the_vcek_when_no_blob_exists(rig):
    """Start with no blob: certd writes the empty table, then its rotator fetches the VCEK
    for the reported TCB from KDS and serves it."""
    assert not rig.daemon.blob.exists()
    rig.daemon.start()
    want = rig.platform.reported_tcb
    asyncio.run(until(lambda: _eq(served_tcb(rig.daemon.socket), want), what="rotated blob"))
    assert any("/vcek/v1/Milan/" in t for t in rig.kds.requests)


async def _eq(coro, want) -> bool:
    return (await coro) == want


async def _fw_update_under_load(rig: Rig, stamp: Path, env: dict | None = None,
                                hold_s: float = 0.0005, tries: int = 1):
    """One fw-update under 8 leasing clients (``tries``: up to that many in a row, until
    one leaves stale answers: a negative control must not depend on one race)."""
    rig.daemon.start()
    old = rig.platform.reported_tcb
    await until(lambda: _eq(served_tcb(rig.daemon.socket), old), what="first blob")
    stop, seen = asyncio.Event(), []
    load = asyncio.create_task(clients(rig.daemon.socket, 8, stop, seen, hold_s))
    await until(lambda: _async(len(seen) > 50), what="clients running")
    for attempt in range(tries):
        before = rig.platform.reported_tcb
        this = stamp.with_name(f"{stamp.name}.{attempt}")
        result = await asyncio.to_thread(rig.fw_update, "--snp", "+1", stamp=this, env=env,
                                         must_succeed=not env)
        after_return = await served_tcb(rig.daemon.socket)
        n = len(seen)
        await until(lambda: _async(len(seen) > n + 50), what="more requests")
        changed_ns = int(this.read_text())
        # Stale: the key before this change in a lease that was live when the firmware
        # moved (the report is signed with the new key) or granted after it.
        stale = [t for got, released, t in seen if released >= changed_ns and t == before]
        if stale:
            break
    stop.set()
    await load
    new = rig.platform.reported_tcb
    return old, new, result, after_return, seen, stale


def _async(v):
    async def f():
        return v
    return f()


def test_fw_update_no_client_gets_the_old_vcek_after_the_change(rig, tmp_path):
    old, new, result, after_return, seen, stale = asyncio.run(
        _fw_update_under_load(rig, tmp_path / "changed"))
    assert new != old and result["platform_changed"] and result["source"] in ("kds", "cache")
    assert after_return == new, "the new blob is served when the hook returns"
    assert stale == [], f"{len(stale)} answers carried the old VCEK after the firmware moved"
    print(f"\nfw-update under load: {len(seen)} answers, 0 stale after the change; exclusive "
           f"{result['exclusive_s'] * 1000:.1f} ms of which CMD {result['cmd_s'] * 1000:.1f} ms")


def test_fw_update_control_early_release_serves_the_old_vcek(rig, tmp_path):
    """Negative control: updaters that release the lock before the new blob is in place
    (CERTD_FAULT=early-release) let clients get the old VCEK after the firmware moved."""
    old, new, result, after_return, seen, stale = asyncio.run(
        _fw_update_under_load(rig, tmp_path / "changed", env={"CERTD_FAULT": "early-release"},
                              hold_s=0.02, tries=3))  # leases long enough to span the change
    assert stale, "the detector must see stale answers when the lock is released early"


def test_kds_down_gives_the_empty_table_then_the_right_blob(rig):
    """fw-update while KDS is down installs the empty table (never the stale VCEK); once
    KDS answers again at the same address, the daemon rotates the right blob in by itself."""
    rig.daemon.start()
    old = rig.platform.reported_tcb
    asyncio.run(until(lambda: _eq(served_tcb(rig.daemon.socket), old), what="first blob"))
    port = rig.kds.server.server_address[1]
    rig.kds.stop()  # KDS is down
    result = rig.fw_update("--snp", "+1")
    assert result["empty_table"] and result["platform_changed"], result
    assert asyncio.run(served_tcb(rig.daemon.socket)) is None  # the empty table
    rig.kds = devkds.DevKds([rig.pki], port=port).start()  # KDS is back
    want = rig.platform.reported_tcb
    asyncio.run(until(lambda: _eq(served_tcb(rig.daemon.socket), want), what="rotation"))


def test_drift_without_the_hook_stops_the_stale_table_then_rotates(rig):
    """Someone moves the firmware by hand (no hook, no lock): the stale VCEK stops being
    served at once and the right one is fetched and rotated in."""
    rig.daemon.start()
    old = rig.platform.reported_tcb
    asyncio.run(until(lambda: _eq(served_tcb(rig.daemon.socket), old), what="first blob"))
    subprocess.run([PY, "-m", "certd.devfw", str(rig.platform_file), "--snp", "+1"], check=True,
                   capture_output=True, timeout=30)
    new = rig.platform.reported_tcb
    got = []

    async def watch():
        while True:
            t = await served_tcb(rig.daemon.socket)
            got.append(t)
            if t == new:
                return True
            assert t != old or len(got) < 3, "the stale VCEK is still served after the change"
            await asyncio.sleep(0.01)
    asyncio.run(asyncio.wait_for(watch(), 20))
    assert old not in got[1:]
    print(f"\ndrift: answers after the hand-made change until the new blob: {got}")


def _drop(directory: Path, name: str, data: bytes) -> None:
    """Write as a provisioning tool should: a dot-file, then rename into place."""
    tmp = directory / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, directory / name)


def test_drop_directory_rotates_a_vlek_in_and_rejects_garbage(tmp_path):
    """A VLEK dropped into [watch] drop_dir on a platform that signs with its VLEK is
    completed with the ASVK and ARK, judged and served; garbage is moved to rejected/ with
    a .reason and the served blob stays."""
    drop = tmp_path / "drop"
    drop.mkdir()
    rig = Rig(tmp_path, extra=f'\n[watch]\ndrop_dir = "{drop}"\n')
    try:
        plat = rig.platform.replace(signing_key="vlek")
        platformmod.save(plat, rig.platform_file)
        rig.daemon.start()
        assert asyncio.run(served_tcb(rig.daemon.socket)) is None  # nothing yet
        vlek, _key = rig.pki.issue_vlek(plat.reported_tcb)
        _drop(drop, "vlek.pem", vlek.public_bytes(devpki.PEM))
        asyncio.run(until(lambda: _eq(served_tcb(rig.daemon.socket), plat.reported_tcb),
                          timeout=10, what="the dropped VLEK served"))
        served = rig.daemon.blob.read_bytes()
        assert policy.parse_blob(served).leaf.kind.value == "VLEK"
        _drop(drop, "junk.pem", b"not a certificate")
        asyncio.run(until(lambda: _async((drop / "rejected" / "junk.pem.reason").exists()),
                          timeout=10, what="garbage rejected"))
        assert (drop / "rejected" / "junk.pem").read_bytes() == b"not a certificate"
        assert rig.daemon.blob.read_bytes() == served
        assert (drop / "accepted" / "vlek.pem").exists()
    finally:
        rig.close()


@pytest.mark.parametrize("unsafe", ["", "empty-first"], ids=["empty-first", "control"])
def test_an_updater_killed_after_the_firmware_step_leaves_nothing_stale_on_disk(tmp_path, unsafe):
    """certctl fw-update SIGKILLed right after its CMD moved the firmware: what a stock
    QEMU reads from the file (it never looks at the journal) is not the old VCEK, because
    the update ran with the empty table at the path. Negative control: without emptying
    first (CERTD_UNSAFE=empty-first) the stale blob is what QEMU would read."""
    rig = Rig(tmp_path)
    try:
        rig.daemon.blob.write_bytes(policy.build_blob(
            rig.pki.ark, rig.pki.ask,
            rig.pki.issue_vcek(rig.platform.reported_tcb, rig.platform.chip_id)[0],
            trust=rig.pki.trust, platform=rig.platform))
        before = rig.platform
        cmd = f'{PY} -m certd.devfw {rig.platform_file} --snp +1 && kill -9 $PPID'
        r = subprocess.run([str(BIN / "certctl"), "fw-update", "--config", str(rig.config), "--",
                            "sh", "-c", cmd], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "CERTD_UNSAFE": unsafe})
        assert r.returncode == -9, r.stderr
        assert rig.platform != before, "precondition: the firmware moved"
        on_disk = rig.daemon.blob.read_bytes()
        problems = policy.check_blob(on_disk, trust=rig.pki.trust, platform=rig.platform)
        stale = on_disk != table.EMPTY_TABLE and bool(problems)
        assert stale == bool(unsafe), (on_disk[:40], problems)
    finally:
        rig.close()
