"""The CLI keeps its word (issue 10 item 7): every exit code a subcommand returns is listed
in its --help, --version, help without a command, --blob defaults, certd --check-config
checks what the configuration refers to, the frame limit agrees in doc, config and code,
and the smaller promises. Run through the installed console scripts (subprocesses)."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

import certd
from certd import config as configmod, exitcodes
from certd.abi import wire
from certd.cli import certctl as certctl_main, common
from certd.store import locks
from daemon_support import (BIN, VECTORS, config_text, listening_socket, make_daemon,
                            start_daemon, status_of, vector_blob, vector_platform)
from certd import platform as platformmod
from store_support import tmpfs

ROOT = Path(__file__).parent.parent
CERTCTL = str(BIN / "certctl")
CERTD = str(BIN / "certd")


def run(*argv: object, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def certctl(*argv: object, **kw) -> subprocess.CompletedProcess:
    return run(CERTCTL, *argv, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid blob for a platform file, and the paths the cases use."""
    d = tmp_path_factory.mktemp("word")
    plat = vector_platform()
    platformmod.save(plat, d / "platform.toml")
    blob = vector_blob(platform=plat)
    (d / "new.blob").write_bytes(blob)
    (d / "garbage.blob").write_bytes(b"not a table at all")
    (d / "bad-platform.toml").write_text("product = 'Rome'\n")
    (d / "bad.toml").write_text("[server]\nmax_frame = 1\n")
    return d


def test_preconditions():
    assert not os.path.exists("/dev/sev"), "these cases expect a host without SNP"
    assert not configmod.DEFAULT_PATH.exists(), "these cases expect no /etc/certd/certd.toml"


# -- every exit code a subcommand returns is listed in its --help ---------------------------

def listed_codes(argv: list[str]) -> tuple[set[int], bool]:
    """The exit codes the epilog of ``certctl ARGV --help`` lists, and whether it also
    promises "CMD's exit status"."""
    p = certctl(*argv, "--help")
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "exit codes:" in text, f"certctl {' '.join(argv)} --help lists no exit codes"
    section = text[text.index("exit codes:"):]
    codes = {int(m) for m in re.findall(r"^\s+(\d+)\s{2}", section, re.M)}
    return codes, "CMD's" in section or "CMD's own exit" in section


def _cases(d: Path) -> list[tuple[list[str], list[str], int, str]]:
    """(help argv, full argv, expected exit code, message fragment) for each case this
    host can provoke."""
    blob = d / "live.blob"
    plat, new = d / "platform.toml", d / "new.blob"
    return [
        (["build"], ["build", "--vcek", d / "none.der", "--chain", d / "none.pem", "-o", d / "o"],
         66, "does not exist"),
        (["build"], ["build", "--vcek", d / "garbage.blob", "--chain", VECTORS / "milan_cert_chain.pem",
                     "-o", d / "o"], 65, ""),
        (["build"], ["build", "--vlek", VECTORS / "milan_vlek.der", "--chain",
                     VECTORS / "milan_vlek_cert_chain.pem", "-o", d / "o"], 1, "expired"),
        (["build"], ["build", "--bogus"], 2, "error:"),
        (["build"], ["build", "--vcek", VECTORS / "milan_gcp_vcek.der", "--chain",
                     VECTORS / "milan_cert_chain.pem", "--platform", "/nonexistent", "-o", d / "o"],
         66, "does not exist"),
        (["show"], ["show", d / "none.blob"], 66, "does not exist"),
        (["show"], ["show", d / "garbage.blob"], 65, "not a valid certificate table"),
        (["show"], ["show", new], 0, ""),
        (["verify"], ["verify", d / "none.blob"], 66, "does not exist"),
        (["verify"], ["verify", new, "--platform", plat], 0, ""),
        (["install"], ["install", "--blob", blob, new], 69, "/dev/sev"),
        (["install"], ["install", "--blob", blob, "--platform", "/nonexistent", new], 66,
         "does not exist"),
        (["install"], ["install", "--blob", blob, "--platform", d / "bad-platform.toml", new],
         65, "platform"),
        (["install"], ["install", "--blob", blob, "--platform", plat, d / "none.blob"], 66, ""),
        (["install"], ["install", "--blob", blob, "--platform", plat, d / "garbage.blob"], 65, ""),
        (["install"], ["install", "--blob", d / "nodir" / "b", "--platform", plat, new], 74,
         "does not exist"),
        (["install"], ["install", "--config", d / "bad.toml", "--platform", plat, new], 78,
         "server.max_frame"),
        (["install"], ["install", "--config", d / "none.toml", "--platform", plat, new], 66,
         "does not exist"),
        (["install"], ["install", "--timeout", "-1", new], 2, "0 or more"),
        (["install"], ["install", "--blob", blob, "--platform", plat, new], 0, ""),
        (["rollback"], ["rollback", "--blob", blob], 69, "/dev/sev"),
        (["rollback"], ["rollback", "--blob", d / "nodir" / "b", "--platform", plat], 74, ""),
        (["rollback"], ["rollback", "--blob", d / "fresh.blob", "--platform", plat], 66,
         "previous"),
        (["rollback"], ["rollback", "--config", d / "bad.toml", "--platform", plat], 78, ""),
        (["lock"], ["lock", "--blob", d / "none.blob", "--shared", "--", "true"], 66,
         "does not exist"),
        (["lock"], ["lock", "--blob", blob, "--shared"], 2, "no command"),
        (["lock"], ["lock", "--blob", blob, "--shared", "--", "/nonexistent-cmd"], 127, ""),
        (["lock"], ["lock", "--blob", blob, "--shared", "--", d], 126, ""),
        (["lock"], ["lock", "--blob", d / "nodir" / "b", "--exclusive", "--", "true"], 74, ""),
        (["lock"], ["lock", "--config", d / "bad.toml", "--shared", "--", "true"], 78, ""),
        (["lock"], ["lock", "--blob", blob, "--shared", "--", "sh", "-c", "exit 42"], 42, ""),
        (["fw-update"], ["fw-update", "--config", d / "none.toml", "--", "true"], 66, ""),
        (["fw-update"], ["fw-update", "--config", d / "bad.toml", "--", "true"], 78, ""),
        (["fw-update"], ["fw-update", "--lock-timeout", "-1", "--", "true"], 2, ""),
        (["kds", "url"], ["kds", "url", "--platform", "/nonexistent"], 66, "does not exist"),
        (["kds", "fetch"], ["kds", "fetch", "--platform", plat, "--config", d / "bad.toml",
                            "-o", d / "o"], 78, ""),
        (["fetch"], ["fetch", "--vm", "x", "--socket", d / "none.sock"], 69, "no certd socket"),
        (["fetch"], ["fetch", "--vm", "", "--socket", d / "none.sock"], 2, "vm"),
        (["status"], ["status", "--socket", d], 69, "not a socket"),
        (["status"], ["status", "--timeout", "0"], 2, "above 0"),
        (["demo"], ["demo", "--vms", "0"], 2, "--vms must be at least 1"),
    ]


def test_every_exit_code_is_listed_in_help(files):
    listed: dict[tuple[str, ...], tuple[set[int], bool]] = {}
    seen: dict[tuple[str, ...], set[int]] = {}
    (files / "live.blob").unlink(missing_ok=True)
    (files / "fresh.blob").write_bytes(b"")  # a blob without BLOB.prev
    for help_argv, argv, code, fragment in _cases(files):
        key = tuple(help_argv)
        if key not in listed:
            listed[key] = listed_codes(help_argv)
        p = certctl(*argv)
        assert p.returncode == code, (argv, p.stdout, p.stderr)
        assert fragment in p.stderr, (argv, p.stderr)
        codes, cmd_status = listed[key]
        assert code in codes or (cmd_status and code not in exitcodes.DESCRIPTIONS), \
            f"certctl {' '.join(map(str, argv))} exits {code}, not listed in its --help: {codes}"
        seen.setdefault(key, set()).add(code)
    # Every subcommand was provoked at least once.
    assert {k[0] for k in seen} == set(certctl_main.COMMANDS)


def test_install_busy_is_75_and_listed(files):
    blob = files / "busy.blob"
    blob.write_bytes((files / "new.blob").read_bytes())
    codes, _ = listed_codes(["install"])
    with locks.acquire_shared_sync(str(blob), None):  # a reader holds the blob
        p = certctl("install", "--blob", blob, "--platform", files / "platform.toml",
                    files / "new.blob", "--timeout", "0.05")
    assert p.returncode == exitcodes.BUSY in codes, p.stderr
    # Negative control: without the reader the same install goes through.
    p = certctl("install", "--blob", blob, "--platform", files / "platform.toml",
                files / "new.blob", "--timeout", "0.05")
    assert p.returncode == 0, p.stderr


def test_nested_install_under_shared_lock_is_a_documented_usage_error(files):
    blob = files / "nested.blob"
    blob.write_bytes((files / "new.blob").read_bytes())
    install = [CERTCTL, "install", "--blob", str(blob), "--platform",
               str(files / "platform.toml"), str(files / "new.blob")]
    p = certctl("lock", "--blob", blob, "--shared", "--", *install)
    assert p.returncode == exitcodes.USAGE, p.stderr
    assert "locked shared by an enclosing 'certctl lock --shared'" in p.stderr
    codes, _ = listed_codes(["install"])
    assert exitcodes.USAGE in codes
    assert "inside 'certctl lock --shared'" in certctl("install", "--help").stdout
    # Negative control: under --exclusive the nested install is the supported hook.
    p = certctl("lock", "--blob", blob, "--exclusive", "--", *install)
    assert p.returncode == 0, p.stderr


# -- --version, help without a command -------------------------------------------------------

@pytest.mark.parametrize("prog", ["certctl", "certd"])
def test_version(prog):
    p = run(BIN / prog, "--version")
    assert p.returncode == 0 and p.stdout.strip() == f"{prog} {certd.__version__}"


def test_certctl_without_a_command_prints_help_and_exits_2():
    p = certctl()
    assert p.returncode == exitcodes.USAGE
    assert p.stdout == ""
    assert p.stderr.startswith("usage: certctl")
    for name in certctl_main.COMMANDS:
        assert f"    {name}" in p.stderr
    assert "exit codes:" in p.stderr
    assert "without a command prints this help on stderr and exits 2" in p.stderr


# -- --blob defaults ---------------------------------------------------------------------------

def test_blob_defaults_to_var_lib_certd_without_a_config(files):
    p = certctl("lock", "--shared", "--", "true")
    assert p.returncode == exitcodes.NOINPUT
    assert "blob /var/lib/certd/certs.blob does not exist" in p.stderr
    assert common.DEFAULT_BLOB == "/var/lib/certd/certs.blob" == str(configmod.StoreConfig().blob)


def test_blob_defaults_to_the_configs_store_blob(files, tmp_path):
    blob = tmp_path / "from-config.blob"
    cfg = tmp_path / "certd.toml"
    cfg.write_text(f'[store]\nblob = "{blob}"\n')
    plat = files / "platform.toml"
    p = certctl("install", "--config", cfg, "--platform", plat, files / "new.blob", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["path"] == str(blob) and blob.exists()
    p = certctl("install", "--config", cfg, "--platform", plat, files / "new.blob")
    assert p.returncode == 0, p.stderr
    p = certctl("lock", "--config", cfg, "--shared", "--json", "--", "true")
    assert p.returncode == 0 and json.loads(p.stdout)["blob"] == str(blob)
    p = certctl("rollback", "--config", cfg, "--platform", plat, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["path"] == str(blob)
    # --blob wins over the configuration.
    other = tmp_path / "explicit.blob"
    p = certctl("install", "--config", cfg, "--blob", other, "--platform", plat,
                files / "new.blob", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["path"] == str(other)


def test_blob_default_reads_the_default_config_when_it_exists(tmp_path, monkeypatch):
    # /etc/certd/certd.toml is not ours to write: the same code with the default moved.
    cfg = tmp_path / "certd.toml"
    monkeypatch.setattr(configmod, "DEFAULT_PATH", cfg)
    args = argparse.Namespace(blob=None, config=None)
    assert common.blob_path(args) == common.DEFAULT_BLOB
    cfg.write_text('[store]\nblob = "/srv/b.blob"\n')
    assert common.blob_path(args) == "/srv/b.blob"
    assert common.blob_path(argparse.Namespace(blob="/x", config=None)) == "/x"


# -- certd --check-config checks what the configuration refers to ---------------------------

def _cfg(d: Path, **over: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    text = config_text(d, platform_file=d / "platform.toml")
    for old, new in over.items():
        if old == "APPEND":
            text += new
        else:
            assert old in text, old
            text = text.replace(old, new)
    path = d / "certd.toml"
    path.write_text(text)
    return path


def check_config(path: Path) -> subprocess.CompletedProcess:
    return run(CERTD, "--check-config", path)


@pytest.fixture
def ro_mount(tmp_path):
    """A read-only tmpfs (root only); unmounted afterwards."""
    with tmpfs(tmp_path / "ro", "size=64k,ro") as mnt:
        yield mnt


def test_check_config_good(tmp_path):
    d = tmp_path / "good"
    d.mkdir()
    platformmod.save(vector_platform(), d / "platform.toml")
    p = check_config(_cfg(d))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr


@pytest.mark.parametrize("case", ["platform_missing", "platform_malformed", "sev_missing",
                                  "auto_nothing", "trust_roots", "cache_dir_under_file",
                                  "drop_dir_read_only", "blob_dir_read_only"])
def test_check_config_refuses_what_a_restart_cannot_fix(tmp_path, ro_mount, case, capsys):
    d = tmp_path / "c"
    d.mkdir()
    platformmod.save(vector_platform(), d / "platform.toml")
    (d / "afile").write_text("x")
    src_file = f'source = "file"\nfile = "{d / "platform.toml"}"\n'
    over, needle = {
        "platform_missing": ({str(d / "platform.toml"): str(d / "gone.toml")},
                             "gone.toml"),
        "platform_malformed": ({str(d / "platform.toml"): str(d / "afile")}, "platform.file"),
        "sev_missing": ({src_file: 'source = "sev"\n'}, "/dev/sev"),
        "auto_nothing": ({src_file: 'source = "auto"\n'}, 'source = "auto"'),
        "trust_roots": ({"[log]": f'[trust]\nroots = ["{d / "afile"}"]\n[log]'}, "[trust] roots"),
        "cache_dir_under_file": ({"[kds]\n": f'[kds]\ncache_dir = "{d / "afile" / "kds"}"\n'},
                                 "kds.cache_dir"),
        "drop_dir_read_only": ({"APPEND": f'[watch]\ndrop_dir = "{ro_mount / "drop"}"\n'},
                               "watch.drop_dir"),
        "blob_dir_read_only": ({f'blob = "{d / "certs.blob"}"': f'blob = "{ro_mount / "b"}"'},
                               "blob directory"),
    }[case]
    path = _cfg(d, **over)
    text = path.read_text()
    for new in over.values():
        assert new in text, "the case's change is in the file"
    p = check_config(path)
    assert p.returncode == exitcodes.CONFIG, (p.stdout, p.stderr)
    assert "a restart cannot fix this" in p.stderr and needle in p.stderr, p.stderr
    # Negative control: the syntax-only check (no look at what the file refers to) passes.
    assert configmod.check_main(path) == exitcodes.OK
    capsys.readouterr()  # its "OK" line is not a figure


def test_check_config_accepts_directories_it_can_create(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    platformmod.save(vector_platform(), d / "platform.toml")
    path = _cfg(d, **{f'blob = "{d / "certs.blob"}"': f'blob = "{d / "new" / "dir" / "b"}"',
                      "APPEND": f'[watch]\ndrop_dir = "{d / "drop"}"\n'})
    p = check_config(path)
    assert p.returncode == 0, p.stderr
    assert not (d / "new").exists() and not (d / "drop").exists(), "a check creates nothing"


def test_systemd_does_not_restart_on_78():
    unit = (ROOT / "systemd" / "certd.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=.*\b78\b", unit, re.M)
    assert exitcodes.CONFIG == 78


# -- platform.source = "auto" with neither /dev/sev nor a file: refuse to start ----------

def test_auto_without_sev_or_file_refuses_to_start(tmp_path):
    d = tmp_path / "auto"
    d.mkdir()
    platformmod.save(vector_platform(), d / "platform.toml")
    src_file = f'source = "file"\nfile = "{d / "platform.toml"}"\n'
    path = _cfg(d, **{src_file: 'source = "auto"\n'})
    assert 'source = "auto"' in path.read_text() and "file =" not in path.read_text()
    p = run(CERTD, "--config", path, timeout=60)
    assert p.returncode == exitcodes.CONFIG, p.stdout + p.stderr
    assert "certd cannot start" in p.stdout + p.stderr
    assert "no /dev/sev and no platform.file" in p.stdout + p.stderr
    assert not (d / "certd.sock").exists(), "nothing was served"
    # Negative control: with a platform file the same configuration starts and serves.
    daemon = make_daemon(tmp_path / "file")
    try:
        daemon.start()
        assert status_of(daemon.socket)["profiles"][0]["state"] == "serving"
    finally:
        assert daemon.stop() == 0


# -- the frame limit: docs, config and code agree -------------------------------------------

def test_frame_limit_agrees_in_docs_config_and_code():
    assert configmod.ServerConfig().max_frame == wire.MAX_REQUEST_FRAME == 1024
    assert configmod.LARGEST_REQUEST == len(wire.encode_get(1, "v" * wire.MAX_VM_ID, 4)) == 96
    proto = (ROOT / "docs" / "protocol.md").read_text()
    assert re.search(r"\| `MAX_REQUEST_FRAME` \| 1024 ", proto)
    conf = (ROOT / "docs" / "configuration.md").read_text()
    row = next(l for l in conf.splitlines() if l.startswith("| `server.max_frame`"))
    assert "96–1024" in row and "`1024`" in row
    for bad in (95, 1025, 65536):
        with pytest.raises(configmod.ConfigError, match="between 96 and 1024"):
            configmod.parse(f"[server]\nmax_frame = {bad}\n")


def _frame_answer(sock_path: str, frame: bytes) -> wire.Message:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(frame)
        dec = wire.Decoder(wire.REPLIES)
        while True:
            data = s.recv(65536)
            assert data, "closed without an answer"
            dec.feed(data)
            msg = dec.next()
            if msg is not None:
                return msg


def test_daemon_refuses_frames_over_1024_and_serves_the_largest_get(tmp_path):
    daemon = make_daemon(tmp_path / "d")
    try:
        daemon.start()
        assert status_of(daemon.socket)["limits"]["max_frame"] == 1024
        over = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.MsgType.GET, 0, 7,
                                1024 - wire.HEADER_SIZE + 1)
        err = _frame_answer(daemon.socket, over)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.FRAME_TOO_LARGE
        assert err.arg == 1024 and err.closing
        # Negative control: a frame of exactly 1024 bytes is not refused for its size.
        at = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.MsgType.GET, 0, 7,
                              1024 - wire.HEADER_SIZE) + b"\0" * (1024 - wire.HEADER_SIZE)
        err = _frame_answer(daemon.socket, at)
        assert isinstance(err, wire.Error) and err.code != wire.ErrorCode.FRAME_TOO_LARGE
        assert daemon.stop() == 0
        # The smallest limit still serves the largest valid request.
        daemon.config_text = daemon.config_text.replace("[server]\n", "[server]\nmax_frame = 96\n")
        daemon.start()
        reply = _frame_answer(daemon.socket, wire.encode_get(1, "v" * wire.MAX_VM_ID, 4))
        assert isinstance(reply, wire.GetReply) and reply.ret == wire.RET_OK, reply
    finally:
        daemon.stop()


# -- smaller promises --------------------------------------------------------------------------

def _timeout_actions(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _timeout_actions(sub, path + (name,))
        elif action.dest.endswith("timeout"):
            yield path, action


def test_every_timeout_refuses_negative_values():
    found = list(_timeout_actions(certctl_main.build_parser()))
    assert {p[0] for p, _ in found} >= {"install", "rollback", "lock", "fw-update", "kds",
                                        "fetch", "status"}
    for path, action in found:
        with pytest.raises(argparse.ArgumentTypeError):
            action.type("-1")
        with pytest.raises(argparse.ArgumentTypeError):
            action.type("nan")
        assert action.type("1.5") == 1.5


@pytest.mark.parametrize("argv", [
    ["install", "--timeout", "-1", "x"], ["rollback", "--timeout", "-0.5"],
    ["lock", "--timeout", "-1", "--shared", "--", "true"],
    ["fw-update", "--timeout", "-1", "--", "true"], ["kds", "fetch", "--timeout", "-1", "-o", "x"],
    ["kds", "prefetch", "--timeout", "-1"], ["fetch", "--vm", "x", "--timeout", "-1"],
    ["status", "--timeout", "-1"],
])
def test_negative_timeout_refused_by_the_console_script(argv):
    p = certctl(*argv)
    assert p.returncode == exitcodes.USAGE, p.stderr
    assert re.search(r"argument --timeout: '-(1|0\.5)': must be 0 or more seconds", p.stderr) \
        or "argument --timeout: '-1': must be a number of seconds above 0" in p.stderr, p.stderr


def test_lock_timeout_zero_is_accepted(tmp_path):
    blob = tmp_path / "b"
    blob.write_bytes(b"")
    p = certctl("lock", "--blob", blob, "--shared", "--timeout", "0", "--", "true")
    assert p.returncode == 0, p.stderr


def test_dev_product_names_the_valid_products():
    p = run(CERTD, "--dev", "--product", "Rome")
    assert p.returncode == exitcodes.USAGE
    assert "'Rome'" in p.stderr and all(n in p.stderr for n in ("Milan", "Genoa", "Turin"))


@pytest.mark.parametrize("argv", [["--product", "Genoa"], ["--dev-dir", "/tmp/x"]])
def test_dev_only_flags_refused_without_dev(argv):
    p = run(CERTD, *argv, "--check-config", "/nonexistent")
    assert p.returncode == exitcodes.USAGE
    assert "work only with --dev" in p.stderr


def test_read_only_directory_message_for_a_blob_that_never_existed(tmp_path, ro_mount, files):
    blob = ro_mount / "certs.blob"
    assert not blob.exists()
    p = certctl("install", "--blob", blob, "--platform", files / "platform.toml", files / "new.blob")
    assert p.returncode == exitcodes.IOERR, p.stderr
    assert "read-only file system" in p.stderr
    assert "untouched" not in p.stderr
    assert f"there was no blob at {blob} and none was written" in p.stderr
    # Negative control: with a blob in place the message does say it was kept.
    subprocess.run(["mount", "-o", "remount,rw", str(ro_mount)], check=True)
    blob.write_bytes((files / "new.blob").read_bytes())
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    p = certctl("install", "--blob", blob, "--platform", files / "platform.toml", files / "new.blob")
    assert p.returncode == exitcodes.IOERR
    assert f"the current blob {blob} is untouched" in p.stderr


def test_status_socket_dir_says_not_a_socket(tmp_path):
    p = certctl("status", "--socket", tmp_path)
    assert p.returncode == exitcodes.UNAVAILABLE
    assert f"{tmp_path} is not a socket" in p.stderr
    # Negative control: a missing path is told apart.
    p = certctl("status", "--socket", tmp_path / "none.sock")
    assert p.returncode == exitcodes.UNAVAILABLE and "no certd socket at" in p.stderr


def test_self_bound_socket_removed_on_clean_exit(tmp_path):
    daemon = make_daemon(tmp_path / "d")
    try:
        daemon.start()
        assert os.path.exists(daemon.socket)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    assert not os.path.exists(daemon.socket)


def test_socket_of_a_newer_process_is_not_removed(tmp_path):
    """unlink_if_ours: a socket put at the path by someone else stays."""
    daemon = make_daemon(tmp_path / "d")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        daemon.start()
        os.unlink(daemon.socket)
        other.bind(daemon.socket)
        assert daemon.stop() == 0
        assert os.path.exists(daemon.socket), "the newer socket was removed"
    finally:
        other.close()
        daemon.stop()


def test_activated_socket_is_kept_on_exit(tmp_path):
    """Negative control of the removal: a socket systemd passed belongs to systemd."""
    daemon = make_daemon(tmp_path / "d")
    listener = listening_socket(daemon.socket)
    try:
        start_daemon(daemon, listener=listener)
        assert '"activated": true' in daemon.log()
        assert daemon.stop() == 0
        assert os.path.exists(daemon.socket)
    finally:
        daemon.stop()
        listener.close()


# -- docs/operations.md covers every message ----------------------------------------------

OPERATIONS = ROOT / "docs" / "operations.md"
_ERRORS = (r'(?:CliError|SetupError|StartupError|BindError|StoreIOError|NothingToRollBack)'
           r'\(\s*f?"([^"]*)"')


def undocumented(doc: str) -> list[str]:
    """Log warnings/errors and user-facing errors whose text ``doc`` does not contain (for
    an f-string: the start of one of its constant parts)."""
    missing = []
    for f in sorted((ROOT / "certd").rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r'log\.(?:error|warning|critical)\(\s*"([^"]+)"', src):
            if m.group(1).rstrip() not in doc:
                missing.append(f"{f.name}: log {m.group(1)!r}")
        for m in re.finditer(_ERRORS, src):
            parts = [p.strip() for p in re.split(r"\{[^}]*\}|\\n", m.group(1))
                     if len(p.strip()) >= 6]
            if parts and parts[0][:24] not in doc:  # the constant start of the message
                missing.append(f"{f.name}: error {m.group(1)!r}")
    return missing


def test_operations_doc_names_every_message():
    doc = OPERATIONS.read_text()
    assert undocumented(doc) == []
    # Negative control: the check notices a message the doc lacks.
    for gone in ("kds fetch failed", "no previous blob to roll back to"):
        assert gone in doc
        assert any(gone in m for m in undocumented(doc.replace(gone, "")))


def test_operations_doc_is_linked_from_readme():
    readme = (ROOT / "README.md").read_text()
    docs = readme[readme.index("## Documentation"):]
    assert "docs/operations.md" in docs
    assert "(metrics.md)" in OPERATIONS.read_text()
