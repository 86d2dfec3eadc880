"""Does this blob fit this platform now? The single validation gate.

:func:`check_blob` is what the store and the daemon call before installing or serving a
blob; :func:`check_report` adds "and did the key in it sign this report"; :func:`build_blob`
makes a canonical blob and refuses to make an invalid one. All return or carry EVERY
problem found (a list of :class:`~certd.verify.problems.Problem`), not just the first, so
an operator fixes everything in one round.

The functions are pure: no I/O, no clocks other than ``at`` (default: now), no caches
that change results. They are total: any bytes give a list of problems (a certificate or
CRL that does not parse is a ``format`` problem naming the entry); only :func:`build_blob`
raises, and only :class:`PolicyError`. Layering: imports abi, amd and verify; nothing
there imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certd.abi import report as reportmod
from certd.abi import table
from certd.abi.table import Role
from certd.amd.roots import TrustStore
from certd.platform import Platform
from certd.verify import chain as chainmod
from certd.verify import pki
from certd.verify.pki import Cert, Crl, Kind, PkiError
from certd.verify.problems import Problem
from certd.verify.report import signature_problems

__all__ = ["PolicyError", "BlobContents", "EMPTY_FILE", "parse_blob", "check_blob",
           "check_report", "build_blob", "Problem"]

#: The one answer for a zero-byte blob file, wherever a blob is checked (certctl show,
#: verify and install, the daemon). A zero-byte file is not a table to certd even though
#: go-sev-guest reads it as an empty one: an updater that wrote nothing is a failure.
EMPTY_FILE = Problem("format", "empty file: not a certificate table "
                               "(an empty table is 24 zero bytes)")


class PolicyError(ValueError):
    """A blob was refused. ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[Problem], what: str = "certificate blob refused"):
        self.problems = list(problems)
        super().__init__(f"{what}: " + "; ".join(str(p) for p in self.problems))


@dataclass
class BlobContents:
    """A decoded blob: its certificates by role, and the format/role problems found."""

    table: table.CertTable | None = None
    ark: Cert | None = None
    intermediate: Cert | None = None  # ASK or ASVK
    leaf: Cert | None = None  # VCEK or VLEK
    crl: Crl | None = None
    problems: list[Problem] = field(default_factory=list)


_EXPECTED_KIND = {Role.ARK: (Kind.ARK,), Role.ASK: (Kind.ASK, Kind.ASVK),
                  Role.VCEK: (Kind.VCEK,), Role.VLEK: (Kind.VLEK,)}


def parse_blob(blob: bytes) -> BlobContents:
    """Decode the table and classify each entry: ``format``, ``role`` and ``size`` problems."""
    out = BlobContents()
    if not blob:
        out.problems.append(EMPTY_FILE)
        return out
    if len(blob) > table.GUEST_MAX_SIZE:
        out.problems.append(Problem("size", f"blob is {len(blob)} bytes; Linux guests accept at "
                                            f"most {table.GUEST_MAX_SIZE} (16 KiB)"))
    try:
        out.table = table.decode(blob)
    except table.TableError as e:
        out.problems.append(Problem("format", f"not a valid certificate table: {e}"))
        return out
    for i, entry in enumerate(out.table.entries):
        role = entry.role
        source = f"blob entry {i}"
        if role is None:
            out.problems.append(Problem("role", f"entry {i} has unknown GUID {entry.guid} "
                                                f"({len(entry.data)} bytes)"))
            continue
        try:
            if role is Role.CRL:
                out.crl = pki.crl_from_der(entry.data, source)
                continue
            cert = pki.cert_from_der(entry.data, source)
        except PkiError as e:
            out.problems.append(Problem("format", str(e)))
            continue
        if cert.kind not in _EXPECTED_KIND[role]:
            out.problems.append(Problem("role", f"{source} holds {cert.describe()}, not "
                                                f"{' or '.join(k.value for k in _EXPECTED_KIND[role])}"))
            continue
        if role is Role.ARK:
            out.ark = cert
        elif role is Role.ASK:
            out.intermediate = cert
        elif out.leaf is None:
            out.leaf = cert
    present = {e.role for e in out.table.entries}
    if Role.ARK not in present:
        out.problems.append(Problem("role", "the blob has no ARK"))
    if Role.ASK not in present:
        out.problems.append(Problem("role", "the blob has no ASK/ASVK"))
    if Role.VCEK in present and Role.VLEK in present:
        out.problems.append(Problem("role", "the blob has both a VCEK and a VLEK; exactly one "
                                            "must be present (the key that signs reports)"))
    elif Role.VCEK not in present and Role.VLEK not in present:
        out.problems.append(Problem("role", "the blob has no VCEK or VLEK"))
    return out


def _product_problems(c: BlobContents, platform: Platform | None) -> list[Problem]:
    problems = []
    named = [(x.describe(), x.product) for x in (c.ark, c.intermediate, c.leaf) if x is not None]
    if c.crl is not None:
        named.append((f"CRL from {c.crl.issuer_cn!r}", c.crl.product))
    for what, product in named:
        if product is None:
            problems.append(Problem("product", f"{what} names no known product"))
    ref_what, ref = next(((w, p) for w, p in named if p is not None), (None, None))
    if ref is not None:
        for what, product in named:
            if product is not None and product is not ref:
                problems.append(Problem("product", f"{what} is {product.value} but {ref_what} "
                                                   f"is {ref.value}"))
        if platform is not None and platform.product is not ref:
            problems.append(Problem("product", f"the platform is {platform.product.value} but "
                                               f"the blob's certificates are {ref.value}"))
    return problems


def _platform_problems(leaf: Cert, platform: Platform, mask_chip_id: bool) -> list[Problem]:
    problems = []
    want = Kind.VLEK if platform.vlek else Kind.VCEK
    if leaf.kind is not want:
        problems.append(Problem("signing_key", f"the platform signs reports with its "
                                               f"{want.value} but the blob carries a "
                                               f"{leaf.kind.value}"))
    try:
        leaf_tcb = leaf.ext.tcb(platform.product)
    except ValueError as e:
        problems.append(Problem("tcb", f"{leaf.describe()}: {e}"))
    else:
        if leaf_tcb != platform.reported_tcb:
            problems.append(Problem("tcb", f"{leaf.describe()} is for TCB {leaf_tcb}, but the "
                                           f"platform's reported TCB is {platform.reported_tcb}"))
    masked = mask_chip_id or platform.mask_chip_id
    if leaf.kind is Kind.VCEK and not masked and platform.chip_id is not None:
        if leaf.hwid is None:
            problems.append(Problem("chip_id", f"{leaf.describe()} has no hwID extension"))
        elif leaf.hwid != platform.chip_id:
            problems.append(Problem("chip_id", f"{leaf.describe()} is for chip "
                                               f"{_short(leaf.hwid)}, this platform's chip id is "
                                               f"{_short(platform.chip_id)}"))
    return problems


def _short(b: bytes) -> str:
    h = b.hex()
    return h if len(h) <= 24 else f"{h[:12]}…{h[-8:]}"


def _check_contents(c: BlobContents, *, trust: TrustStore, platform: Platform | None,
                    at: datetime, crls: Sequence[Crl], mask_chip_id: bool) -> list[Problem]:
    problems = list(c.problems)
    if c.table is None:
        return problems
    if c.ark is not None and c.intermediate is not None:
        problems += chainmod.verify_chain(c.ark, c.intermediate, c.leaf, trust=trust, at=at)
    else:
        for x in (c.ark, c.intermediate, c.leaf):
            if x is not None:
                problems += chainmod.validity_problems(x, at)
    problems += _product_problems(c, platform)
    if c.leaf is not None:
        if not c.leaf.ext.has_tcb:
            problems.append(Problem("tcb", f"{c.leaf.describe()} lacks the TCB extensions"))
        if platform is not None:
            problems += _platform_problems(c.leaf, platform, mask_chip_id)
    # Only CRLs a pinned ARK signed are believed. The blob's own CRL is served to guests,
    # so its dates matter too; a CRL we were handed only adds revocations, so it is blamed
    # only if forged (its staleness is not the blob's problem).
    usable: list[Crl] = []
    if c.crl is not None:
        forged = chainmod.crl_authenticity_problems(c.crl, trust=trust)
        problems += forged + chainmod.crl_date_problems(c.crl, at)
        if not forged:
            usable.append(c.crl)
    for extra in crls:
        if extra.product is not None and c.ark is not None and extra.product is not c.ark.product:
            continue  # another product line's CRL says nothing about this blob
        forged = chainmod.crl_authenticity_problems(extra, trust=trust)
        problems += forged
        if not forged:
            usable.append(extra)
    problems += chainmod.revocation_problems((c.ark, c.intermediate, c.leaf), usable, at=at)
    return problems


def _as_crl(x: Crl | bytes | x509.CertificateRevocationList, what: str) -> Crl:
    if isinstance(x, Crl):
        return x
    if isinstance(x, x509.CertificateRevocationList):
        return pki.crl_from_der(x.public_bytes(Encoding.DER), what)
    return pki.load_crl(x, what)


def _as_crls(crls: Sequence[Crl | bytes | x509.CertificateRevocationList],
             ) -> tuple[list[Crl], list[Problem]]:
    """The CRL arguments that load, and a ``format`` problem for each one that does not."""
    out, problems = [], []
    for i, x in enumerate(crls):
        try:
            out.append(_as_crl(x, f"CRL argument {i}"))
        except PkiError as e:
            problems.append(Problem("format", str(e)))
    return out, problems


def _check(c: BlobContents, *, trust: TrustStore, platform: Platform | None,
           at: datetime | None, crls: Sequence[Crl | bytes], mask_chip_id: bool,
           ) -> list[Problem]:
    extra, problems = _as_crls(crls)
    return problems + _check_contents(c, trust=trust, platform=platform, at=chainmod.utc(at),
                                      crls=extra, mask_chip_id=mask_chip_id)


def check_blob(blob: bytes, *, trust: TrustStore, platform: Platform | None = None,
               at: datetime | None = None, crls: Sequence[Crl | bytes] = (),
               mask_chip_id: bool = False) -> list[Problem]:
    """Every reason ``blob`` must not be served on ``platform`` at ``at``; [] if it fits.

    Checks: table format; roles (one ARK, one ASK/ASVK, exactly one VCEK or VLEK, optional
    CRL, unknown GUIDs); chain to a pinned root of ``trust``; product agreement of ARK,
    ASK, leaf, CRL and platform; leaf TCB == platform reported TCB (fmc on Turin); hwID ==
    chip id (unless masked or VLEK); signing key type; validity dates; revocation by the
    blob's CRL and ``crls`` (one that does not load is a ``format`` problem); size <= 16
    KiB. An empty file is :data:`EMPTY_FILE`.
    """
    return _check(parse_blob(bytes(blob)), trust=trust, platform=platform, at=at, crls=crls,
                  mask_chip_id=mask_chip_id)


def check_report(blob: bytes, report: bytes | reportmod.AttestationReport, *,
                 trust: TrustStore, at: datetime | None = None,
                 platform: Platform | None = None, crls: Sequence[Crl | bytes] = (),
                 mask_chip_id: bool = False) -> list[Problem]:
    """:func:`check_blob` plus: the blob's leaf signed ``report``, the report's signing key
    type matches the leaf, REPORTED_TCB == leaf TCB, CHIP_ID == hwID (unless masked: by
    ``mask_chip_id`` or an all-zero CHIP_ID), and the report's product (CPUID, v3+) matches
    the leaf's. A guest receiving this blob with this report would accept both."""
    contents = parse_blob(bytes(blob))
    problems = _check(contents, trust=trust, platform=platform, at=at, crls=crls,
                      mask_chip_id=mask_chip_id)
    if not isinstance(report, reportmod.AttestationReport):
        try:
            report = reportmod.parse(report)
        except reportmod.ReportError as e:
            return problems + [Problem("format", f"report: {e}")]
    leaf = contents.leaf
    if leaf is None:
        return problems + [Problem("signature", "the blob has no VCEK/VLEK to check the report "
                                                "against")]

    key = report.signing_key
    if key is reportmod.SigningKey.NONE or not isinstance(key, reportmod.SigningKey):
        problems.append(Problem("signing_key", f"the report's SIGNING_KEY field is {key!r}: "
                                               "no VCEK/VLEK signed it"))
    elif key.name != leaf.kind.value:
        problems.append(Problem("signing_key", f"the report was signed by the platform's "
                                               f"{key.name} but the blob carries a "
                                               f"{leaf.kind.value}"))
    problems += signature_problems(report, leaf)

    if report.cpuid is not None:
        rp = report.product()
        if rp is None:
            fam, model, _ = report.cpuid
            problems.append(Problem("product", f"report CPUID family 0x{fam:x} model 0x{model:x} "
                                               "is not a known SEV-SNP product"))
        elif leaf.product is not None and rp is not leaf.product:
            problems.append(Problem("product", f"the report comes from a {rp.value} CPU (CPUID) "
                                               f"but {leaf.describe()} is {leaf.product.value}"))
    else:
        rp = None  # v2 reports carry no CPUID: the leaf's product decides the layouts
    product = rp or leaf.product
    if product is None:
        return problems
    try:
        leaf_tcb = leaf.ext.tcb(product)
        rep_tcb = report.reported_tcb(product)
    except ValueError as e:
        problems.append(Problem("tcb", f"{leaf.describe()}: {e}"))
    else:
        if leaf_tcb != rep_tcb:
            problems.append(Problem("tcb", f"report REPORTED_TCB is {rep_tcb} but "
                                           f"{leaf.describe()} is for {leaf_tcb}"))
    if leaf.kind is Kind.VCEK and not mask_chip_id and not report.chip_id_masked:
        if leaf.hwid is None:
            problems.append(Problem("chip_id", f"{leaf.describe()} has no hwID extension"))
        elif report.hwid(product) != leaf.hwid:
            problems.append(Problem("chip_id", f"report CHIP_ID {_short(report.hwid(product))} "
                                               f"is another chip than {leaf.describe()} "
                                               f"(hwID {_short(leaf.hwid)})"))
    return problems


def _as_cert(x: Cert | x509.Certificate | bytes, what: str) -> Cert:
    if isinstance(x, Cert):
        return x
    if isinstance(x, x509.Certificate):
        return pki.cert_from_der(x.public_bytes(Encoding.DER), what)
    return pki.load_certificate(x, what)


def build_blob(ark: Cert | x509.Certificate | bytes, ask: Cert | x509.Certificate | bytes,
               leaf: Cert | x509.Certificate | bytes,
               crl: Crl | x509.CertificateRevocationList | bytes | None = None, *,
               trust: TrustStore, at: datetime | None = None,
               platform: Platform | None = None, crls: Sequence[Crl | bytes] = (),
               mask_chip_id: bool = False) -> bytes:
    """The canonical blob (ARK, ASK/ASVK, VCEK or VLEK, CRL) if it passes :func:`check_blob`;
    otherwise raise :class:`PolicyError` listing every problem (inputs that do not parse
    are ``format`` problems)."""
    problems: list[Problem] = []
    parts: dict[str, Cert] = {}
    for name, x in (("ARK", ark), ("ASK", ask), ("leaf", leaf)):
        try:
            parts[name] = _as_cert(x, f"{name} input")
        except PkiError as e:
            problems.append(Problem("format", str(e)))
    crl_obj = None
    if crl is not None:
        try:
            crl_obj = _as_crl(crl, "CRL input")
        except PkiError as e:
            problems.append(Problem("format", str(e)))
    if "leaf" in parts and not parts["leaf"].kind.is_leaf:
        problems.append(Problem("role", f"the leaf input is {parts['leaf'].describe()}, not a "
                                        "VCEK or VLEK"))
    if problems:
        raise PolicyError(problems)
    leaf_role = Role.VLEK if parts["leaf"].kind is Kind.VLEK else Role.VCEK
    entries = [table.Entry.of(Role.ARK, parts["ARK"].der), table.Entry.of(Role.ASK, parts["ASK"].der),
               table.Entry.of(leaf_role, parts["leaf"].der)]
    if crl_obj is not None:
        entries.append(table.Entry.of(Role.CRL, crl_obj.der))
    blob = table.encode(entries)
    problems = check_blob(blob, trust=trust, platform=platform, at=at, crls=crls,
                          mask_chip_id=mask_chip_id)
    if problems:
        raise PolicyError(problems)
    return blob
