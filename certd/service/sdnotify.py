"""systemd glue without libsystemd: sd_notify, the watchdog, socket activation.

Why our own code (see docs/python-platform-notes.md §3): the ``sdnotify`` package sends on a
blocking socket (can stall the event loop), swallows errors with a bare ``except``, and has
neither socket activation nor a watchdog helper; ``python3-systemd`` needs libsystemd.

The protocol is tiny: newline-separated ``KEY=VALUE`` datagrams to the ``AF_UNIX`` address in
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Socket activation passes
listening sockets as fds 3.. with ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Callable, MutableMapping

from certd.logs import get_logger

log = get_logger("certd.sdnotify")

#: First fd passed by socket activation (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3


def _address(raw: str) -> str | None:
    """``$NOTIFY_SOCKET`` → an ``AF_UNIX`` address for ``sendto``, or None if unusable."""
    if raw.startswith("@"):
        return "\0" + raw[1:]           # abstract namespace
    if raw.startswith("/"):
        return raw
    # systemd also knows "vsock:CID:PORT" (v253+); 252 never sets it, and we do not need it.
    return None


class Notifier:
    """Sends sd_notify messages. Never raises into the caller.

    A daemon must not die because systemd's notify socket is full or gone: every failure
    is logged (a warning when notifications start failing, then quiet until they work
    again, so a watchdog ping every few seconds cannot flood the journal) and ignored.
    Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every method
    is a no-op that returns False.
    """

    def __init__(self, address: str | None):
        self.address = _address(address) if address else None
        self._sock: socket.socket | None = None
        self._failing = False
        if address and self.address is None:
            log.warning("notify_socket_unsupported", notify_socket=address)
        if self.address is not None:
            try:
                # Non-blocking: a full systemd queue must cost one EAGAIN, not a stalled
                # event loop. CLOEXEC: children (firmware hooks) must not inherit it.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            except OSError as e:
                log.warning("notify_socket_failed", error=str(e))

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> "Notifier":
        """Build from ``$NOTIFY_SOCKET`` and remove it from the environment, so that processes
        we start (hooks) cannot send notifications in our name."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if the kernel accepted it."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.warning("sd_notify_failed", message=fields[0] if fields else "",
                            error=e.strerror or str(e))
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify_recovered")
        return True

    # -- the messages certd sends ------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup (or a reload) finished; ``systemctl start`` returns now."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: the one-line state shown by ``systemctl status``."""
        return self.send(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` + ``MONOTONIC_USEC``: a reload started; send ``ready()`` when done.

        systemd (≥ 253, harmless on 252) uses the timestamp to tell this reload from an
        earlier one; ``systemctl reload`` waits for the following READY=1.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown (draining) started."""
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One datagram is newline-separated: a newline inside STATUS would start a bogus field.
    return ("STATUS=" + text.replace("\n", " "),)


# -- watchdog ----------------------------------------------------------------------------------


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    recommends), or None when the watchdog is off or meant for another process
    (``$WATCHDOG_PID`` set and not ours). Malformed values are logged and mean "off"."""
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("watchdog_pid_invalid", watchdog_pid=pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("watchdog_usec_invalid", watchdog_usec=raw)
        return None
    return usec / 2e6


async def watchdog_loop(notifier: Notifier, interval: float,
                        healthy: Callable[[], bool] | None = None) -> None:
    """Ping ``WATCHDOG=1`` every ``interval`` seconds until cancelled.

    The pings are sent *from the event loop*, not from a thread: if the loop hangs (a
    blocking call, a busy loop), the pings stop and systemd kills and restarts us. That is
    the whole point; a thread would keep pinging for a dead daemon. ``healthy``, if given,
    is asked before each ping; returning False skips it (same effect as a hung loop).
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be > 0 seconds, got {interval}")
    skipping = False
    while True:
        if healthy is None or healthy():
            notifier.watchdog()
            if skipping:
                skipping = False
                log.info("watchdog_pings_resumed")
        elif not skipping:
            # Logged once, not at every interval: the journal would fill while systemd
            # counts down to the kill.
            skipping = True
            log.warning("watchdog_pings_skipped", reason="health check failed")
        await asyncio.sleep(interval)


def start_watchdog(notifier: Notifier, interval: float | None = None,
                   healthy: Callable[[], bool] | None = None) -> asyncio.Task[None] | None:
    """Start :func:`watchdog_loop` as a task on the running loop.

    ``interval`` defaults to :func:`watchdog_interval`; returns None when there is no
    watchdog (or no notify socket). Cancel the task at shutdown.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None or not notifier.enabled:
        return None
    log.debug("watchdog_started", interval_s=interval)
    return asyncio.get_running_loop().create_task(
        watchdog_loop(notifier, interval, healthy), name="certd-watchdog")


# -- socket activation -------------------------------------------------------------------------


class ActivationError(ValueError):
    """The socket-activation environment is malformed, or a passed fd is not usable."""


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd socket activation, grouped by ``FileDescriptorName=``.

    Returns ``{}`` when not socket-activated (no ``$LISTEN_FDS``, or ``$LISTEN_PID`` is
    another process's: the variables leaked from a parent). The three variables are always
    removed from the environment, so our children do not mistake the fds for theirs. The
    fds arrive without ``FD_CLOEXEC``; it is set here. Fds without a name are listed under
    ``"unknown"`` (what systemd-socket-activate uses without ``--fdname``).
    """
    env = os.environ if environ is None else environ
    pid_s = env.pop("LISTEN_PID", None)
    n_s = env.pop("LISTEN_FDS", None)
    names_s = env.pop("LISTEN_FDNAMES", None)
    if not n_s or not pid_s:
        return {}
    try:
        pid, n = int(pid_s), int(n_s)
    except ValueError:
        raise ActivationError(
            f"malformed socket activation: LISTEN_PID={pid_s!r} LISTEN_FDS={n_s!r}") from None
    if pid != os.getpid():
        return {}
    if n < 0:
        raise ActivationError(f"malformed socket activation: LISTEN_FDS={n}")
    names = names_s.split(":") if names_s else []
    out: dict[str, list[socket.socket]] = {}
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ActivationError(f"socket activation: fd {fd} is not a socket")
            os.set_inheritable(fd, False)
        except OSError as e:
            raise ActivationError(f"socket activation: fd {fd} unusable: {e.strerror}") from None
        name = names[i] if i < len(names) and names[i] else "unknown"
        # fileno= makes Python query family and type from the fd itself.
        out.setdefault(name, []).append(socket.socket(fileno=fd))
    return out


def unix_listener(fds: dict[str, list[socket.socket]], name: str = "certd") -> socket.socket | None:
    """The one listening ``AF_UNIX`` stream socket named ``name`` (``FileDescriptorName=``),
    or None if systemd passed none. Refuses anything else with a clear error, so a unit
    with a typo (``ListenDatagram=``, two ``ListenStream=``) fails at start, not later."""
    socks = fds.get(name)
    if not socks:
        return None
    if len(socks) != 1:
        raise ActivationError(f"socket activation passed {len(socks)} sockets named {name!r}, "
                              "expected exactly one")
    s = socks[0]
    if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
        raise ActivationError(f"socket {name!r} (fd {s.fileno()}) is not an AF_UNIX stream "
                              f"socket (family {s.family!r}, type {s.type!r}): use ListenStream=")
    if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"socket {name!r} (fd {s.fileno()}) is not listening")
    return s
