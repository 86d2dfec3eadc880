"""The systemd files: `systemd-analyze verify` prints nothing, the hardening exposure stays
<= 1.5 (and is printed, so the CI log shows it), and the units agree with the code's defaults.

Run with `-rA` or `-s` to see the printed exposure figure."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from certd import config
from certd import exitcodes

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def load_check_units():
    """systemd/check-units is a script (no .py) that CI calls; the tests reuse its code."""
    path = SYSTEMD / "check-units"
    loader = importlib.machinery.SourceFileLoader("check_units", str(path))
    spec = importlib.util.spec_from_loader("check_units", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


check_units = load_check_units()


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned (systemd allows repeating keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


@pytest.fixture
def units(tmp_path):
    # A temporary copy with ExecStart pointing at an executable that exists here: verify
    # fails on a missing ExecStart binary ("Command /usr/bin/certd is not executable"), and
    # certd is installed in the venv, not /usr/bin, on development and CI machines.
    return check_units.copy_units(tmp_path, check_units.stand_in_exec())


@needs_analyze
def test_verify_prints_nothing(units):
    rc, out = check_units.verify(units)
    assert (rc, out) == (0, ""), out


@needs_analyze
def test_verify_check_catches_unknown_keys(units):
    """rc alone would miss this: a typo is a warning with rc 0 and is silently ignored."""
    service = units[0]
    service.write_text(service.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    rc, out = check_units.verify(units)
    assert rc == 0 and "NoNewPrivilege" in out


@needs_analyze
def test_security_exposure(units):
    figure, table = check_units.exposure(units[0])
    print(f"\ncertd.service exposure (systemd-analyze security --offline=yes): {figure:.1f} "
          f"(max {MAX_EXPOSURE})")
    assert figure <= MAX_EXPOSURE, table


@needs_analyze
def test_check_units_script():
    r = subprocess.run([sys.executable, str(SYSTEMD / "check-units")], capture_output=True,
                       text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    assert "verify: clean" in r.stdout and "exposure" in r.stdout


def test_service_unit_essentials():
    u = unit("certd.service")
    s = u["Service"]
    assert s["Type"] == ["notify"]
    exec_start = s["ExecStart"][0].split()
    assert exec_start == ["/usr/bin/certd", "--config", str(config.DEFAULT_PATH)]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"]
    assert s["Restart"] == ["on-failure"]
    assert str(exitcodes.CONFIG) in s["RestartPreventExitStatus"][0].split()
    assert s["User"] == ["certd"]
    assert "certd" in s["StateDirectory"][0].split()
    assert "certd" in s["CacheDirectory"][0].split()
    assert s["ConfigurationDirectory"] == ["certd"]
    assert "/dev/sev r" in s["DeviceAllow"]
    # KDS is fetched over HTTPS: the network must stay reachable.
    assert s.get("PrivateNetwork", ["no"]) == ["no"]
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(s["RestrictAddressFamilies"][0].split())
    # PrivateUsers would turn every peer uid into 65534 and break SO_PEERCRED checks.
    assert s.get("PrivateUsers", ["no"]) == ["no"]


def test_runtime_directory_trap():
    """If the service owns the directory that holds the activated socket, systemd deletes it
    (socket file included) on every stop/restart unless it is preserved."""
    s = unit("certd.service")["Service"]
    sock_dir = Path(unit("certd.socket")["Socket"]["ListenStream"][0]).parent
    runtime = [Path("/run", d) for v in s.get("RuntimeDirectory", []) for d in v.split()]
    if sock_dir in runtime:
        assert s.get("RuntimeDirectoryPreserve") == ["yes"]


def test_socket_unit_matches_the_code():
    sock = unit("certd.socket")["Socket"]
    defaults = config.Config().server
    assert sock["ListenStream"] == [str(defaults.socket)]
    assert sock["SocketMode"] == [f"{defaults.socket_mode:04o}"]
    # The daemon picks the activated socket by this name (sdnotify.unix_listener default).
    assert sock["FileDescriptorName"] == ["certd"]
    group = sock["SocketGroup"][0]
    sysusers = (SYSTEMD / "certd.sysusers").read_text().split("\n")
    assert any(line.split()[:2] == ["g", group] for line in sysusers if line.strip()), \
        f"sysusers must make sure group {group!r} exists"
    assert any(line.split()[:2] == ["u", "certd"] for line in sysusers if line.strip())


def test_tmpfiles_creates_the_default_directories():
    defaults = config.Config()
    dirs = {line.split()[1] for line in (SYSTEMD / "certd.tmpfiles").read_text().splitlines()
            if line.strip() and not line.startswith("#") and line.split()[0] == "d"}
    assert str(defaults.store.blob.parent) in dirs
    assert str(defaults.kds.cache_dir) in dirs
    assert str(config.DEFAULT_PATH.parent) in dirs


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None, reason="systemd tools missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles needs root to chown")
def test_sysusers_and_tmpfiles_apply_cleanly(tmp_path):
    """Apply both files to an empty root directory (--root): no warnings, and the state
    directories end up owned by the certd user that sysusers created there."""
    (tmp_path / "etc").mkdir()
    for cmd in (["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "certd.sysusers")],
                ["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                 str(SYSTEMD / "certd.tmpfiles")]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        noise = [line for line in (r.stdout + r.stderr).splitlines()
                 if not line.startswith("Creating ")]
        assert (r.returncode, noise) == (0, []), (cmd, r.stdout, r.stderr)
    passwd = dict(line.split(":")[:3:2] for line in (tmp_path / "etc/passwd").read_text()
                  .splitlines())
    uid = int(passwd["certd"])
    for d in ("var/lib/certd", "var/lib/certd/drop", "var/cache/certd/kds"):
        assert (tmp_path / d).stat().st_uid == uid, d
    assert (tmp_path / "var/lib/certd").stat().st_mode & 0o777 == 0o755
