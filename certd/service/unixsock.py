"""Binding a Unix socket path that certd creates itself (the request socket when not
socket-activated, the metrics socket), without stealing it from a live process."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from certd import exitcodes


class BindError(Exception):
    """The path cannot be bound; ``code`` is the exit code: CONFIG (78) where a restart
    cannot help (the path is not a socket), UNAVAILABLE (69) where it may."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def bind(path: str, mode: int, gid: int | None = None, backlog: int = 1024) -> socket.socket:
    """A listening socket at ``path`` with ``mode`` (and group ``gid``). A socket file left
    by a crash is replaced; one a process still answers on is refused."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"{path} exists and is not a socket; refusing to replace it",
                            exitcodes.CONFIG)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise BindError(f"another process is serving {path}; stop it first",
                            exitcodes.UNAVAILABLE)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # a stale socket left by a crash
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {path}: {e.strerror}", exitcodes.UNAVAILABLE) from None
    return sock


def unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove ``path`` at exit if it is still the socket we bound (``ident`` = its
    (st_dev, st_ino) right after binding), not one a newer process put there."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass
