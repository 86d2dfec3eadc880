"""certd under systemd's protocols without systemd as PID 1: socket activation through
systemd-socket-activate, and sd_notify READY / WATCHDOG / RELOADING / STOPPING on a fake
NOTIFY_SOCKET."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from certd import client as clientmod
from tests.daemon_support import BIN, Notifications, make_daemon

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd-socket-activate not installed")


def test_socket_activation_and_notify_protocol(tmp_path):
    d = make_daemon(tmp_path / "d")
    d.config_path.write_text(d.config_text)
    notify = Notifications.open()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", d.socket, "--fdname=certd",
         "-E", f"NOTIFY_SOCKET={notify.address}", "-E", "WATCHDOG_USEC=400000",
         str(BIN / "certd"), "--config", str(d.config_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # systemd-socket-activate says "Listening on ..." once the socket exists.
        assert "Listening on" in proc.stderr.readline()
        # The first connection starts certd on the inherited listening socket.
        with clientmod.Client(d.socket, timeout=30) as c:
            r = c.get("vm-activated", 4)
            assert r.ret == 0 and r.table == d.blob.read_bytes()
            c.release(r.lease_id)
        ready = notify.wait_for("READY=1")
        assert "STATUS=serving generation 1" in ready
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        assert "reloaded" in notify.wait_for("READY=1")
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=15) == 0
        logged = proc.stderr.read()  # a few KB: the pipe never fills in this short run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        notify.close()
    assert '"activated": true' in logged
