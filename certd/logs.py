"""The one place structlog is configured (see docs/python-platform-notes.md §4).

Output, chosen by :func:`configure`:

- **journald** (``$JOURNAL_STREAM`` names our stderr): one JSON object per line, prefixed
  with ``<N>``, the syslog priority of the level. journald strips the prefix into the
  ``PRIORITY`` field (``SyslogLevelPrefix=yes`` is its default), so ``journalctl -p warning``
  filters by level. No timestamp: journald stamps every line itself.
- **a TTY**: structlog's readable ``ConsoleRenderer``.
- **anything else** (a file, a pipe, a container log collector): plain JSON lines with an
  ISO-8601 UTC timestamp.

Tracebacks never carry local variables: a frame's locals can hold key material or
certificate bytes. JSON uses ``ExceptionDictTransformer(show_locals=False)``; the console
uses ``plain_traceback``, explicitly, because structlog's default console formatter is
Rich's, which shows locals when Rich happens to be installed.

Rules for callers: use the plain methods (``log.info``), never the ``a*`` ones (``ainfo``
hops to a thread pool: 158 µs instead of ~9 µs); get loggers with :func:`get_logger` at
module level (it is lazy, so configuring later is fine); bind per-connection values with
``log.bind(...)`` and per-request ones with ``structlog.contextvars.bind_contextvars``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, TextIO

import structlog

from certd import faults
from structlog.typing import EventDict, WrappedLogger

#: Log level name → syslog priority (sd-daemon(3): ``<N>`` prefixes).
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3,
            "exception": 3, "critical": 2}

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")


class JournaldPrefix:
    """Wraps a renderer and puts ``<N>`` (the syslog priority of the level) in front."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        pri = PRIORITY.get(str(event_dict.get("level", "")).lower(), 6)
        return f"<{pri}>{self.inner(logger, name, event_dict)}"


def _under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if ``stream`` is connected to journald.

    systemd sets ``$JOURNAL_STREAM`` to ``DEV:INODE`` of the stream it connected; comparing
    with our stream's fstat (as systemd.exec(5) recommends) avoids prefixing lines that a
    child of a journald-logged process writes to a plain file. A stream without an fd (tests)
    trusts the variable alone.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # closed or fd-less streams
        return False


def level_number(level: str | int) -> int:
    """``"info"`` → ``logging.INFO``; refuses unknown names with a clear error."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and level.lower() in LEVELS:
        return logging.getLevelNamesMapping()[level.upper()]
    raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}")


def configure(level: str | int = "info", fmt: str = "auto", stream: TextIO | None = None, *,
              cache: bool = True, environ: Mapping[str, str] | None = None) -> str:
    """Configure structlog for the whole process; returns the renderer chosen
    (``"journald"``, ``"json"`` or ``"console"``), for the startup log line.

    ``fmt``: ``"auto"`` (console on a TTY, JSON otherwise), ``"json"`` or ``"console"``.
    The journald ``<N>`` prefix is added to JSON whenever ``stream`` goes to journald.

    ``cache=True`` (the daemon) makes a filtered ``log.debug()`` cost ~0.2 µs, but loggers
    are then frozen at first use: calling ``configure`` again (a SIGHUP that changes
    ``log.level``) does not reach them, so a level change needs a restart. Tests pass
    ``cache=False`` (and may call ``structlog.reset_defaults()``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    lvl = level_number(level)
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    tty = _isatty(out)
    journald = _under_journald(out, env)
    console = fmt == "console" or (fmt == "auto" and tty and not journald)

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not journald:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=not console))
    if console:
        processors += [
            structlog.dev.set_exc_info,
            structlog.dev.ConsoleRenderer(colors=tty,
                                          exception_formatter=structlog.dev.plain_traceback),
        ]
        kind = "console"
    else:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
        if journald:
            processors[-1] = JournaldPrefix(processors[-1])
            kind = "journald"
        else:
            kind = "json"

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # WriteLogger writes and flushes each entry: no PYTHONUNBUFFERED needed.
        logger_factory=structlog.WriteLoggerFactory(out),
        context_class=dict,
        cache_logger_on_first_use=cache,
    )
    # Messages of the standard library's loggers (asyncio's "Fatal error ...", for one)
    # go through the same renderer: one format in the journal, JSON included.
    root = logging.getLogger()
    root.handlers[:] = [StdlibToStructlog()]
    root.setLevel(lvl)
    return kind


class StdlibToStructlog(logging.Handler):
    """A ``logging`` handler that re-emits each record through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(component=record.name)
            name = record.levelname.lower()
            method = getattr(log, name if name in PRIORITY else "info")
            kw: dict[str, Any] = {}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            method(record.getMessage(), **kw)
        except Exception:  # never let logging take the caller down
            self.handleError(record)


class RateLimited:
    """At most one line per ``interval`` seconds per key (a peer and a class of message,
    say), so a client cannot turn certd's log into the attack: :meth:`allow` answers None
    while a key is quiet, else how many lines were suppressed since its last line (log
    that count with it). Bounded: at most ``max_keys`` keys are remembered."""

    def __init__(self, interval: float = 1.0, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._last: dict[Any, list] = {}  # key -> [time of last line, suppressed since]
        self._off = faults.unsafe("log-limit")  # read once: a flood calls allow() a lot

    def allow(self, key: Any) -> int | None:
        if self._off:
            return 0
        now = self.clock()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        suppressed = entry[1] if entry is not None else 0
        if entry is None and len(self._last) >= self.max_keys:
            self._last.clear()  # a flood of keys: start over rather than grow
        self._last[key] = [now, 0]
        return suppressed


def get_logger(name: str, **initial: Any) -> Any:
    """A lazy logger whose lines carry ``component=name``; safe to create at import time.

    (The key is not ``logger``: that name is taken by ``structlog.get_logger``'s own
    parameter, and reaching around it would mean using structlog's private classes.)
    """
    return structlog.get_logger(component=name, **initial)
