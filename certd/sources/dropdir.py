"""The drop directory: CSP-provisioned VLEK (or VCEK) certificates, installed when dropped.

A file written (``IN_CLOSE_WRITE``) or renamed (``IN_MOVED_TO``) into the directory is
judged by :func:`judge`: the certificate in it is completed with the pinned ARK and
ASK/ASVK (no network) and the blob is built and validated by
:func:`certd.policy.build_blob` for the platform as it is now. Then:

- **accepted**: ``accept(blob, name)`` installs it; on success the file is moved to
  ``<drop_dir>/accepted/<name>``;
- **rejected** (or installing failed): the file is moved to ``<drop_dir>/rejected/<name>``
  with ``<name>.reason`` beside it, one problem per line. The served blob is untouched.

Nothing is lost: every file ends in ``accepted/`` or ``rejected/``, and neither overwrites
an earlier file of the same name (the new one gets a numbered name, ``vcek.1.pem``).
A file is first claimed by renaming it into ``<drop_dir>/.processing/``, so a file seen
twice (an event and a rescan) is processed once, and a file written again under the
same name while the first one is processed is a new file, processed after it; files left
there by a crash are processed at the next start.

Left alone: dotfiles and names ending in ``.tmp``, ``.part`` or ``~`` (write to such a
name, then rename, so that certd never reads half a file), directories, and the
``accepted/``, ``rejected/`` and ``.processing/`` subdirectories.

Files present at start are processed (oldest first), and again after an inotify queue
overflow. If the directory is removed (or moved away), certd waits for it to be
re-created (the parent is watched) and then rescans it.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from typing import Awaitable, Callable

from certd import faults, inotify, logs, policy
from certd.amd.roots import TrustStore
from certd.platform import Platform
from certd.verify import pki
from certd.verify.pki import Cert, Crl, Kind, PkiError
from certd.verify.problems import Problem

log = logs.get_logger("certd.dropdir")

ACCEPTED = "accepted"
REJECTED = "rejected"
WORK = ".processing"
REASON_SUFFIX = ".reason"
#: Larger files are refused unread: a certificate is ~1.3 KiB, a whole blob at most 16 KiB.
MAX_FILE = 64 * 1024
#: Test-only switches (CERTD_UNSAFE), for negative controls: skip the platform checks;
#: process files where they are instead of claiming them first.
UNSAFE_JUDGE = "dropdir-judge"
UNSAFE_CLAIM = "dropdir-claim"

_TEMP_SUFFIXES = (".tmp", ".part", "~")
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)
_DIR_MASK = inotify.CLOSE_WRITE | inotify.MOVED_TO
_PARENT_MASK = inotify.CREATE | inotify.MOVED_TO


# --- the decision (pure) -------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """Either ``blob`` (ready to install) or ``problems``; ``reason`` is one line for logs."""

    blob: bytes | None
    problems: list[Problem] = field(default_factory=list)
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.blob is not None

    @classmethod
    def refused(cls, problems: list[Problem]) -> "Verdict":
        return cls(None, list(problems), "; ".join(map(_one_line, problems)))

    def reason_lines(self) -> str:
        """The text of a ``.reason`` file: one problem per line."""
        return "".join(f"{_one_line(p)}\n" for p in self.problems)


def _one_line(p: Problem) -> str:
    return " ".join(str(p).split("\n"))


def judge(data: bytes, name: str, *, trust: TrustStore, platform: Platform | None,
          at: datetime | None = None) -> Verdict:
    """Is the file ``name`` with content ``data`` a certificate to install on ``platform``?

    ``data`` is a VCEK or VLEK (PEM or DER), a PEM bundle holding exactly one of them, or
    a whole GHCB certificate table. Only its VCEK/VLEK is used (plus any CRLs, to check
    revocation): the ARK and ASK/ASVK always come from ``trust``. Pure: no I/O, no clock
    but ``at`` (default now).
    """
    if platform is None:
        return Verdict.refused([Problem("platform", "the platform's identity is not known, so "
                                                    "the certificate's TCB and chip cannot be "
                                                    "checked")])
    return _judge(data, name, trust=trust, platform=platform, at=at)


def _judge(data: bytes, name: str, *, trust: TrustStore, platform: Platform | None,
           at: datetime | None) -> Verdict:
    """:func:`judge`; with ``platform`` None only chain, product and dates are checked."""
    found = _certificates(data, name)
    if isinstance(found, Problem):
        return Verdict.refused([found])
    leaves = [c for c in found if isinstance(c, Cert) and c.kind.is_leaf]
    crls = [c for c in found if isinstance(c, Crl)]
    if len(leaves) != 1:
        kinds = ", ".join(c.kind.value if isinstance(c, Cert) else "CRL" for c in found)
        return Verdict.refused([Problem("role", f"{name} holds {len(leaves)} VCEK/VLEK "
                                                f"certificates (found: {kinds or 'nothing'}); "
                                                "drop exactly one per file")])
    leaf = leaves[0]
    # The leaf's own product line decides the roots; if the store has none for it, the
    # platform's are used so that policy names the mismatch (product, chain) itself.
    roots = trust.get(leaf.product) if leaf.product is not None else None
    if roots is None and platform is not None:
        roots = trust.get(platform.product)
    if roots is None:
        what = leaf.product.value if leaf.product else "its product"
        return Verdict.refused([Problem("chain", f"the {trust.name} trust store has no roots "
                                                 f"for {what} ({leaf.describe()})")])
    vlek = leaf.kind is Kind.VLEK
    intermediate = roots.intermediate(vlek)
    if intermediate is None:
        return Verdict.refused([Problem("chain", f"the {trust.name} trust store has no "
                                                 f"{'ASVK' if vlek else 'ASK'} for "
                                                 f"{roots.product.value}, so "
                                                 f"{leaf.describe()} cannot be completed")])
    try:
        blob = policy.build_blob(roots.ark, intermediate, leaf, trust=trust, at=at,
                                 platform=platform, crls=crls)
    except policy.PolicyError as e:
        return Verdict.refused(e.problems)
    tcb = platform.reported_tcb if platform is not None else None
    return Verdict(blob, [], f"valid {leaf.describe()}"
                             f"{f' for TCB {tcb}' if tcb is not None else ''}")


def _certificates(data: bytes, name: str) -> list[Cert | Crl] | Problem:
    """The certificates and CRLs in a PEM/DER file or a GHCB table, or why there are none."""
    if not data.strip():
        return Problem("format", f"{name} is empty")
    try:
        return pki.load_bytes(data, name)
    except PkiError as e:
        if b"-----BEGIN" in data:
            return Problem("format", str(e))
        first_error = str(e)
    contents = policy.parse_blob(data)
    if contents.table is None:
        return Problem("format", f"{name} is neither a certificate (PEM or DER) nor a "
                                 f"certificate table ({first_error})")
    found: list[Cert | Crl] = [c for c in (contents.ark, contents.intermediate, contents.leaf,
                                           contents.crl) if c is not None]
    return found


# --- the directory (I/O) -------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What became of one dropped file."""

    name: str
    accepted: bool
    reason: str  # Verdict.reason, or why installing failed
    moved_to: str | None  # None if it could not be moved (logged); it stays in .processing/


def wanted(name: str) -> bool:
    """False for names the drop directory leaves alone (temp files, its own subdirectories)."""
    return not (name.startswith(".") or name.endswith(_TEMP_SUFFIXES)
                or name in (ACCEPTED, REJECTED))


class DropDir:
    """Watches ``path`` and hands each valid certificate to ``accept`` (see module doc).

    ``platform()`` is called for every file (the platform as it is now; None if unknown:
    every file is then refused). ``accept(blob, name)`` installs the blob and returns None,
    or a reason why it could not; it may be a coroutine function (files are processed one
    at a time, so the next waits for it). ``on_result(outcome)`` is told about every file.
    """

    def __init__(self, path: str | os.PathLike, *, trust: TrustStore,
                 platform: Callable[[], Platform | None],
                 accept: Callable[[bytes, str], str | None | Awaitable[str | None]],
                 loop: asyncio.AbstractEventLoop,
                 on_result: Callable[[Outcome], None] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.parent, self.base = os.path.split(self.path)
        self.work = os.path.join(self.path, WORK)
        self.trust = trust
        self.platform = platform
        self.accept = accept
        self.on_result = on_result
        self.counts = {"accepted": 0, "rejected": 0, "rescans": 0, "overflows": 0}
        self._pending: dict[str, None] = {}  # names to process, in order, once each
        self._scan_wanted = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._present = asyncio.Event()
        self._absent = asyncio.Event()
        os.makedirs(self.path, exist_ok=True)
        self.watcher = inotify.Watcher(self._event, loop=loop)
        try:
            # Watching the parent is how a removed drop directory is noticed coming back.
            self.watcher.add(self.parent, _PARENT_MASK)
            self._watch_dir()
        except BaseException:
            self.watcher.close()
            raise
        self._task = loop.create_task(self._run(), name=f"dropdir {self.path}")

    # --- public ------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """True while the directory exists and is watched."""
        return self._present.is_set()

    async def wait_watching(self, value: bool = True) -> None:
        await (self._present if value else self._absent).wait()

    def rescan(self) -> None:
        """Look at every file in the directory again (after lost events)."""
        self._scan_wanted = True
        self._kick()

    async def drained(self) -> None:
        """Wait until every file certd has heard of is processed."""
        await self._idle.wait()

    def close(self) -> None:
        """Stop watching and processing. A file whose ``accept`` is still awaited stays in
        ``.processing/`` and is processed again at the next start."""
        self.watcher.close()
        self._task.cancel()

    async def aclose(self) -> None:
        self.close()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    # --- events ------------------------------------------------------------------------

    def _event(self, ev: inotify.Event) -> None:
        if ev.overflow:
            self.counts["overflows"] += 1
            log.warning("drop-dir events were lost; rescanning", directory=self.path)
            self.rescan()
        elif ev.directory == self.path:
            if ev.gone:
                self._lost()
            elif ev.name and not ev.is_dir and wanted(ev.name):
                self._pending[ev.name] = None
                self._kick()
        elif ev.directory == self.parent:
            if ev.gone:
                log.error("the drop directory's parent is gone; a re-created drop directory "
                          "will not be noticed until restart", directory=self.path)
            elif ev.name == self.base and ev.is_dir:
                self._watch_dir()

    def _watch_dir(self) -> None:
        try:
            self.watcher.add(self.path, _DIR_MASK)
        except inotify.WatchError as e:
            if os.path.isdir(self.path):
                raise
            log.warning("drop directory missing; waiting for it to be created",
                        directory=self.path, error=str(e))
            self._set_present(False)
            return
        if not self.watching:
            log.info("watching the drop directory", directory=self.path)
        self._set_present(True)
        self.rescan()  # files may have arrived before the watch

    def _lost(self) -> None:
        log.warning("drop directory removed or moved away; waiting for it to be re-created",
                    directory=self.path)
        self._set_present(False)
        if os.path.isdir(self.path):  # re-created before we heard it was gone
            self._watch_dir()

    def _set_present(self, present: bool) -> None:
        (self._present if present else self._absent).set()
        (self._absent if present else self._present).clear()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    # --- processing --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._scan_wanted or self._pending:
                if self._scan_wanted:
                    self._scan_wanted = False
                    await self._scan()
                if self._pending:
                    name = next(iter(self._pending))
                    del self._pending[name]
                    await self._take(name)
                    await asyncio.sleep(0)  # one file (~1-2 ms) per turn of the loop
            self._idle.set()

    async def _scan(self) -> None:
        self.counts["rescans"] += 1
        try:
            leftovers = sorted(os.listdir(self.work))
        except FileNotFoundError:
            leftovers = []
        except OSError as e:
            log.error("cannot list the drop directory's work area", directory=self.work,
                      error=str(e))
            leftovers = []
        for name in leftovers:  # claimed before a crash: finish them first
            await self._process(name, os.path.join(self.work, name))
        try:
            with os.scandir(self.path) as it:
                entries = [(e.stat(follow_symlinks=False).st_mtime_ns, e.name) for e in it
                           if wanted(e.name) and not e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return  # removed; its re-creation triggers another scan
        except OSError as e:
            log.error("cannot list the drop directory", directory=self.path, error=str(e))
            return
        for _, name in sorted(entries):  # oldest first: the newest certificate wins
            self._pending[name] = None

    async def _take(self, name: str) -> None:
        """Claim ``name`` by moving it into the work area, then process it."""
        src, work = os.path.join(self.path, name), os.path.join(self.work, name)
        try:
            if stat.S_ISDIR(os.lstat(src).st_mode):
                return
            if faults.unsafe(UNSAFE_CLAIM):
                await self._process(name, src)
                return
            if os.path.lexists(work):  # an earlier file of that name is unfinished
                await self._process(name, work)
                if os.path.lexists(work):
                    log.error("cannot process a drop-dir file: an earlier file of the same "
                              "name is stuck in the work area", file=name, work=work)
                    return
            os.makedirs(self.work, exist_ok=True)
            os.rename(src, work)
        except FileNotFoundError:
            return  # already processed (seen twice), or removed by someone else
        except OSError as e:
            log.error("cannot claim a drop-dir file; it stays in place", file=name, error=str(e))
            return
        await self._process(name, work)

    async def _process(self, name: str, path: str) -> None:
        """Judge the file ``name`` (now at ``path``), install it or not, and move it."""
        data, problem = _read(path, name)
        verdict = Verdict.refused([problem]) if problem else self._judge(data, name)
        if verdict.accepted:
            failure = await self._install(verdict.blob, name)
            if failure is not None:
                verdict = Verdict.refused([Problem("install", f"{name} is valid, but installing "
                                                              f"it failed: {failure}")])
        if verdict.accepted:
            moved = _move_unique(path, os.path.join(self.path, ACCEPTED), name)
            self.counts["accepted"] += 1
            log.info("drop-dir file accepted", file=name, reason=verdict.reason, moved_to=moved)
        else:
            moved = _move_unique(path, os.path.join(self.path, REJECTED), name,
                                 reason=verdict.reason_lines())
            self.counts["rejected"] += 1
            log.warning("drop-dir file rejected", file=name, reason=verdict.reason,
                        problems=sorted({p.check for p in verdict.problems}), moved_to=moved)
        if self.on_result is not None:
            try:
                self.on_result(Outcome(name, verdict.accepted, verdict.reason, moved))
            except Exception:
                log.exception("drop-dir on_result callback failed", file=name)

    def _judge(self, data: bytes, name: str) -> Verdict:
        try:
            platform = self.platform()
        except Exception:
            log.exception("reading the platform identity failed")
            platform = None
        try:
            if faults.unsafe(UNSAFE_JUDGE):
                return _judge(data, name, trust=self.trust, platform=None, at=None)
            return judge(data, name, trust=self.trust, platform=platform)
        except Exception as e:  # judge is total; this keeps one bad file from stopping all
            log.exception("judging a drop-dir file failed", file=name)
            return Verdict.refused([Problem("format", f"{name} could not be judged: {e!r}")])

    async def _install(self, blob: bytes, name: str) -> str | None:
        try:
            result = self.accept(blob, name)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as e:
            log.exception("installing a drop-dir certificate failed", file=name)
            return f"{type(e).__name__}: {e}"


def _read(path: str, name: str) -> tuple[bytes, None] | tuple[None, Problem]:
    """The file's bytes, without following a symlink or blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, Problem("format", f"{name} is a symbolic link; drop the certificate "
                                           "file itself")
        return None, Problem("format", f"{name} cannot be read: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, Problem("format", f"{name} is not a regular file")
        if st.st_size > MAX_FILE:
            return None, Problem("size", f"{name} is {st.st_size} bytes; a certificate or "
                                         f"certificate table is at most {MAX_FILE}")
        data = os.read(fd, MAX_FILE + 1)
        if len(data) > MAX_FILE:
            return None, Problem("size", f"{name} is over {MAX_FILE} bytes")
        return data, None
    except OSError as e:
        return None, Problem("format", f"{name} cannot be read: {e.strerror}")
    finally:
        os.close(fd)


def _numbered(name: str, n: int) -> str:
    """``vcek.pem`` -> ``vcek.1.pem``; ``garbage`` -> ``garbage.1``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{n}.{ext}" if dot and stem else f"{name}.{n}"


def _move_unique(src: str, directory: str, name: str, *, reason: str | None = None) -> str | None:
    """Move ``src`` into ``directory`` under ``name`` (numbered if taken; never overwriting),
    with ``<name>.reason`` beside it if ``reason`` is given. Returns the new path, or None
    (logged; ``src`` stays where it is)."""
    try:
        os.makedirs(directory, exist_ok=True)
        n = 0
        while True:
            dst = os.path.join(directory, _numbered(name, n) if n else name)
            n += 1
            if reason is not None and os.path.lexists(dst + REASON_SUFFIX):
                continue
            try:
                os.link(src, dst, follow_symlinks=False)  # fails if dst exists: no clobbering
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS or os.path.lexists(dst):
                    raise
                os.rename(src, dst)  # no hard links here; only certd writes this directory
                linked = False
            else:
                linked = True
            break
        if reason is not None:
            fd = os.open(dst + REASON_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o644)
            with open(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(reason)
        if linked:
            os.unlink(src)
        return dst
    except OSError as e:
        log.error("cannot move a drop-dir file; it stays in the work area", file=name,
                  directory=directory, error=str(e))
        return None
