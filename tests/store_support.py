"""Helpers for the store tests: a table-only validator for fake blobs, real AMD blobs and
matching platform files, certctl as a subprocess, the QEMU-style C reader, a small tmpfs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import select
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certd.abi import table
from certd.abi.table import Entry, Role
from certd.verify.problems import Problem

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def tmpfs(mnt: pathlib.Path, options: str):
    """A tmpfs mounted at ``mnt`` (made here) with ``options``, e.g. ``size=64k,ro``; root
    only: the test is skipped elsewhere. Lazily unmounted afterwards."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)

VECTORS = ROOT / "tests" / "vectors"
CERTCTL = [sys.executable, "-c", textwrap.dedent("""
    import importlib.util, sys
    from certd.cli import certctl
    # run with whatever subcommands this checkout has (others are written concurrently)
    certctl.COMMANDS = tuple(c for c in certctl.COMMANDS
                             if importlib.util.find_spec('certd.cli.cmd_' + c))
    sys.exit(certctl.main())
""")]


def table_only(blob: bytes) -> list[Problem]:
    """Test validator for fake blobs: any well-formed table a guest accepts."""
    if not blob:
        from certd.policy import EMPTY_FILE
        return [EMPTY_FILE]
    try:
        table.decode(blob)
    except table.TableError as e:
        return [Problem("format", f"not a valid certificate table: {e}")]
    if len(blob) > table.GUEST_MAX_SIZE:
        return [Problem("size", f"{len(blob)} bytes; at most {table.GUEST_MAX_SIZE} bytes")]
    return []


def fake_blob(tag: bytes, size: int = 200) -> bytes:
    """A well-formed table with distinct fake content (passes :func:`table_only`)."""
    return table.encode([Entry.of(Role.ARK, tag * 8), Entry.of(Role.ASK, tag * 4),
                         Entry.of(Role.VCEK, (tag * size)[:size])])


def real_blob(product: str, vcek: str) -> bytes:
    ask, ark = x509.load_pem_x509_certificates((VECTORS / f"{product}_cert_chain.pem").read_bytes())
    return table.encode([Entry.of(Role.ARK, ark.public_bytes(Encoding.DER)),
                         Entry.of(Role.ASK, ask.public_bytes(Encoding.DER)),
                         Entry.of(Role.VCEK, (VECTORS / vcek).read_bytes())])


def milan_platform(blob: bytes, **over):
    """The Milan platform ``blob``'s VCEK was issued for (fields in ``over`` replaced)."""
    from certd import policy
    from certd.abi.product import Product
    from certd.platform import Platform
    leaf = policy.parse_blob(blob).leaf
    p = Platform(product=Product.MILAN, reported_tcb=leaf.ext.tcb(Product.MILAN),
                 chip_id=leaf.hwid)
    return p.replace(**over) if over else p


def moved_tcb(p):
    """``p`` after a firmware update: another reported TCB, so its VCEK no longer fits."""
    t = p.reported_tcb
    return p.replace(reported_tcb=dataclasses.replace(t, snp=t.snp + 1))


def certctl(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CERTCTL + list(args), capture_output=True, text=True,
                          timeout=timeout, **kw)


def certctl_runner(directory: pathlib.Path) -> str:
    """A shell command word running certctl (for hooks written as sh -c '...')."""
    runner = directory / "certctl_runner.py"
    runner.write_text(CERTCTL[2])
    return f"'{sys.executable}' '{runner}'"


def build_qemu_reader(directory: pathlib.Path) -> pathlib.Path | None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    exe = directory / "qemu_reader"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(exe),
                    str(ROOT / "contrib" / "qemu_reader.c")], check=True, timeout=60)
    return exe


def parse_reads(out: pathlib.Path) -> list[tuple[int, int, bytes]]:
    """(acquired_ns, released_ns, bytes) of every successful read qemu_reader logged."""
    reads = []
    for line in out.read_text().splitlines():
        status, acq, rel, _busy, _repl, length, data = line.split(" ")
        if status == "ok":
            raw = bytes.fromhex(data) if data != "-" else b""
            assert len(raw) == int(length)
            reads.append((int(acq), int(rel), raw))
    return reads


class Fifo:
    """A named pipe a shell hook writes one line to (or reads one from): the test awaits
    the event with a bound instead of sleeping."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        os.mkfifo(path)

    def read_line(self, timeout: float = 30) -> str:
        """Wait (at most ``timeout``) for a writer's line."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            data = b""
            while not data.endswith(b"\n"):
                assert p.poll(timeout * 1000), f"nothing written to {self.path} in {timeout} s"
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip()
        finally:
            os.close(fd)

    def write_line(self, text: str, timeout: float = 30) -> None:
        """Hand a line to the reader of the pipe; waits (at most ``timeout``) for it to
        open the pipe (a blocking open, in a thread so that the wait is bounded)."""
        done: list[BaseException | None] = []

        def write() -> None:
            try:
                with open(self.path, "wb") as f:  # blocks until the reader opens
                    f.write(text.encode() + b"\n")
                done.append(None)
            except BaseException as e:
                done.append(e)

        t = threading.Thread(target=write, daemon=True)
        t.start()
        t.join(timeout)
        assert done, f"no reader opened {self.path} in {timeout} s"
        if done[0] is not None:
            raise done[0]
