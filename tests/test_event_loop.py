"""``server.event_loop`` (issue "10,000 VMs", item 2): uvloop when it is installed, asyncio's
own loop otherwise or when asked, and a clear refusal when uvloop is required but absent.
Real certd processes; STATUS says which loop serves."""

from __future__ import annotations

import importlib.util
import json

import pytest

from certd import client as clientmod, exitcodes
from tests.daemon_support import make_daemon, with_server_keys

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def _no_uvloop(tmp_path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, as on a host without it."""
    shadow = tmp_path / "shadow" / "uvloop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no uvloop on this host')\n")
    return {"PYTHONPATH": str(shadow.parent)}


def _serve_once(d) -> str:
    """One GET+RELEASE against ``d``; the loop STATUS reports."""
    with clientmod.Client(d.socket) as c:
        r = c.get("vm-1", 4)
        assert r.ret == 0 and r.table == d.blob.read_bytes()
        c.release(r.lease_id)
        return c.status()["event_loop"]


def _daemon(tmp_path, choice: str | None):
    d = make_daemon(tmp_path / "d")
    if choice is not None:
        d.config_text = with_server_keys(d.config_text, event_loop=choice)
    return d


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed here")
def test_auto_runs_on_uvloop_when_it_is_installed(tmp_path):
    d = _daemon(tmp_path, None).start()  # the default is "auto"
    try:
        assert _serve_once(d) == "uvloop"
        assert '"event_loop": "uvloop"' in d.log()  # the ready line says it too
    finally:
        assert d.stop() == 0


def test_asyncio_when_asked(tmp_path):
    d = _daemon(tmp_path, "asyncio").start()
    try:
        assert _serve_once(d) == "asyncio"
    finally:
        assert d.stop() == 0


def test_auto_falls_back_to_asyncio_without_uvloop(tmp_path):
    d = _daemon(tmp_path, "auto").start(extra_env=_no_uvloop(tmp_path))
    try:
        assert _serve_once(d) == "asyncio"
    finally:
        assert d.stop() == 0


def test_uvloop_required_but_missing_is_refused_with_the_reason(tmp_path):
    d = _daemon(tmp_path, "uvloop").start(extra_env=_no_uvloop(tmp_path), wait=False)
    try:
        assert d.proc.wait(timeout=30) == exitcodes.CONFIG
    finally:
        d.stop()
    lines = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
    refusal = [x for x in lines if x.get("event") == "certd cannot start"]
    assert refusal and "uvloop is not installed" in refusal[0]["error"], d.log()
