"""certd's Prometheus metrics (docs/metrics.md).

Two kinds. Events that leave no state behind (a request answered, a rotation, a KDS
request, a lock wait) are counted here by plain calls, always, whether or not a listener
is configured; each is a dict increment, so the request path pays well under a microsecond.
Everything else is read from the daemon's own state when scraped: leases, connections,
generations, profile states, expiry dates (:mod:`certd.service.health`).

Call the module-level functions (``metrics.rotation("kds", "ok")``); they are safe to call
from any code in the daemon process at any time.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, \
    HistogramMetricFamily, Metric

from certd import __version__
from certd.abi import wire
from certd.service import health, httpd

if TYPE_CHECKING:
    from certd.service.profiles import Profile
    from certd.service.server import CertServer

#: Request durations: a reply from memory takes tens of microseconds, a GET that waits for
#: an updater up to the request deadline (100 ms by default, 60 s at most).
REQUEST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
LOCK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

_REFUSALS = range(16, 32)  # wire.ErrorCode: 16-31 are refusals
_ERROR_NAMES = {int(c): c.name.lower() for c in wire.ErrorCode}


class Histogram:
    """Counts per bucket and a sum; cumulated only when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Events:
    """What happened since start, by label values."""

    def __init__(self) -> None:
        #: One histogram per (op, ret): a request costs one observe, and the request
        #: counter and the per-op duration histogram are both derived from these at scrape.
        self.answers: dict[tuple[str, str], Histogram] = {}
        self.refusals: dict[str, int] = {}
        self.rotations: dict[tuple[str, str], int] = {}
        self.kds_requests: dict[str, int] = {}
        self.kds_cache_hits = 0
        self.lock_waits: dict[str, Histogram] = {}

    def request(self, op: str, ret: str, seconds: float) -> None:
        """A request of type ``op`` (get, release, status) was answered with ``ret``,
        ``seconds`` after it was read."""
        self.recorder(op, ret)(seconds)

    def recorder(self, op: str, ret: str) -> Callable[[float], None]:
        """``request(op, ret, seconds)`` as a callable of ``seconds`` alone, for the hot
        path to look up once (it is the bound ``observe`` of that answer's histogram)."""
        h = self.answers.get((op, ret))
        if h is None:
            h = self.answers[(op, ret)] = Histogram(REQUEST_BUCKETS)
        return h.observe

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Requests answered, by (op, ret)."""
        return {key: sum(h.counts) for key, h in self.answers.items()}

    @property
    def durations(self) -> dict[str, Histogram]:
        """Request durations by op, whatever the answer."""
        out: dict[str, Histogram] = {}
        for (op, _), h in self.answers.items():
            m = out.get(op)
            if m is None:
                m = out[op] = Histogram(REQUEST_BUCKETS)
            m.counts = [a + b for a, b in zip(m.counts, h.counts)]
            m.sum += h.sum
        return out

    def error(self, code: int, op: str | None = None, seconds: float = 0.0) -> None:
        """An ERROR frame with ``code`` was sent: a refusal if the code is one, and the
        answer to an ``op`` request if it answered one."""
        name = _ERROR_NAMES.get(code) or str(code)
        if code in _REFUSALS:
            self.refusal(name)
        if op is not None:
            self.request(op, name, seconds)

    def refusal(self, why: str) -> None:
        self.refusals[why] = self.refusals.get(why, 0) + 1

    def rotation(self, source: str, result: str) -> None:
        """A rotation from ``source`` ended with ``result``."""
        key = (source, result)
        self.rotations[key] = self.rotations.get(key, 0) + 1

    def blob_changed(self, profile: "Profile", first: bool) -> None:
        """What ``profile`` serves changed (its ``on_change``): a rotation noticed on the
        file, unless this was the first look at it (``first``: start, or a profile a
        reload added)."""
        if not first:
            self.rotation("file", health.state(profile))

    def kds_request(self, status: str) -> None:
        """A KDS (or mirror) request ended: an HTTP status code, or e.g. "timeout"."""
        self.kds_requests[status] = self.kds_requests.get(status, 0) + 1

    def kds_cache_hit(self) -> None:
        self.kds_cache_hits += 1

    def lock_wait(self, who: str, seconds: float) -> None:
        """``who`` waited ``seconds`` for a blob lock (whether it got it or gave up)."""
        h = self.lock_waits.get(who)
        if h is None:
            h = self.lock_waits[who] = Histogram(LOCK_BUCKETS)
        h.observe(seconds)


#: The daemon's events; the functions below record into it.
EVENTS = Events()
request = EVENTS.request
recorder = EVENTS.recorder
error = EVENTS.error
refusal = EVENTS.refusal
rotation = EVENTS.rotation
blob_changed = EVENTS.blob_changed
kds_request = EVENTS.kds_request
kds_cache_hit = EVENTS.kds_cache_hit
lock_wait = EVENTS.lock_wait


def _histogram(name: str, doc: str, label: str, hists: dict[str, Histogram]) -> Metric:
    m = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in sorted(hists.items()):
        m.add_metric([value], h.buckets(), h.sum)
    return m


def _counter(name: str, doc: str, labels: list[str], counts: dict) -> Metric:
    m = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(counts.items()):
        m.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return m


class Collector:
    """Yields every certd metric at scrape time, from ``events`` and ``server``'s state."""

    def __init__(self, server: "CertServer", events: Events = EVENTS):
        self.server = server
        self.events = events

    def collect(self) -> Iterator[Metric]:
        srv, ev = self.server, self.events
        info = GaugeMetricFamily("certd_build_info", "certd's version (always 1)",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _counter("certd_requests", "requests answered, by type and answer",
                       ["op", "ret"], ev.requests)
        yield _histogram("certd_request_duration_seconds",
                         "time from reading a request to writing its answer", "op",
                         ev.durations)
        yield _counter("certd_refusals", "ERROR answers that refused a request or a "
                       "connection, by error code", ["why"], ev.refusals)
        yield GaugeMetricFamily("certd_leases_live", "leases not yet released",
                                value=len(srv.leases.live))
        yield CounterMetricFamily("certd_leases_expired", "leases ended by the lease "
                                  "timeout, not by RELEASE or close",
                                  value=srv.leases.expired)
        yield CounterMetricFamily("certd_leases_cut_short", "of those, leases of a hoarder "
                                  "ended after server.hoarder_grace_ms because an update "
                                  "or a drain waited for readers", value=srv.leases.cut_short)
        yield GaugeMetricFamily("certd_connections", "open client connections",
                                value=len(srv.connections))
        yield CounterMetricFamily("certd_protocol_errors", "malformed frames received",
                                  value=srv.counters.protocol_errors)
        yield _histogram("certd_lock_wait_seconds", "time spent waiting for a blob lock, "
                         "by waiter", "who", ev.lock_waits)
        yield _counter("certd_rotations", "blob changes, by source and the resulting state",
                       ["source", "result"], ev.rotations)
        yield _counter("certd_kds_requests", "KDS requests, by HTTP status or failure",
                       ["status"], ev.kds_requests)
        yield CounterMetricFamily("certd_kds_cache_hits", "KDS answers taken from the cache",
                                  value=ev.kds_cache_hits)
        gen = GaugeMetricFamily("certd_blob_generation", "generation of what each profile "
                                "serves (grows at every change)", labels=["profile"])
        st = GaugeMetricFamily("certd_profile_state", "1 for the state each profile is in",
                               labels=["profile", "state"])
        leaf = GaugeMetricFamily("certd_leaf_not_after_timestamp_seconds",
                                 "notAfter of the served VCEK/VLEK", labels=["profile"])
        crl = GaugeMetricFamily("certd_crl_next_update_timestamp_seconds",
                                "nextUpdate of the served CRL", labels=["profile"])
        for p in srv.profiles:
            gen.add_metric([p.name], p.generation)
            now = health.state(p)
            for s in health.STATES:
                st.add_metric([p.name, s], 1 if s == now else 0)
            d = health.dates(p)
            if d.leaf_not_after is not None:
                leaf.add_metric([p.name], d.leaf_not_after.timestamp())
            if d.crl_next_update is not None:
                crl.add_metric([p.name], d.crl_next_update.timestamp())
        yield from (gen, st, leaf, crl)


def registry(server: "CertServer") -> CollectorRegistry:
    """A registry with certd's metrics and the process's (CPU, memory, descriptors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(server))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition format (``prometheus_client.CONTENT_TYPE_LATEST``)."""
    return generate_latest(reg)


def routes(server: "CertServer", listening: Callable[[], bool]) -> dict[str, httpd.Handler]:
    """/metrics, /healthz (the loop answers) and /readyz (``health.not_ready``)."""
    reg = registry(server)

    def ready() -> tuple[int, str, bytes]:
        why = health.not_ready(server.profiles, listening=listening(),
                               accepting=server.accepting)
        return httpd.json_body(503 if why else 200, {"ready": not why, "why": why})

    return {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, render(reg)),
            "/healthz": lambda: httpd.json_body(200, {"live": True}),
            "/readyz": ready}
