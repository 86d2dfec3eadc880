"""Locks handed down to nested updaters: ``certctl lock --exclusive -- CMD`` and a
``certctl install`` (or rollback) that CMD runs.

The nested install must neither wait for the lock its own parent holds (a deadlock) nor
give the new blob up when it is done: the hook may still be at work (the firmware steps
after the install), so readers must stay out until the enclosing lock ends. How:

* The parent (:func:`run_command`) makes a ``SOCK_SEQPACKET`` socketpair and passes one
  end to CMD, named in ``$CERTD_LOCK_HELD`` (``1:<mode>:<parent pid>:<fd>:<blob path>``;
  internal, may change).
* A nested updater (:func:`adopt`) checks that the descriptor is a socketpair made by
  that pid, and opens a *session*: it sends one end of a fresh socketpair (SCM_RIGHTS)
  and receives, over it, the parent's gate descriptor and its descriptor on the blob now
  at the path. It adopts them only if each descriptor itself holds the exclusive lock
  (:func:`certd.store.locks.holds_exclusive`); the parent's answer proves it is alive. A
  stale ``$CERTD_LOCK_HELD`` (a background job that outlived its hook) gets no answer,
  adopts nothing, and waits for the lock like any updater.
* When the nested updater releases its hold, it sends the descriptor of the blob it
  locked (the new inode) to the parent, then closes its own copy *without unlocking*: the
  OFD lock lives on in the parent's copy of the same open file description. The parent
  keeps it until CMD exits, and offers it to the next nested session.
* The parent serves one session at a time, so two nested updaters never both hold it.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import time
from typing import Mapping, Sequence

from certd import faults
from certd.store import locks

HELD_ENV = "CERTD_LOCK_HELD"
_VERSION = "1"
_OPEN = b"certd-lock/1 open"
_EXCLUSIVE = b"certd-lock/1 exclusive"
_SHARED = b"certd-lock/1 shared"
_KEEP = b"certd-lock/1 keep"
_KEPT = b"certd-lock/1 kept"
#: Signals a parent forwards to CMD.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: How long a nested updater waits for the parent to take over its lock (it answers in
#: microseconds unless it is gone).
_KEEP_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")


def _send(sock: socket.socket, msg: bytes, fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [msg], list(fds), socket.MSG_NOSIGNAL)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(sock, 256, 4, socket.MSG_CMSG_CLOEXEC)
    return msg, fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


# --- parent side ------------------------------------------------------------------------

class Channel:
    """The parent's end: answers nested updaters for as long as CMD runs (:meth:`serve`)."""

    def __init__(self, hold: locks.Hold):
        self.hold = hold
        self._listen, self._child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sessions = 0
        self.kept = 0

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        mode = "exclusive" if self.hold.exclusive else "shared"
        return {**base, HELD_ENV: f"{_VERSION}:{mode}:{os.getpid()}:{self._child.fileno()}:"
                                  f"{self.hold.path}"}

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._child.fileno(),)

    def close(self) -> None:
        self._listen.close()
        self._child.close()

    def serve(self, proc: subprocess.Popen) -> int:
        """Answer sessions until ``proc`` exits and no session is open; return its status.

        Sessions are served one at a time; requests queued when CMD exits are dropped
        (their senders see EOF and wait for the lock themselves)."""
        self._child.close()  # CMD has its copy; EOF must reach us when all users are gone
        pidfd = os.pidfd_open(proc.pid)
        session: socket.socket | None = None
        exited = False
        try:
            while not exited or session is not None:
                poller = select.poll()
                if not exited:
                    poller.register(pidfd, select.POLLIN)
                if session is not None:
                    poller.register(session, select.POLLIN)
                elif not exited:
                    poller.register(self._listen, select.POLLIN)
                for fd, _ev in poller.poll():
                    if fd == pidfd:
                        exited = True
                    elif session is not None and fd == session.fileno():
                        if not self._serve_one(session):
                            session.close()
                            session = None
                    elif fd == self._listen.fileno():
                        session = self._accept()
        finally:
            os.close(pidfd)
            if session is not None:
                session.close()
        return proc.wait()

    def _accept(self) -> socket.socket | None:
        try:
            msg, fds = _recv(self._listen)
        except OSError:
            return None
        if msg != _OPEN or len(fds) != 1:
            _close_all(fds)
            return None
        try:
            sess = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return None
        hold = self.hold
        try:
            if not hold.exclusive:
                _send(sess, _SHARED)
            else:
                mine = [hold.gate_fd]
                if hold.fd is not None and locks.same_file(hold.fd, hold.path) is not None:
                    mine.append(hold.fd)
                _send(sess, _EXCLUSIVE, mine)
        except OSError:
            sess.close()
            return None
        self.sessions += 1
        return sess

    def _serve_one(self, sess: socket.socket) -> bool:
        """One message of an open session; False when it ended."""
        try:
            msg, fds = _recv(sess)
        except OSError:
            return False
        if not msg:
            return False
        if msg == _KEEP and len(fds) == 1 and self.hold.exclusive:
            self._keep(fds[0])
            try:
                _send(sess, _KEPT)
            except OSError:
                return False
            return True
        _close_all(fds)
        return True

    def _keep(self, fd: int) -> None:
        """Take over a nested updater's lock on the inode it installed."""
        hold = self.hold
        st = locks.same_file(fd, hold.path)
        if st is None:  # not (or no longer) the file at the path: hold it, but as history
            hold.kept.append(fd)
            return
        if hold.fd is not None:
            if hold.adopted_blob:
                os.close(hold.fd)
            else:
                hold.kept.append(hold.fd)  # the replaced inode: unlocked at release
        hold.fd, hold.stat, hold.adopted_blob = fd, st, False
        self.kept += 1


def run_command(hold: locks.Hold, cmd: Sequence[str],
                env: Mapping[str, str] | None = None) -> int:
    """Run ``cmd`` while ``hold`` is held, serving nested updaters; return its status as
    :attr:`subprocess.Popen.returncode` (negative: killed by that signal). SIGTERM,
    SIGINT, SIGHUP and SIGQUIT are forwarded to it. Locks that nested updaters hand over
    join ``hold`` (released with it). Raises OSError if ``cmd`` cannot be started."""
    chan = Channel(hold)
    try:
        proc = subprocess.Popen(list(cmd), env=chan.environ(os.environ if env is None else env),
                                pass_fds=chan.pass_fds)
    except BaseException:
        chan.close()
        raise

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return chan.serve(proc)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        chan.close()


# --- child side -------------------------------------------------------------------------

class Session:
    """A nested updater's session with its parent; the :class:`~certd.store.locks.Keeper`
    of the adopted hold."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def keep(self, fd: int) -> bool:
        """Hand our exclusive lock on ``fd`` to the parent; True once it holds it (the
        caller then closes ``fd`` without unlocking)."""
        if faults.unsafe("nested-keep"):
            return False  # test-only: unlock at the end of the install, as before
        try:
            self.sock.settimeout(_KEEP_TIMEOUT)
            _send(self.sock, _KEEP, [fd])
            msg, fds = _recv(self.sock)
        except OSError:
            return False
        _close_all(fds)
        return msg == _KEPT

    def close(self) -> None:
        self.sock.close()


def _channel(raw: str, path: str) -> tuple[str, socket.socket] | None:
    """The mode and a private duplicate of the channel ``raw`` names, if it is ours."""
    try:
        version, mode, pid, fd, held_path = raw.split(":", 4)
        pid_n, fd_n = int(pid), int(fd)
    except ValueError:
        return None
    if version != _VERSION or os.path.abspath(held_path) != path:
        return None
    try:
        sock = socket.socket(fileno=os.dup(fd_n))
    except OSError:
        return None
    try:
        ok = sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET and \
            _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                          _UCRED.size))[0] == pid_n
    except OSError:
        ok = False
    if not ok:
        sock.close()
        return None
    return mode, sock


def adopt(path: str, deadline: float | None,
          environ: Mapping[str, str] = os.environ) -> locks.Hold | None:
    """The exclusive lock an enclosing ``certctl lock --exclusive`` holds on ``path``, as an
    adopted Hold, or None (no enclosing lock, a stale ``$CERTD_LOCK_HELD``, or the parent
    busy with another nested updater until ``deadline``): then take the lock normally.

    The Hold's ``fd`` is None if the parent holds no lock on the file now at the path;
    complete it with ``BlobLock.acquire_exclusive_sync(..., hold=h)``. Releasing it hands
    the blob lock to the parent. Raises RuntimeError if the parent holds a shared lock (an
    update under it could never get the exclusive lock).
    """
    path = os.path.abspath(path)
    raw = environ.get(HELD_ENV)
    if not raw:
        return None
    found = _channel(raw, path)
    if found is None:
        return _unchecked(path)
    mode, chan = found
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            _send(chan, _OPEN, [theirs.fileno()])
        finally:
            theirs.close()
            chan.close()
        left = None if deadline is None else deadline - time.monotonic()
        mine.settimeout(0.05 if left is None else max(left, 0.001))
        msg, fds = _recv(mine)
    except OSError:  # stale (EPIPE, ECONNREFUSED), or no answer in time (TimeoutError)
        mine.close()
        return _unchecked(path)
    if msg == _SHARED:
        mine.close()
        _close_all(fds)
        raise RuntimeError(
            f"{path} is locked shared by an enclosing 'certctl lock --shared'; "
            "an update needs 'certctl lock --exclusive'")
    if msg != _EXCLUSIVE or not fds:
        mine.close()
        _close_all(fds)
        return None
    gate_fd, blob_fd = fds[0], (fds[1] if len(fds) > 1 else None)
    _close_all(fds[2:])
    gate = locks.gate_path(path)
    if locks.same_file(gate_fd, gate) is None or not locks.holds_exclusive(gate_fd, gate):
        mine.close()
        _close_all([d for d in (gate_fd, blob_fd) if d is not None])
        return None
    st = None
    if blob_fd is not None:
        st = locks.same_file(blob_fd, path)
        if st is None or not locks.holds_exclusive(blob_fd, path):
            os.close(blob_fd)
            blob_fd, st = None, None
    hold = locks.Hold(path, blob_fd, st, True, gate_fd=gate_fd)
    hold.adopted_gate, hold.adopted_blob = True, blob_fd is not None
    hold.keeper = Session(mine)
    return hold


def _unchecked(path: str) -> locks.Hold | None:
    """Test-only (``CERTD_UNSAFE=adopt-check``): the old adoption by appearance. Adopts
    whenever a fresh description sees a write lock on the gate, whoever holds it."""
    if not faults.unsafe("adopt-check"):
        return None
    gate = os.open(locks.gate_path(path), os.O_RDONLY | os.O_CLOEXEC)
    if locks.conflicting_lock(gate, False) != fcntl.F_WRLCK:
        os.close(gate)
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = locks.same_file(fd, path)
    except FileNotFoundError:
        fd, st = None, None
    hold = locks.Hold(path, fd, st, True, gate_fd=gate)
    hold.adopted_gate, hold.adopted_blob = True, fd is not None
    return hold
