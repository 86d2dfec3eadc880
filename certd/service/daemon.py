"""The certd daemon's life: start, serve, reload on SIGHUP, drain and stop on SIGTERM.

Everything long-lived is built here from the configuration; the request path itself is
in :mod:`certd.service.server`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine

import structlog

from certd import __version__, config as configmod, exitcodes, faults, platform as platformmod
from certd.abi import table
from certd.amd.roots import TrustStore
from certd.platform import Platform, PlatformSource
from certd.service import access, httpd, metrics, rotation, sdnotify, unixsock
from certd.service.watcher import BlobWatcher
from certd.service.profiles import HoldPolicy, Judge, Profile, ProfileSet
from certd.service.server import CertServer, Limits
from certd.sources.dropdir import DropDir
from certd.store import blobstore

log = structlog.get_logger("certd.daemon")

#: New connections accepted and set up per loop turn (see Daemon.run).
ACCEPTS_PER_TURN = 8


#: certd cannot start; the message says why and what to do, ``code`` the exit code.
StartupError = rotation.SetupError


@dataclass
class Context:
    """What the daemon is given beyond the configuration (dev mode and tests set these)."""

    trust: TrustStore | None = None  # None: AMD's pinned roots
    platform: Platform | None = None  # None: from [platform] in the configuration
    #: Printed once the socket is ready (dev mode prints its paths and commands here).
    on_ready: Callable[[], None] | None = None


def _log_profile(profile: Profile) -> None:
    """A profile's ``on_change``: it runs on the request path (the decision that changed
    what is served is answering a GET), so the log line and the metric are written a
    loop turn later, after the answers."""
    first = not profile.decided  # now: the profile marks itself decided after this call
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _report_profile(profile, first)
        return
    loop.call_soon(_report_profile, profile, first)


def _report_profile(profile: Profile, first: bool) -> None:
    """Log what ``profile`` serves now (a turn after the change: the latest state)."""
    metrics.blob_changed(profile, first)
    if profile.problems:
        log.error("blob not served", profile=profile.name, blob=profile.blob_path,
                  why="; ".join(map(str, profile.problems)),
                  serving="the empty table until a valid blob is installed")
    elif profile.served == table.EMPTY_TABLE:
        log.warning("no blob: serving the empty table", profile=profile.name,
                    blob=profile.blob_path)
    else:
        log.info("serving blob", profile=profile.name, blob=profile.blob_path,
                 generation=profile.generation, size=len(profile.served),
                 npages=table.npages(len(profile.served)))


def build_profiles(cfg: configmod.Config, judge: Judge, old: ProfileSet | None = None
                   ) -> ProfileSet:
    """The profiles of ``cfg``, judged by ``judge``. Profiles of ``old`` with the same blob
    path are kept (their holds and generation carry on); the others are closed."""
    reuse = {p.blob_path: p for p in old} if old else {}
    holds = hold_policy_of(cfg)

    def make(name: str, path: Path, patterns: tuple[str, ...]) -> Profile:
        p = reuse.pop(str(path), None)
        if p is None:
            p = Profile(name, str(path), judge, on_change=_log_profile)
        p.name, p.patterns, p.holds = name, patterns, holds
        p.use(judge)
        return p

    default = make("default", cfg.store.blob, ())
    profiles = ProfileSet(default, tuple(make(p.name, p.blob, p.vms) for p in cfg.profiles))
    for dropped in reuse.values():
        dropped.close()
    return profiles


def hold_policy_of(cfg: configmod.Config) -> HoldPolicy:
    s = cfg.server
    return HoldPolicy(max_age=s.hold_max_age_ms / 1000, gap=s.hold_gap_ms / 1000)


def limits_of(cfg: configmod.Config) -> Limits:
    s = cfg.server
    return Limits(request_deadline=s.request_deadline_ms / 1000,
                  lease_timeout=s.lease_timeout_ms / 1000, idle_timeout=s.idle_timeout_s,
                  max_frame=s.max_frame,
                  max_leases_per_connection=s.max_leases_per_connection,
                  max_connections=s.max_connections,
                  max_connections_per_pid=s.max_connections_per_pid,
                  max_leases_per_vm=s.max_leases_per_vm, frame_timeout=s.frame_timeout_s,
                  hoarder_grace=s.hoarder_grace_ms / 1000)


def allow_of(cfg: configmod.Config) -> access.AllowList:
    a = cfg.access
    return access.AllowList(frozenset(a.allow_uids) | frozenset(a.user_uids),
                            frozenset(a.allow_gids) | frozenset(a.group_gids))


def bind_socket(cfg: configmod.Config) -> socket.socket:
    """Bind the configured path, refusing to steal it from a live certd."""
    try:
        return unixsock.bind(str(cfg.server.socket), cfg.server.socket_mode,
                             cfg.server.socket_gid)
    except unixsock.BindError as e:
        raise StartupError(str(e), e.code) from None


class Daemon:
    def __init__(self, cfg: configmod.Config, config_path: str | None, ctx: Context):
        self.cfg = cfg
        self.config_path = config_path
        self.ctx = ctx
        self.setup = rotation.Setup.from_config(cfg, trust=ctx.trust,
                                                platform=self._platform_source(cfg))
        self.trust, self.platform, self.judge = self.setup.trust, self.setup.platform, \
            self.setup.judge
        self.profiles = build_profiles(cfg, self.judge)
        self.rotator = rotation.Rotator(self.profiles.default, self.setup, metrics.rotation)
        self.dropdir: DropDir | None = None
        self._blobs_changed: set[str | None] = set()  # for _report_blobs_changed
        lim = limits_of(cfg)
        self.server = CertServer(self.profiles, lim, allow_of(cfg),
                                 access.RateLimiter(cfg.server.rate_per_vm, cfg.server.rate_burst))
        self.notifier = sdnotify.Notifier.from_environ()
        self.stop_event = asyncio.Event()
        self.activated = False
        #: (path, (st_dev, st_ino)) of the socket certd bound itself: removed at exit.
        self.own_socket: tuple[str, tuple[int, int]] | None = None

    def _platform_source(self, cfg: configmod.Config,
                         old: PlatformSource | None = None) -> PlatformSource:
        if self.ctx.platform is not None:
            return old or PlatformSource("fixed", fixed=self.ctx.platform)
        new = rotation.platform_source(cfg)
        if old is not None and (old.kind, old.path) == (new.kind, new.path):
            old.observe(force=True)
            return old
        return new

    def listener(self) -> socket.socket:
        sock = sdnotify.unix_listener(sdnotify.listen_fds())
        if sock is not None:
            self.activated = True
            return sock
        sock = bind_socket(self.cfg)
        st = os.stat(sock.getsockname())
        self.own_socket = (sock.getsockname(), (st.st_dev, st.st_ino))
        return sock

    def status_line(self) -> str:
        d = self.profiles.default
        state = (f"serving generation {d.generation} ({len(d.served)} bytes)"
                 if d.served != table.EMPTY_TABLE else "serving the empty table")
        return f"{state}; {len(self.server.leases.live)} leases"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.server.event_loop = type(loop).__module__.partition(".")[0]  # asyncio or uvloop
        if faults.active():
            log.warning("test-only switches are set: this daemon is NOT safe to serve guests",
                        switches=faults.active())
        for p in self.profiles:
            self._ensure_blob(p)
            if p.look() == "empty":
                _log_profile(p)
        sock = self.listener()
        # asyncio uses ``backlog`` twice: for listen(2) and as the number of connections
        # it accepts (and sets up) in one loop turn. A connect flood then makes turns of
        # 100 set-ups, 5 ms and more with every VM waiting: accept a few per turn, and
        # give the kernel queue its full size back (asyncio set it to the small number;
        # systemd's socket unit had it at SOMAXCONN).
        srv = await loop.create_unix_server(self.server.protocol, sock=sock,
                                            backlog=ACCEPTS_PER_TURN)
        sock.listen(socket.SOMAXCONN)
        self.http = httpd.HttpServer(metrics.routes(self.server, srv.is_serving))
        try:
            await self.http.start(self.cfg.metrics.address, self.cfg.metrics.socket_mode)
        except unixsock.BindError as e:
            raise StartupError(f"[metrics] listen: {e}", e.code) from None
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        watchdog = sdnotify.start_watchdog(self.notifier)
        self.watch()
        self.watch_drop_dir()
        poller = loop.create_task(self._poll_platform())
        self.rotator.check("start")
        plat = self.platform.current
        log.info("certd ready", version=__version__, socket=sock.getsockname(),
                 event_loop=self.server.event_loop,
                 activated=self.activated, config=self.config_path,
                 platform=self.platform.describe(),
                 product=None if plat is None else plat.product.value,
                 trust=repr(self.trust))
        if plat is None:
            log.error("platform identity unreadable: serving the empty table",
                      error=self.platform.error)
        # What exists now (modules, config, trust roots, the judged blob: ~35,000 objects)
        # lives as long as the daemon: leave it out of the cyclic collector, whose full
        # collections otherwise scan it all, 15-40 ms measured with the loop serving
        # nobody (the good VM's p99 under load). Refcounting still frees what of it dies.
        gc.freeze()
        self.notifier.ready(self.status_line())
        if self.ctx.on_ready:
            self.ctx.on_ready()
        try:
            await self.stop_event.wait()
        finally:
            poller.cancel()
            await self.shutdown(srv, watchdog)
        return 0

    def _ensure_blob(self, p: Profile) -> None:
        """A stock QEMU fails the guest's request when the blob file is missing: before
        READY, a missing blob becomes the empty table (never wrong, sometimes empty)."""
        try:
            if p.store.ensure_exists():
                log.info("no blob at start: wrote the empty table", profile=p.name,
                         blob=p.blob_path, mode=oct(blobstore.DEFAULT_MODE))
        except (blobstore.StoreError, OSError) as e:
            log.error("cannot write the empty table where the blob belongs", profile=p.name,
                      blob=p.blob_path, error=str(e),
                      consequence="a VMM reading the file face fails its guests' requests")

    async def _poll_platform(self) -> None:
        """Look at the platform every platform.poll_s seconds (also on inotify, SIGHUP and
        at every new hold): a change makes every profile decide again."""
        while True:
            await asyncio.sleep(self.cfg.platform.poll_s)
            self.platform_changed("poll")
            self.rotator.check("poll")

    def platform_changed(self, why: str, force: bool = False) -> None:
        if self.platform.observe(force):
            plat = self.platform.current
            log.warning("platform identity changed", why=why,
                        reported_tcb=None if plat is None else str(plat.reported_tcb),
                        signing_key=None if plat is None else plat.signing_key,
                        error=self.platform.error)
            self.blob_changed(None)

    def watch_drop_dir(self) -> None:
        """``[watch] drop_dir``: VLEKs/VCEKs dropped there are judged and rotated in."""
        path = self.cfg.watch.drop_dir
        if self.dropdir is not None:
            if path is not None and os.path.abspath(path) == self.dropdir.path:
                return
            self.dropdir.close()
            self.dropdir = None
        if path is None:
            return

        def platform() -> Platform | None:
            self.platform.observe()
            return self.platform.current

        async def accept(blob: bytes, name: str) -> str | None:
            return await self.rotator.install(blob, "drop_dir")

        self.dropdir = DropDir(path, trust=self.trust, platform=platform, accept=accept,
                               loop=asyncio.get_running_loop())
        log.info("watching the drop directory", drop_dir=str(path))

    def watch(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.close()
        paths = [p.blob_path for p in self.profiles]
        if self.platform.kind == "file":
            paths.append(self.platform.path)
        self.watcher = BlobWatcher(paths, self.file_changed)

    def file_changed(self, path: str | None) -> None:
        # A blob replaced (certctl fw-update, install, a hook) is a request to look at the
        # platform too: /dev/sev has no inotify, and an update is when it changes.
        why = ("platform file changed" if path == self.platform.path else
               "inotify overflow" if path is None else "blob replaced")
        self.platform_changed(why)
        # The rest logs, rotates and reports: a loop turn later, after the waiting GETs
        # that the same events woke (an updater's release) have been answered.
        if not self._blobs_changed:  # one report for the events of this turn
            asyncio.get_running_loop().call_later(0, self._report_blobs_changed)
        self._blobs_changed.add(None if path == self.platform.path else path)

    def _report_blobs_changed(self) -> None:
        paths, self._blobs_changed = self._blobs_changed, set()
        for path in (None,) if None in paths else sorted(paths):
            self.blob_changed(path)

    def blob_changed(self, path: str | None, tries: int = 20) -> None:
        """A blob was replaced (or the platform changed): decide now (logged by the
        profile), retrying while the updater still holds the lock on the new file."""
        busy = False
        for p in self.profiles:
            if path is None or p.blob_path == path:
                busy |= p.look() == "busy"
        if busy:
            if tries:
                asyncio.get_running_loop().call_later(0.05, self.blob_changed, path, tries - 1)
            return
        self.rotator.check("blob or platform changed")
        self.notifier.status(self.status_line())

    def reload(self) -> None:
        self.notifier.reloading("reloading configuration")
        if self.config_path is None:
            log.warning("reload: no configuration file (built-in configuration); nothing to do")
            self.notifier.ready(self.status_line())
            return
        try:
            cfg = configmod.load(self.config_path)
        except configmod.ConfigError as e:
            log.error("reload refused: the old configuration stays in force", error=str(e))
            self.notifier.ready("reload refused; old configuration in force")
            return
        if cfg.server.socket != self.cfg.server.socket and not self.activated:
            log.warning("server.socket changed: takes effect at the next restart")
        if cfg.metrics != self.cfg.metrics:
            log.warning("[metrics] changed: takes effect at the next restart")
        if cfg.server.event_loop != self.cfg.server.event_loop:
            log.warning("server.event_loop changed: takes effect at the next restart")
        try:
            platform = self._platform_source(cfg, self.platform)
        except (StartupError, platformmod.PlatformError, OSError) as e:
            log.error("reload refused: platform source unusable", error=str(e))
            self.notifier.ready("reload refused; old configuration in force")
            return
        try:
            setup = rotation.Setup.from_config(cfg, trust=self.ctx.trust, platform=platform)
        except rotation.SetupError as e:
            log.error("reload refused", error=str(e))
            self.notifier.ready("reload refused; old configuration in force")
            return
        self.cfg, self.setup = cfg, setup
        self.trust, self.platform, self.judge = setup.trust, setup.platform, setup.judge
        self.profiles = build_profiles(cfg, self.judge, self.profiles)
        self.rotator.close()
        self.rotator = rotation.Rotator(self.profiles.default, setup, metrics.rotation)
        for p in self.profiles:
            self._ensure_blob(p)
        srv = self.server
        srv.profiles, srv.allow = self.profiles, allow_of(cfg)
        srv.limits = limits_of(cfg)
        srv.leases.timeout = srv.limits.lease_timeout
        srv.rate = access.RateLimiter(cfg.server.rate_per_vm, cfg.server.rate_burst)
        self.watch()
        self.watch_drop_dir()
        # Look at every blob now (a profile just added is decided) and let the rotator
        # check what the new configuration serves.
        self.blob_changed(None)
        log.info("configuration reloaded", config=self.config_path)
        self.notifier.ready("reloaded; " + self.status_line())

    async def shutdown(self, srv: asyncio.AbstractServer, watchdog) -> None:
        self.notifier.stopping("draining leases")
        self.server.accepting = False
        srv.close()
        if self.own_socket is not None:  # an activated socket belongs to systemd: kept
            unixsock.unlink_if_ours(*self.own_socket)
        leases = self.server.leases
        deadline = time.monotonic() + self.server.limits.lease_timeout
        if leases.live:
            log.info("draining leases", live=len(leases.live),
                     within_s=self.server.limits.lease_timeout)
        while leases.live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.server.close_all()
        self.server.leases.close()
        if watchdog is not None:
            watchdog.cancel()
        self.watcher.close()
        if self.dropdir is not None:
            await self.dropdir.aclose()
        self.rotator.close()
        self.profiles.close()
        await self.http.close()
        log.info("certd stopped", leases_left=len(leases.live))
        self.notifier.close()


def event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """``server.event_loop``: the function that runs the daemon's coroutine on its loop.

    uvloop cuts the CPU per GET+RELEASE by about a fifth (benchmarks/bench_server.py);
    it is optional, and "auto" falls back to asyncio's own loop without it."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise StartupError('server.event_loop is "uvloop" but uvloop is not installed '
                                   "(pip install 'certd[fast]'), or set it to \"auto\"",
                                   exitcodes.CONFIG) from None
        else:
            return uvloop.run
    return asyncio.run


def run(cfg: configmod.Config, config_path: str | None, ctx: Context | None = None) -> int:
    """Run the daemon until SIGTERM; returns the exit code."""
    async def main() -> int:
        return await Daemon(cfg, config_path, ctx or Context()).run()
    try:
        return event_loop_runner(cfg.server.event_loop)(main())
    except StartupError as e:
        log.error("certd cannot start", error=str(e))
        return e.code
    except (platformmod.PlatformError, OSError) as e:
        log.error("certd cannot start: platform identity unreadable", error=str(e))
        return exitcodes.UNAVAILABLE
