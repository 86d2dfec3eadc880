"""Where a rotation happens: keeping the blob in step with the key the firmware signs with.

Two writers install blobs, and both go through :meth:`certd.store.blobstore.BlobStore.update`
(exclusive lock, judge, crash-safe replace):

* ``certctl fw-update`` (:mod:`certd.cli.cmd_fwupdate`) runs a firmware-update command
  under the exclusive lock and installs the blob for the new reported TCB (or the empty
  table) before releasing;
* the daemon's :class:`Rotator`, whenever the default profile does not serve a valid blob
  (after a firmware update that could not get its certificate in time, a TCB change made
  by hand, a VLEK dropped in, a start with no blob): it obtains the right certificate
  (the KDS cache, KDS itself with back-off for as long as it takes, the drop directory)
  and installs it.

:class:`Setup` is the one place that turns a configuration into the platform source, the
trust anchors, the judge and the KDS client, for the daemon and for certctl alike.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from certd import config as configmod, exitcodes
from certd.abi.tcb import Tcb
from certd.amd import roots
from certd.amd.roots import TrustStore
from certd.platform import Platform, PlatformSource
from certd.service.profiles import Judge, Profile
from certd.store import blobstore, locks
from certd.verify import trustfile

log = structlog.get_logger("certd.rotation")

SEV_DEVICE = "/dev/sev"


class SetupError(Exception):
    """The configuration cannot be put to work; ``code`` is the exit code: CONFIG (78)
    where restarting cannot help, UNAVAILABLE (69) where it may."""

    def __init__(self, message: str, code: int = exitcodes.CONFIG):
        super().__init__(message)
        self.code = code


def platform_source(cfg: configmod.Config) -> PlatformSource:
    """Where the platform identity is observed: ``/dev/sev`` when ``source = "sev"``, or
    ``"auto"`` on a host that has it; else the platform file. ``auto`` with neither is
    refused: serving with the TCB and chip id checks skipped could serve a stale VCEK."""
    src, path = cfg.platform.source, cfg.platform.file
    if src == "sev" or (src == "auto" and os.path.exists(SEV_DEVICE)):
        return PlatformSource("sev", SEV_DEVICE)
    if path is None:
        if src == "file":
            raise SetupError('[platform] source = "file" needs platform.file')
        raise SetupError(f'[platform] source = "auto": this host has no {SEV_DEVICE} and no '
                         "platform.file is set; certd cannot check the TCB and chip id "
                         "without one (set platform.file, or run on an SNP host)")
    return PlatformSource("file", path)


def trust_of(cfg: configmod.Config) -> TrustStore:
    """AMD's pinned roots, or the files of ``[trust] roots`` (development PKI) instead."""
    if not cfg.trust.roots:
        return roots.pinned()
    try:
        return trustfile.load(cfg.trust.roots, name="[trust] roots")
    except trustfile.TrustFileError as e:
        raise SetupError(f"[trust] roots: {e}") from None


def kds_client(cfg: configmod.Config, trust: TrustStore):
    """The KDS client of ``[kds]``, or None when ``base_url`` and ``mirrors`` are empty."""
    k = cfg.kds
    if not k.urls:
        return None
    from certd.sources import kds  # the HTTP stack loads only when KDS is configured
    return kds.KdsClient(list(k.urls), k.cache_dir, trust=trust, timeout_s=k.timeout_s,
                         min_backoff_s=k.min_backoff_s, max_backoff_s=k.max_backoff_s,
                         relay=k.relay)


@dataclass
class Setup:
    platform: PlatformSource
    trust: TrustStore
    judge: Judge
    kds: Any = None  # certd.sources.kds.KdsClient, or None

    @classmethod
    def from_config(cls, cfg: configmod.Config, *, trust: TrustStore | None = None,
                    platform: PlatformSource | None = None) -> "Setup":
        trust = trust or trust_of(cfg)
        platform = platform or platform_source(cfg)
        return cls(platform, trust, Judge(trust, platform), kds_client(cfg, trust))

    def prefetch(self, tcb: Tcb) -> dict[str, Any]:
        """Warm the KDS cache for ``tcb`` on this chip (before an update is locked)."""
        plat = self.platform.current
        if plat is None:
            raise SetupError(f"platform unreadable: {self.platform.error}", exitcodes.NOINPUT)
        if self.kds is None:
            raise SetupError("--expect-tcb needs [kds] base_url or mirrors", exitcodes.CONFIG)
        from certd.sources import kds
        try:
            self.kds.prefetch(plat.product, plat.chip_id, tcb)
        except kds.KdsUnavailable as e:
            raise SetupError(f"cannot prefetch the VCEK for TCB {tcb}: {e}",
                             exitcodes.UNAVAILABLE) from None
        return {"tcb": str(tcb)}

    def blob_for(self, platform: Platform | None, *, deadline_s: float
                 ) -> tuple[bytes | None, str]:
        """The validated blob for ``platform`` within ``deadline_s`` (cache, then KDS), and
        where it came from; (None, why) if it cannot be had in time."""
        if platform is None:
            return None, "platform unreadable"
        if platform.vlek:
            return None, "the platform signs with a VLEK: it comes from the drop directory"
        if self.kds is None:
            return None, "KDS not configured"
        from certd.sources import kds
        cached = self.kds.cached_blob(platform)
        if cached is not None:
            return cached, "cache"
        if deadline_s <= 0:
            return None, "not cached"
        try:
            return self.kds.vcek_blob_sync(platform, deadline_s=deadline_s), "kds"
        except kds.KdsUnavailable as e:
            return None, f"KDS: {e}"


class Rotator:
    """Keeps the default profile serving the blob that fits the platform now.

    :meth:`check` is called on every event that may leave the profile without a valid
    blob (platform change, blob change, start, poll, a drop-directory file). At most one
    rotation runs at a time; it keeps trying (KDS back-off is the client's) until the
    profile serves a valid blob or the platform changes under it, then starts over.
    """

    def __init__(self, profile: Profile, setup: Setup,
                 on_rotated: Callable[[str, str], None] = lambda source, result: None):
        self.profile = profile
        self.setup = setup
        self.on_rotated = on_rotated
        self.task: asyncio.Task | None = None

    def check(self, why: str) -> None:
        if self.task is not None and not self.task.done():
            return
        if self.profile.look() in ("serving", "busy"):
            return
        plat = self.setup.platform.current
        if plat is None or plat.vlek or self.setup.kds is None:
            return  # nothing to fetch: unreadable platform, VLEK (drop dir), no KDS
        self.task = asyncio.get_running_loop().create_task(self._rotate(plat, why))

    async def _rotate(self, plat: Platform, why: str) -> None:
        log.info("rotation: fetching the VCEK", why=why, reported_tcb=str(plat.reported_tcb),
                 state=self.profile.state)
        blob = self.setup.kds.cached_blob(plat)
        source = "cache"
        if blob is None:
            blob = await self.setup.kds.vcek_blob(plat)  # keeps trying, logging each attempt
            source = "kds"
        failed = await self.install(blob, source)
        if failed is not None:
            changed = self.setup.platform.current != plat
            asyncio.get_running_loop().call_later(
                0 if changed else 1.0, self.check,
                "platform changed during rotation" if changed else "retry after a failure")

    async def install(self, blob: bytes, source: str) -> str | None:
        """Install ``blob`` (judged against the platform as it is when the lock is held);
        None on success, else why not. Runs the store in a thread: it waits for the
        exclusive lock, which takes until our own holds drain."""
        store = blobstore.BlobStore(self.profile.blob_path, self.setup.judge.problems)
        try:
            r = await asyncio.get_running_loop().run_in_executor(
                None, lambda: store.install(blob, timeout=5.0))
        except (blobstore.StoreError, locks.LockBusy, OSError) as e:
            log.error("rotation failed", source=source, error=str(e),
                      serving="what fits the platform now, or the empty table")
            self.on_rotated(source, "failed")
            return str(e)
        log.info("rotated", source=source, blob=r.path, sha256=r.sha256, size=r.size,
                 exclusive_ms=round((r.released_ns - r.locked_ns) / 1e6, 3))
        self.on_rotated(source, "installed")
        self.profile.look()
        return None

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
