"""The simulated platform, shared between processes: PKI directory + platform file.

The daemon, the updaters and the VMMs are separate processes, so the fake PSP's state
lives in files:

* the **PKI directory** holds the dev ARK/ASK/ASVK (certificates and private keys) and
  the chip's secret. VCEK/VLEK private keys are *derived* from the secret, the chip id and
  the reported TCB, as a real PSP derives them, so every process that signs for a TCB
  uses the same key, and going back to an old TCB gives the old key again;
* the **platform file** (:mod:`certd.platform`) holds the reported TCB, chip id and
  signing key. A firmware update rewrites it (atomically, by rename): the key changes at
  that instant, not when certd learns of it.

:class:`SharedPsp` re-reads the platform file at every signature, so a report is signed
with the key of the moment the VMM resumes the vCPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certd import devpki, platform as platformmod, policy
from certd.abi import table, tcb as tcbmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.amd.roots import TrustStore
from certd.platform import Platform

_CAS = ("ark", "ask", "asvk")
_SECRET = "psp.secret"
#: The order of the P-384 group: derived scalars are reduced into [1, n-1].
_P384_N = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
              "581a0db248b0a77aecec196accc52973", 16)


def create_pki(directory: str | Path, product: Product = Product.MILAN) -> devpki.DevPki:
    """Generate a dev PKI and write it (certificates, private keys, chip secret) to
    ``directory``, plus ``roots.pem`` (ASK, ARK, ASVK) for humans and certctl."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pki = devpki.DevPki.generate(product, name=f"sim-{os.urandom(8).hex()}")
    for name in _CAS:
        cert, key = getattr(pki, name), getattr(pki, f"{name}_key")
        (d / f"{name}.pem").write_bytes(cert.public_bytes(devpki.PEM))
        key_file = d / f"{name}.key"
        key_file.write_bytes(key.private_bytes(devpki.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
    (d / _SECRET).write_bytes(os.urandom(48))
    (d / "product").write_text(product.value + "\n")
    (d / "roots.pem").write_bytes(pki.cert_chain_pem() + pki.asvk.public_bytes(devpki.PEM))
    return pki


def load_pki(directory: str | Path) -> devpki.DevPki:
    """The dev PKI that :func:`create_pki` wrote."""
    d = Path(directory)
    parts = {}
    for name in _CAS:
        parts[name] = x509.load_pem_x509_certificate((d / f"{name}.pem").read_bytes())
        parts[f"{name}_key"] = serialization.load_pem_private_key(
            (d / f"{name}.key").read_bytes(), password=None)
    product = Product.parse((d / "product").read_text().strip())
    return devpki.DevPki(product, f"sim:{d}", **parts)


def load_trust(directory: str | Path) -> TrustStore:
    return load_pki(directory).trust


@dataclass
class SharedPsp(devpki.FakePsp):
    """A :class:`~certd.devpki.FakePsp` whose state is in files (see the module doc)."""

    platform_path: Path | None = None
    secret: bytes = b""
    _stat_key: tuple | None = field(default=None, repr=False)

    @classmethod
    def open(cls, pki_dir: str | Path, platform_path: str | Path) -> "SharedPsp":
        pki = load_pki(pki_dir)
        path = Path(platform_path)
        psp = cls(pki, platformmod.load(path), platform_path=path,
                  secret=(Path(pki_dir) / _SECRET).read_bytes())
        psp.refresh()
        return psp

    def _ident(self, tcb: Tcb) -> tuple:
        return (self.platform.signing_key, self.platform.chip_id, tcb)

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        """The VCEK/VLEK private key for the current reported TCB, derived from the chip
        secret (the same in every process)."""
        p = self.platform
        ident = self._ident(p.reported_tcb)
        k = self._keys.get(ident)
        if k is None:
            seed = hashlib.sha384(b"|".join([
                p.signing_key.encode(), self.secret,
                b"" if p.vlek else (p.chip_id or b""),
                tcbmod.encode(p.reported_tcb, p.product)])).digest()
            k = ec.derive_private_key(int.from_bytes(seed, "big") % (_P384_N - 1) + 1,
                                      ec.SECP384R1())
            self._keys[ident] = k
        return k

    def refresh(self) -> Platform:
        """Re-read the platform file if it was replaced (one fstat when it was not)."""
        assert self.platform_path is not None
        with open(self.platform_path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key != self._stat_key:
                self.platform = platformmod.loads(f.read().decode(), str(self.platform_path))
                self._stat_key = key
        return self.platform

    def sign(self, report_data: bytes = b"") -> bytes:
        """SNP_GUEST_REQUEST: a report signed with the key of this instant."""
        self.refresh()
        return self.report(report_data)

    def valid_blob(self, platform: Platform | None = None) -> bytes:
        """The blob for ``platform`` (default: the current one), built and checked by
        :func:`certd.policy.build_blob` against the dev trust."""
        if platform is not None:
            self.platform = platform
        ask = self.pki.asvk if self.platform.vlek else self.pki.ask
        return policy.build_blob(self.pki.ark, ask, self.leaf, trust=self.pki.trust,
                                 platform=self.platform)

    def validator(self):
        """``check_blob`` against the dev trust and the platform file *as it is when the
        validator runs* (after the firmware step of an update). The empty table is valid:
        it is what a host without certificates serves."""
        def validate(blob: bytes):
            if blob == table.EMPTY_TABLE:
                return []
            return policy.check_blob(blob, trust=self.pki.trust, platform=self.refresh())
        return validate


def firmware_update(platform_path: str | Path, new_tcb: Tcb, *,
                    signing_key: str | None = None) -> Platform:
    """The firmware command: install and commit ``new_tcb`` (and optionally switch to the
    VLEK or back). From this instant the PSP signs with the new key."""
    old = platformmod.load(platform_path)
    new = old.replace(reported_tcb=new_tcb, current_tcb=new_tcb,
                      signing_key=signing_key or old.signing_key)
    platformmod.save(new, platform_path)
    return new


def next_tcb(tcb: Tcb) -> Tcb:
    """The TCB a simulated update moves to: SNP SPL + 1 (wrapping below 256)."""
    return Tcb(fmc=tcb.fmc, bl=tcb.bl, tee=tcb.tee, snp=(tcb.snp + 1) % 256, ucode=tcb.ucode)


def leaf_tcb(blob: bytes, product: Product) -> Tcb | None:
    """The TCB of the VCEK/VLEK in ``blob`` (None for the empty table or no leaf)."""
    c = policy.parse_blob(blob)
    return None if c.leaf is None else c.leaf.ext.tcb(product)
