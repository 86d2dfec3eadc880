"""certd's configuration: one TOML file (``/etc/certd/certd.toml``), every key documented in
docs/configuration.md with its default.

``parse(text, source)`` / ``load(path)`` return a frozen :class:`Config` or raise
:class:`ConfigError`, which lists *every* problem found, each with the file, the line and
the dotted key (``certd.toml:12: server.socket_mode: ...``). Unknown keys are errors: a typo
must not silently leave a default in force. Nothing is half-applied: the daemon either gets
a whole new Config or keeps the old one (SIGHUP reload).

How it works: ``tomllib`` parses; then each section is checked against its dataclass, whose
fields carry a checker in their metadata (type, range, path rules). tomllib does not report
where a key was, so :class:`_Lines` scans the text for table headers and ``key =`` lines to
put a line number on each problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import grp
import pwd
import re
import sys
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from certd.abi import wire

DEFAULT_PATH = Path("/etc/certd/certd.toml")

#: The largest valid request frame (a GET with a 64-byte VM id): ``server.max_frame``
#: cannot be set below it, or valid requests would be refused.
LARGEST_REQUEST = wire.HEADER_SIZE + wire.GET_FIXED_SIZE + wire.MAX_VM_ID

#: ``sun_path`` is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int | None      #: 1-based; None only when the file could not be read at all
    key: str              #: dotted key, e.g. ``server.socket_mode`` or ``profile[2].blob``
    message: str


class ConfigError(Exception):
    """The configuration is invalid. ``str()`` gives one ``file:line: key: message`` line per
    problem; ``problems`` has them as data (first one first, in file order)."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.key))
        super().__init__(self._text())

    def _text(self) -> str:
        lines = []
        for p in self.problems:
            where = f"{self.source}:{p.line}" if p.line is not None else self.source
            lines.append(f"{where}: {p.key}: {p.message}" if p.key else f"{where}: {p.message}")
        return "\n".join(lines)

    @property
    def line(self) -> int | None:
        """Line of the first problem."""
        return self.problems[0].line if self.problems else None

    @property
    def key(self) -> str:
        """Key of the first problem."""
        return self.problems[0].key if self.problems else ""


class _Bad(Exception):
    """A checker's verdict on one value; becomes a Problem with the key's line."""


# -- value checkers (each returns the value to store, or raises _Bad) ---------------------------


def _resolve_id(name: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A user/group name (looked up now, through NSS) or a numeric id, to an id."""
    if name.isascii() and name.isdigit():
        n = int(name)
        if n > 2**32 - 2:                 # (uid_t)-1 means "no change" to the kernel
            raise _Bad(f"{kind} id {name} is out of range")
        return n
    try:
        return lookup(name)
    except (KeyError, ValueError):        # ValueError: embedded NUL
        raise _Bad(f"no such {kind} {name!r}") from None


def _resolve_group(name: str) -> int:
    return _resolve_id(name, "group", lambda n: grp.getgrnam(n).gr_gid)


def _resolve_user(name: str) -> int:
    return _resolve_id(name, "user", lambda n: pwd.getpwnam(n).pw_uid)


def _typename(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string",
            list: "array", dict: "table"}.get(type(v), type(v).__name__)


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        # bool is an int in Python but `true` is not a number in a config file.
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Bad(f"must be an integer, got {_typename(v)} {v!r}")
        if not lo <= v <= hi:
            raise _Bad(f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def _number(lo: float, hi: float) -> Callable[[Any], float]:
    """Seconds and rates: integers or floats, strictly positive when lo is 0."""
    def check(v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _Bad(f"must be a number, got {_typename(v)} {v!r}")
        if v != v or not (lo < v <= hi):      # v != v: NaN (TOML allows `nan`)
            raise _Bad(f"must be greater than {lo:g} and at most {hi:g}, got {v}")
        return float(v)
    return check


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, got {_typename(v)} {v!r}")
    return v


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _str(v)
        if s not in options:
            raise _Bad(f"must be one of {', '.join(repr(o) for o in options)}, got {s!r}")
        return s
    return check


def _abs_path(v: Any) -> Path:
    s = _str(v)
    if not s:
        raise _Bad("must not be empty")
    if "\0" in s:
        raise _Bad("must not contain a NUL character")
    if not s.startswith("/"):
        # The daemon's working directory is "/" under systemd and something else in a shell:
        # a relative path would mean two different files.
        raise _Bad(f"must be an absolute path, got {s!r}")
    return Path(s)


def _opt_abs_path(v: Any) -> Path | None:
    """"" means "not set"."""
    if isinstance(v, str) and v == "":
        return None
    return _abs_path(v)


def _opt_socket_path(v: Any) -> Path | None:
    """"" means "not set"."""
    if isinstance(v, str) and v == "":
        return None
    return _socket_path(v)


def _socket_path(v: Any) -> Path:
    p = _abs_path(v)
    if len(str(p).encode()) > _SUN_PATH_MAX:
        raise _Bad(f"is {len(str(p).encode())} bytes long; a Unix socket path can have at "
                   f"most {_SUN_PATH_MAX}")
    return p


_LOOPBACK_LISTEN = re.compile(r"(127\.0\.0\.1|\[::1\]):([0-9]{1,5})")


def _listen(v: Any) -> str:
    """"" (off), an absolute Unix socket path, or a loopback TCP address."""
    s = _str(v)
    if s == "" or s.startswith("/"):
        return s if s == "" else str(_socket_path(s))
    m = _LOOPBACK_LISTEN.fullmatch(s)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        # Loopback only: the endpoints need no credentials, so they must not leave the host.
        raise _Bad("must be \"\" (off), an absolute Unix socket path, \"127.0.0.1:PORT\" or "
                   f"\"[::1]:PORT\" (loopback only, PORT 1-65535), got {s!r}")
    return s


def _mode(v: Any) -> int:
    # A string, because TOML has no leading-zero integers: `socket_mode = 0660` is a syntax
    # error and `socket_mode = 660` would silently mean 0o1224.
    if isinstance(v, int) and not isinstance(v, bool):
        raise _Bad(f"must be an octal mode string like \"0660\" (quoted; an integer such as "
                   f"0o660 cannot be told from a decimal mistake), got integer {v}")
    s = _str(v)
    if not re.fullmatch(r"0?[0-7]{3}", s):
        raise _Bad(f"must be an octal mode string like \"0660\", got {s!r}")
    mode = int(s, 8)
    if mode & 0o600 != 0o600:
        raise _Bad(f"must give the owner read and write (0600), got {s!r}")
    return mode


def _group(v: Any) -> str:
    """A group name or numeric gid that exists now ("" = none)."""
    s = _str(v)
    if s:
        _resolve_group(s)
    return s


def _user_name(v: Any) -> str:
    s = _name(v)
    _resolve_user(s)
    return s


def _group_name(v: Any) -> str:
    s = _name(v)
    _resolve_group(s)
    return s


def _url(v: Any) -> str:
    s = _str(v)
    if s and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", s):
        raise _Bad(f"must be an http:// or https:// URL without query or fragment, got {s!r}")
    return s.rstrip("/")


def _url_hosts(urls: tuple[str, ...]) -> list[str]:
    """The distinct ``scheme://host:port`` of ``urls`` (what a relay would connect to)."""
    out: list[str] = []
    for url in urls:
        u = urllib.parse.urlsplit(url)
        where = f"{u.scheme}://{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"
        if where not in out:
            out.append(where)
    return out


def _list_of(item: Callable[[Any], Any], what: str,
             nonempty: bool = False) -> Callable[[Any], tuple[Any, ...]]:
    def check(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise _Bad(f"must be an array of {what}, got {_typename(v)} {v!r}")
        if nonempty and not v:
            raise _Bad(f"must list at least one of the {what}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Bad as e:
                raise _Bad(f"item {i} ({x!r}) {e}") from None
        return tuple(out)
    return check


def _name(v: Any) -> str:
    s = _str(v)
    if not s:
        raise _Bad("must not be empty")
    return s


def _profile_name(v: Any) -> str:
    s = _str(v)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s):
        raise _Bad("must be 1-64 characters of letters, digits, '_', '.', '-', starting with "
                   f"a letter or digit, got {s!r}")
    return s


def _vm_glob(v: Any) -> str:
    s = _str(v)
    # VM ids are at most 64 printable bytes (DESIGN §4); a glob is printable ASCII too.
    if not s or not all(0x20 < ord(c) < 0x7F for c in s):
        raise _Bad("must be a non-empty pattern of printable ASCII without spaces")
    return s


def _level(v: Any) -> str:
    s = _str(v).lower()
    levels = ("debug", "info", "warning", "error", "critical")
    if s not in levels:
        raise _Bad(f"must be one of {', '.join(levels)}, got {v!r}")
    return s


def _key(check: Callable[[Any], Any], doc: str) -> dict[str, Any]:
    return {"check": check, "doc": doc}


# -- the configuration -------------------------------------------------------------------------
# Field order is documentation order. Fields with `metadata["check"]` are the TOML keys (the
# checker validates and converts the value); fields without it are derived by parse() once
# every check passed (resolved names), and are not keys.


@dataclass(frozen=True)
class ServerConfig:
    socket: Path = field(default=Path("/run/certd/certd.sock"), metadata=_key(
        _socket_path, "Unix socket to listen on when not socket-activated"))
    socket_mode: int = field(default=0o660, metadata=_key(
        _mode, "permissions of the socket certd creates (octal string)"))
    socket_group: str = field(default="", metadata=_key(
        _group, "group (name or gid) of the socket certd creates; \"\" leaves it as is"))
    request_deadline_ms: int = field(default=100, metadata=_key(
        _int(1, 60_000), "how long a request may wait for a valid table before EAGAIN"))
    lease_timeout_ms: int = field(default=2000, metadata=_key(
        _int(1, 600_000), "a lease not released within this time is ended and logged"))
    idle_timeout_s: float = field(default=300.0, metadata=_key(
        _number(0, 86_400), "close a connection with no request and no lease for this long"))
    max_frame: int = field(default=wire.MAX_REQUEST_FRAME, metadata=_key(
        _int(LARGEST_REQUEST, wire.MAX_REQUEST_FRAME),
        "largest frame accepted from a client, bytes (header included)"))
    max_leases_per_connection: int = field(default=16, metadata=_key(
        _int(1, 65_536), "leases one connection may hold at once"))
    max_connections: int = field(default=1024, metadata=_key(
        _int(1, 1 << 20), "concurrent client connections"))
    rate_per_vm: float = field(default=50.0, metadata=_key(
        _number(0, 1e6), "token bucket refill rate per VM id, requests per second"))
    rate_burst: int = field(default=100, metadata=_key(
        _int(1, 1 << 20), "token bucket size per VM id"))
    max_connections_per_pid: int = field(default=64, metadata=_key(
        _int(1, 1 << 20), "connections one client process may have open"))
    max_leases_per_vm: int = field(default=4, metadata=_key(
        _int(1, 65_536), "live leases one VM id may hold (a guest asks once per VMPL)"))
    frame_timeout_s: float = field(default=3.0, metadata=_key(
        _number(0.01, 3600), "a connection that started a frame must finish it this fast"))
    hold_max_age_ms: int = field(default=100, metadata=_key(
        _int(1, 60_000), "a shared hold takes new leases for at most this long, then drains "
        "so an updater that only takes the kernel's exclusive OFD lock gets in"))
    hoarder_grace_ms: int = field(default=50, metadata=_key(
        _int(1, 600_000), "while an update or a drain waits for readers, a lease of a client "
        "process that let a lease time out before ends after this long (honest clients keep "
        "lease_timeout_ms)"))
    hold_gap_ms: int = field(default=2, metadata=_key(
        _int(0, 1000), "after a hold drained for its age, no shared lock is taken for this long"))
    event_loop: str = field(default="auto", metadata=_key(
        _choice("auto", "asyncio", "uvloop"), "auto (uvloop when it is installed, else "
        "asyncio's own loop), asyncio, or uvloop (certd then refuses to start without it)"))
    #: ``socket_group`` resolved to a gid by :func:`parse` (None: leave the group as is).
    #: Not a TOML key.
    socket_gid: int | None = None

    @property
    def request_deadline(self) -> float:
        """``request_deadline_ms`` in seconds."""
        return self.request_deadline_ms / 1000

    @property
    def lease_timeout(self) -> float:
        """``lease_timeout_ms`` in seconds."""
        return self.lease_timeout_ms / 1000


@dataclass(frozen=True)
class AccessConfig:
    allow_uids: tuple[int, ...] = field(default=(0,), metadata=_key(
        _list_of(_int(0, 2**32 - 2), "uids"), "peer uids allowed to connect"))
    allow_gids: tuple[int, ...] = field(default=(), metadata=_key(
        _list_of(_int(0, 2**32 - 2), "gids"),
        "peers whose primary or a supplementary group is one of these may connect"))
    allow_users: tuple[str, ...] = field(default=(), metadata=_key(
        _list_of(_user_name, "user names"), "like allow_uids, by name (resolved at load)"))
    allow_groups: tuple[str, ...] = field(default=(), metadata=_key(
        _list_of(_group_name, "group names"), "like allow_gids, by name (resolved at load)"))
    #: allow_users / allow_groups resolved by :func:`parse` (not TOML keys).
    user_uids: tuple[int, ...] = ()
    group_gids: tuple[int, ...] = ()

    @property
    def uids(self) -> frozenset[int]:
        """Every allowed uid: allow_uids and the resolved allow_users."""
        return frozenset(self.allow_uids) | frozenset(self.user_uids)

    @property
    def gids(self) -> frozenset[int]:
        """Every allowed gid: allow_gids and the resolved allow_groups."""
        return frozenset(self.allow_gids) | frozenset(self.group_gids)

    def allows(self, uid: int, gids: "frozenset[int] | set[int] | tuple[int, ...]" = ()) -> bool:
        """May a peer with this uid and these groups (primary + supplementary, e.g. from
        SO_PEERCRED and SO_PEERGROUPS) connect?"""
        return uid in self.uids or not self.gids.isdisjoint(gids)


@dataclass(frozen=True)
class StoreConfig:
    blob: Path = field(default=Path("/var/lib/certd/certs.blob"), metadata=_key(
        _abs_path, "the default certificate blob (GHCB table) served and kept up to date"))


@dataclass(frozen=True)
class PlatformConfig:
    source: str = field(default="auto", metadata=_key(
        _choice("auto", "sev", "file"),
        "where platform identity comes from: /dev/sev, a platform file, or auto"))
    file: Path | None = field(default=None, metadata=_key(
        _opt_abs_path, "platform TOML file (hosts without SNP, tests); \"\" = none"))
    poll_s: float = field(default=30.0, metadata=_key(
        _number(0.01, 86_400), "re-read the platform identity this often (also on a platform "
        "file change, SIGHUP and every new shared hold)"))


@dataclass(frozen=True)
class TrustConfig:
    roots: tuple[Path, ...] = field(default=(), metadata=_key(
        _list_of(_abs_path, "paths"), "PEM files whose ARK/ASK/ASVK replace AMD's pinned roots "
        "(the development PKI of certd --dev only); [] = AMD's pinned roots"))


@dataclass(frozen=True)
class KdsConfig:
    base_url: str = field(default="https://kdsintf.amd.com", metadata=_key(
        _url, "AMD KDS base URL; \"\" disables fetching from KDS"))
    mirrors: tuple[str, ...] = field(default=(), metadata=_key(
        _list_of(_url, "URLs"), "KDS mirrors/caches tried in order before base_url"))
    cache_dir: Path = field(default=Path("/var/cache/certd/kds"), metadata=_key(
        _abs_path, "on-disk cache of fetched certificates and CRLs"))
    timeout_s: float = field(default=10.0, metadata=_key(
        _number(0, 600), "timeout of one KDS HTTP request"))
    min_backoff_s: float = field(default=10.0, metadata=_key(
        _number(0, 86_400), "first retry delay after a failure or HTTP 429"))
    max_backoff_s: float = field(default=300.0, metadata=_key(
        _number(0, 86_400), "longest retry delay"))
    relay: Path | None = field(default=None, metadata=_key(
        _opt_socket_path, "Unix socket of a TCP relay to the KDS source (the shipped unit's "
        "certd-kds-relay.socket); \"\" = connect directly"))

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to fetch from, in order: mirrors, then base_url (empty: KDS disabled)."""
        return self.mirrors + ((self.base_url,) if self.base_url else ())


@dataclass(frozen=True)
class WatchConfig:
    drop_dir: Path | None = field(default=None, metadata=_key(
        _opt_abs_path, "directory watched for CSP-provisioned VLEK/VCEK certificates; "
        "\"\" = disabled"))


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=_key(
        _level, "debug, info, warning, error or critical"))
    format: str = field(default="auto", metadata=_key(
        _choice("auto", "json", "console"),
        "auto: JSON (with <N> priority under journald), console on a TTY"))


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = field(default="", metadata=_key(
        _listen, "where /metrics, /healthz and /readyz are served: a Unix socket path, "
        "\"127.0.0.1:PORT\" or \"[::1]:PORT\"; \"\" = off"))
    socket_mode: int = field(default=0o660, metadata=_key(
        _mode, "permissions of the metrics Unix socket (octal string)"))

    @property
    def address(self) -> tuple[str, str, int] | None:
        """``("unix", path, 0)``, ``("tcp", host, port)``, or None when off."""
        if not self.listen:
            return None
        if self.listen.startswith("/"):
            return ("unix", self.listen, 0)
        host, _, port = self.listen.rpartition(":")
        return ("tcp", host.strip("[]"), int(port))


@dataclass(frozen=True)
class Profile:
    name: str = field(metadata=_key(_profile_name, "unique profile name (for logs)"))
    blob: Path = field(metadata=_key(_abs_path, "certificate blob served to these VMs"))
    vms: tuple[str, ...] = field(metadata=_key(
        _list_of(_vm_glob, "VM id glob patterns", nonempty=True), "VM id glob patterns (fnmatch)"))

    def matches(self, vm_id: str) -> bool:
        return any(fnmatch.fnmatchcase(vm_id, p) for p in self.vms)


#: TOML table name → (attribute of Config, dataclass).
_SECTIONS: dict[str, tuple[str, type]] = {
    "server": ("server", ServerConfig),
    "access": ("access", AccessConfig),
    "store": ("store", StoreConfig),
    "platform": ("platform", PlatformConfig),
    "trust": ("trust", TrustConfig),
    "kds": ("kds", KdsConfig),
    "watch": ("watch", WatchConfig),
    "log": ("log", LogConfig),
    "metrics": ("metrics", MetricsConfig),
}


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    kds: KdsConfig = field(default_factory=KdsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: ``[[profile]]`` tables in file order.
    profiles: tuple[Profile, ...] = ()
    #: Where this came from (a path or ``<defaults>``), for log lines.
    source: str = "<defaults>"

    def profile_for(self, vm_id: str) -> Profile | None:
        """The first profile (file order) with a pattern matching ``vm_id``, or None."""
        for p in self.profiles:
            if p.matches(vm_id):
                return p
        return None

    def blob_for(self, vm_id: str) -> Path:
        """The blob to serve to ``vm_id``: its profile's, else ``store.blob``."""
        p = self.profile_for(vm_id)
        return p.blob if p is not None else self.store.blob

    @property
    def blobs(self) -> tuple[Path, ...]:
        """Every blob certd serves: the default first, then each profile's."""
        return (self.store.blob,) + tuple(p.blob for p in self.profiles)


# -- locating keys in the text -----------------------------------------------------------------

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEYPART = rf"\s*(?:{_BARE}|{_QUOTED})\s*"
_DOTTED = re.compile(rf"{_KEYPART}(?:\.{_KEYPART})*")
_HEADER = re.compile(rf"\s*(\[\[|\[)({_DOTTED.pattern})\]\]?\s*(?:#.*)?$")
_KEYLINE = re.compile(rf"({_DOTTED.pattern})=")


def _split_key(k: str) -> tuple[str, ...]:
    parts = re.findall(rf"{_BARE}|{_QUOTED}", k)
    out = []
    for p in parts:
        if p[0] in "\"'":
            p = p[1:-1]
            if "\\" in p:            # rare; good enough for locating a line
                try:
                    p = p.encode("utf-8").decode("unicode_escape")
                except (UnicodeError, ValueError):
                    pass
        out.append(p)
    return tuple(out)


class _Lines:
    """Maps key paths to the line they are defined on.

    Paths look like ``("server", "socket")`` or, inside arrays of tables,
    ``("profile", 1, "blob")``. Best effort by design: it understands headers, dotted keys and
    multi-line strings, which is all a certd config needs; anything it cannot place falls back
    to the nearest enclosing table's line, then to line 1.
    """

    def __init__(self, text: str):
        self.at: dict[tuple[Any, ...], int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: tuple[Any, ...] = ()
        in_ml: str | None = None          # the delimiter of an open multi-line string
        for no, line in enumerate(text.splitlines(), 1):
            if in_ml is not None:
                if in_ml in line:
                    in_ml = None
                continue
            h = _HEADER.match(line)
            if h:
                path = _split_key(h.group(2))
                if h.group(1) == "[[":
                    i = counts.get(path, 0)
                    counts[path] = i + 1
                    table = path + (i,)
                else:
                    table = path
                for n in range(1, len(table) + 1):   # [a.b] also defines table a
                    self.at.setdefault(table[:n], no)
                continue
            k = _KEYLINE.match(line)
            if k:
                key = _split_key(k.group(1))
                for n in range(1, len(key) + 1):     # a.b.c = 1 also defines table a.b
                    self.at.setdefault(table + key[:n], no)
                rest = line[k.end():]
                for delim in ('"""', "'''"):
                    if rest.count(delim) % 2 == 1:
                        in_ml = delim
                        break

    def line(self, path: tuple[Any, ...]) -> int:
        for n in range(len(path), 0, -1):
            if path[:n] in self.at:
                return self.at[path[:n]]
        return 1


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p + 1}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# -- parsing -----------------------------------------------------------------------------------


def _syntax_line(err: Exception, text: str) -> int:
    m = re.search(r"at line (\d+)", str(err))
    if m:
        return int(m.group(1))
    # "(at end of document)"
    return max(1, text.count("\n") + (0 if text.endswith("\n") else 1))


class _Builder:
    def __init__(self, text: str):
        self.lines = _Lines(text)
        self.problems: list[Problem] = []

    def bad(self, path: tuple[Any, ...], message: str) -> None:
        self.problems.append(Problem(self.lines.line(path), _dotted(path), message))

    def section(self, cls: type, path: tuple[Any, ...], table: Any) -> Any:
        """Check one table against ``cls``; returns an instance, or None if it had problems."""
        if not isinstance(table, dict):
            self.bad(path, f"must be a table ([{_dotted(path)}]), got {_typename(table)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}
        values: dict[str, Any] = {}
        ok = True
        for k, v in table.items():
            f = fields.get(k)
            if f is None:
                hint = difflib.get_close_matches(k, fields, n=1)
                self.bad(path + (k,), "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint
                                                       else f"; known: {', '.join(fields)}"))
                ok = False
                continue
            try:
                values[k] = f.metadata["check"](v)
            except _Bad as e:
                self.bad(path + (k,), str(e))
                ok = False
        for name, f in fields.items():
            if name not in table and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                self.bad(path, f"missing required key {name!r}")
                ok = False
        return cls(**values) if ok else None


def parse(text: str, source: str = "<string>") -> Config:
    """Parse and check a whole configuration. Raises only :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = _syntax_line(e, text)
        msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(e))
        # Name the key on that line if there is one: "server.socket_mode: Invalid value".
        key = ""
        lines = _Lines(text)
        for path, no in lines.at.items():
            if no == line:
                key = _dotted(path)
        raise ConfigError(source, [Problem(line, key, f"TOML syntax error: {msg}")]) from None
    except (ValueError, RecursionError) as e:   # e.g. absurdly nested arrays
        raise ConfigError(source, [Problem(_syntax_line(e, text), "",
                                           f"TOML syntax error: {type(e).__name__}")]) from None

    b = _Builder(text)
    parts: dict[str, Any] = {}
    profiles: list[tuple[int, Profile]] = []   # (index in the file, profile)
    for key, value in data.items():
        if key in _SECTIONS:
            attr, cls = _SECTIONS[key]
            obj = b.section(cls, (key,), value)
            if obj is not None:
                parts[attr] = obj
        elif key == "profile":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                b.bad((key,), "must be an array of tables: write each as [[profile]]")
                continue
            for i, t in enumerate(value):
                obj = b.section(Profile, ("profile", i), t)
                if obj is not None:
                    profiles.append((i, obj))
        else:
            known = list(_SECTIONS) + ["profile"]
            hint = difflib.get_close_matches(key, known, n=1)
            b.bad((key,), "unknown section" + (f" (did you mean [{hint[0]}]?)" if hint
                                               else f"; known: {', '.join(known)}"))

    # Cross-key checks and name resolution, on the sections that passed their own checks.
    server = parts.get("server")
    if server is not None and server.socket_group:
        try:
            parts["server"] = dataclasses.replace(
                server, socket_gid=_resolve_group(server.socket_group))
        except _Bad as e:
            b.bad(("server", "socket_group"), str(e))
    access = parts.get("access")
    if access is not None:
        resolved: dict[str, list[int]] = {"allow_users": [], "allow_groups": []}
        for attr, resolve in (("allow_users", _resolve_user), ("allow_groups", _resolve_group)):
            for name in getattr(access, attr):
                try:
                    resolved[attr].append(resolve(name))
                except _Bad as e:
                    b.bad(("access", attr), str(e))
        access = parts["access"] = dataclasses.replace(
            access, user_uids=tuple(resolved["allow_users"]),
            group_gids=tuple(resolved["allow_groups"]))
        if not access.allow_uids and not access.allow_gids and not access.allow_users \
                and not access.allow_groups:
            b.bad(("access",), "allows nobody: set allow_uids, allow_gids, allow_users or "
                  "allow_groups")
    platform = parts.get("platform")
    if platform is not None and platform.source == "file" and platform.file is None:
        b.bad(("platform", "file"), "must be set when platform.source = \"file\"")
    kds = parts.get("kds")
    if kds is not None and kds.max_backoff_s < kds.min_backoff_s:
        b.bad(("kds", "max_backoff_s"),
              f"must be at least min_backoff_s ({kds.min_backoff_s:g}), got {kds.max_backoff_s:g}")
    if kds is not None and kds.relay is not None and len(_url_hosts(kds.urls)) > 1:
        b.bad(("kds", "relay"), "a relay forwards to one host, but kds.mirrors and "
              f"kds.base_url name {len(_url_hosts(kds.urls))}: "
              f"{', '.join(_url_hosts(kds.urls))}; keep the relay's target only")
    metrics = parts.get("metrics")
    if metrics is not None and metrics.listen and \
            Path(metrics.listen) == parts.get("server", ServerConfig()).socket:
        b.bad(("metrics", "listen"), f"{metrics.listen!r} is server.socket; the metrics "
              "listener needs a path of its own")
    store = parts.get("store", StoreConfig())
    names: dict[str, int] = {}
    blobs: dict[Path, str] = {store.blob: "store.blob"}
    for i, prof in profiles:
        if prof.name in names:
            b.bad(("profile", i, "name"), f"duplicate profile name {prof.name!r} "
                  f"(first used by profile[{names[prof.name] + 1}])")
        else:
            names[prof.name] = i
        if prof.blob in blobs:
            b.bad(("profile", i, "blob"), f"{str(prof.blob)!r} is already used by "
                  f"{blobs[prof.blob]}: each blob belongs to one profile")
        else:
            blobs[prof.blob] = f"profile {prof.name!r}"

    if b.problems:
        raise ConfigError(source, b.problems)
    return Config(**parts, profiles=tuple(p for _, p in profiles), source=source)


def load(path: str | Path = DEFAULT_PATH) -> Config:
    """Read and parse ``path``. Unreadable files are a ConfigError too (without a line)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(source, [Problem(None, "", f"cannot read: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(source, [Problem(line, "", "not valid UTF-8 (TOML files must be)")]) \
            from None
    return parse(text, source)


def check_main(path: str | Path = DEFAULT_PATH,
               refers: Callable[[Config], list[str]] | None = None) -> int:
    """``certd --check-config``: print OK or every problem; return 0 or 78 (CONFIG).

    ``refers(cfg)`` checks what the configuration refers to (files, devices, directories)
    and returns one line per problem; the caller passes it (those checks live above this
    layer)."""
    # Imported here: config sits below the CLI layer; only this entry point needs exit codes.
    from certd import exitcodes

    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"certd: invalid configuration:\n{e}", file=sys.stderr)
        return exitcodes.CONFIG
    problems = refers(cfg) if refers is not None else []
    if problems:
        print(f"certd: {cfg.source} parses, but what it refers to is not usable "
              "(a restart cannot fix this):\n" + "\n".join(f"  {p}" for p in problems),
              file=sys.stderr)
        return exitcodes.CONFIG
    n = len(cfg.profiles)
    print(f"{cfg.source}: OK ({n} profile{'s' if n != 1 else ''})")
    return exitcodes.OK
