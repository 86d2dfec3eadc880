"""certctl kds url|fetch|prefetch|export against the loopback test KDS; the one-request
guarantee across 50 in-process waiters and a concurrent certctl process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from certd import exitcodes, platform as platmod
from certd.abi import table
from certd.abi.product import Product
from certd.abi.table import Role
from certd.amd.roots import pinned
from certd.cli import certctl
from certd.sources.kds import KdsClient

from kds_support import VECTORS, KdsServer, Reply
from test_kds_client import case_platform


@pytest.fixture
def kds():
    with KdsServer() as server:
        yield server


def write_config(tmp_path: Path, urls: list[str], **kds_keys) -> Path:
    keys = {"timeout_s": 5, "min_backoff_s": 0.01, "max_backoff_s": 0.05, **kds_keys}
    mirrors = ", ".join(f'"{u}"' for u in urls[:-1])
    text = (f'[kds]\nbase_url = "{urls[-1]}"\nmirrors = [{mirrors}]\n'
            f'cache_dir = "{tmp_path / "cache"}"\n'
            + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    path = tmp_path / "certd.toml"
    path.write_text(text)
    return path


def platform_file(tmp_path: Path, name: str, **changes) -> Path:
    p, _ = case_platform(name)
    if changes:
        p = p.replace(**changes)
    path = tmp_path / f"{name}.toml"
    platmod.save(p, path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = certctl.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_url_prints_the_documented_urls(tmp_path, capsys):
    pf = platform_file(tmp_path, "turin")
    cfg = write_config(tmp_path, ["https://kdsintf.amd.com"])
    rc, out, _ = run(capsys, "kds", "url", "--platform", str(pf), "--config", str(cfg),
                     "--chain", "--crl")
    assert rc == 0
    assert out.splitlines() == [
        "https://kdsintf.amd.com/vcek/v1/Turin/0910b4f884ff4ba9"
        "?fmcSPL=1&blSPL=3&teeSPL=2&snpSPL=5&ucodeSPL=97",
        "https://kdsintf.amd.com/vcek/v1/Turin/cert_chain",
        "https://kdsintf.amd.com/vcek/v1/Turin/crl"]
    rc, out, _ = run(capsys, "kds", "url", "--platform", str(pf), "--config", str(cfg), "--json",
                     "--tcb", "fmc=2,bl=3,tee=2,snp=5,ucode=97")
    doc = json.loads(out)
    assert doc["urls"]["vcek"][0].endswith("?fmcSPL=2&blSPL=3&teeSPL=2&snpSPL=5&ucodeSPL=97")


def test_fetch_writes_a_validated_blob_and_der(kds, tmp_path, capsys):
    pf = platform_file(tmp_path, "milan")
    cfg = write_config(tmp_path, [kds.url])
    out = tmp_path / "new.blob"
    rc, text, _ = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                      "-o", str(out), "--json")
    assert rc == 0, text
    doc = json.loads(text)
    assert doc["ok"] and doc["format"] == "blob" and doc["crl"] is False
    leaf = next(e.data for e in table.decode(out.read_bytes()).entries if e.role is Role.VCEK)
    assert leaf == (VECTORS / "milan_vcek.der").read_bytes()
    der = tmp_path / "vcek.der"
    rc, text, _ = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                      "-o", str(der), "--der", "--json")
    assert rc == 0 and json.loads(text)["requests"] == 0  # from the cache
    assert der.read_bytes() == (VECTORS / "milan_vcek.der").read_bytes()
    assert len(kds.vcek_requests()) == 1


def test_fetch_exit_codes(tmp_path, capsys):
    with KdsServer(served=[]) as empty, KdsServer() as garbage:
        garbage.script(*[Reply.garbage()] * 100)
        pf = platform_file(tmp_path, "milan")
        cfg = write_config(tmp_path, [empty.url])
        rc, text, _ = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                          "-o", str(tmp_path / "x"), "--timeout", "0.3", "--json")
        assert rc == exitcodes.UNAVAILABLE == 69
        doc = json.loads(text)
        assert doc["failures"][0]["kind"] == "missing" and empty.url in doc["error"]
        rc, text, err = run(capsys, "kds", "fetch", "--platform", str(pf), "--url", garbage.url,
                            "--config", str(cfg), "-o", str(tmp_path / "x"), "--timeout", "0.3")
        assert rc == exitcodes.DATAERR == 65 and "invalid answer" in err
        assert not (tmp_path / "x").exists()
        rc, _, err = run(capsys, "kds", "fetch", "--platform", str(tmp_path / "nope.toml"),
                         "--config", str(cfg), "-o", str(tmp_path / "x"))
        assert rc == exitcodes.NOINPUT == 66 and "nope.toml" in err
        bad = tmp_path / "bad.toml"
        bad.write_text("[kds]\ntimeout_s = -1\n")
        rc, _, err = run(capsys, "kds", "url", "--platform", str(pf), "--config", str(bad))
        assert rc == exitcodes.CONFIG and "timeout_s" in err


def test_prefetch_then_export_in_trustee_layout(kds, tmp_path, capsys):
    # the platform still runs an older TCB; the VCEK for the TCB about to be installed
    from certd.abi.tcb import Tcb
    pf = platform_file(tmp_path, "milan", reported_tcb=Tcb(bl=1, tee=0, snp=1, ucode=1))
    cfg = write_config(tmp_path, [kds.url])
    rc, text, _ = run(capsys, "kds", "prefetch", "--platform", str(pf), "--config", str(cfg),
                      "--tcb", "bl=2,tee=0,snp=5,ucode=68", "--json")
    assert rc == 0, text
    rc, _, _ = run(capsys, "kds", "prefetch", "--platform", str(platform_file(tmp_path, "turin")),
                   "--config", str(cfg))
    assert rc == 0
    # a corrupt cache entry is not exported
    junk = tmp_path / "cache" / "vcek" / "Milan" / ("ab" * 64) / "bl01_tee00_snp01_ucode01_vcek.der"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a certificate")
    rc, text, _ = run(capsys, "kds", "export", "--config", str(cfg), "--trustee",
                      str(tmp_path / "trustee"), "--json")
    assert rc == 0
    doc = json.loads(text)
    milan_hwid = (VECTORS / "milan_report.bin").read_bytes()[0x1A0:0x1E0].hex()
    store = tmp_path / "trustee" / "kds-store" / "vcek"
    expected = {
        store / milan_hwid / "bl02_tee00_snp05_ucode68_vcek.der": "milan_vcek.der",
        store / "0910b4f884ff4ba9" / "bl03_tee02_snp05_ucode97_fmc01_vcek.der": "turin_vcek.der",
    }
    assert {Path(e["file"]) for e in doc["exported"]} == set(expected)
    for path, vector in expected.items():
        assert path.read_bytes() == (VECTORS / vector).read_bytes()
    assert [s["file"] for s in doc["skipped"]] == [str(junk)]


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "negative-control"])
async def test_50_waiters_and_a_certctl_prefetch_make_one_request(kds, tmp_path, monkeypatch,
                                                                  coalesce):
    import threading
    if not coalesce:
        monkeypatch.setenv("CERTD_UNSAFE", "kds-coalesce")
    hold = threading.Event()
    kds.script(Reply(200, hold=hold))  # the first VCEK request waits until we let it go
    platform, _ = case_platform("milan")
    pf = platform_file(tmp_path, "milan")
    cfg = write_config(tmp_path, [kds.url])
    client = KdsClient([kds.url], tmp_path / "cache", trust=pinned(), timeout_s=20,
                       min_backoff_s=0.01, max_backoff_s=0.05)
    tasks = [asyncio.ensure_future(client.vcek_blob(platform)) for _ in range(50)]
    assert await asyncio.to_thread(kds.first_vcek_request.wait, 20)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "certd.cli.certctl", "kds", "prefetch", "--platform", str(pf),
        "--config", str(cfg), "--json", "--timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        if coalesce:
            # Precondition: the other process is waiting on the per-key lock file
            fd_dir = Path(f"/proc/{proc.pid}/fd")
            for _ in range(2000):
                links = []
                for fd in fd_dir.iterdir():
                    try:
                        links.append(os.readlink(fd))
                    except OSError:
                        pass
                if any(link.endswith("_vcek.der.lock") for link in links):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("certctl kds prefetch never opened the lock file")
        else:
            await asyncio.sleep(0.5)
        hold.set()
        blobs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        hold.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert len(set(blobs)) == 1
    n = len(kds.vcek_requests())
    if coalesce:
        assert n == 1
        assert json.loads(out)["requests"] == 0  # it found what the daemon side fetched
    else:
        assert n > 1  # without coalescing every waiter asks KDS itself


@pytest.mark.parametrize("name", ["milan", "genoa-A0h", "turin"])
def test_fetch_from_platform_files_requests_the_documented_url(kds, tmp_path, capsys, name):
    from test_kds_client import CASES
    pf = platform_file(tmp_path, name)
    if name == "genoa-A0h":  # a model A0h part is a Siena/Bergamo: the file may say so
        text = pf.read_text()
        assert 'product = "Genoa"' in text
        pf.write_text(text.replace('product = "Genoa"', 'product = "Siena"'))
    _, target = case_platform(name)
    cfg = write_config(tmp_path, [kds.url])
    out = tmp_path / "vcek.der"
    rc, text, err = run(capsys, "kds", "fetch", "--platform", str(pf), "--config", str(cfg),
                        "-o", str(out), "--der")
    assert rc == 0, err
    assert [r.target for r in kds.vcek_requests()] == [target]
    assert out.read_bytes() == (VECTORS / CASES[name][2]).read_bytes()
