"""certctl kds: the VCEK URL, fetch, prefetch, and export the cache for trustee."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from certd import config as configmod
from certd import exitcodes, policy
from certd.abi.tcb import Tcb
from certd.amd import kds as kdsurl
from certd.cli import certinfo
from certd.cli.cmd_build import write_atomic
from certd.cli.common import CliError, add_json_flag, emit, nonnegative
from certd.platform import Platform
from certd.sources import kds as kdsmod
from certd.sources.kds import KdsClient, KdsUnavailable
from certd.verify import pki

DEFAULT_TIMEOUT_S = 60.0

EPILOG = """\
Which chip and TCB: --platform FILE (a platform file, docs/platform.md), else the
[platform] section of --config (default /etc/certd/certd.toml), i.e. /dev/sev on an SNP
host. Where from: the config's [kds] mirrors, then base_url (--url overrides, repeatable),
with its cache_dir (--cache-dir overrides), retry settings and relay (kds.relay: the
Unix socket of a relay to the configured source; --url connects directly).

The VCEK is the one for the platform's REPORTED TCB (or --tcb). Every answer is checked
before it is used or cached: it must parse, chain to AMD's pinned ARK/ASK (or --roots),
and carry the TCB and hwID asked for. 429/5xx answers are retried after Retry-After or a
backoff; 404 tries the next source; all of it within --timeout.

examples:
  certctl kds url --platform /etc/certd/platform.toml --chain --crl
  certctl kds fetch -o /var/lib/certd/new.blob          # ARK, ASK, VCEK, CRL if fresh
  certctl kds fetch --der -o vcek.der                    # the bare VCEK
  certctl kds prefetch --tcb bl=4,tee=0,snp=29,ucode=222 # before a firmware update
  certctl kds export --trustee /srv/trustee              # DIR/kds-store/vcek/...

""" + exitcodes.epilog()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kds", help="AMD KDS: VCEK URL, fetch, prefetch, export the cache",
                       description="Get VCEKs from AMD KDS (or mirrors) through certd's "
                                   "validated on-disk cache.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="kds_command", metavar="ACTION", required=True)

    def action(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_, description=description, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        a.add_argument("--platform", metavar="FILE", help="the " + certinfo.PLATFORM_HELP)
        a.add_argument("--config", metavar="FILE", default=str(configmod.DEFAULT_PATH),
                       help="certd configuration for [kds] and [platform] (default: "
                            "%(default)s; if that default is missing, built-in defaults)")
        a.add_argument("--url", metavar="URL", action="append", default=[],
                       help="KDS base URL or mirror to use instead of the configured ones "
                            "(repeatable; tried in order)")
        a.add_argument("--cache-dir", metavar="DIR", help="cache directory instead of "
                                                          "kds.cache_dir")
        certinfo.add_roots_flag(a)
        add_json_flag(a)
        return a

    u = action("url", "print the VCEK URL for the platform's reported TCB",
               "Print the KDS URL of this platform's VCEK (no network).")
    u.add_argument("--tcb", type=certinfo.tcb_arg, metavar="TCB",
                   help="another TCB than the reported one: bl=N,tee=N,snp=N,ucode=N[,fmc=N]")
    u.add_argument("--chain", action="store_true", help="also print the cert_chain URL")
    u.add_argument("--crl", action="store_true", help="also print the CRL URL")
    u.set_defaults(func=run_url)

    f = action("fetch", "fetch and validate the VCEK; write the blob (or --der)",
               "Fetch the VCEK for the platform's reported TCB (cache first), validate it, "
               "and write the certificate blob: ARK, ASK, VCEK and the CRL while fresh.")
    f.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="file to write (replaced atomically)")
    f.add_argument("--der", action="store_true",
                   help="write the bare VCEK (DER) instead of the blob")
    timeout_flag(f)
    f.set_defaults(func=run_fetch)

    pf = action("prefetch", "warm the cache for a TCB about to be installed",
                "Fetch and cache the VCEK for --tcb (default: the reported TCB) without "
                "writing a blob. Concurrent fetches of one VCEK (certd, other certctl runs) "
                "share one KDS request.")
    pf.add_argument("--tcb", type=certinfo.tcb_arg, metavar="TCB",
                    help="bl=N,tee=N,snp=N,ucode=N[,fmc=N] (fmc on Turin only)")
    timeout_flag(pf)
    pf.set_defaults(func=run_prefetch)

    e = action("export", "copy the cached VCEKs into trustee's offline store layout",
               "Write every valid cached VCEK as DIR/kds-store/vcek/<hwid>/"
               "bl<BL>_tee<TEE>_snp<SNP>_ucode<UC>[_fmc<FMC>]_vcek.der (hwid lower-case hex, "
               "8 bytes on Turin; SPLs two digits), the layout of trustee's OfflineStore.")
    e.add_argument("--trustee", metavar="DIR", required=True, help="trustee store root")
    e.set_defaults(func=run_export)


def timeout_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=nonnegative, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="give up after S seconds of retrying (default: %(default)g)")


# --- shared --------------------------------------------------------------------------------

def _config(args: argparse.Namespace) -> configmod.Config:
    path = Path(args.config)
    if args.config == str(configmod.DEFAULT_PATH) and not path.exists():
        return configmod.Config()
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        code = exitcodes.NOINPUT if not path.exists() else exitcodes.CONFIG
        raise CliError(f"invalid configuration: {e}", code) from None


class _StderrLog:
    """What the client logs, as certctl lines on stderr (retries and refusals only)."""

    def info(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        where = kw.get("url") or kw.get("path") or ""
        why = kw.get("reason") or kw.get("error") or ""
        retry = f"; retrying in {kw['retry_in_s']:g} s" if "retry_in_s" in kw else ""
        print(f"certctl: {event}: {where}: {why}{retry}", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace, cfg: configmod.Config) -> KdsClient:
    k = cfg.kds
    urls = tuple(u.rstrip("/") for u in args.url) or k.urls
    if not urls and args.kds_command in ("fetch", "prefetch"):
        raise CliError("no KDS source: kds.base_url is \"\" and kds.mirrors is empty; give "
                       "--url URL", exitcodes.CONFIG)
    return KdsClient(urls, Path(args.cache_dir) if args.cache_dir else k.cache_dir,
                     trust=certinfo.trust_from_args(args), timeout_s=k.timeout_s,
                     min_backoff_s=k.min_backoff_s, max_backoff_s=k.max_backoff_s,
                     relay=None if args.url else k.relay, log=_StderrLog())


def _platform(args: argparse.Namespace, cfg: configmod.Config) -> Platform:
    if args.platform:
        return certinfo.load_platform(args.platform)
    from certd.service.daemon import StartupError, load_platform
    try:
        p = load_platform(cfg)
    except FileNotFoundError as e:
        raise CliError(f"platform file {e.filename!r} does not exist", exitcodes.NOINPUT) from None
    except (StartupError, ValueError, OSError) as e:
        raise CliError(f"cannot read the platform: {e}", exitcodes.UNAVAILABLE) from None
    if p is None:
        raise CliError(f"no platform: {cfg.source} sets no platform.file and this host has no "
                       "/dev/sev; give --platform FILE", exitcodes.NOINPUT)
    return p


def _with_tcb(p: Platform, tcb: Tcb | None) -> Platform:
    if tcb is None:
        return p
    try:
        return p.replace(reported_tcb=tcb, current_tcb=None)
    except ValueError as e:
        raise CliError(f"--tcb {tcb}: {e}", exitcodes.USAGE) from None


def _setup(args: argparse.Namespace) -> tuple[KdsClient, Platform]:
    cfg = _config(args)
    platform = _with_tcb(_platform(args, cfg), getattr(args, "tcb", None))
    if platform.vlek:
        raise CliError("the platform signs reports with a VLEK: KDS gives VLEKs only to the "
                       "CSP; put the VLEK in the drop directory instead", exitcodes.DATAERR)
    if platform.chip_id is None:
        raise CliError("the platform's chip id is unknown (platform file without chip_id); "
                       "a VCEK cannot be looked up without it", exitcodes.DATAERR)
    return _client(args, cfg), platform


def _unavailable(e: KdsUnavailable) -> CliError:
    lines = "\n".join(f"  {f}" for f in e.failures) or "  (no sources)"
    code = exitcodes.DATAERR if e.invalid else exitcodes.UNAVAILABLE
    return CliError(f"{e.what} not available:\n{lines}", code, **e.as_dict())


# --- actions ------------------------------------------------------------------------------

def run_url(args: argparse.Namespace) -> int:
    client, p = _setup(args)
    bases = client.urls or (kdsurl.DEFAULT_BASE,)
    try:
        urls: dict[str, Any] = {"vcek": [client.vcek_url(p, b) for b in bases]}
    except ValueError as e:
        raise CliError(str(e), exitcodes.DATAERR) from None
    if args.chain:
        urls["cert_chain"] = [kdsurl.cert_chain_url(p.product, base=b) for b in bases]
    if args.crl:
        urls["crl"] = [kdsurl.crl_url(p.product, base=b) for b in bases]
    emit(args, {"ok": True, "product": p.product.value, "tcb": p.reported_tcb.as_dict(),
                "hwid": p.chip_id.hex(), "urls": urls},
         "\n".join(v[0] for v in urls.values()))
    return exitcodes.OK


def run_fetch(args: argparse.Namespace) -> int:
    client, p = _setup(args)
    try:
        blob = client.vcek_blob_sync(p, deadline_s=args.timeout)
    except KdsUnavailable as e:
        raise _unavailable(e) from None
    except policy.PolicyError as e:
        raise CliError(str(e), exitcodes.CHECK_FAILED) from None
    contents = policy.parse_blob(blob)
    data = contents.leaf.der if args.der else blob
    out = Path(args.output)
    write_atomic(out, data)
    has_crl = contents.crl is not None
    emit(args, {"ok": True, "output": str(out), "format": "der" if args.der else "blob",
                "size": len(data), "product": p.product.value, "tcb": p.reported_tcb.as_dict(),
                "hwid": p.chip_id.hex(), "crl": has_crl, "trust": client.trust.name,
                "requests": client.requests},
         f"wrote {out}: {'VCEK (DER)' if args.der else 'blob'} {len(data)} bytes; "
         f"{p.product.value} TCB {p.reported_tcb}"
         f"{'' if args.der else (' with CRL' if has_crl else ' (no fresh CRL)')}; "
         f"verified against the {client.trust.name} roots")
    return exitcodes.OK


def run_prefetch(args: argparse.Namespace) -> int:
    client, p = _setup(args)
    try:
        path = client.prefetch(p.product, p.chip_id, p.reported_tcb, deadline_s=args.timeout)
    except KdsUnavailable as e:
        raise _unavailable(e) from None
    except ValueError as e:
        raise CliError(str(e), exitcodes.DATAERR) from None
    emit(args, {"ok": True, "cached": str(path), "product": p.product.value,
                "tcb": p.reported_tcb.as_dict(), "hwid": p.chip_id.hex(),
                "requests": client.requests},
         f"cached {path} ({p.product.value} TCB {p.reported_tcb}"
         f"{'; already cached' if client.requests == 0 else ''})")
    return exitcodes.OK


def run_export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    client = _client(args, cfg)
    store = Path(args.trustee) / "kds-store" / "vcek"
    exported, skipped = [], []
    for product, hwid, path in client.cached_vceks():
        try:
            leaf = pki.load_certificate(path.read_bytes(), str(path))
            tcb = leaf.tcb()
            roots = client.trust.roots(product)
            policy.build_blob(roots.ark, roots.ask, leaf, trust=client.trust,
                              platform=Platform(product=product, reported_tcb=tcb, chip_id=hwid))
            if path.name != kdsmod.vcek_file_name(tcb):
                raise ValueError(f"its TCB {tcb} does not match the file name")
        except (OSError, ValueError) as e:  # PkiError, PolicyError, TrustError are ValueErrors
            skipped.append({"file": str(path), "reason": str(e)})
            continue
        dest = store / hwid.hex() / kdsmod.vcek_file_name(tcb)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, leaf.der)
        os.chmod(dest, 0o644)
        exported.append({"file": str(dest), "product": product.value, "hwid": hwid.hex(),
                         "tcb": tcb.as_dict()})
    emit(args, {"ok": True, "store": str(store), "exported": exported, "skipped": skipped},
         lambda: "\n".join([f"exported {e['file']}" for e in exported]
                           + [f"skipped {s['file']}: {s['reason']}" for s in skipped]
                           + [f"{len(exported)} VCEK(s) in {store}"]))
    return exitcodes.OK
