"""certd.logs: journald priority prefixes, no locals in tracebacks, console on a TTY."""

from __future__ import annotations

import io
import json
import os
import pty
import select

import pytest
import structlog

from certd import logs

SECRET = "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-planted-secret"


@pytest.fixture(autouse=True)
def _reset_structlog():
    # configure() is process-global; leave structlog as we found it for other test files.
    yield
    structlog.reset_defaults()


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def fail_with_secret_local() -> None:
    private_key_pem = SECRET  # noqa: F841 - a local that a locals-dumping traceback would show
    raise RuntimeError("signing failed")


def test_journald_prefix_carries_the_syslog_priority():
    buf = io.StringIO()
    kind = logs.configure("debug", "auto", buf, cache=False, environ={"JOURNAL_STREAM": "8:1"})
    assert kind == "journald"
    log = logs.get_logger("certd.test")
    log.debug("d")
    log.info("lease_granted", vm="vm-1", lease=7)
    log.warning("w")
    log.error("blob_invalid")
    log.critical("c")
    got = lines(buf)
    assert [line[:3] for line in got] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    info = json.loads(got[1][3:])
    assert info == {"component": "certd.test", "vm": "vm-1", "lease": 7,
                    "event": "lease_granted", "level": "info"}, "journald stamps time itself"


def test_journal_stream_of_another_file_means_plain_json(tmp_path):
    # $JOURNAL_STREAM names the journald stream systemd gave us; a file we write to is not it.
    with open(tmp_path / "log", "w") as f:
        kind = logs.configure("info", "auto", f, cache=False, environ={"JOURNAL_STREAM": "1:2"})
        logs.get_logger("t").info("hello")
    assert kind == "json"
    line = (tmp_path / "log").read_text()
    assert line.startswith("{")
    assert json.loads(line)["event"] == "hello"


def test_journal_stream_matching_the_fd(tmp_path):
    with open(tmp_path / "log", "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.configure("info", "json", f, cache=False, environ=env) == "journald"
        logs.get_logger("t").error("x")
    assert (tmp_path / "log").read_text().startswith("<3>{")


def test_plain_json_has_a_utc_timestamp_and_filters_levels():
    buf = io.StringIO()
    assert logs.configure("info", "auto", buf, cache=False, environ={}) == "json"
    log = logs.get_logger("t")
    log.debug("invisible")
    log.info("visible", n=1)
    got = lines(buf)
    assert len(got) == 1
    ev = json.loads(got[0])
    assert ev["event"] == "visible" and ev["level"] == "info"
    assert ev["timestamp"].endswith("Z")


@pytest.mark.parametrize("env", [{"JOURNAL_STREAM": "8:1"}, {}])
def test_exception_logs_carry_no_locals(env):
    buf = io.StringIO()
    logs.configure("info", "json", buf, cache=False, environ=env)
    log = logs.get_logger("t")
    try:
        fail_with_secret_local()
    except RuntimeError:
        log.exception("sign_failed")
    out = buf.getvalue()
    assert "signing failed" in out and "fail_with_secret_local" in out, out
    assert "planted-secret" not in out
    assert "private_key_pem" not in out
    assert '"locals"' not in out


def test_console_exception_carries_no_locals():
    buf = io.StringIO()
    assert logs.configure("info", "console", buf, cache=False, environ={}) == "console"
    try:
        fail_with_secret_local()
    except RuntimeError:
        logs.get_logger("t").exception("sign_failed")
    out = buf.getvalue()
    assert "signing failed" in out
    assert "planted-secret" not in out


def test_console_renderer_on_a_tty():
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    try:
        assert logs.configure("info", "auto", stream, cache=False, environ={}) == "console"
        logs.get_logger("certd.test").info("serving", socket="/run/certd/certd.sock")
        out = b""
        while b"serving" not in out or b"\n" not in out:
            r, _, _ = select.select([master], [], [], 5)
            assert r, f"nothing written to the pty: {out!r}"
            out += os.read(master, 4096)
        text = out.decode()
        assert not text.lstrip().startswith("{"), "a TTY gets readable lines, not JSON"
        assert "serving" in text and "/run/certd/certd.sock" in text
        assert "\x1b[" in text, "colors on a TTY"
    finally:
        stream.close()
        os.close(master)


def test_journald_wins_over_tty_in_auto_mode():
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    try:
        st = os.fstat(slave)
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.configure("info", "auto", stream, cache=False, environ=env) == "journald"
    finally:
        stream.close()
        os.close(master)


def test_cached_filtered_debug_is_a_noop():
    buf = io.StringIO()
    logs.configure("info", "json", buf, environ={})     # the daemon's setting: cache on
    log = logs.get_logger("t")
    for _ in range(3):
        log.debug("x", expensive=1)
    log.info("y")
    assert [json.loads(x)["event"] for x in lines(buf)] == ["y"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="log level 'verbose'"):
        logs.configure("verbose", "json", io.StringIO())
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.configure("info", "xml", io.StringIO())
    assert logs.level_number("WARNING") == 30
    assert logs.level_number(10) == 10
