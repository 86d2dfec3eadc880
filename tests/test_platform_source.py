"""Where the platform identity comes from (issue "Never wrong", item 9): ``source =
"auto"`` means /dev/sev when it exists, else the platform file, else certd refuses to
start (78) rather than serve with the TCB and chip id checks skipped."""

from __future__ import annotations

import pytest

from certd import config as configmod, devpki, exitcodes, platform as platformmod
from certd.service import rotation


def _cfg(tmp_path, source: str, with_file: bool) -> configmod.Config:
    pf = tmp_path / "platform.toml"
    platformmod.save(devpki.make_platform(), pf)
    file = f'file = "{pf}"\n' if with_file else ""
    return configmod.parse(f'[platform]\nsource = "{source}"\n{file}')


def test_auto_prefers_dev_sev_when_present(tmp_path, monkeypatch):
    sev = tmp_path / "sev"
    sev.write_bytes(b"")  # stands for the device node: only its existence is asked
    monkeypatch.setattr(rotation, "SEV_DEVICE", str(sev))
    src = rotation.platform_source(_cfg(tmp_path, "auto", with_file=True))
    assert (src.kind, src.path) == ("sev", str(sev))
    assert src.current is None and src.error  # not a real device: nothing is trusted


def test_auto_uses_the_file_without_dev_sev(tmp_path, monkeypatch):
    monkeypatch.setattr(rotation, "SEV_DEVICE", str(tmp_path / "absent"))
    src = rotation.platform_source(_cfg(tmp_path, "auto", with_file=True))
    assert src.kind == "file" and src.current is not None


def test_auto_with_neither_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setattr(rotation, "SEV_DEVICE", str(tmp_path / "absent"))
    with pytest.raises(rotation.SetupError) as e:
        rotation.platform_source(_cfg(tmp_path, "auto", with_file=False))
    assert e.value.code == exitcodes.CONFIG and "platform.file" in str(e.value)


def test_file_source_reads_the_file_even_with_dev_sev(tmp_path, monkeypatch):
    sev = tmp_path / "sev"
    sev.write_bytes(b"")
    monkeypatch.setattr(rotation, "SEV_DEVICE", str(sev))
    assert rotation.platform_source(_cfg(tmp_path, "file", with_file=True)).kind == "file"


def test_an_observed_platform_file_change_bumps_the_epoch(tmp_path):
    pf = tmp_path / "platform.toml"
    p = devpki.make_platform()
    platformmod.save(p, pf)
    src = platformmod.PlatformSource("file", pf)
    e0 = src.epoch
    assert not src.observe()  # unchanged: no re-read, same epoch
    t = p.reported_tcb
    platformmod.save(p.replace(reported_tcb=type(t)(t.bl, t.tee, t.snp + 1, t.ucode)), pf)
    assert src.observe() and src.epoch == e0 + 1
    assert src.current.reported_tcb.snp == t.snp + 1
    pf.write_text("garbage")
    assert src.observe() and src.current is None and "TOML" in src.error
