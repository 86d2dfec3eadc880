#!/usr/bin/env python3
"""Policy fuzz outside pytest: corrupted blobs through check_blob / check_report /
build_blob (tests/policy_fuzz.py), with and without the total-policy protection.

Prints, for the protected run: inputs, exceptions (must be 0), how many inputs were
refused for a malformed field, and the time per 1000 inputs; for the same loop with
CERTD_UNSAFE=total-policy: the exceptions it finds (the bug this fuzz is for); and as a
baseline measured in the same run, the time per 1000 checks of the clean blobs, cold
(every memo cleared before each check) and warm. Warnings are errors, as under pytest.

    .venv/bin/python benchmarks/fuzz_policy.py                # 100,002 inputs
    .venv/bin/python benchmarks/fuzz_policy.py --inputs 20000 --unsafe-inputs 2000
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import policy_fuzz  # noqa: E402
from certd import policy  # noqa: E402
from certd.verify import chain, pki  # noqa: E402


def clean_checks(cases, rounds: int, cold: bool) -> float:
    """Seconds per check of the uncorrupted blobs."""
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for c in cases:
            if cold:
                pki.clear_cache()
                chain.clear_cache()
            assert policy.check_blob(c.blob, trust=c.trust, at=c.at, platform=c.platform) == []
            n += 1
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="total, over all cases")
    ap.add_argument("--unsafe-inputs", type=int, default=7_000,
                    help="inputs for the run with the protection off")
    ap.add_argument("--seed", type=int, default=20261201)
    args = ap.parse_args()
    warnings.simplefilter("error")
    cases = policy_fuzz.corpus()
    per_case = -(-args.inputs // len(cases))

    total = policy_fuzz.Result()
    for c in cases:
        r = policy_fuzz.run(c, per_case, args.seed)
        print(r.summary(f"  {c.name}"))
        total.add(r)
    print(total.summary("protected"))
    for i, fn, where in total.exceptions[:20]:
        print(f"  EXCEPTION input {i} {fn}: {where}")

    os.environ["CERTD_UNSAFE"] = "total-policy"
    pki.clear_cache()
    off = policy_fuzz.Result()
    for c in cases:
        off.add(policy_fuzz.run(c, -(-args.unsafe_inputs // len(cases)), args.seed))
    del os.environ["CERTD_UNSAFE"]
    pki.clear_cache()
    kinds = collections.Counter(where.split(":")[0] for _, _, where in off.exceptions)
    print(f"protection OFF: {off.inputs} inputs, {len(off.exceptions)} exceptions "
          f"({100 * len(off.exceptions) / off.inputs:.1f} %): {dict(kinds.most_common())}")

    cold = clean_checks(cases, 30, cold=True)
    warm = clean_checks(cases, 300, cold=False)
    fuzz = total.seconds / total.inputs
    print(f"baseline: clean check_blob {1e6 * cold:.0f} ms per 1000 cold, {1e6 * warm:.0f} "
          f"warm; a corrupted input costs {fuzz / cold:.2f} of a cold clean check")
    return 0 if not total.exceptions and off.exceptions else 1


if __name__ == "__main__":
    sys.exit(main())
