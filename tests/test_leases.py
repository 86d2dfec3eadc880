"""LeaseTable: what an expiry callback does may end other leases of the same sweep (the
server marks a hoarder there, and cutting hoarders' leases can follow); the sweep goes on
and every due lease ends exactly once. Found by benchmarks/hostile.py: the sweep raised
KeyError, never re-armed, and the hoarders' leases then lived for ever."""

from __future__ import annotations

import asyncio

from certd.service.leases import LeaseTable, SharedHold


class _Lock:
    def release(self) -> None:
        pass


async def test_an_expiry_callback_that_ends_other_due_leases_does_not_stop_the_sweep():
    loop = asyncio.get_running_loop()
    hold = SharedHold(_Lock(), b"table", 1)
    ended: list[tuple[int, bool]] = []
    table = None

    def on_expire(lease, cut_short):
        ended.append((lease.id, cut_short))
        if not cut_short:  # like CertServer: the first expiry cuts the others
            table.cut([x for x in table.live.values()])

    table = LeaseTable(0.01, on_expire=on_expire)
    for vm in ("a", "b", "c"):
        table.grant(vm, hold, object(), loop)
    assert len(table.live) == 3 and hold.leases == 3
    done = loop.create_future()
    hold.on_idle = lambda h: done.done() or done.set_result(None)
    await asyncio.wait_for(done, 5)
    assert table.live == {} and hold.leases == 0
    assert sorted(i for i, _ in ended) == [1, 2, 3]  # each ended once
    assert table.expired == 3 and table.cut_short == 2
