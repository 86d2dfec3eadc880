"""Attestation report signature: ECDSA P-384 / SHA-384 by the VCEK or VLEK.

r and s are 72-byte little-endian integers in the report (certd.abi.report parses them);
cryptography wants a DER ECDSA-Sig-Value, so they go through ``encode_dss_signature``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from certd.abi.report import AttestationReport
from certd.verify.pki import Cert
from certd.verify.problems import Problem


def verify_signature(report: AttestationReport, key: ec.EllipticCurvePublicKey) -> bool:
    """True if ``key`` signed ``report`` (over bytes 0x000..0x29F)."""
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)):
        return False
    if not (0 < report.sig_r and 0 < report.sig_s):
        return False
    try:
        key.verify(encode_dss_signature(report.sig_r, report.sig_s), report.signed_bytes,
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def signature_problems(report: AttestationReport, leaf: Cert) -> list[Problem]:
    if verify_signature(report, leaf.public_key):
        return []
    return [Problem("signature", f"the report signature does not verify with the key of "
                                 f"{leaf.describe()}: this is not the key that signed the report")]
