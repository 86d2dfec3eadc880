"""A tiny HTTP/1.1 server on the daemon's event loop, for ``[metrics] listen``.

Any local user can reach it, so it is bounded: GET and HEAD only, one request per
connection, a request head of at most 8 KiB that must arrive within 5 s, an answer that must
be taken within 5 s, and at most 32 clients at once (more are closed unanswered). Handlers
are plain functions that return at once; nothing here blocks the loop or starts a thread.
"""

from __future__ import annotations

import asyncio
import http
import json
import os
import socket
from typing import Callable

import structlog

from certd import exitcodes
from certd.service import unixsock

log = structlog.get_logger("certd.httpd")

MAX_HEAD = 8192
TIMEOUT = 5.0
MAX_CLIENTS = 32

#: A route: () -> (HTTP status, Content-Type, body).
Handler = Callable[[], tuple[int, str, bytes]]


class BadRequest(ValueError):
    pass


def parse_head(head: bytes) -> tuple[str, str]:
    """(method, path without the query) from a request head; raises BadRequest."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1") \
            or not parts[1].startswith(b"/"):
        raise BadRequest("not an HTTP/1.x request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request line is not ASCII") from None
    return method, target.split("?", 1)[0]


def response(status: int, content_type: str, body: bytes, *, head_only: bool = False,
             extra: str = "") -> bytes:
    phrase = http.HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
            "Connection: close\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def json_body(status: int, doc: dict) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(doc).encode() + b"\n"


class HttpServer:
    """Routes by exact path. ``url`` is where it listens (None: not listening)."""

    def __init__(self, routes: dict[str, Handler]):
        self.routes = routes
        self.url: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self._unix: tuple[str, tuple[int, int]] | None = None  # path, (st_dev, st_ino)

    @property
    def clients(self) -> int:
        """Connections being served now."""
        return len(self._clients)

    async def start(self, address: tuple[str, str, int] | None, socket_mode: int = 0o660) -> None:
        """Listen on ``address`` (see :attr:`certd.config.MetricsConfig.address`); None:
        do nothing. Raises :class:`unixsock.BindError`."""
        if address is None:
            return
        kind, host, port = address
        if kind == "unix":
            sock = unixsock.bind(host, socket_mode, backlog=64)
            info = os.stat(host)
            self._unix = (host, (info.st_dev, info.st_ino))
            self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                           limit=MAX_HEAD)
            self.url = f"unix:{host}"
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.create_server((host, port), family=family, backlog=64)
            except OSError as e:
                raise unixsock.BindError(f"cannot listen on {host}:{port}: {e.strerror}",
                                         exitcodes.UNAVAILABLE) from None
            self._server = await asyncio.start_server(self._client, sock=sock, limit=MAX_HEAD)
            self.url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
        log.info("metrics listening", url=self.url, paths=sorted(self.routes))

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        if self._unix is not None:
            unixsock.unlink_if_ours(*self._unix)
        self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each client callback as a task
        self._clients.add(task)
        closed = False
        try:
            await asyncio.wait_for(self._serve(reader, writer), 2 * TIMEOUT)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
            closed = True
        except (TimeoutError, OSError):  # too slow, or gone
            pass
        finally:
            self._clients.discard(task)
            if not closed:
                writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            method, path = parse_head(head)
        except TimeoutError:
            out = response(408, "text/plain", b"request head not received in time\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, BadRequest) as e:
            if isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                return  # connected and closed: a port probe
            too_big = isinstance(e, asyncio.LimitOverrunError)
            out = response(431 if too_big else 400, "text/plain",
                           b"request head over 8 KiB\n" if too_big else b"bad request\n")
        else:
            head_only = method == "HEAD"
            handler = self.routes.get(path)
            if method not in ("GET", "HEAD"):
                out = response(405, "text/plain", b"only GET and HEAD\n",
                               extra="Allow: GET, HEAD\r\n")
            elif handler is None:
                out = response(404, "text/plain",
                               ("not found; try " + ", ".join(sorted(self.routes)) + "\n")
                               .encode(), head_only=head_only)
            else:
                try:
                    status, ctype, body = handler()
                except Exception:  # a bug in a handler must not take the listener down
                    log.exception("metrics handler failed", path=path)
                    status, ctype, body = 500, "text/plain", b"internal error (logged)\n"
                out = response(status, ctype, body, head_only=head_only)
        writer.write(out)
        await asyncio.wait_for(writer.drain(), TIMEOUT)
