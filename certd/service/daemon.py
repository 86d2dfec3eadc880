"""The certd daemon's life: start, serve, reload on SIGHUP, drain and stop on SIGTERM.

Everything long-lived is built here from the configuration; the request path itself is
in :mod:`certd.service.server`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import structlog

from certd import __version__, config as configmod, platform as platformmod, policy
from certd.abi import table
from certd.amd import roots
from certd import exitcodes
from certd.amd.roots import TrustStore
from certd.platform import Platform
from certd.service import access, httpd, metrics, sdnotify, unixsock
from certd.service.watcher import BlobWatcher
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer, Limits
from certd.verify.problems import Problem

log = structlog.get_logger("certd.daemon")


class StartupError(Exception):
    """certd cannot start; the message says why and what to do. ``code`` is the exit code:
    CONFIG (78) where restarting cannot help, UNAVAILABLE (69) where it may."""

    def __init__(self, message: str, code: int = exitcodes.CONFIG):
        super().__init__(message)
        self.code = code


@dataclass
class Context:
    """What the daemon is given beyond the configuration (dev mode and tests set these)."""

    trust: TrustStore | None = None  # None: AMD's pinned roots
    platform: Platform | None = None  # None: from [platform] in the configuration
    #: Printed once the socket is ready (dev mode prints its paths and commands here).
    on_ready: Callable[[], None] | None = None


def load_platform(cfg: configmod.Config) -> Platform | None:
    src, path = cfg.platform.source, cfg.platform.file
    if src == "file" or (src == "auto" and path is not None):
        if path is None:
            raise StartupError("[platform] source = \"file\" needs platform.file")
        return platformmod.load(path)
    if src == "sev" or (src == "auto" and os.path.exists("/dev/sev")):
        return platformmod.read_dev_sev()
    return None


def make_validator(trust: TrustStore, platform: Platform | None,
                   ) -> Callable[[bytes], Sequence[Problem]]:
    def validate(blob: bytes) -> list[Problem]:
        p = platform
        if p is not None:
            # A profile may serve a VLEK blob while the host's default is VCEK (or the
            # reverse): compare against the platform with the leaf's own key type.
            try:
                vlek = table.decode(blob).get(table.Role.VLEK) is not None
            except table.TableError:
                vlek = p.vlek
            if vlek != p.vlek:
                p = p.replace(signing_key="vlek" if vlek else "vcek")
        return policy.check_blob(blob, trust=trust, platform=p)
    return validate


def _log_profile(profile: Profile) -> None:
    metrics.blob_changed(profile)
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


def build_profiles(cfg: configmod.Config, validate, old: ProfileSet | None = None) -> ProfileSet:
    reuse = {p.blob_path: p for p in old} if old else {}

    def make(name: str, path: Path, patterns: tuple[str, ...]) -> Profile:
        p = reuse.get(str(path))
        if p is None:
            p = Profile(name, str(path), on_change=_log_profile)
        p.name, p.patterns = name, patterns
        p.use_validator(validate)
        return p

    default = make("default", cfg.store.blob, ())
    return ProfileSet(default, tuple(make(p.name, p.blob, p.vms) for p in cfg.profiles))


def limits_of(cfg: configmod.Config) -> Limits:
    s = cfg.server
    return Limits(request_deadline=s.request_deadline_ms / 1000,
                  lease_timeout=s.lease_timeout_ms / 1000, idle_timeout=s.idle_timeout_s,
                  max_frame=s.max_frame,
                  max_leases_per_connection=s.max_leases_per_connection,
                  max_connections=s.max_connections)


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
        self.trust = ctx.trust or roots.pinned()
        self.platform = ctx.platform if ctx.platform is not None else load_platform(cfg)
        self.validate = make_validator(self.trust, self.platform)
        self.profiles = build_profiles(cfg, self.validate)
        lim = limits_of(cfg)
        self.server = CertServer(self.profiles, lim, allow_of(cfg),
                                 access.RateLimiter(cfg.server.rate_per_vm, cfg.server.rate_burst))
        self.notifier = sdnotify.Notifier.from_environ()
        self.stop_event = asyncio.Event()
        self.activated = False

    def listener(self) -> socket.socket:
        sock = sdnotify.unix_listener(sdnotify.listen_fds())
        if sock is not None:
            self.activated = True
            return sock
        return bind_socket(self.cfg)

    def status_line(self) -> str:
        d = self.profiles.default
        state = (f"serving generation {d.generation} ({len(d.served)} bytes)"
                 if d.served != table.EMPTY_TABLE else "serving the empty table")
        return f"{state}; {len(self.server.leases.live)} leases"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for p in self.profiles:
            p.refresh()
            if p.served == table.EMPTY_TABLE and not p.problems:
                _log_profile(p)
        sock = self.listener()
        srv = await loop.create_unix_server(self.server.protocol, sock=sock)
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
        log.info("certd ready", version=__version__, socket=sock.getsockname(),
                 activated=self.activated, config=self.config_path,
                 platform=None if self.platform is None else self.platform.product.value,
                 trust=repr(self.trust))
        if self.platform is None:
            log.warning("no platform identity: TCB and chip id checks are skipped",
                        fix="set [platform] file, or run on a host with /dev/sev")
        self.notifier.ready(self.status_line())
        if self.ctx.on_ready:
            self.ctx.on_ready()
        try:
            await self.stop_event.wait()
        finally:
            await self.shutdown(srv, watchdog)
        return 0

    def watch(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.close()
        self.watcher = BlobWatcher([p.blob_path for p in self.profiles], self.blob_changed)

    def blob_changed(self, path: str | None, tries: int = 20) -> None:
        """A blob was replaced: read and validate it now (logged by the profile), retrying
        while the updater still holds the lock on the new file."""
        busy = False
        for p in self.profiles:
            if path is None or p.blob_path == path:
                busy |= p.refresh() is False
        if busy and tries:
            asyncio.get_running_loop().call_later(0.05, self.blob_changed, path, tries - 1)
        elif not busy:
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
        try:
            platform = self.ctx.platform if self.ctx.platform is not None else load_platform(cfg)
        except (StartupError, platformmod.PlatformError, OSError) as e:
            log.error("reload refused: platform unreadable", error=str(e))
            self.notifier.ready("reload refused; old configuration in force")
            return
        self.cfg, self.platform = cfg, platform
        self.validate = make_validator(self.trust, platform)
        self.profiles = build_profiles(cfg, self.validate, self.profiles)
        srv = self.server
        srv.profiles, srv.allow = self.profiles, allow_of(cfg)
        srv.limits = limits_of(cfg)
        srv.leases.timeout = srv.limits.lease_timeout
        srv.rate = access.RateLimiter(cfg.server.rate_per_vm, cfg.server.rate_burst)
        self.watch()
        self.blob_changed(None)  # look at every blob now: a profile just added is decided
        log.info("configuration reloaded", config=self.config_path)
        self.notifier.ready("reloaded; " + self.status_line())

    async def shutdown(self, srv: asyncio.AbstractServer, watchdog) -> None:
        self.notifier.stopping("draining leases")
        self.server.accepting = False
        srv.close()
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
        self.profiles.close()
        await self.http.close()
        log.info("certd stopped", leases_left=len(leases.live))
        self.notifier.close()


def run(cfg: configmod.Config, config_path: str | None, ctx: Context | None = None) -> int:
    """Run the daemon until SIGTERM; returns the exit code."""
    async def main() -> int:
        return await Daemon(cfg, config_path, ctx or Context()).run()
    try:
        return asyncio.run(main())
    except StartupError as e:
        log.error("certd cannot start", error=str(e))
        return e.code
    except (platformmod.PlatformError, OSError) as e:
        log.error("certd cannot start: platform identity unreadable", error=str(e))
        return exitcodes.UNAVAILABLE
