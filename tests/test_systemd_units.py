"""The systemd files: `systemd-analyze verify` prints nothing, the hardening exposure stays
<= 1.0 (certd.service, no network; <= 1.2 with the direct-network drop-in; the KDS relay's
<= 1.1) and is printed, so the CI log shows it, the socket stays out of the service's
RuntimeDirectory, and the units agree with the code's defaults. (tests/test_nspawn.py boots
them under a real systemd.)

Run with `-rA` or `-s` to see the printed exposure figures."""

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


MAX_EXPOSURE = check_units.MAX_EXPOSURE


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return check_units.settings((SYSTEMD / name).read_text())


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
def test_security_exposure_no_network(units):
    """certd.service has no network: KDS only through the relay's Unix socket."""
    _, table = check_units.exposure(units[0])
    assert "PrivateNetwork=" not in _bad_items(table)
    assert "RestrictAddressFamilies=~AF_(INET|INET6)" not in _bad_items(table)
    assert "IPAddressDeny=" not in _bad_items(table)


@needs_analyze
def test_direct_network_dropin_exceeds_the_limit(units, tmp_path):
    """Negative control: the direct-network drop-in opens the network again; the 1.0 check
    must see it (and the drop-in stays within its documented 1.2)."""
    direct = check_units.with_dropin(units[0], check_units.DIRECT_NETWORK_DROPIN,
                                     tmp_path / "certd-direct.service")
    figure, table = check_units.exposure(direct)
    print(f"\ncertd.service + {check_units.DIRECT_NETWORK_DROPIN.name} exposure: {figure:.1f} "
          f"(max {check_units.MAX_EXPOSURE_DIRECT})")
    assert MAX_EXPOSURE < figure <= check_units.MAX_EXPOSURE_DIRECT, table
    assert {"PrivateNetwork=", "RestrictAddressFamilies=~AF_(INET|INET6)",
            "IPAddressDeny="} <= _bad_items(table)


@needs_analyze
def test_relay_exposure(units):
    relay = units[0].parent / check_units.RELAY_SERVICE
    figure, table = check_units.exposure(relay)
    print(f"\n{check_units.RELAY_SERVICE} exposure: {figure:.1f} "
          f"(max {check_units.MAX_EXPOSURE_RELAY})")
    assert figure <= check_units.MAX_EXPOSURE_RELAY, table
    # What stays open is the network (and AF_UNIX for name lookups), besides what certd's
    # unit also keeps (the host's root, char-rtc which ProtectClock= adds).
    assert _bad_items(table) == {"PrivateNetwork=", "RestrictAddressFamilies=~AF_(INET|INET6)",
                                 "IPAddressDeny=", "RestrictAddressFamilies=~AF_UNIX",
                                 "RootDirectory=/RootImage=", "DeviceAllow="}, table


def _bad_items(table: str) -> set[str]:
    return {line.split()[1] for line in table.splitlines() if line.startswith("✗")}


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
    # No network: KDS through the relay's Unix socket, which the service pulls in.
    assert s["PrivateNetwork"] == ["yes"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert s["IPAddressDeny"] == ["any"]
    assert "certd-kds-relay.socket" in u["Unit"]["Wants"][-1].split()
    assert "certd-kds-relay.socket" in u["Install"]["Also"][0].split()
    # PrivateUsers would turn every peer uid into 65534 and break SO_PEERCRED checks.
    assert s.get("PrivateUsers", ["no"]) == ["no"]
    # A private /dev; /dev/sev bound in read-only where it exists.
    assert s["PrivateDevices"] == ["yes"]
    assert "-/dev/sev" in s["BindReadOnlyPaths"][0].split()


def test_runtime_directory_trap():
    """The socket's directory must not be the service's RuntimeDirectory: systemd chowns it
    (socket file included) to certd:certd at every start and removes it at stop.
    tests/test_nspawn.py shows the effect under a real systemd."""
    service = (SYSTEMD / "certd.service").read_text()
    socket_unit = (SYSTEMD / "certd.socket").read_text()
    assert check_units.socket_dir_problems(service, socket_unit) == []
    # Negative control: the unit as it was.
    old = service.replace("[Service]\n", "[Service]\nRuntimeDirectory=certd\n"
                          "RuntimeDirectoryPreserve=yes\n", 1)
    assert "RuntimeDirectory=certd" in old
    assert check_units.socket_dir_problems(old, socket_unit) != []


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


def test_relay_units():
    """The relay socket is where the docs and the example config say, only certd (and root)
    may connect, and the service forwards to AMD KDS's host."""
    sock = unit("certd-kds-relay.socket")["Socket"]
    path = sock["ListenStream"][0]
    assert path == "/run/certd-kds/relay.sock"
    assert f'"{path}"' in (ROOT / "contrib/certd.toml.example").read_text()
    assert f'"{path}"' in (ROOT / "docs/configuration.md").read_text()
    assert config.parse(f'[kds]\nrelay = "{path}"\n').kds.relay == Path(path)
    assert (sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"]) == \
        (["root"], ["certd"], ["0660"])
    svc = unit("certd-kds-relay.service")
    exec_start = svc["Service"]["ExecStart"][0].split()
    assert exec_start[0] == "/usr/lib/systemd/systemd-socket-proxyd"
    base = config.Config().kds.base_url
    assert exec_start[-1] == base.removeprefix("https://") + ":443"
    assert svc["Service"]["DynamicUser"] == ["yes"]
    assert "certd-kds-relay.socket" in svc["Unit"]["Requires"][0].split()


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
