"""What metrics cost: the request path's per-reply call, and one scrape.

    .venv/bin/python benchmarks/bench_metrics.py [--n 1000000] [--profiles 1,16]

Per reply the server adds ``metrics.request(op, ret, time.monotonic() - t0)``; measured
against the same loop with a no-op function of the same signature (the baseline, same run).
A scrape renders the exposition of an in-process CertServer with N serving profiles.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from certd import devpki, policy
from certd.service import metrics
from certd.service.profiles import Profile, ProfileSet
from certd.service.server import CertServer


def per_call(fn, n: int) -> float:
    t0 = time.monotonic()
    start = time.perf_counter()
    for _ in range(n):
        fn("get", "ok", time.monotonic() - t0)
    return (time.perf_counter() - start) / n


def scrape_cost(nprofiles: int, rounds: int = 50) -> tuple[float, int]:
    pki = devpki.DevPki.generate(name="bench")
    plat = devpki.make_platform()
    blob = policy.build_blob(pki.ark, pki.ask, devpki.FakePsp(pki, plat).leaf, trust=pki.trust,
                             platform=plat)
    with tempfile.TemporaryDirectory() as d:
        profiles = []
        for i in range(nprofiles):
            path = Path(d) / f"p{i}.blob"
            path.write_bytes(blob)
            p = Profile(f"p{i}", str(path), patterns=(f"vm-{i}-*",),
                        validate=lambda b: policy.check_blob(b, trust=pki.trust, platform=plat))
            assert p.refresh() and p.served == blob
            profiles.append(p)
        srv = CertServer(ProfileSet(profiles[0], tuple(profiles[1:])))
        reg = metrics.registry(srv)
        size = len(metrics.render(reg))  # the first render parses the blobs' dates
        start = time.perf_counter()
        for _ in range(rounds):
            metrics.render(reg)
        took = (time.perf_counter() - start) / rounds
        srv.leases.close()
        for p in profiles:
            p.close()
    return took, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--profiles", default="1,16")
    a = ap.parse_args()
    events = metrics.Events()

    def noop(op: str, ret: str, seconds: float) -> None:
        pass

    base = min(per_call(noop, a.n) for _ in range(3))
    cost = min(per_call(events.request, a.n) for _ in range(3))
    print(f"per reply: metrics.request {cost * 1e9:.0f} ns, no-op baseline {base * 1e9:.0f} ns"
          f" -> {(cost - base) * 1e9:.0f} ns added ({cost / base:.2f}x the bare call)")
    for n in map(int, a.profiles.split(",")):
        took, size = scrape_cost(n)
        print(f"scrape, {n} profile(s): {took * 1e3:.2f} ms to render {size} bytes")


if __name__ == "__main__":
    main()
