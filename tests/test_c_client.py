"""contrib/certd-client (the CLI on the C library certd-client.c): compiled with gcc, run
against the test-only FakeServer, which can send the odd answers a real daemon never does.

The C client mirrors a VMM (GET, copy the table, hold, RELEASE); these tests check that a
client written from docs/protocol.md alone interoperates with certd.abi.wire. The library
against a real daemon, and the VMM example: tests/test_c_kit.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from certd.abi import wire
from certd import exitcodes
from test_client import TABLE, FakeServer, GENERATION  # the shared test-only server

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
SOURCES = [CONTRIB / "certd-client-cli.c", CONTRIB / "certd-client.c"]
#: The Makefile's warning set, plus -Werror: the kit must build clean.
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion",
          "-Wno-sign-conversion", "-Werror"]


def compile_c(out: Path, *sources: Path) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    r = subprocess.run([cc, *CFLAGS, "-o", str(out), *map(str, sources)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no warnings either
    return str(out)


@pytest.fixture(scope="module")
def cclient(tmp_path_factory) -> str:
    return compile_c(tmp_path_factory.mktemp("cc") / "certd-client", *SOURCES)


@pytest.fixture
async def server(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    path = str(d / "certd.sock")
    if len(path) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    srv = await FakeServer(path).start()
    try:
        yield srv
    finally:
        await srv.stop()


async def run(exe: str, *args: str, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_get_writes_table_and_releases(cclient, server, tmp_path):
    out = tmp_path / "table.bin"
    rc, stdout, stderr = await run(cclient, "-s", server.path, "get", "vm-c", "-o", str(out))
    assert rc == 0, stderr
    assert out.read_bytes() == TABLE
    assert f"ret=0 (OK) npages=3 generation={GENERATION} lease=101 table_len={len(TABLE)}" in stdout
    assert "release=released" in stdout
    assert server.released == [101] and not server.leases
    get = server.requests[0]
    assert get == wire.Get(1, "vm-c", 4, 0)


async def test_options_before_vm_id_and_wait_ms(cclient, server):
    rc, _, stderr = await run(cclient, "-s", server.path, "-t", "2000", "get", "-n", "3",
                              "-w", "250", "vm-x")
    assert rc == 0, stderr
    assert server.requests[0] == wire.Get(1, "vm-x", 3, 250)


async def test_hold_keeps_the_lease_until_release(cclient, server):
    task = asyncio.ensure_future(run(cclient, "-s", server.path, "get", "vm", "-H", "300"))
    for _ in range(500):
        if server.leases or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.leases and not server.released  # held during -H
    rc, stdout, stderr = await task
    assert rc == 0, stderr
    assert "release=released" in stdout
    assert not server.leases


@pytest.mark.parametrize("npages, code", [(2, exitcodes.NOSPACE), (0, exitcodes.NOSPACE)])
async def test_enospc(cclient, server, npages, code):
    rc, stdout, _ = await run(cclient, "-s", server.path, "get", "vm", "-n", str(npages))
    assert rc == code
    assert "ret=28 (ENOSPC) npages=3" in stdout and "lease=0" in stdout
    assert not server.leases


@pytest.mark.parametrize("vm, code, text", [
    ("busy", exitcodes.BUSY, "ret=11 (EAGAIN)"),
    ("broken", exitcodes.UNAVAILABLE, "ret=5 (EIO)"),
    ("denied", exitcodes.NOPERM, "ERROR 16"),
    ("ratelimit", exitcodes.BUSY, "ERROR 17 (arg 250)"),
    ("garbage", exitcodes.SOFTWARE, "bad magic"),
])
async def test_other_answers(cclient, server, vm, code, text):
    rc, stdout, stderr = await run(cclient, "-s", server.path, "get", vm)
    assert rc == code, (stdout, stderr)
    assert text in stdout + stderr


async def test_status(cclient, server):
    rc, stdout, stderr = await run(cclient, "-s", server.path, "status")
    assert rc == 0, stderr
    doc = json.loads(stdout)
    assert doc["generation"] == GENERATION and doc["fake"] is True


async def test_timeout_is_unavailable(cclient, server):
    rc, _, stderr = await run(cclient, "-s", server.path, "-t", "200", "get", "silent")
    assert rc == exitcodes.UNAVAILABLE and "within 200 ms" in stderr


async def test_unavailable_and_usage(cclient, tmp_path):
    rc, _, stderr = await run(cclient, "-s", str(tmp_path / "none.sock"), "status")
    assert rc == exitcodes.UNAVAILABLE and "no certd socket" in stderr
    for args in (["get"], ["get", "x" * 65], ["get", "a\tb"], ["frob"], ["get", "vm", "-n", "-1"],
                 ["status", "extra"], ["get", "vm", "extra"]):
        rc, _, stderr = await run(cclient, *args)
        assert rc == exitcodes.USAGE, (args, stderr)
    rc, stdout, _ = await run(cclient, "-h")
    assert rc == 0 and "usage:" in stdout


async def test_write_failure_still_releases(cclient, server, tmp_path):
    rc, stdout, stderr = await run(cclient, "-s", server.path, "get", "vm",
                                   "-o", str(tmp_path / "no" / "such" / "dir" / "t.bin"))
    assert rc == exitcodes.IOERR and "cannot open" in stderr
    assert "release=released" in stdout and not server.leases


def test_makefile_builds(tmp_path):
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("make or cc missing")
    for name in ("certd-client.h", "certd-client.c", "certd-client-cli.c", "vmm-example.c",
                 "qemu_reader.c", "Makefile"):
        shutil.copy(CONTRIB / name, tmp_path / name)
    r = subprocess.run(["make", "-s", "-C", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CFLAGS": "-O2 -Werror"})
    assert r.returncode == 0, r.stdout + r.stderr
    for built in ("certd-client", "vmm-example", "qemu_reader", "libcertd-client.a"):
        assert (tmp_path / built).exists(), built
