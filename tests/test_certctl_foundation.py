"""certctl build / show / verify, run in-process through certd.cli.certctl.main (and once
as the installed console script), on every real pair and the negative cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certd import devpki
from certd import platform as platmod
from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.product import Product
from certd import exitcodes
from certd.cli.certctl import main
from vector_pairs import PAIRS

VCEK_AT = "2026-09-01T00:00:00Z"
VLEK_AT = "2025-03-01"


def at_arg(leaf: str) -> str:
    return VLEK_AT if "vlek" in leaf else VCEK_AT


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def build(capsys, vectors, tmp_path, leaf, chain, *extra) -> Path:
    out = tmp_path / f"{leaf}.blob"
    flag = "--vlek" if "vlek" in leaf else "--vcek"
    code, o, e = run(capsys, "build", "--chain", vectors / chain, flag, vectors / leaf,
                     "-o", out, "--at", at_arg(leaf), *extra)
    assert code == 0, o + e
    return out


@pytest.mark.parametrize("rep,leaf,chain,kind", PAIRS)
def test_every_real_pair_builds_and_verifies(capsys, vectors, tmp_path, rep, leaf, chain, kind):
    blob = build(capsys, vectors, tmp_path, leaf, chain)
    code, out, err = run(capsys, "verify", blob, "--report", vectors / rep, "--at", at_arg(leaf))
    assert code == exitcodes.OK, out + err
    assert out.startswith("OK:")
    code, out, _ = run(capsys, "verify", blob, "--report", vectors / rep, "--at", at_arg(leaf),
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["problems"] == []


@pytest.mark.parametrize("leaf,chain,rep", [
    ("milan_vlek.der", "milan_vlek_cert_chain.pem", "milan_vlek_report.bin"),
    ("milan_vlek_b.der", "milan_vlek_cert_chain.pem", "milan_vlek_b_report.bin"),
])
def test_vlek_expired_by_default(capsys, vectors, tmp_path, leaf, chain, rep):
    blob = build(capsys, vectors, tmp_path, leaf, chain)
    code, out, _ = run(capsys, "verify", blob, "--report", vectors / rep)
    assert code == exitcodes.CHECK_FAILED
    assert "validity: VLEK 'SEV-VLEK'" in out and "expired at 2025-" in out
    # build refuses too, naming the expiry, and writes nothing
    target = tmp_path / "refused.blob"
    code, out, err = run(capsys, "build", "--chain", vectors / chain, "--vlek", vectors / leaf,
                         "-o", target)
    assert code == exitcodes.CHECK_FAILED and "expired" in err and not target.exists()


def test_console_script_subprocess(vectors, tmp_path):
    certctl = Path(sys.executable).with_name("certctl")
    out = tmp_path / "t.blob"
    subprocess.run([certctl, "build", "--chain", vectors / "turin_cert_chain.pem", "--vcek",
                    vectors / "turin_vcek.der", "-o", out, "--at", VCEK_AT],
                   check=True, capture_output=True, timeout=60)
    p = subprocess.run([certctl, "verify", out, "--report", vectors / "turin_report.bin",
                        "--at", VCEK_AT, "--json"], capture_output=True, timeout=60, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ok"] is True
    p = subprocess.run([certctl, "verify", out, "--report", vectors / "turin_msft_report.bin",
                        "--at", VCEK_AT], capture_output=True, timeout=60, text=True)
    assert p.returncode == 1 and "signature:" in p.stdout


@pytest.mark.parametrize("leaf,chain,rep,expect", [
    # another chip with the same TCB
    ("milan_virtee_vcek.der", "milan_cert_chain.pem", "milan_trustee_report.bin",
     {"signature", "chip_id"}),
    # another product
    ("milan_msft_vcek.pem", "milan_cert_chain.pem", "genoa_msft_report.bin",
     {"signature", "product", "tcb", "chip_id"}),
    ("turin_vcek.der", "turin_cert_chain.pem", "genoa_report.bin",
     {"signature", "product", "tcb", "chip_id"}),
    # a VLEK against a VCEK report
    ("milan_vlek.der", "milan_vlek_cert_chain.pem", "milan_report.bin",
     {"signing_key", "signature", "tcb"}),
])
def test_cross_pairs_fail_naming_the_check(capsys, vectors, tmp_path, leaf, chain, rep, expect):
    blob = build(capsys, vectors, tmp_path, leaf, chain)
    code, out, _ = run(capsys, "verify", blob, "--report", vectors / rep, "--at", at_arg(leaf),
                       "--json")
    data = json.loads(out)
    assert code == exitcodes.CHECK_FAILED and data["ok"] is False
    assert {p["check"] for p in data["problems"]} == expect


def test_flipped_bit_in_report(capsys, vectors, tmp_path):
    blob = build(capsys, vectors, tmp_path, "milan_gcp_vcek.der", "milan_cert_chain.pem")
    raw = bytearray((vectors / "milan_gcp_report.bin").read_bytes())
    raw[0x90] ^= 0x80  # one bit of MEASUREMENT
    bad = tmp_path / "flipped.bin"
    bad.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "verify", blob, "--report", bad, "--at", VCEK_AT)
    assert code == exitcodes.CHECK_FAILED
    assert out.splitlines()[1].strip().startswith("signature: the report signature does not verify")


def test_hex_report_accepted(capsys, vectors, tmp_path):
    blob = build(capsys, vectors, tmp_path, "milan_virtee_vcek.der", "milan_cert_chain.pem")
    code, out, err = run(capsys, "verify", blob, "--report", vectors / "milan_virtee_report.hex",
                         "--at", VCEK_AT)
    assert code == 0, out + err


def test_verify_platform_arguments(capsys, vectors, tmp_path):
    blob = build(capsys, vectors, tmp_path, "turin_vcek.der", "turin_cert_chain.pem")
    r = reportmod.parse((vectors / "turin_report.bin").read_bytes())
    chip = r.hwid(Product.TURIN).hex()
    ok = ["--at", VCEK_AT, "--product", "Turin"]
    assert run(capsys, "verify", blob, "--tcb", "fmc=1,bl=3,tee=2,snp=5,ucode=97",
               "--chip-id", chip, *ok)[0] == 0
    code, out, _ = run(capsys, "verify", blob, "--tcb", "fmc=2,bl=3,tee=2,snp=5,ucode=97", *ok)
    assert code == 1 and "tcb:" in out and "fmc=2" in out
    code, out, _ = run(capsys, "verify", blob, "--chip-id", "1e550a8ee5cf9f4d", *ok)
    assert code == 1 and "chip_id:" in out
    assert run(capsys, "verify", blob, "--chip-id", "1e550a8ee5cf9f4d", "--mask-chip-id", *ok)[0] == 0
    code, out, _ = run(capsys, "verify", blob, "--product", "Milan", "--at", VCEK_AT)
    assert code == 1 and "product:" in out
    # a platform file
    plat = platmod.Platform(product=Product.TURIN, reported_tcb=r.reported_tcb(Product.TURIN),
                            chip_id=r.hwid(Product.TURIN))
    pf = tmp_path / "platform.toml"
    platmod.save(plat, pf)
    assert run(capsys, "verify", blob, "--platform", pf, "--at", VCEK_AT)[0] == 0
    assert run(capsys, "build", "--chain", vectors / "turin_cert_chain.pem", "--vcek",
               vectors / "turin_vcek.der", "--platform", pf, "--at", VCEK_AT,
               "-o", tmp_path / "p.blob")[0] == 0
    code, out, _ = run(capsys, "verify", blob, "--platform", pf, "--tcb",
                       "fmc=1,bl=3,tee=2,snp=6,ucode=97", "--at", VCEK_AT)
    assert code == 1 and "tcb:" in out  # --tcb overrides the file


def test_show(capsys, vectors, tmp_path):
    blob = build(capsys, vectors, tmp_path, "turin_vcek.der", "turin_cert_chain.pem")
    code, out, _ = run(capsys, "show", blob)
    assert code == 0
    for needle in ("ARK-Turin", "SEV-Turin", "SEV-VCEK", "63da758d-e664-4564-adc5-f4b93be8accd",
                   "fmc=1 bl=3 tee=2 snp=5 ucode=97", "0910b4f884ff4ba9", "2026-06-28..2033-06-28",
                   "fits the 16 KiB guest limit"):
        assert needle in out, needle
    code, out, _ = run(capsys, "show", blob, "--json")
    data = json.loads(out)
    assert [e["role"] for e in data["entries"]] == ["ARK", "ASK/ASVK", "VCEK"]
    vcek = data["entries"][2]
    assert vcek["hwid"] == "0910b4f884ff4ba9" and vcek["offset"] == data["entries"][1]["offset"] + data["entries"][1]["length"]
    assert data["npages"] == table.npages(data["size"])


def test_show_vlek_and_crl(capsys, vectors, tmp_path):
    blob = build(capsys, vectors, tmp_path, "milan_vlek.der", "milan_vlek_cert_chain.pem")
    code, out, _ = run(capsys, "show", blob)
    assert "SEV-VLEK-Milan" in out and "cspID CN=cc-us-east-2.amazonaws.com" in out
    genoa = tmp_path / "g.blob"
    # genoa_crl_2024 (valid until 2025-11-03) and the Genoa VCEKs (issued 2026) never
    # overlap: every reason is named, and nothing is written.
    code, _, err = run(capsys, "build", "--ark", vectors / "genoa_ark.pem", "--ask",
                       vectors / "genoa_ask.pem", "--vcek", vectors / "genoa_vcek.der",
                       "--crl", vectors / "genoa_crl_2024.pem", "-o", genoa, "--at", "2025-06-01")
    assert code == 1 and "is not valid yet" in err and not genoa.exists()
    code, _, err = run(capsys, "build", "--ark", vectors / "genoa_ark.pem", "--ask",
                       vectors / "genoa_ask.pem", "--vcek", vectors / "genoa_vcek.der",
                       "--crl", vectors / "genoa_crl_2024.pem", "-o", genoa, "--at", VCEK_AT)
    assert code == 1 and "revocation:" in err and "stale" in err
    assert run(capsys, "build", "--ark", vectors / "genoa_ark.pem", "--ask", vectors / "genoa_ask.pem",
               "--vcek", vectors / "genoa_msft_vcek.pem", "-o", genoa, "--at", VCEK_AT)[0] == 0


def test_real_crls_through_cli(capsys, vectors, tmp_path):
    blob = tmp_path / "m.blob"
    assert run(capsys, "build", "--chain", vectors / "milan_cert_chain.pem", "--vcek",
               vectors / "milan_vcek.der", "--crl", vectors / "milan_crl.der", "-o", blob,
               "--at", "2026-07-01")[0] == 0
    code, out, _ = run(capsys, "show", blob)
    assert "CRL ARK-Milan" in out
    assert run(capsys, "verify", blob, "--at", "2026-07-01", "--crl", vectors / "milan_crl_2025.pem")[0] == 0
    code, out, _ = run(capsys, "verify", blob)  # now: the embedded CRL is past nextUpdate
    assert code == 1 and "revocation:" in out and "stale" in out


def test_dev_pki_revocation_and_pinning_through_cli(capsys, tmp_path, dev_pki):
    pk = dev_pki(Product.GENOA)
    files = pk.write(tmp_path / "roots")
    plat = devpki.make_platform(Product.GENOA)
    leaf, _ = pk.issue_vcek(plat.reported_tcb, plat.chip_id)
    (tmp_path / "vcek.der").write_bytes(leaf.public_bytes(Encoding.DER))
    (tmp_path / "revoke.crl").write_bytes(pk.crl([pk.ask.serial_number]).public_bytes(Encoding.DER))
    base = ["build", "--chain", files["cert_chain"], "--vcek", tmp_path / "vcek.der"]
    # Against AMD's pinned roots a self-made AMD-lookalike chain is refused: "chain".
    code, _, err = run(capsys, *base, "-o", tmp_path / "x.blob")
    assert code == 1 and "chain: ARK 'ARK-Genoa'" in err and "not the pinned Genoa ARK" in err
    # With the dev roots it builds...
    blob = tmp_path / "dev.blob"
    assert run(capsys, *base, "-o", blob, "--roots", files["cert_chain"])[0] == 0
    # ...unless the CRL revokes the ASK.
    code, _, err = run(capsys, *base, "--crl", tmp_path / "revoke.crl", "-o", tmp_path / "r.blob",
                       "--roots", files["cert_chain"])
    assert code == 1 and "revocation:" in err and "is revoked" in err
    code, out, _ = run(capsys, "verify", blob, "--roots", files["cert_chain"], "--crl",
                       tmp_path / "revoke.crl", "--json")
    assert code == 1 and [p["check"] for p in json.loads(out)["problems"]] == ["revocation"]


def test_oversize_refused(capsys, tmp_path, dev_pki):
    pk = dev_pki(Product.MILAN)
    files = pk.write(tmp_path / "roots")
    plat = devpki.make_platform(Product.MILAN)
    leaf, _ = pk.issue_vcek(plat.reported_tcb, plat.chip_id)
    (tmp_path / "vcek.der").write_bytes(leaf.public_bytes(Encoding.DER))
    (tmp_path / "big.crl").write_bytes(pk.crl(range(1000, 1700)).public_bytes(Encoding.DER))
    code, out, _ = run(capsys, "build", "--chain", files["cert_chain"], "--vcek", tmp_path / "vcek.der",
                       "--crl", tmp_path / "big.crl", "-o", tmp_path / "b.blob",
                       "--roots", files["cert_chain"], "--json")
    data = json.loads(out)
    assert code == 1 and [p["check"] for p in data["problems"]] == ["size"]
    assert not (tmp_path / "b.blob").exists()


def test_input_errors(capsys, vectors, tmp_path):
    out = tmp_path / "o.blob"
    code, _, err = run(capsys, "build", "--chain", vectors / "milan_cert_chain.pem",
                       "--vcek", vectors / "milan_vlek.der", "-o", out)
    assert code == exitcodes.DATAERR and "holds VLEK" in err and "--vlek" in err
    code, _, err = run(capsys, "build", "--chain", vectors / "nope.pem",
                       "--vcek", vectors / "milan_vcek.der", "-o", out)
    assert code == exitcodes.NOINPUT and "nope.pem" in err
    code, _, err = run(capsys, "build", "--chain", vectors / "milan_report.bin",
                       "--vcek", vectors / "milan_vcek.der", "-o", out)
    assert code == exitcodes.DATAERR and "milan_report.bin" in err
    code, _, err = run(capsys, "build", "--vcek", vectors / "milan_vcek.der", "-o", out)
    assert code == exitcodes.USAGE and "--chain" in err
    code, _, err = run(capsys, "build", "--chain", vectors / "milan_cert_chain.pem", "--vcek",
                       vectors / "milan_vcek.der", "-o", tmp_path / "no-dir" / "o.blob")
    assert code == exitcodes.IOERR and "cannot write" in err
    garbage = tmp_path / "garbage.blob"
    garbage.write_bytes(b"\x07" * 40)
    code, out_, _ = run(capsys, "verify", garbage)
    assert code == exitcodes.DATAERR and "format:" in out_
    assert run(capsys, "show", garbage)[0] == exitcodes.DATAERR
    blob = build(capsys, vectors, tmp_path, "milan_vcek.der", "milan_cert_chain.pem")
    code, out_, _ = run(capsys, "verify", blob, "--report", vectors / "milan_vcek.der", "--at", VCEK_AT)
    assert code == exitcodes.DATAERR and "format: report" in out_
    with pytest.raises(SystemExit) as ei:
        main(["verify", str(blob), "--tcb", "bl=1,tee=x"])
    assert ei.value.code == exitcodes.USAGE
    assert "bad TCB component" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", str(blob), "--at", "yesterday"])
    assert "not an ISO 8601 time" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["build", "show", "verify"])
def test_help_teaches(capsys, cmd):
    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"certctl {cmd}" in out and "exit codes:" in out
