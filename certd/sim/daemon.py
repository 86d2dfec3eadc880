"""``python -m certd.sim.daemon --config FILE --pki DIR``: certd trusting a simulated PKI.

The daemon of ``certd --dev`` generates its PKI in memory at every start; the simulator
needs one that survives restarts and is shared with the PSP and the updaters, so this runs
the same daemon (:func:`certd.service.daemon.run`) with the trust of the PKI directory.
Socket activation (``LISTEN_FDS``) and sd_notify work as with ``certd``.
"""

from __future__ import annotations

import argparse
import sys

from certd import config as configmod, logs
from certd.service import daemon
from certd.sim import psp as pspmod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m certd.sim.daemon", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--pki", required=True)
    args = p.parse_args(argv)
    cfg = configmod.load(args.config)
    logs.configure(cfg.log.level, cfg.log.format)
    return daemon.run(cfg, args.config, daemon.Context(trust=pspmod.load_trust(args.pki)))


if __name__ == "__main__":
    sys.exit(main())
