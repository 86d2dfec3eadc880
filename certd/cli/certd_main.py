"""certd: the daemon. ``certd --dev`` runs it on a generated development setup."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from certd import __version__, config as configmod, logs
from certd.abi.product import Product
from certd import exitcodes
from certd.cli.certinfo import product_arg

DESCRIPTION = """\
certd serves SEV-SNP certificate tables (ARK, ASK/ASVK, VCEK/VLEK, CRL) to VMMs that
forward KVM_EXIT_SNP_REQ_CERTS over a Unix socket, holding the blob's shared OFD lock per
request until the VMM confirms the report was signed (docs/protocol.md). It keeps the blob
at a path a stock QEMU can read too (certs-filename=).

Run it under systemd (systemd/certd.service, socket activation, sd_notify, watchdog), or:
  certd --dev                      generated PKI, simulated platform, temporary paths
  certd --config /etc/certd/certd.toml
  certd --check-config /etc/certd/certd.toml

Signals: SIGHUP reloads the configuration (a bad file is refused, the old one stays);
SIGTERM stops taking requests, drains leases within the lease timeout, and exits.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certd", description=DESCRIPTION,
                                epilog=exitcodes.epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"configuration file (default {configmod.DEFAULT_PATH})")
    p.add_argument("--check-config", nargs="?", const="", metavar="FILE",
                   help="check a configuration file and what it refers to (platform file "
                        "or /dev/sev, [trust] roots, writable directories); print OK or "
                        "every problem, and exit 0 or 78")
    p.add_argument("--dev", action="store_true",
                   help="development mode: generated AMD-like PKI, simulated platform, "
                        "temporary paths (printed at start)")
    p.add_argument("--dev-dir", metavar="DIR",
                   help="with --dev: keep the development files here instead of a "
                        "temporary directory removed at exit")
    p.add_argument("--product", type=product_arg,
                   help="with --dev: product line to simulate: Milan (default), Genoa "
                        "(also Siena, Bergamo) or Turin")
    p.add_argument("--version", action="version", version=f"certd {__version__}")
    return p


def _writable(directory: Path, what: str) -> str | None:
    """None if ``directory`` is a writable directory or can be created (its nearest
    existing ancestor is a writable directory), else the problem."""
    d = directory
    while not os.path.lexists(d) and d != d.parent:
        d = d.parent
    if not d.is_dir():
        return f"{what}: {d} is not a directory"
    if not os.access(d, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        verb = "is not writable" if d == directory else f"cannot be created ({d} is not writable)"
        return f"{what}: {directory} {verb}"
    return None


def referred_problems(cfg: configmod.Config) -> list[str]:
    """What ``cfg`` refers to and certd cannot start (or serve) without: the platform
    source, the [trust] roots, and the directories it writes to."""
    from certd import platform as platmod
    from certd.service import rotation

    problems = []
    try:
        source = rotation.platform_source(cfg)
    except rotation.SetupError as e:
        problems.append(str(e))
    else:
        if source.kind == "sev" and not os.path.exists(source.path):
            problems.append(f'platform.source = "sev" but this host has no {source.path} '
                            '(not an SNP host, or the ccp/kvm_amd modules are not loaded)')
        elif source.kind == "file":
            try:
                platmod.load(source.path)
            except (platmod.PlatformError, OSError) as e:
                problems.append(f"platform.file: {e}")
    try:
        rotation.trust_of(cfg)
    except rotation.SetupError as e:
        problems.append(str(e))
    dirs = [(b.parent, f"blob directory of {b}") for b in cfg.blobs]
    dirs.append((cfg.kds.cache_dir, "kds.cache_dir"))
    if cfg.watch.drop_dir is not None:
        dirs.append((cfg.watch.drop_dir, "watch.drop_dir"))
    for d, what in dirs:
        problem = _writable(Path(d), what)
        if problem:
            problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dev and (args.product is not None or args.dev_dir is not None):
        parser.error("--product and --dev-dir work only with --dev")
    from certd.service import daemon, devmode  # the daemon stack loads only when used

    if args.check_config is not None:
        return configmod.check_main(args.check_config or args.config or configmod.DEFAULT_PATH,
                                    referred_problems)
    if args.dev:
        directory = Path(args.dev_dir) if args.dev_dir else Path(
            tempfile.mkdtemp(prefix="certd-dev-"))
        try:
            setup = devmode.prepare(directory, args.product or Product.MILAN)
            logs.configure(setup.config.log.level, setup.config.log.format)
            ctx = daemon.Context(trust=setup.trust,
                                 on_ready=lambda: devmode.print_banner(setup))
            try:
                return daemon.run(setup.config, str(setup.config_path), ctx)
            finally:
                setup.kds.stop()
        finally:
            if not args.dev_dir:
                shutil.rmtree(directory, ignore_errors=True)
    path = args.config or str(configmod.DEFAULT_PATH)
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as e:
        print(f"certd: invalid configuration:\n{e}", file=sys.stderr)
        return exitcodes.CONFIG
    logs.configure(cfg.log.level, cfg.log.format)
    return daemon.run(cfg, path, daemon.Context())


if __name__ == "__main__":
    sys.exit(main())
