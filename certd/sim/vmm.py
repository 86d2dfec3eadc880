"""VMMs: how KVM_EXIT_SNP_REQ_CERTS is handled, through certd's socket or a file.

:class:`SocketVmm` follows the KVM flow with certd (docs/protocol.md): exit with the VM id
and ``npages`` -> GET -> write the table to the guest buffer -> resume the vCPU (after a
scheduling delay, the PSP signs) -> RELEASE. If certd cannot be reached (it is restarting)
the VMM waits for it up to ``unavailable_s`` and then answers EAGAIN: never EIO. (The
checklist of docs/protocol.md §10 answers EAGAIN at once; an SVSM guest that meets a
restart that way loses its VMPCK, so the simulated VMM waits.)

:class:`FileVmm` is a stock QEMU (RFC v2 ``open_certs_locked()`` and
``kvm_handle_snp_req_certs``): open, OFD shared lock (non-blocking), inode check, read,
sign, unlock, close; busy is retried every 1 ms until ``certs_timeout`` (100 ms), then
EAGAIN.

Run as a process (``python -m certd.sim.vmm SPEC.json``): it hosts the guests listed in
the spec, prints ``ready`` once they run, and on SIGTERM stops them and prints their
counters as one JSON line.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import sys
import time
import traceback

from certd import client as clientmod
from certd.abi import table, wire
from certd.sim import guests as guestmod, psp as pspmod
from certd.sim.guests import Counters
from certd.store import locks


class SocketVmm:
    """One VM's VMM talking to certd (one connection per VM, as one QEMU per VM)."""

    def __init__(self, socket_path: str, psp: pspmod.SharedPsp, counters: Counters, *,
                 resume_delay_s: float = 0.002, unavailable_s: float = 10.0,
                 timeout_s: float = 5.0):
        self.client = clientmod.AsyncClient(socket_path, timeout=timeout_s)
        self.psp = psp
        self.c = counters
        self.resume_delay = resume_delay_s
        self.unavailable_s = unavailable_s

    async def exit(self, vm_id: str, npages: int, report_data: bytes
                   ) -> tuple[int, bytes, bytes | None]:
        give_up = time.monotonic() + self.unavailable_s
        backoff = 0.02
        while True:
            try:
                # One long wait rather than many short ones: while certd restarts, the
                # socket kept by socket activation queues the request until it is back.
                r = await self.client.get(vm_id, npages,
                                          timeout=max(give_up - time.monotonic(), 0.05))
                break
            except clientmod.Refused:
                return wire.EAGAIN, b"", None  # rate or lease limits: busy, retry later
            except (clientmod.Unavailable, clientmod.ProtocolError, OSError):
                # docs/protocol.md §5: EAGAIN, never EIO. (OSError: AsyncClient lets a
                # recv() error of a dead connection escape unwrapped; this kernel answers
                # EINVAL once the peer was killed.)
                self.c.reconnects += 1
                if time.monotonic() >= give_up:
                    self.c.unavailable += 1
                    self.c.note({"what": "unavailable", "vm": vm_id, "at": time.time(),
                                 "waited_s": self.unavailable_s})
                    return wire.EAGAIN, b"", None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
        if r.ret != wire.RET_OK:
            return r.ret, b"", None
        guest_buffer = bytes(r.table)  # written to the guest's shared pages
        if self.resume_delay:
            await asyncio.sleep(random.uniform(0, self.resume_delay))
        report = self.psp.sign(report_data)  # KVM_RUN: snp_complete_req_certs -> firmware
        if r.lease_id:  # immediate_exit: KVM_RUN returned -EINTR, the report is signed
            try:
                res = await self.client.release(r.lease_id)
            except (clientmod.ClientError, OSError):
                self.c.leases_lost += 1
            else:
                if res == wire.ReleaseResult.EXPIRED:
                    self.c.leases_expired += 1
        return wire.RET_OK, guest_buffer, report

    async def close(self) -> None:
        await self.client.close()


class FileVmm:
    """One VM's stock QEMU reading ``certs-filename`` itself."""

    def __init__(self, blob_path: str, psp: pspmod.SharedPsp, counters: Counters, *,
                 certs_timeout_s: float = 0.100, resume_delay_s: float = 0.002):
        self.path = blob_path
        self.psp = psp
        self.c = counters
        self.certs_timeout = certs_timeout_s
        self.resume_delay = resume_delay_s

    def _open_locked(self) -> int | None:
        """open_certs_locked(): a locked fd on the current inode, None if busy."""
        while True:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # ENOENT: QEMU fails
            if not locks.try_lock(fd, False):
                os.close(fd)
                return None
            if locks.same_file(fd, self.path) is None:
                os.close(fd)  # disappeared or recreated: drop the stale lock, retry
                continue
            return fd

    async def exit(self, vm_id: str, npages: int, report_data: bytes
                   ) -> tuple[int, bytes, bytes | None]:
        deadline = time.monotonic() + self.certs_timeout
        while True:
            try:
                fd = self._open_locked()
            except OSError as e:
                # QEMU exits on any error other than busy; the guest sees the VM die.
                self.c.errors += e.errno != errno.ENOENT
                return wire.EIO, b"", None
            if fd is not None:
                # g_usleep(1000) after every attempt, a successful one too (lock held). It
                # blocks, as QEMU's vCPU thread does, so that the other VMs of this process
                # cannot stretch the hold.
                time.sleep(0.001)
                break
            if time.monotonic() >= deadline:
                return wire.EAGAIN, b"", None
            await asyncio.sleep(0.001)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            if len(data) > npages * table.PAGE_SIZE:
                return wire.ENOSPC, b"", None
            if self.resume_delay:
                time.sleep(random.uniform(0, self.resume_delay))  # the vCPU thread resumes
            report = self.psp.sign(report_data)
        finally:
            locks.unlock(fd)  # snp_release_certs_lock(): unlock, close
            os.close(fd)
        return wire.RET_OK, data, report

    async def close(self) -> None:
        pass


async def run_vmm(spec: dict, ready=lambda: None) -> dict:
    """Host the guests of ``spec`` until SIGTERM (or ``spec["duration_s"]``); their
    counters by guest kind."""
    psp = pspmod.SharedPsp.open(spec["pki"], spec["platform"])
    trust = psp.pki.trust
    by_kind: dict[str, Counters] = {k: Counters() for k in guestmod.KINDS}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def quiet(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # AsyncClient leaves the futures of requests abandoned on a dying connection with
        # an exception nobody retrieves; a restart of certd is expected here, not news.
        if not isinstance(context.get("exception"), (clientmod.ClientError, OSError)):
            loop.default_exception_handler(context)
    loop.set_exception_handler(quiet)
    lo, hi = spec.get("think_ms", (200, 600))
    vmms, tasks = [], []
    for vm_id, kind in spec["vms"]:
        c = by_kind[kind]
        if spec["face"] == "socket":
            vmm = SocketVmm(spec["socket"], psp, c,
                            resume_delay_s=spec.get("resume_delay_ms", 2) / 1000,
                            unavailable_s=spec.get("unavailable_s", 10.0))
        else:
            vmm = FileVmm(spec["blob"], psp, c,
                          certs_timeout_s=spec.get("certs_timeout_ms", 100) / 1000,
                          resume_delay_s=spec.get("resume_delay_ms", 2) / 1000)
        g = guestmod.KINDS[kind](vm_id, vmm.exit, trust, c,
                                 time_scale=spec.get("time_scale", 1.0))
        vmms.append(vmm)

        async def one(g=g) -> None:
            await asyncio.sleep(random.uniform(0, hi / 1000))  # VMs do not boot in step
            try:
                await g.run(stop, lambda: random.uniform(lo, hi) / 1000)
            except Exception as e:  # a simulator bug must show up in the report
                g.c.errors += 1
                g.c.note({"what": "error", "vm": g.vm_id, "why": repr(e),
                          "where": traceback.format_exc(limit=-4)})
        tasks.append(asyncio.create_task(one()))
    ready()
    if spec.get("duration_s"):
        try:
            await asyncio.wait_for(stop.wait(), spec["duration_s"])
        except asyncio.TimeoutError:
            stop.set()
    else:
        await stop.wait()
    done, pending = await asyncio.wait(tasks, timeout=spec.get("grace_s", 10.0))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for vmm in vmms:
        await vmm.close()
    return {"face": spec["face"], "by_kind": {k: c.as_dict() for k, c in by_kind.items()},
            "unfinished": len(pending)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    out = asyncio.run(run_vmm(spec, ready=lambda: print("ready", flush=True)))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
