"""Fairness and admission (issue "10,000 VMs", item 4), against a real certd: a new VM
connects while max_connections idle peers are connected; a connection stuck inside a
frame (slowloris) is closed; one process cannot take every connection; one VM id cannot
hold more than a few leases."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from certd import client as clientmod
from certd.abi import wire
from tests.daemon_support import make_daemon


def _server_section(d, text: str) -> None:
    d.config_text = d.config_text.replace("[server]\n", "[server]\n" + text, 1)


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True if certd closed ``s`` within ``timeout`` (it may send an ERROR first)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(4096):
                return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("evict", [True, False], ids=["admission", "control-no-room"])
def test_a_newcomer_connects_while_the_table_is_full_of_idle_peers(tmp_path, evict):
    d = make_daemon(tmp_path / "d")
    _server_section(d, "max_connections = 8\nmax_connections_per_pid = 100\n")
    d.start()
    idle = []
    try:
        for _ in range(8):
            idle.append(_raw(d.socket))
        with clientmod.Client(d.socket) as c:  # precondition: the table is full
            assert c.status()["connections"] == 8
        if not evict:
            # Negative control: peers that hold leases cannot be evicted, so the newcomer
            # is refused: the test can tell admission from luck.
            holders = [clientmod.Client(d.socket) for _ in range(8)]
            for s in idle:
                s.close()
            for h in holders:
                h.connect()
                h.get(f"holder-{id(h)}", 4)
        with clientmod.Client(d.socket) as c:
            if evict:
                r = c.get("new-vm", 4)
                assert r.ret == 0 and r.table == d.blob.read_bytes()
            else:
                with pytest.raises(clientmod.ClientError):
                    c.get("new-vm", 4)
        if evict:
            assert sum(_closed_by_peer(s, 5) for s in idle[:1]) == 1  # the oldest made room
        else:
            for h in holders:
                h.close()
    finally:
        for s in idle:
            s.close()
        assert d.stop() == 0


def test_a_slowloris_connection_is_closed(tmp_path):
    d = make_daemon(tmp_path / "d")
    _server_section(d, "frame_timeout_s = 0.5\n")
    d.start()
    slow, good = _raw(d.socket), _raw(d.socket)
    try:
        slow.sendall(b"CRTD")  # part of a header, then nothing
        assert _closed_by_peer(slow, 10)
        good.settimeout(0.2)  # idle but not inside a frame: kept
        with pytest.raises(socket.timeout):
            good.recv(1)
        with clientmod.Client(d.socket) as c:
            assert c.get("vm-1", 4).ret == 0
    finally:
        slow.close()
        good.close()
        assert d.stop() == 0


def test_one_vm_id_holds_a_bounded_number_of_leases(tmp_path):
    d = make_daemon(tmp_path / "d")
    _server_section(d, "max_leases_per_vm = 2\n")
    d.start()
    try:
        with clientmod.Client(d.socket) as a, clientmod.Client(d.socket) as b:
            assert a.get("vm-h", 4).lease_id and b.get("vm-h", 4).lease_id
            with pytest.raises(clientmod.Refused, match="TOO_MANY_LEASES"):
                a.get("vm-h", 4)
            assert a.get("vm-other", 4).lease_id  # other VMs are not affected
    finally:
        assert d.stop() == 0


def test_one_process_cannot_take_every_connection(tmp_path):
    d = make_daemon(tmp_path / "d")
    _server_section(d, "max_connections_per_pid = 3\n")
    d.start()
    socks = []
    try:
        socks = [_raw(d.socket) for _ in range(3)]
        with pytest.raises(clientmod.ClientError, match="TOO_MANY_CONNECTIONS"):
            with clientmod.Client(d.socket) as c:
                c.get("vm-1", 4)
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0
