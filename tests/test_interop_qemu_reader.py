"""Interop with a stock VMM: contrib/qemu_reader.c (QEMU RFC v2's reader loop) against
'certctl install' rotating real certificate blobs.

Proves: every byte string a reader read is one of the installed blobs, whole; and every
read of blob N lies between the start of N's exclusive section and the start of N+1's
(CLOCK_MONOTONIC on both sides): no reader ever gets old certificates once an update began.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certd.abi import table
from certd.abi.table import Entry, Role
from store_support import CERTCTL, build_qemu_reader

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
READERS, ROTATIONS = 4, 12


def milan_blobs() -> list[bytes]:
    ask, ark = x509.load_pem_x509_certificates((VECTORS / "milan_cert_chain.pem").read_bytes())
    head = [Entry.of(Role.ARK, ark.public_bytes(Encoding.DER)),
            Entry.of(Role.ASK, ask.public_bytes(Encoding.DER))]
    names = ["milan_vcek.der", "milan_gcp_vcek.der", "milan_trustee_vcek.der",
             "milan_virtee_vcek.der"]
    blobs = [table.encode(head + [Entry.of(Role.VCEK, (VECTORS / n).read_bytes())]) for n in names]
    assert len(set(blobs)) == len(blobs)
    return blobs


@pytest.fixture(scope="module")
def qemu_reader(tmp_path_factory):
    exe = build_qemu_reader(tmp_path_factory.mktemp("cc"))
    if exe is None:
        pytest.skip("no C compiler")
    return exe


def install(blob_path, new_path) -> dict:
    r = subprocess.run(CERTCTL + ["install", "--blob", str(blob_path), str(new_path), "--force",
                                  "--timeout", "5", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def parse(out: pathlib.Path) -> tuple[list[tuple[int, int, bytes]], int, int]:
    reads, timeouts, replaced = [], 0, 0
    for line in out.read_text().splitlines():
        status, acq, rel, busy, repl, length, data = line.split(" ")
        replaced += int(repl)
        if status == "timeout":
            timeouts += 1
            continue
        raw = bytes.fromhex(data) if data != "-" else b""
        assert len(raw) == int(length)
        reads.append((int(acq), int(rel), raw))
    return reads, timeouts, replaced


def test_qemu_readers_only_ever_see_whole_current_blobs(tmp_path, qemu_reader):
    blobs = milan_blobs()
    files = []
    for i, b in enumerate(blobs):
        f = tmp_path / f"new{i}.blob"
        f.write_bytes(b)
        files.append(f)
    path = tmp_path / "certs.blob"
    gens = [(install(path, files[0]), blobs[0])]

    procs, outs = [], []
    try:
        for i in range(READERS):
            out = tmp_path / f"reader{i}.out"
            outs.append(out)
            # 100 ms timeout (QEMU's default certs-timeout), hold 1 ms, 2 ms between reads
            procs.append(subprocess.Popen([str(qemu_reader), str(path), str(out),
                                           "100", "1", "0", "2"]))
        time.sleep(0.1)
        for n in range(1, ROTATIONS + 1):
            k = n % len(blobs)
            gens.append((install(path, files[k]), blobs[k]))
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)

    starts = [g["locked_monotonic_ns"] for g, _ in gens] + [2**63]
    for (g, b) in gens:
        assert g["sha256"] and g["size"] == len(b)
    installed = {b for _, b in gens}
    total = timeouts = replaced = 0
    per_gen = [0] * len(gens)
    for out in outs:
        reads, t, r = parse(out)
        timeouts += t
        replaced += r
        for acq, rel, data in reads:
            total += 1
            assert data in installed, f"a reader read {len(data)} bytes that were never installed"
            # the generation this read must belong to: the last section that began before it
            k = max(i for i in range(len(gens)) if starts[i] <= acq)
            assert gens[k][1] == data, (
                f"read at {acq} returned blob of generation with other content (gen {k})")
            assert rel < starts[k + 1], "a reader held blob N after the update to N+1 began"
            per_gen[k] += 1
    holds_ms = [(g["released_monotonic_ns"] - g["locked_monotonic_ns"]) / 1e6 for g, _ in gens]
    print(f"\ninterop: {READERS} qemu_reader processes, {len(gens)} installs "
          f"({len(gens) - 1} rotations through {len(blobs)} real Milan blobs): {total} reads, "
          f"all whole installed blobs, none across an update; reads per generation "
          f"min {min(per_gen)} max {max(per_gen)}; reader timeouts (100 ms) {timeouts}; "
          f"inode-changed retries {replaced}; exclusive section (incl. policy check) "
          f"max {max(holds_ms):.1f} ms")
    assert total > 100
    assert min(per_gen[1:]) > 0  # every rotated blob was seen by some reader
