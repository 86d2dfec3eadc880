"""Test-only switches, read in one place.

Two kinds, both set through the environment so they reach real processes (the daemon,
``certctl`` updaters) that a test starts:

* ``CERTD_FAULT=<name>[,<name>...]`` makes certd *misbehave* on purpose in a named way
  (for example ``early-release``: updaters release the lock before the new blob is in
  place). A negative-control test sets it and expects the invariant checker to fail.
* ``CERTD_UNSAFE=<protection>[,...]`` switches a named *protection* off (for example
  ``inode-check``), for the same purpose.
* ``CERTD_FAULT_AT=<step>`` (store only): SIGKILL the installing process at that step.

Names in use (grep for ``fault("`` and ``unsafe("``):

* fault ``early-release``: ``BlobStore.update`` releases the exclusive lock (blob and
  gate) before running the change and installing; nothing else differs.
* unsafe ``journal``: updaters write no journal (a killed updater leaves no trace).
* unsafe ``settle``: ``BlobStore.update`` does not re-check the blob after a change that
  installed nothing (a failed firmware step leaves the stale blob).
* unsafe ``bounded-read``: the blob is opened blocking and read whole, whatever it is.
* unsafe ``nested-keep``: a nested install unlocks the new blob when it ends instead of
  handing the lock to the enclosing ``certctl lock``.
* unsafe ``adopt-check``: a nested updater adopts any exclusive lock it sees on the gate,
  without the enclosing ``certctl lock`` answering (a stale ``$CERTD_LOCK_HELD`` works).
* unsafe ``hoarder-cut``: the daemon never ends a hoarder's lease early while an update
  waits (an update then waits for the full lease timeout).
* unsafe ``ensure-recheck``: ``BlobStore.ensure_exists`` writes the empty table even if
  a blob appeared while it waited for the gate.

Nothing in a production configuration sets these; the daemon logs a warning at start
when any is set (see :func:`active`).
"""

from __future__ import annotations

import functools
import os

FAULT_ENV = "CERTD_FAULT"
UNSAFE_ENV = "CERTD_UNSAFE"
FAULT_AT_ENV = "CERTD_FAULT_AT"


def _names(var: str) -> frozenset[str]:
    # Checked on the request path: parse each value once (tests monkeypatch the
    # environment, so the value, not the process, is the cache key).
    return _parse(os.environ.get(var, ""))


@functools.lru_cache(maxsize=64)
def _parse(value: str) -> frozenset[str]:
    return frozenset(x.strip() for x in value.split(",") if x.strip())


def fault(name: str) -> bool:
    """True if the test-only misbehaviour ``name`` is switched on (``CERTD_FAULT``)."""
    return name in _names(FAULT_ENV)


def unsafe(protection: str) -> bool:
    """True if the protection ``protection`` is switched off (``CERTD_UNSAFE``)."""
    return protection in _names(UNSAFE_ENV)


def unsafe_now() -> frozenset[str]:
    """Every protection switched off now: for an object that reads them on a hot path and
    may take them once, when it is made."""
    return _names(UNSAFE_ENV)


def active() -> dict[str, str]:
    """The test-only switches set in this process's environment (for a start-up warning)."""
    return {k: os.environ[k] for k in (FAULT_ENV, UNSAFE_ENV, FAULT_AT_ENV) if os.environ.get(k)}
