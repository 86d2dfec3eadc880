"""Chain, date and revocation checks for AMD SEV certificates.

    ARK (self-signed) --> ASK  --> VCEK
                      +-> ASVK --> VLEK

Every RSA signature (ARK, ASK, ASVK, and the ones they make over leaves and CRLs) is
RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt; verification uses exactly those
parameters rather than trusting what the certificate declares. Leaves must hold an EC
P-384 key (the report signature is ECDSA P-384).

Trust comes only from the :class:`~certd.amd.roots.TrustStore`: the ARK and the ASK/ASVK
must be the pinned ones (same key) for their product. A self-made chain with AMD's names
verifies internally and still fails here, which is the point.

All functions return lists of :class:`~certd.verify.problems.Problem`, never raise on bad
certificates, and have no side effects.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from certd.amd.roots import TrustStore
from certd.verify.pki import Cert, Crl, Kind, common_name
from certd.verify.problems import Problem

PSS_SALT = 48
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=PSS_SALT)


def utc(at: datetime | None) -> datetime:
    """``at`` as an aware UTC datetime; naive values are taken as UTC; None is now."""
    if at is None:
        return datetime.now(timezone.utc)
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


#: (issuer SubjectPublicKeyInfo, signature, signed bytes) -> verified. Verification is a
#: pure function of these, and RSA-4096 is most of a check's cost: the daemon and certctl
#: check the same blobs again and again, and a blob with one bad entry leaves the other
#: signatures as they were.
_PSS_VERIFIED: dict[tuple[bytes, bytes, bytes], bool] = {}
_PSS_MEMO_MAX = 512


def _pss_verifies(issuer_key: rsa.RSAPublicKey, issuer_spki: bytes, signature: bytes,
                  data: bytes) -> bool:
    memo = (issuer_spki, signature, data)
    ok = _PSS_VERIFIED.get(memo)
    if ok is None:
        try:
            issuer_key.verify(signature, data, PSS, hashes.SHA384())
            ok = True
        except InvalidSignature:
            ok = False
        if len(_PSS_VERIFIED) >= _PSS_MEMO_MAX:
            _PSS_VERIFIED.clear()
        _PSS_VERIFIED[memo] = ok
    return ok


def clear_cache() -> None:
    """Forget memoized verifications (benchmarks measure the cold cost with it)."""
    _PSS_VERIFIED.clear()


def pss_signature_error(issuer_key, issuer_spki: bytes, signature: bytes, data: bytes,
                        algo_oid, hash_algo, what: str, by: str) -> str | None:
    """None if ``signature`` over ``data`` verifies as AMD's PSS by ``issuer_key`` (whose
    DER SubjectPublicKeyInfo is ``issuer_spki``)."""
    if algo_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"{what} is signed with {getattr(algo_oid, '_name', algo_oid.dotted_string)}, " \
               "not RSASSA-PSS"
    if not isinstance(hash_algo, hashes.SHA384):
        return f"{what} signature uses {getattr(hash_algo, 'name', hash_algo)}, not SHA-384"
    if not isinstance(issuer_key, rsa.RSAPublicKey):
        return f"{by} has no RSA key, so it cannot have signed {what}"
    if not _pss_verifies(issuer_key, issuer_spki, signature, data):
        return f"{what} is not signed by {by} (RSASSA-PSS SHA-384 salt {PSS_SALT})"
    return None


def signature_error(subject: Cert, issuer: Cert) -> str | None:
    c = subject.cert
    return pss_signature_error(issuer.public_key, issuer.spki, c.signature,
                               c.tbs_certificate_bytes, c.signature_algorithm_oid,
                               subject.signature_hash, subject.describe(), issuer.describe())


def validity_problems(cert: Cert, at: datetime) -> list[Problem]:
    at = utc(at)
    if at < cert.not_before:
        return [Problem("validity", f"{cert.describe()} is not valid yet: valid from "
                                    f"{_fmt(cert.not_before)}, checked at {_fmt(at)}")]
    if at > cert.not_after:
        return [Problem("validity", f"{cert.describe()} expired at {_fmt(cert.not_after)} "
                                    f"(checked at {_fmt(at)})")]
    return []


def verify_chain(ark: Cert, intermediate: Cert, leaf: Cert | None, *, trust: TrustStore,
                 at: datetime | None = None) -> list[Problem]:
    """ARK self-signature and pinning, ARK -> ASK/ASVK (pinned), ASK/ASVK -> leaf, dates.

    Role/kind agreement (ARK is an ARK, ...) is the caller's job (policy reports it as
    ``role``); this checks what the signatures and the trust store say.
    """
    at = utc(at)
    problems: list[Problem] = []

    def chain(msg: str) -> None:
        problems.append(Problem("chain", msg))

    # --- ARK: pinned and self-signed.
    if ark.product is None:
        chain(f"{ark.describe()} names no known product, so no pinned ARK can match it")
    elif not trust.is_pinned(ark.product, "ARK", ark.spki):
        chain(f"{ark.describe()} is not the pinned {ark.product.value} ARK of the {trust.name} "
              "trust store (pinned roots are the only anchors; names prove nothing)")
    if ark.issuer != ark.subject:
        chain(f"{ark.describe()} is not self-issued (issuer {ark.issuer_cn!r})")
    err = signature_error(ark, ark)
    if err:
        chain(f"ARK self-signature: {err}")

    # --- ASK / ASVK: pinned, issued and signed by the ARK.
    role = "ASVK" if intermediate.kind is Kind.ASVK else "ASK"
    if intermediate.product is not None and not trust.is_pinned(intermediate.product, role,
                                                                intermediate.spki):
        chain(f"{intermediate.describe()} is not the pinned {intermediate.product.value} {role} "
              f"of the {trust.name} trust store")
    if intermediate.issuer != ark.subject:
        chain(f"{intermediate.describe()} names issuer {intermediate.issuer_cn!r}, "
              f"not {ark.subject_cn!r}")
    err = signature_error(intermediate, ark)
    if err:
        chain(err)

    # --- leaf: EC P-384, issued and signed by the right intermediate.
    if leaf is not None:
        want = Kind.ASVK if leaf.kind is Kind.VLEK else Kind.ASK
        if intermediate.kind is not want:
            chain(f"a {leaf.kind.value} is signed by an {want.value}, but the chain has "
                  f"{intermediate.describe()}")
        key = leaf.public_key
        if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)):
            chain(f"{leaf.describe()} key is {type(key).__name__.lstrip('_')}"
                  f"{'/' + key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else ''}, "
                  "not EC P-384")
        if leaf.issuer != intermediate.subject:
            chain(f"{leaf.describe()} names issuer {leaf.issuer_cn!r}, "
                  f"not {intermediate.subject_cn!r}")
        err = signature_error(leaf, intermediate)
        if err:
            chain(err)

    for c in (ark, intermediate, leaf):
        if c is not None:
            problems += validity_problems(c, at)
    return problems


def crl_authenticity_problems(crl: Crl, *, trust: TrustStore) -> list[Problem]:
    """Empty if a pinned ARK issued and signed ``crl`` (only then believe its entries)."""
    what = f"CRL from {crl.issuer_cn!r} ({crl.source})"
    if crl.product is None or trust.get(crl.product) is None:
        return [Problem("revocation", f"{what}: issuer is not an ARK of the {trust.name} "
                                      "trust store")]
    ark = trust.roots(crl.product).ark
    problems = []
    if crl.issuer != ark.subject:
        problems.append(Problem("revocation", f"{what}: issuer name differs from the pinned "
                                              f"{crl.product.value} ARK"))
    err = crl_signature_error(crl, ark, trust.key(crl.product, "ARK"))
    if err:
        problems.append(Problem("revocation", err))
    return problems


def crl_signature_error(crl: Crl, ark: x509.Certificate, ark_spki: bytes) -> str | None:
    """None if ``ark`` (DER SubjectPublicKeyInfo ``ark_spki``) signed ``crl`` with AMD's
    PSS parameters."""
    return pss_signature_error(ark.public_key(), ark_spki, crl.crl.signature,
                               crl.crl.tbs_certlist_bytes, crl.crl.signature_algorithm_oid,
                               crl.signature_hash, f"CRL from {crl.issuer_cn!r} ({crl.source})",
                               f"the pinned {common_name(ark.subject)}")


def crl_date_problems(crl: Crl, at: datetime | None = None) -> list[Problem]:
    at = utc(at)
    what = f"CRL from {crl.issuer_cn!r} ({crl.source})"
    problems = []
    this, nxt = crl.this_update, crl.next_update
    if at < this:
        problems.append(Problem("revocation", f"{what} is not valid yet: thisUpdate "
                                              f"{_fmt(this)}, checked at {_fmt(at)}"))
    elif nxt is not None and at > nxt:
        problems.append(Problem("revocation", f"{what} is stale: nextUpdate {_fmt(nxt)} has "
                                              f"passed (checked at {_fmt(at)})"))
    return problems


def crl_problems(crl: Crl, *, trust: TrustStore, at: datetime | None = None) -> list[Problem]:
    """A CRL must be issued and signed by a pinned ARK and be current at ``at``."""
    problems = crl_authenticity_problems(crl, trust=trust)
    if problems and crl.product is None:
        return problems
    return problems + crl_date_problems(crl, at)


def revocation_problems(certs: Iterable[Cert | None], crls: Sequence[Crl], *,
                        at: datetime | None = None) -> list[Problem]:
    """Certificates (ASK/ASVK; an ARK's CRL covers what the ARK issued) revoked by a CRL
    of their product whose revocation date is not after ``at``."""
    at = utc(at)
    problems = []
    for c in certs:
        if c is None or c.kind not in (Kind.ASK, Kind.ASVK):
            continue
        for crl in crls:
            if crl.product is not c.product or crl.issuer != c.issuer:
                continue
            since = crl.revoked.get(c.serial)
            if since is not None and since <= at:
                problems.append(Problem(
                    "revocation", f"{c.describe()} serial 0x{c.serial:x} is revoked since "
                                  f"{_fmt(since)} by CRL {crl.source}"))
    return problems
