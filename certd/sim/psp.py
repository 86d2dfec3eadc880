"""The simulated platform, shared between processes: PKI directory + platform file.

The daemon, the updaters, the development KDS and the VMMs are separate processes, so the
fake PSP's state lives in files:

* the **PKI directory** of the development KDS (:func:`certd.devkds.open_pki_dir`: dev
  ARK/ASK/ASVK with their keys, and ``dev-roots.pem``). VCEK private keys are derived from
  it, the chip id and the reported TCB (:func:`certd.devkds.derived_vcek_key`, the function
  the development KDS mints with), so every process that signs for a TCB uses the key of
  the VCEK that KDS hands out, and going back to an old TCB gives the old key again;
* the **platform file** (:mod:`certd.platform`) holds the reported TCB, chip id and
  signing key. A firmware update (``python -m certd.devfw``) rewrites it atomically: the
  key changes at that instant, not when certd learns of it.

:class:`SharedPsp` re-reads the platform file at every signature, so a report is signed
with the key of the moment the VMM resumes the vCPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from certd import devkds, devpki, platform as platformmod, policy
from certd.abi.product import Product
from certd.abi.tcb import Tcb
from certd.platform import Platform

#: Stands for the chip id in the key derivation of a VLEK (which has no hwID).
_VLEK_LABEL = b"VLEK"


def roots_path(pki_dir: str | Path) -> Path:
    """The trust anchors of the PKI directory (``[trust] roots``, ``--roots``)."""
    return Path(pki_dir) / "dev-roots.pem"


@dataclass
class SharedPsp(devpki.FakePsp):
    """A :class:`~certd.devpki.FakePsp` whose state is in files (see the module doc)."""

    platform_path: Path | None = None
    _stat_key: tuple | None = field(default=None, repr=False)

    @classmethod
    def open(cls, pki_dir: str | Path, platform_path: str | Path) -> "SharedPsp":
        path = Path(platform_path)
        platform = platformmod.load(path)
        pki = devkds.load_pki(pki_dir, platform.product)
        if pki is None:
            raise FileNotFoundError(f"no {platform.product.value} PKI in {pki_dir}")
        psp = cls(pki, platform, platform_path=path)
        psp.refresh()
        return psp

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        """The VCEK/VLEK private key for the current reported TCB, the one the development
        KDS certifies (the same in every process)."""
        p = self.platform
        ident = self._ident(p.reported_tcb)
        k = self._keys.get(ident)
        if k is None:
            chip = _VLEK_LABEL if p.vlek else (p.chip_id or b"")
            k = self._keys[ident] = devkds.derived_vcek_key(self.pki, chip, p.reported_tcb)
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
        validator runs* (after the firmware step of an update)."""
        return lambda blob: policy.check_blob(blob, trust=self.pki.trust,
                                              platform=self.refresh())


def next_tcb(tcb: Tcb) -> Tcb:
    """The TCB a simulated update moves to: SNP SPL + 1 (wrapping below 256)."""
    return Tcb(fmc=tcb.fmc, bl=tcb.bl, tee=tcb.tee, snp=(tcb.snp + 1) % 256, ucode=tcb.ucode)


def leaf_tcb(blob: bytes, product: Product) -> Tcb | None:
    """The TCB of the VCEK/VLEK in ``blob`` (None for the empty table or no leaf)."""
    c = policy.parse_blob(blob)
    return None if c.leaf is None else c.leaf.ext.tcb(product)
