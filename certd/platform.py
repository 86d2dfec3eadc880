"""The platform's identity: product, reported/current TCB, chip id, masking, signing key.

On an SNP host these come from ``/dev/sev`` (:func:`read_dev_sev`). Hosts without SNP,
tests and ``certd --dev`` use a small TOML *platform file* with the same fields::

    # certd platform file
    product = "Milan"               # Milan, Genoa (also Siena/Bergamo) or Turin
    chip_id = "3ac3fe21...6b5d"     # hex; 64 bytes (Milan/Genoa) or 8 bytes (Turin)
    mask_chip_id = false            # true: guests' reports carry an all-zero CHIP_ID
    signing_key = "vcek"            # or "vlek" (a CSP-provisioned VLEK is loaded)

    [reported_tcb]                  # selects the VCEK; fmc only on Turin
    bl = 2
    tee = 0
    snp = 5
    ucode = 68

    [current_tcb]                   # optional
    bl = 2
    ...

``chip_id`` may be omitted only when the chip id is masked or the signing key is the
VLEK (neither compares a hwID).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certd import faults
from certd.fileio import write_atomic
from certd.abi import tcb as tcbmod
from certd.abi.product import Product
from certd.abi.tcb import Tcb

SIGNING_KEYS = ("vcek", "vlek")


class PlatformError(ValueError):
    pass


@dataclass(frozen=True)
class Platform:
    product: Product
    reported_tcb: Tcb
    #: The hwID as VCEKs carry it: 64 bytes Milan/Genoa, 8 bytes Turin (a 64-byte Turin
    #: CHIP_ID with a zero tail is shortened). None: unknown, hwID is not compared.
    chip_id: bytes | None = None
    current_tcb: Tcb | None = None
    mask_chip_id: bool = False
    signing_key: str = "vcek"

    def __post_init__(self) -> None:
        if not isinstance(self.product, Product):
            raise PlatformError(f"product must be a Product, got {self.product!r}")
        for name in ("reported_tcb", "current_tcb"):
            t = getattr(self, name)
            if t is None and name == "current_tcb":
                continue
            if not isinstance(t, Tcb):
                raise PlatformError(f"{name} must be a Tcb, got {t!r}")
            try:
                tcbmod.encode(t, self.product)  # fmc present exactly on Turin
            except tcbmod.TcbError as e:
                raise PlatformError(f"{name}: {e}") from None
        if self.signing_key not in SIGNING_KEYS:
            raise PlatformError(f"signing_key must be one of {', '.join(SIGNING_KEYS)}, "
                                f"got {self.signing_key!r}")
        if self.chip_id is not None:
            cid = bytes(self.chip_id)
            if self.product.turin_layout and len(cid) == 64 and not any(cid[8:]):
                cid = cid[:8]
            if len(cid) != self.product.hwid_len:
                raise PlatformError(f"{self.product.value} chip_id is {self.product.hwid_len} "
                                    f"bytes, got {len(cid)}")
            object.__setattr__(self, "chip_id", cid)

    @property
    def vlek(self) -> bool:
        return self.signing_key == "vlek"

    def replace(self, **changes: Any) -> "Platform":
        return dataclasses.replace(self, **changes)


# --- platform file ----------------------------------------------------------------------

def _tcb_from(table: Any, where: str, product: Product) -> Tcb:
    if not isinstance(table, dict):
        raise PlatformError(f"{where} must be a table with bl, tee, snp, ucode"
                            f"{', fmc' if product.turin_layout else ''}")
    allowed = {"bl", "tee", "snp", "ucode", "fmc"}
    extra = set(table) - allowed
    if extra:
        raise PlatformError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    try:
        t = Tcb(**{k: int(v) for k, v in table.items()})
    except (TypeError, ValueError) as e:
        raise PlatformError(f"{where}: {e}") from None
    return t


def loads(text: str, source: str = "<platform file>") -> Platform:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlatformError(f"{source}: not valid TOML: {e}") from None
    known = {"product", "chip_id", "mask_chip_id", "signing_key", "reported_tcb", "current_tcb"}
    extra = set(doc) - known
    if extra:
        raise PlatformError(f"{source}: unknown key(s) {', '.join(sorted(extra))}")
    for key in ("product", "reported_tcb"):
        if key not in doc:
            raise PlatformError(f"{source}: missing {key!r}")
    try:
        product = Product.parse(str(doc["product"]))
    except ValueError as e:
        raise PlatformError(f"{source}: {e}") from None
    mask = doc.get("mask_chip_id", False)
    if not isinstance(mask, bool):
        raise PlatformError(f"{source}: mask_chip_id must be true or false")
    signing_key = str(doc.get("signing_key", "vcek")).lower()
    chip_id = None
    if "chip_id" in doc:
        text_id = re.sub(r"[\s:]", "", str(doc["chip_id"]))
        try:
            chip_id = bytes.fromhex(text_id)
        except ValueError:
            raise PlatformError(f"{source}: chip_id is not hex") from None
    elif not mask and signing_key != "vlek":
        raise PlatformError(f"{source}: missing 'chip_id' (required unless mask_chip_id = true "
                            "or signing_key = \"vlek\")")
    try:
        return Platform(
            product=product,
            reported_tcb=_tcb_from(doc["reported_tcb"], f"{source}: [reported_tcb]", product),
            current_tcb=(_tcb_from(doc["current_tcb"], f"{source}: [current_tcb]", product)
                         if "current_tcb" in doc else None),
            chip_id=chip_id, mask_chip_id=mask, signing_key=signing_key)
    except PlatformError as e:
        msg = str(e)
        raise PlatformError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def load(path: str | Path) -> Platform:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlatformError(f"{p}: cannot read platform file ({getattr(e, 'strerror', None) or e})") from None
    return loads(text, str(p))


def _tcb_toml(section: str, t: Tcb) -> str:
    lines = [f"[{section}]"]
    if t.fmc is not None:
        lines.append(f"fmc = {t.fmc}")
    lines += [f"bl = {t.bl}", f"tee = {t.tee}", f"snp = {t.snp}", f"ucode = {t.ucode}"]
    return "\n".join(lines) + "\n"


def dumps(p: Platform) -> str:
    out = ["# certd platform file (stand-in for /dev/sev)",
           f'product = "{p.product.value}"']
    if p.chip_id is not None:
        out.append(f'chip_id = "{p.chip_id.hex()}"')
    out += [f"mask_chip_id = {'true' if p.mask_chip_id else 'false'}",
            f'signing_key = "{p.signing_key}"', ""]
    text = "\n".join(out) + "\n" + _tcb_toml("reported_tcb", p.reported_tcb)
    if p.current_tcb is not None:
        text += "\n" + _tcb_toml("current_tcb", p.current_tcb)
    return text


def save(p: Platform, path: str | Path) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    write_atomic(path, dumps(p).encode("utf-8"))


# --- /dev/sev (best effort; cannot run without SNP hardware) ----------------------------

def product_from_cpuinfo(path: str = "/proc/cpuinfo") -> Product:
    """Product from the first CPU's family/model (what CPUID says; Siena/Bergamo -> Genoa)."""
    fam = model = None
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "cpu family" and fam is None:
                    fam = int(value)
                elif key == "model" and model is None:
                    model = int(value)
                if fam is not None and model is not None:
                    break
    except (OSError, ValueError) as e:
        raise PlatformError(f"cannot read CPU family/model from {path}: {e}") from None
    product = Product.from_cpuid(fam or 0, model or 0) if fam is not None else None
    if product is None:
        raise PlatformError(f"CPU family {fam} model {model} is not a known SEV-SNP product")
    return product


def read_dev_sev(path: str = "/dev/sev", *, product: Product | None = None) -> Platform:
    """Read SNP_PLATFORM_STATUS and GET_ID2 from the SEV firmware device.

    Both go through the one ioctl ``SEV_ISSUE_CMD``; the structures are decoded by the
    pure functions of :mod:`certd.amd.sev` (docs/platform.md maps the fields). Untested
    here beyond those decoders (no SNP host); kept small on purpose.
    """
    import ctypes
    import fcntl

    from certd.amd import sev

    if not os.path.exists(path):
        raise PlatformError(f"{path} does not exist: this host has no SEV firmware interface "
                            "(not an AMD SEV-SNP host, or the ccp/kvm_amd modules are not "
                            "loaded); use a platform file instead")
    product = product or product_from_cpuinfo()

    def issue(fd: int, cmd: int, buf: ctypes.Array) -> None:
        arg = bytearray(sev.encode_issue_cmd(sev.IssueCmd(cmd, ctypes.addressof(buf))))
        try:
            fcntl.ioctl(fd, sev.SEV_ISSUE_CMD, arg, True)
        except OSError as e:
            fw_error = sev.decode_issue_cmd(bytes(arg)).error
            raise PlatformError(f"{path}: SEV command {cmd} failed: {e.strerror} "
                                f"(firmware error 0x{fw_error:x})") from None

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise PlatformError(f"cannot open {path}: {e.strerror} (needs root or the device's "
                            "group)") from None
    try:
        status_buf = ctypes.create_string_buffer(sev.SNP_STATUS.size)
        issue(fd, sev.SNP_PLATFORM_STATUS, status_buf)
        ident = ctypes.create_string_buffer(sev.ID_BUFFER_LEN)
        id2 = ctypes.create_string_buffer(
            sev.encode_get_id2(ctypes.addressof(ident), sev.ID_BUFFER_LEN), sev.GET_ID2.size)
        issue(fd, sev.SEV_GET_ID2, id2)
    finally:
        os.close(fd)
    try:
        status = sev.decode_snp_status(status_buf.raw)
        _, id_len = sev.decode_get_id2(id2.raw)
        chip_id = sev.chip_id_from_id_buffer(ident.raw, id_len, product)
    except sev.SevError as e:
        raise PlatformError(f"{path}: {e}") from None
    return Platform(product=product,
                    reported_tcb=status.reported_tcb(product),
                    current_tcb=status.current_tcb(product),
                    chip_id=chip_id,
                    mask_chip_id=status.mask_chip_id,
                    signing_key="vlek" if status.vlek_en else "vcek")


# --- the platform as observed now -------------------------------------------------------

class PlatformSource:
    """The platform identity as it is *now*, re-read when it may have changed.

    Firmware updates, SNP_COMMIT, SNP_SET_CONFIG and SNP_VLEK_LOAD change the reported TCB
    and the signing key while certd runs, so a snapshot taken at start goes stale.
    :meth:`observe` re-reads the identity (a platform file only when its inode, size,
    mtime or ctime changed; ``/dev/sev`` on every call) and bumps :attr:`epoch` whenever
    what it says changed, so every verdict taken under the old identity can be told apart
    from one taken under the new. A read that fails leaves :attr:`current` None with
    :attr:`error` saying why: nothing is served as valid on an identity nobody can read.

    ``kind``: ``"file"`` (``path``), ``"sev"`` (``path`` defaults to /dev/sev) or
    ``"fixed"`` (``fixed``: tests and dev mode pass a Platform).
    """

    def __init__(self, kind: str, path: str | Path | None = None,
                 fixed: Platform | None = None):
        if kind not in ("file", "sev", "fixed"):
            raise PlatformError(f"platform source must be file, sev or fixed, got {kind!r}")
        if kind == "file" and path is None:
            raise PlatformError("a platform file source needs a path")
        self.kind = kind
        self.path = str(path) if path is not None else ("/dev/sev" if kind == "sev" else None)
        self.current: Platform | None = fixed
        self.error: str | None = None
        self.epoch = 0
        self._key: tuple[int, ...] | None = None
        if kind != "fixed":
            self.observe(force=True)

    def describe(self) -> str:
        return {"file": f"platform file {self.path}", "sev": f"{self.path}",
                "fixed": "built-in platform"}[self.kind]

    def _file_key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def observe(self, force: bool = False) -> bool:
        """Look at the platform now; True if its identity changed (epoch bumped)."""
        if self.kind == "fixed" or (faults.unsafe("platform-observe") and self.epoch):
            return False  # unsafe: keep the identity of the first read (a snapshot)
        if self.kind == "file":
            key = self._file_key()
            if not force and key is not None and key == self._key:
                return False
            self._key = key
        try:
            new = load(self.path) if self.kind == "file" else read_dev_sev(self.path)  # type: ignore[arg-type]
            error = None
        except (PlatformError, OSError) as e:
            new, error = None, str(e)
        if new == self.current and error == self.error:
            return False
        self.current, self.error = new, error
        self.epoch += 1
        return True

    def set_fixed(self, platform: Platform) -> None:
        """Tests and dev mode: the platform changed to ``platform`` (kind ``fixed`` only)."""
        if self.kind != "fixed":
            raise PlatformError("only a fixed platform source is set by hand")
        if platform != self.current:
            self.current = platform
            self.epoch += 1
