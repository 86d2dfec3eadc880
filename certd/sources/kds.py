"""KDS client: VCEKs, cert chains and CRLs from AMD KDS or mirrors, with an on-disk cache.

What it guarantees (docs/fleet.md and docs/configuration.md ``[kds]`` say the same):

* **Sources in order.** ``urls`` (config: ``kds.mirrors`` then ``kds.base_url``) are tried in
  order in each round. 404 means "this source does not have it": the next one is tried.
* **Retries.** A source that failed is not asked again before its wait is over: after a
  429 or 5xx with ``Retry-After`` (seconds or an HTTP date; at least min(1 s,
  ``min_backoff_s``)) that long, after any other failure (404, timeout, connection error,
  invalid body, 429/5xx without Retry-After) an exponential backoff with jitter from
  ``min_backoff_s`` capped at ``max_backoff_s``, counted per source. The next attempt goes
  to the first source (in order) that is ready. ``deadline_s=None`` retries for ever (the
  daemon, one log line per failed attempt); a deadline bounds it (certctl).
* **Validated before use.** A body is used (and cached) only if it parses and the whole
  blob it makes passes :func:`certd.policy.build_blob` for the key asked for: chain to the
  trust store's ARK/ASK, the TCB and the hwID of the request, dates. An error body or an
  invalid 200 is never written to the cache. A CRL must be signed by the pinned ARK and
  fresh (thisUpdate <= now < nextUpdate).
* **Cache.** ``cache_dir/vcek/<Product>/<hwid>/<bl..>_vcek.der`` (the file name trustee's
  offline store uses), ``cache_dir/crl/<Product>.der``,
  ``cache_dir/cert_chain/<Product>.pem``; written by temp file + fsync + rename. Entries
  are validated again when read.
* **One request per key.** Concurrent fetches of one key share one in-flight future in a
  process, and across processes the fetcher holds an OFD lock on ``.<file>.lock`` beside
  the cache entry: a second process waits for the lock and then finds the entry.
  A fetch whose last waiter has gone (cancelled, or timed out) stops retrying.
* **CRLs** go into a blob only while fresh; one past ``refresh_at`` (a quarter of its
  validity, at most a day, before nextUpdate) is fetched again; a stale one is deleted.

HTTP is the standard library's ``http.client``, run in a worker thread: each request gets
an absolute deadline of ``timeout_s`` that also bounds a slowly trickling body (the socket
timeout is set to the time left before every read). No proxy support: a fleet points
``kds.mirrors`` at an HTTP cache instead (docs/fleet.md). With ``kds.relay`` every
connection is made to that Unix socket, a TCP relay to the source's host (the shipped
certd.service has no network; docs/systemd.md), with TLS still end to end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import errno
import http.client
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd import faults, logs, policy
from certd.fileio import write_atomic
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd import kds as kdsurl
from certd.amd.roots import TrustStore
from certd.platform import Platform
from certd.store import locks
from certd.verify import chain as chainmod
from certd.verify import pki

__all__ = ["KdsClient", "KdsUnavailable", "SourceFailure", "vcek_file_name", "vcek_cache_path",
           "parse_retry_after", "backoff_delay", "http_get", "MAX_BODY"]

#: Largest body accepted. A VCEK is ~1.3 KB, a CRL a few KB, a cert_chain ~4 KB.
MAX_BODY = 1 << 20
#: Longest Retry-After honoured (a broken date far in the future must not stall for years).
MAX_RETRY_AFTER_S = 86_400.0
#: Cross-process lock wait: first poll, ceiling (a fetch takes tens of ms to minutes).
_LOCK_POLL_FIRST, _LOCK_POLL_CAP = 0.005, 0.1
USER_AGENT = "certd/0.1 (+https://github.com/certd)"

_log = logs.get_logger("kds")


# --- pure helpers ---------------------------------------------------------------------------

def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or
    None if absent or unparseable. Negative waits become 0; at most MAX_RETRY_AFTER_S."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        secs = float(int(value))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        secs = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(secs, 0.0), MAX_RETRY_AFTER_S)


def backoff_delay(n: int, lo: float, hi: float, u: float) -> float:
    """Delay after the ``n``-th consecutive failed round (n = 0 first): ``lo * 2**n`` capped
    at ``hi``, times a jitter factor in [0.8, 1.2) from ``u`` in [0, 1), kept in [lo, hi]."""
    base = min(hi, lo * (2.0 ** min(n, 62)))
    return max(lo, min(hi, base * (0.8 + 0.4 * u)))


def vcek_file_name(tcb: Tcb) -> str:
    """``bl{BL}_tee{TEE}_snp{SNP}_ucode{UC}[_fmc{FMC}]_vcek.der``, SPLs two-digit zero-padded:
    trustee's offline VCEK store name (attestation-service/docs/amd-offline-certificate-cache.md)."""
    name = f"bl{tcb.bl:02d}_tee{tcb.tee:02d}_snp{tcb.snp:02d}_ucode{tcb.ucode:02d}"
    if tcb.fmc is not None:
        name += f"_fmc{tcb.fmc:02d}"
    return name + "_vcek.der"


def vcek_cache_path(cache_dir: str | os.PathLike[str], product: Product, hwid: bytes,
                    tcb: Tcb) -> Path:
    """Where the VCEK for (product, hwid, TCB) is cached. ``hwid`` as KDS wants it."""
    return Path(cache_dir) / "vcek" / product.value / hwid.hex() / vcek_file_name(tcb)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- errors ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFailure:
    url: str
    #: ``missing`` (404), ``throttled`` (429), ``server`` (5xx), ``http`` (other status),
    #: ``invalid`` (a 200 that failed validation), ``network`` (connect/timeout/reset),
    #: ``busy`` (another process held the fetch lock past the deadline), ``closed``.
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


class KdsUnavailable(Exception):
    """Nothing valid could be had. ``failures`` names each source's last failure."""

    def __init__(self, what: str, failures: Sequence[SourceFailure]):
        self.what = what
        self.failures = list(failures)
        detail = "; ".join(str(f) for f in self.failures) or "no sources configured"
        super().__init__(f"{what} not available: {detail}")

    @property
    def invalid(self) -> bool:
        """True if every source answered, and every answer failed validation."""
        return bool(self.failures) and all(f.kind == "invalid" for f in self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "failures": [
            {"url": f.url, "kind": f.kind, "reason": f.reason} for f in self.failures]}


class InvalidAnswer(ValueError):
    """A 200 body that must not be used; the message says why."""


# --- HTTP -----------------------------------------------------------------------------------

@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _RelayConnection(http.client.HTTPConnection):
    """Plain HTTP to ``host`` over a stream Unix socket (a relay that forwards to it)."""

    def __init__(self, host: str, port: int | None, relay: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.relay = relay

    def connect(self) -> None:
        self.sock = _relay_socket(self.relay, self.timeout)


class _RelayTLSConnection(http.client.HTTPSConnection):
    """HTTPS over the relay's Unix socket: TLS end to end with the URL's host, whose name
    is sent as SNI and checked against its certificate (the relay only moves bytes)."""

    def __init__(self, host: str, port: int | None, relay: str, timeout: float,
                 context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.relay = relay
        self.tls = context

    def connect(self) -> None:
        sock = _relay_socket(self.relay, self.timeout)
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except (ssl.SSLEOFError, ConnectionResetError) as e:
            sock.close()
            # What a relay that cannot reach its target does: accept, then hang up.
            raise ConnectionResetError(errno.ECONNRESET, f"KDS relay {self.relay} closed the "
                                       f"connection before TLS with {self.host} began "
                                       f"(relay unable to reach it? {e})") from None


def _relay_socket(relay: str, timeout: float | None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(relay)
    except OSError as e:
        s.close()
        # Say which socket: "No such file or directory" alone reads like a missing URL.
        raise type(e)(e.errno, f"KDS relay {relay}: {e.strerror or e}") from None
    return s


def _only_loopback() -> bool:
    """True if this process's network namespace has no device but ``lo``."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return {line.split(":")[0].strip() for line in lines} == {"lo"}


def http_get(url: str, timeout_s: float, *, relay: str | os.PathLike[str] | None = None,
             context: ssl.SSLContext | None = None) -> _Response:
    """GET ``url``; the whole exchange (connect, headers, body) within ``timeout_s``.

    ``relay``: connect to this Unix socket instead of the URL's host (a TCP relay such as
    systemd-socket-proxyd forwarding to it; docs/systemd.md); HTTP and TLS (SNI, host name
    check) stay as for a direct connection. ``context``: the TLS context (default: the
    system's trust store, certificate and host name verified).

    Raises ``OSError`` (including ``TimeoutError``) or ``http.client.HTTPException``."""
    deadline = time.monotonic() + timeout_s
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme in {url!r}")
    tls = (context or ssl.create_default_context()) if u.scheme == "https" else None
    host = u.hostname or ""
    conn: http.client.HTTPConnection
    if relay is not None and tls is not None:
        conn = _RelayTLSConnection(host, u.port, os.fspath(relay), timeout_s, tls)
    elif relay is not None:
        conn = _RelayConnection(host, u.port, os.fspath(relay), timeout_s)
    elif tls is not None:
        conn = http.client.HTTPSConnection(host, u.port, timeout=timeout_s, context=tls)
    else:
        conn = http.client.HTTPConnection(host, u.port, timeout=timeout_s)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, f"no complete answer within {timeout_s:g} s")
        return remaining

    try:
        try:
            conn.connect()
        except OSError as e:
            if relay is None and _only_loopback():
                # The shipped certd.service has no network; a bare "Name or service not
                # known" would not say that the relay is what is missing.
                raise type(e)(e.errno, f"{e.strerror or e} (this process has no network but "
                              "lo: set kds.relay, docs/systemd.md)") from None
            raise
        target = u.path + (f"?{u.query}" if u.query else "")
        conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
        sock = conn.sock  # getresponse() drops conn.sock when the server closes after it
        sock.settimeout(left())
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        want = headers.get("content-length")
        chunks, total = [], 0
        while True:
            sock.settimeout(left())
            chunk = resp.read1(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_BODY:
                raise http.client.HTTPException(f"body larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        if want is not None and want.isdigit() and int(want) != total:
            raise http.client.IncompleteRead(b"".join(chunks), int(want) - total)
        return _Response(resp.status, headers, b"".join(chunks))
    finally:
        conn.close()


# --- files ----------------------------------------------------------------------------------

def _cache_owner(root: Path) -> tuple[int, int] | None:
    """(uid, gid) new cache files and directories get: the cache root's, when we are root
    and it belongs to someone else (``certctl`` run as root must not leave entries the
    daemon, User=certd, cannot replace or lock). None: leave ownership alone."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(root)
    except OSError:
        return None
    return None if (st.st_uid, st.st_gid) == (0, 0) else (st.st_uid, st.st_gid)


def _make_dirs(root: Path, directory: Path) -> None:
    """``mkdir -p directory`` (inside ``root``), giving each new level the root's owner."""
    owner = _cache_owner(root)
    missing = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            continue  # another process made it meanwhile
        if owner is not None:
            os.chown(d, *owner)


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None if it cannot be read (missing, or the cache unusable)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be cleaned is re-validated on every read anyway


# --- the client -----------------------------------------------------------------------------

@dataclass
class _Item:
    """One cacheable thing: where it lives, the URL on each source, how to validate it."""

    key: tuple
    what: str                         #: for messages: "VCEK for Milan 3ac3…/bl=2 …"
    path: Path
    url: Callable[[str], str]         #: base URL -> request URL
    validate: Callable[[bytes], bytes]  #: body -> bytes to cache; raises InvalidAnswer
    #: A valid cache entry that is not ``current`` is refetched but not deleted (a CRL past
    #: its refresh time is still better than none until it goes stale).
    current: Callable[[bytes], bool] = lambda data: True


@dataclass
class _Flight:
    """An in-flight fetch of one key. ``deadline`` None: until it succeeds, close(), or
    every waiter has gone (``cancel`` is then set: nobody wants that key any more, e.g. the
    daemon stopped waiting for the VCEK of a TCB the platform has left)."""

    future: concurrent.futures.Future
    deadline: float | None
    failures: list[SourceFailure] = field(default_factory=list)
    waiters: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class KdsClient:
    """VCEKs (for a platform's reported TCB), cert chains and CRLs; see the module doc.

    ``urls``: base URLs tried in order (``KdsConfig.urls``). ``trust``: the anchors that
    every answer must chain to (AMD's pinned store, or a development PKI's). ``log``: a
    structlog-style logger (``.info``/``.warning``). ``relay``: every request goes through
    this Unix socket (``kds.relay``; see :func:`http_get`). ``ssl_context``: the TLS context
    for https:// sources (default: the system's, fully verifying; tests pass a test CA's).
    """

    def __init__(self, urls: Sequence[str], cache_dir: str | os.PathLike[str], *,
                 trust: TrustStore, timeout_s: float = 10.0, min_backoff_s: float = 10.0,
                 max_backoff_s: float = 300.0, log: Any = None,
                 rng: Callable[[], float] = random.random,
                 relay: str | os.PathLike[str] | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.cache_dir = Path(cache_dir)
        self.trust = trust
        self.timeout_s = timeout_s
        self.relay = relay
        self.ssl_context = ssl_context
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max(max_backoff_s, min_backoff_s)
        self.log = log if log is not None else _log
        self._rng = rng
        self._mutex = threading.Lock()
        self._flights: dict[tuple, _Flight] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: product -> monotonic time before which a failed CRL fetch is not retried
        self._crl_quiet_until: dict[Product, float] = {}
        #: VCEK HTTP requests this client sent (for tests and `certctl kds --json`)
        self.requests = 0

    def close(self) -> None:
        """Stop every retry loop (in-flight fetches end with KdsUnavailable)."""
        self._stop.set()
        with self._mutex:
            for flight in self._flights.values():
                flight.cancel.set()

    def fetching(self) -> list[str]:
        """What is being fetched now (one entry per key in flight)."""
        with self._mutex:
            return [" ".join(map(str, key)) for key in self._flights]

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until no fetch thread runs (after close(), or once waiters have gone)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._mutex:
                threads = [t for t in self._threads if t.is_alive()]
                self._threads = threads
            if not threads:
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            threads[0].join(left)

    # -- what is asked for

    def _roots(self, product: Product):
        r = self.trust.roots(product)  # TrustError (a ValueError) if the store lacks it
        if r.ask is None:
            raise ValueError(f"the {self.trust.name} trust store has no ASK for {product.value}")
        return r

    def _vcek_item(self, product: Product, hwid: bytes, tcb: Tcb) -> _Item:
        hwid = kdsurl.hwid_for_url(product, hwid)
        kdsurl.vcek_url(product, hwid, tcb, base="http://x")  # refuses a TCB of the wrong shape
        roots = self._roots(product)
        # Validation asks for exactly the key requested: its hwID is compared even when the
        # platform masks its chip id in reports.
        asked = Platform(product=product, reported_tcb=tcb, chip_id=hwid)

        def validate(body: bytes) -> bytes:
            if faults.unsafe("kds-validate"):
                return body
            try:
                leaf = pki.load_certificate(body, "KDS answer")
                policy.build_blob(roots.ark, roots.ask, leaf, trust=self.trust, platform=asked)
            except (pki.PkiError, policy.PolicyError) as e:
                raise InvalidAnswer(str(e)) from None
            return leaf.der

        return _Item(("vcek", product, hwid, tcb),
                     f"VCEK for {product.value} chip {hwid.hex()[:16]} at TCB {tcb}",
                     vcek_cache_path(self.cache_dir, product, hwid, tcb),
                     lambda base: kdsurl.vcek_url(product, hwid, tcb, base=base), validate)

    def _crl_item(self, product: Product) -> _Item:
        def validate(body: bytes) -> bytes:
            try:
                crl = pki.load_crl(body, "KDS CRL")
            except pki.PkiError as e:
                raise InvalidAnswer(str(e)) from None
            problems = chainmod.crl_problems(crl, trust=self.trust, at=_now())
            if crl.product is not product:
                problems = [f"the CRL is from {crl.issuer_cn!r}, not ARK-{product.value}"] + problems
            if problems:
                raise InvalidAnswer("; ".join(str(p) for p in problems))
            return crl.der

        def current(der: bytes) -> bool:  # der passed validate()
            return _now() < self.refresh_at(x509.load_der_x509_crl(der))

        return _Item(("crl", product), f"{product.value} VCEK CRL",
                     self.cache_dir / "crl" / f"{product.value}.der",
                     lambda base: kdsurl.crl_url(product, base=base), validate, current)

    def _chain_item(self, product: Product) -> _Item:
        def validate(body: bytes) -> bytes:
            try:
                items = pki.load_bytes(body, "KDS cert_chain")
            except pki.PkiError as e:
                raise InvalidAnswer(str(e)) from None
            kinds = [getattr(i, "kind", None) for i in items]
            if kinds != [pki.Kind.ASK, pki.Kind.ARK]:
                raise InvalidAnswer(f"expected ASK then ARK, got {[getattr(k, 'value', 'CRL') for k in kinds]}")
            ask, ark = items
            if not (self.trust.is_pinned(product, "ASK", ask.cert)
                    and self.trust.is_pinned(product, "ARK", ark.cert)):
                raise InvalidAnswer(f"the chain is not the {self.trust.name} {product.value} ASK/ARK")
            return b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in items)

        return _Item(("cert_chain", product), f"{product.value} cert_chain",
                     self.cache_dir / "cert_chain" / f"{product.value}.pem",
                     lambda base: kdsurl.cert_chain_url(product, base=base), validate)

    # -- validation of a fetched body (public: the fuzzers call exactly what a fetch runs)

    def validate_vcek(self, body: bytes, product: Product, hwid: bytes, tcb: Tcb) -> bytes:
        """The DER to cache if ``body`` is the VCEK asked for; raises :class:`InvalidAnswer`
        (a bad body) or ValueError (a question of the wrong shape, as a fetch would)."""
        return self._vcek_item(product, hwid, tcb).validate(body)

    def validate_crl(self, body: bytes, product: Product) -> bytes:
        """The DER to cache if ``body`` is a valid CRL of ``product``'s ARK; raises
        :class:`InvalidAnswer`."""
        return self._crl_item(product).validate(body)

    def validate_chain(self, body: bytes, product: Product) -> bytes:
        """The PEM to cache if ``body`` is the pinned ASK then ARK of ``product``; raises
        :class:`InvalidAnswer`."""
        return self._chain_item(product).validate(body)

    # -- one round of sources, retries, the cross-process lock

    def _attempt(self, item: _Item, base: str) -> tuple[bytes | None, SourceFailure | None,
                                                         float | None]:
        """One request: (validated bytes, None, None) or (None, failure, Retry-After s)."""
        url = item.url(base)
        if item.key[0] == "vcek":
            with self._mutex:
                self.requests += 1
        try:
            r = http_get(url, self.timeout_s, relay=self.relay, context=self.ssl_context)
        except (OSError, http.client.HTTPException) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            return None, SourceFailure(url, "network", f"{type(e).__name__}: {why}"), None
        if r.status == 200:
            try:
                return item.validate(r.body), None, None
            except InvalidAnswer as e:
                return None, SourceFailure(url, "invalid", f"invalid answer ({len(r.body)} "
                                                          f"bytes): {e}"), None
        retry_after = None
        if r.status == 404:
            kind, why = "missing", "404: this source does not have it"
        elif r.status == 429 or r.status >= 500:
            kind = "throttled" if r.status == 429 else "server"
            retry_after = parse_retry_after(r.headers.get("retry-after"))
            why = f"HTTP {r.status}" + (f", Retry-After {retry_after:g} s"
                                         if retry_after is not None else "")
        else:
            kind, why = "http", f"HTTP {r.status}"
        return None, SourceFailure(url, kind, why), retry_after

    def _sleep(self, flight: _Flight, seconds: float) -> None:
        if flight.cancel.wait(max(0.0, seconds)):
            why = "the client was closed" if self._stop.is_set() else "nobody waits for it any more"
            raise KdsUnavailable("fetch", [SourceFailure("-", "closed", why)])

    def _fetch(self, item: _Item, flight: _Flight, *, rounds: int | None = None) -> bytes:
        """Ask the sources in order until one gives a valid answer, the deadline passes,
        every source was asked ``rounds`` times, or the fetch is cancelled. Each source
        waits on its own after a failure (Retry-After, else its backoff); the next attempt
        goes to the first source that is ready. Updates ``flight.failures`` as it goes."""
        if not self.urls:
            raise KdsUnavailable(item.what, [])
        ready = {u: 0.0 for u in self.urls}
        fails = {u: 0 for u in self.urls}
        last: dict[str, SourceFailure] = {}
        # A server answering "Retry-After: 0" again and again must not make a busy loop.
        floor = min(1.0, self.min_backoff_s)
        while True:
            for base in self.urls:
                if ready[base] > time.monotonic():
                    continue
                data, failure, retry_after = self._attempt(item, base)
                if data is not None:
                    self.log.info("kds fetched", what=item.what, url=item.url(base),
                                  bytes=len(data))
                    return data
                wait = max(floor, retry_after) if retry_after is not None else backoff_delay(
                    fails[base], self.min_backoff_s, self.max_backoff_s, self._rng())
                fails[base] += 1
                ready[base] = time.monotonic() + wait
                last[base] = failure
                flight.failures = [last[u] for u in self.urls if u in last]
                self.log.warning("kds fetch failed", what=item.what, url=failure.url,
                                 kind=failure.kind, reason=failure.reason,
                                 retry_in_s=round(wait, 3))
            wake = min(ready.values())
            if (rounds is not None and min(fails.values()) >= rounds) or (
                    flight.deadline is not None and wake >= flight.deadline):
                raise KdsUnavailable(item.what, flight.failures)
            self._sleep(flight, wake - time.monotonic())

    def _cached(self, item: _Item) -> bytes | None:
        """The cache entry if it still validates; a bad one is removed (and logged)."""
        data = _read(item.path)
        if data is None:
            return None
        try:
            valid = item.validate(data)
        except InvalidAnswer as e:
            self.log.warning("kds cache entry dropped", what=item.what, path=str(item.path),
                             reason=str(e))
            _remove(item.path)
            return None
        return valid if item.current(valid) else None

    def _store(self, item: _Item, data: bytes) -> None:
        """Cache a validated answer. A cache that cannot be written is logged, not fatal:
        the answer is still good."""
        try:
            _make_dirs(self.cache_dir, item.path.parent)
            write_atomic(item.path, data, owner=_cache_owner(self.cache_dir))
        except OSError as e:
            self.log.warning("kds cache write failed", what=item.what, path=str(item.path),
                             reason=e.strerror or str(e))

    def _open_lock(self, item: _Item) -> int | None:
        """The per-key lock file, opened (created with the cache's owner), or None if the
        cache directory is unusable (logged; then this process fetches unlocked)."""
        lock_path = item.path.with_name(f".{item.path.name}.lock")
        try:
            _make_dirs(self.cache_dir, lock_path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self.log.warning("kds cache lock unusable", what=item.what, path=str(lock_path),
                             reason=e.strerror or str(e))
            return None
        owner = _cache_owner(self.cache_dir)
        if owner is not None:
            try:
                os.fchown(fd, *owner)
            except OSError:
                pass  # only a convenience for the daemon; the lock works as it is
        return fd

    def _produce(self, item: _Item, flight: _Flight, rounds: int | None) -> bytes:
        """Cache, else (under the per-key OFD lock) cache again, else fetch and cache."""
        hit = self._cached(item)
        if hit is not None:
            return hit
        fd = None if faults.unsafe("kds-coalesce") else self._open_lock(item)
        try:
            delay = _LOCK_POLL_FIRST
            while fd is not None and not locks.try_lock(fd, exclusive=True):
                if flight.deadline is not None and time.monotonic() + delay >= flight.deadline:
                    raise KdsUnavailable(item.what, [SourceFailure(
                        item.path.name + ".lock", "busy", "another process is fetching this "
                        "key and did not finish before the deadline")])
                self._sleep(flight, delay)
                delay = min(delay * 2, _LOCK_POLL_CAP)
            if fd is not None:
                hit = self._cached(item)  # the process we waited for fetched it
                if hit is not None:
                    return hit
            data = self._fetch(item, flight, rounds=rounds)
            self._store(item, data)
            return data
        finally:
            if fd is not None:
                os.close(fd)  # closing the only descriptor drops the OFD lock

    # -- coalescing

    def _join(self, item: _Item, deadline: float | None, rounds: int | None) -> _Flight:
        """The in-flight fetch of ``item`` (joined), or a new one started in a thread."""
        with self._mutex:
            flight = None if faults.unsafe("kds-coalesce") else self._flights.get(item.key)
            if flight is not None:
                flight.waiters += 1
                return flight
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_running_or_notify_cancel()  # a waiter's cancel must not cancel the fetch
            flight = _Flight(fut, deadline, waiters=1)
            if self._stop.is_set():
                flight.cancel.set()
            if not faults.unsafe("kds-coalesce"):
                self._flights[item.key] = flight

        def run() -> None:
            try:
                result = self._produce(item, flight, rounds)
            except BaseException as e:  # delivered to every waiter
                self._land(item.key, flight)
                fut.set_exception(e)
            else:
                self._land(item.key, flight)
                fut.set_result(result)

        thread = threading.Thread(target=run, name=f"kds-{item.key[0]}", daemon=True)
        with self._mutex:
            self._threads.append(thread)
        thread.start()
        return flight

    def _land(self, key: tuple, flight: _Flight) -> None:
        with self._mutex:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _leave(self, key: tuple, flight: _Flight) -> None:
        """A waiter stopped waiting; the last one to go before the end abandons the fetch
        (a later request for the key starts afresh, reading what the cache has by then)."""
        with self._mutex:
            flight.waiters -= 1
            if flight.waiters > 0 or flight.future.done():
                return
            flight.cancel.set()
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _obtain_steps(self, item: _Item, deadline: float | None, rounds: int | None = None
                      ) -> Generator[tuple[concurrent.futures.Future, float | None], bool, bytes]:
        """Join or start the fetch, wait (the driver waits and sends True once done), and
        start again if the fetch we joined had an earlier deadline than ours."""
        while True:
            flight = self._join(item, deadline, rounds)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                done = yield flight.future, timeout
            finally:  # also when the waiter is cancelled (the generator is closed)
                self._leave(item.key, flight)
            if not done:
                raise KdsUnavailable(item.what, flight.failures or [SourceFailure(
                    "-", "busy", "deadline passed while another request fetched this key")])
            exc = flight.future.exception()
            if exc is None:
                return flight.future.result()
            if (isinstance(exc, KdsUnavailable) and rounds is None
                    and flight.deadline is not None
                    and (deadline is None or flight.deadline < deadline - 0.001)
                    and not self._stop.is_set()):
                continue
            raise exc

    def _obtain_sync(self, item: _Item, deadline: float | None, rounds: int | None = None) -> bytes:
        steps = self._obtain_steps(item, deadline, rounds)
        try:
            fut, timeout = next(steps)
            while True:
                done, _ = concurrent.futures.wait([fut], timeout)
                fut, timeout = steps.send(bool(done))
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()

    async def _obtain(self, item: _Item, deadline: float | None, rounds: int | None = None) -> bytes:
        steps = self._obtain_steps(item, deadline, rounds)
        try:
            fut, timeout = next(steps)
            while True:
                waiter = asyncio.wrap_future(fut)
                # the outcome is read from ``fut``; mark the wrapper's as read too
                waiter.add_done_callback(lambda w: w.cancelled() or w.exception())
                done, _ = await asyncio.wait([waiter], timeout=timeout)
                fut, timeout = steps.send(bool(done))
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()  # a cancelled waiter leaves the flight

    # -- CRLs

    @staticmethod
    def refresh_at(crl: x509.CertificateRevocationList) -> datetime:
        """When a CRL is fetched again: a quarter of its validity (at most a day) before
        nextUpdate."""
        this, nxt = crl.last_update_utc, crl.next_update_utc
        if nxt is None:
            return this
        return nxt - min(timedelta(days=1), (nxt - this) / 4)

    def _crl_step(self, product: Product, deadline: float | None) -> Generator:
        """The CRL to put in a blob now, or None: cached if fresh, refetched (one round)
        when past refresh_at or missing; a stale one is deleted, never served."""
        item = self._crl_item(product)
        data = _read(item.path)
        cached = None
        if data is not None:
            try:
                cached = pki.load_crl(data, str(item.path))
            except pki.PkiError:
                cached = None
            now = _now()
            if cached is None or chainmod.crl_problems(cached, trust=self.trust, at=now):
                self.log.info("kds CRL dropped", what=item.what, path=str(item.path),
                              reason="stale or invalid")
                _remove(item.path)
                cached = None
            elif now < self.refresh_at(cached.crl):
                return cached.der
        if time.monotonic() < self._crl_quiet_until.get(product, 0.0):
            return cached.der if cached else None
        round_deadline = time.monotonic() + self.timeout_s * max(1, len(self.urls)) + 1.0
        if deadline is not None:
            round_deadline = min(round_deadline, deadline)
        try:
            return (yield item, round_deadline)
        except KdsUnavailable as e:
            self._crl_quiet_until[product] = time.monotonic() + self.min_backoff_s
            self.log.warning("kds CRL not refreshed", what=item.what, error=str(e),
                             serving="cached" if cached else "none")
            # The cached file may have been replaced by another process meanwhile; still
            # only a fresh one is used.
            if cached is not None and not chainmod.crl_date_problems(cached, _now()):
                return cached.der
            return None

    def _drive_crl_sync(self, product: Product, deadline: float | None) -> bytes | None:
        gen = self._crl_step(product, deadline)
        try:
            item, d = next(gen)
        except StopIteration as s:
            return s.value
        try:
            got = self._obtain_sync(item, d, rounds=1)
        except KdsUnavailable as e:
            return _finish(gen, throw=e)
        return _finish(gen, send=got)

    def crl_sync(self, product: Product, *, deadline_s: float | None = None) -> bytes | None:
        """The fresh CRL DER for ``product`` (cache or one round of sources), or None."""
        return self._drive_crl_sync(product, None if deadline_s is None
                                    else time.monotonic() + deadline_s)

    def crl_refresh_at(self, product: Product) -> datetime | None:
        """When the cached CRL should be fetched again (None: no fresh CRL cached). The
        daemon calls :meth:`vcek_blob` again then so the served CRL never goes stale."""
        data = _read(self._crl_item(product).path)
        if data is None:
            return None
        try:
            return self.refresh_at(pki.load_crl(data, "cached CRL").crl)
        except pki.PkiError:
            return None

    # -- the API

    def _platform_item(self, platform: Platform) -> _Item:
        if platform.vlek:
            raise ValueError("the platform signs reports with a VLEK; KDS serves VLEKs only to "
                             "the CSP (use the drop directory)")
        if platform.chip_id is None:
            raise ValueError("the platform's chip id is unknown; a VCEK cannot be fetched "
                             "without it")
        return self._vcek_item(platform.product, platform.chip_id, platform.reported_tcb)

    def _blob(self, platform: Platform, vcek: bytes, crl: bytes | None) -> bytes:
        roots = self._roots(platform.product)
        if faults.unsafe("kds-validate"):
            return policy.build_blob(roots.ark, roots.ask, vcek, crl, trust=self.trust)
        return policy.build_blob(roots.ark, roots.ask, vcek, crl, trust=self.trust,
                                 platform=platform)

    def vcek_url(self, platform: Platform, base: str | None = None) -> str:
        """The VCEK URL on ``base`` (default: the first source)."""
        item = self._platform_item(platform)
        return item.url(base or (self.urls[0] if self.urls else kdsurl.DEFAULT_BASE))

    def cached_blob(self, platform: Platform) -> bytes | None:
        """The blob from the cache alone (no network): ARK, ASK, VCEK, CRL if fresh."""
        item = self._platform_item(platform)
        vcek = self._cached(item)
        if vcek is None:
            return None
        crl = None
        data = _read(self._crl_item(platform.product).path)
        if data is not None:
            try:
                c = pki.load_crl(data, "cached CRL")
                if not chainmod.crl_problems(c, trust=self.trust, at=_now()):
                    crl = c.der
            except pki.PkiError:
                pass
        try:
            return self._blob(platform, vcek, crl)
        except policy.PolicyError:
            return None

    async def vcek_blob(self, platform: Platform, *, deadline_s: float | None = None) -> bytes:
        """The validated blob for ``platform``'s reported TCB: cache, else the sources,
        retrying for ever (``deadline_s`` None) or until the deadline. Raises
        :class:`KdsUnavailable` (with every source's failure) or ValueError (a VLEK platform,
        no chip id, a product the trust store lacks)."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        item = self._platform_item(platform)
        vcek = await self._obtain(item, deadline)
        gen = self._crl_step(platform.product, deadline)
        try:
            crl_item, d = next(gen)
        except StopIteration as s:
            crl = s.value
        else:
            try:
                got = await self._obtain(crl_item, d, rounds=1)
            except KdsUnavailable as e:
                crl = _finish(gen, throw=e)
            else:
                crl = _finish(gen, send=got)
        return self._blob(platform, vcek, crl)

    def vcek_blob_sync(self, platform: Platform, *, deadline_s: float | None) -> bytes:
        """Blocking :meth:`vcek_blob` (certctl): give up after ``deadline_s`` seconds."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        item = self._platform_item(platform)
        vcek = self._obtain_sync(item, deadline)
        crl = self._drive_crl_sync(platform.product, deadline)
        return self._blob(platform, vcek, crl)

    def prefetch(self, product: Product, hwid: bytes, tcb: Tcb, *,
                 deadline_s: float | None = 60.0) -> Path:
        """Warm the cache with the VCEK for (product, hwid, TCB), e.g. for a TCB about to be
        installed. Returns the cache file. Raises KdsUnavailable."""
        item = self._vcek_item(product, hwid, tcb)
        self._obtain_sync(item, None if deadline_s is None else time.monotonic() + deadline_s)
        return item.path

    def cert_chain(self, product: Product, *, deadline_s: float | None = 60.0) -> bytes:
        """The KDS cert_chain (PEM ASK, ARK), checked to be the trust store's."""
        item = self._chain_item(product)
        return self._obtain_sync(item, None if deadline_s is None else time.monotonic() + deadline_s)

    def cached_vceks(self) -> list[tuple[Product, bytes, Path]]:
        """Every cached VCEK file as (product, hwid, path); not validated."""
        out = []
        for pdir in sorted((self.cache_dir / "vcek").glob("*")):
            try:
                product = Product.parse(pdir.name)
            except ValueError:
                continue
            for hdir in sorted(pdir.glob("*")):
                try:
                    hwid = bytes.fromhex(hdir.name)
                except ValueError:
                    continue
                out += [(product, hwid, f) for f in sorted(hdir.glob("*_vcek.der"))]
        return out


def _finish(gen: Generator, *, send: Any = None, throw: BaseException | None = None) -> Any:
    """Resume a one-step generator with a value or an exception; its return value."""
    try:
        if throw is not None:
            gen.throw(throw)
        else:
            gen.send(send)
    except StopIteration as s:
        return s.value
    raise RuntimeError("generator yielded twice")
