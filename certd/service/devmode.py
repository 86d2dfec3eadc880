"""``certd --dev``: the embedded development default.

A generated AMD-like PKI (same structure and algorithms as AMD's, 2048-bit RSA for speed),
a simulated platform with a fake PSP, and temporary paths: everything a VMM developer
needs to talk to a real certd on a laptop, printed at start.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from certd import config as configmod, devkds, devpki, platform as platformmod, policy
from certd.abi.product import Product
from certd.amd.roots import TrustStore
from certd.store.blobstore import BlobStore


@dataclass
class DevSetup:
    directory: Path
    config_path: Path
    config: configmod.Config
    trust: TrustStore
    psp: devpki.FakePsp
    kds: devkds.DevKds

    @property
    def socket(self) -> Path:
        return self.directory / "certd.sock"

    @property
    def blob(self) -> Path:
        return self.directory / "certs.blob"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.metrics.listen}/metrics"

    def banner(self) -> str:
        d, q = self.directory, lambda p: shlex.quote(str(p))
        p = self.psp.platform
        beside = Path(sys.argv[0]).resolve().parent / "certctl"
        certctl = q(beside) if beside.exists() else "certctl"
        return f"""\
{'certd development mode ':-<77}
  generated AMD-like PKI ({p.product.value}), simulated platform, TCB {p.reported_tcb}
  socket   {self.socket}
  blob     {self.blob}   (a stock QEMU may read it: certs-filename=)
  metrics  {self.metrics_url}   (also /healthz, /readyz)
  config   {self.config_path}
  roots    {d / 'dev-roots.pem'}   (development trust anchors, NOT AMD's)
  report   {d / 'report.bin'}   (signed by the simulated PSP)
  kds      {self.kds.url}   (development KDS: mints VCEKs for any TCB)

Try, from another shell:
  {certctl} fetch --socket {q(self.socket)} --vm dev-vm --npages 4 -o /tmp/certs-table.bin
  {certctl} status --socket {q(self.socket)}
  {certctl} show {q(self.blob)}
  {certctl} verify {q(self.blob)} --roots {q(d / 'dev-roots.pem')} --report {q(d / 'report.bin')}

A firmware update that moves the reported TCB, with the matching VCEK installed before
any guest sees the new key (the development KDS supplies it):
  {certctl} fw-update --config {q(self.config_path)} -- {q(sys.executable)} -m certd.devfw {q(d / 'platform.toml')} --snp +1

Ctrl-C stops certd.
{'':-<77}"""


def prepare(directory: Path, product: Product = Product.MILAN) -> DevSetup:
    directory.mkdir(parents=True, exist_ok=True)
    pki = devpki.DevPki.generate(product, name="certd-dev")
    kds = devkds.DevKds([pki]).start()
    psp = devpki.FakePsp(pki, devpki.make_platform(product))
    platform = psp.platform
    platform_path = directory / "platform.toml"
    platformmod.save(platform, platform_path)
    (directory / "dev-roots.pem").write_bytes(pki.cert_chain_pem() + pki.asvk.public_bytes(
        devpki.PEM))
    (directory / "report.bin").write_bytes(psp.report(b"certd --dev"))

    blob = policy.build_blob(pki.ark, pki.ask, psp.leaf, trust=pki.trust, platform=platform)
    store = BlobStore(directory / "certs.blob",
                      lambda b: policy.check_blob(b, trust=pki.trust, platform=platform))
    store.install(blob)

    config_path = directory / "certd.toml"
    config_path.write_text(f"""\
# Written by certd --dev. Every key: docs/configuration.md.
[server]
socket = "{directory / 'certd.sock'}"
socket_mode = "0600"

[access]
allow_uids = [{os.getuid()}]

[store]
blob = "{directory / 'certs.blob'}"

[platform]
source = "file"
file = "{platform_path}"

[trust]
roots = ["{directory / 'dev-roots.pem'}"]   # development trust anchors, NOT AMD's

[kds]
base_url = "{kds.url}"             # the development KDS, in this process
cache_dir = "{directory / 'kds-cache'}"
min_backoff_s = 0.5
max_backoff_s = 5.0

[log]
level = "debug"

[metrics]
listen = "127.0.0.1:{_free_port()}"
""")
    return DevSetup(directory, config_path, configmod.load(config_path), pki.trust, psp, kds)


def _free_port() -> int:
    # Asked of the kernel now and bound again at start: another process could take it in
    # between, which certd reports (exit 69) rather than serving elsewhere.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_banner(setup: DevSetup) -> None:
    print(setup.banner(), flush=True)
    sys.stdout.flush()
