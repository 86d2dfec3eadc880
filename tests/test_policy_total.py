"""certd.policy is total: certificates and CRLs that cryptography reads lazily, or refuses
with an exception other than ValueError, are named ``format`` problems, never exceptions.

Each case is one deliberate corruption of the real Milan blob (ARK, ASK, VCEK, AMD's CRL)
that today's main let escape from check_blob as an exception. The lazy ones also run with
the protection off (``CERTD_UNSAFE=total-policy``), where they must raise again: that is
what proves the corruption reaches the field it is named after.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certd import policy
from certd.verify import pki
from policy_fuzz import Case, corpus


@pytest.fixture(scope="module")
def milan() -> Case:
    case = corpus()[0]
    assert case.name == "milan-vcek+crl" and len(case.spans) == 4
    return case


def mutate(case: Case, entry: int, find: bytes, repl: bytes) -> bytes:
    """``case.blob`` with the first ``find`` inside entry ``entry`` replaced (same length)."""
    off, n = case.spans[entry]
    der = case.blob[off:off + n]
    i = der.index(find)  # precondition: the bytes to corrupt are there
    assert len(repl) == len(find) and repl != find
    return case.blob[:off + i] + repl + case.blob[off + i + len(find):]


def _ec_point(case: Case) -> bytes:
    off, n = case.spans[2]
    leaf = pki.cert_from_der(case.blob[off:off + n], "leaf")
    return leaf.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


OU, C = bytes.fromhex("060355040b"), bytes.fromhex("0603550406")  # OIDs 2.5.4.11, 2.5.4.6
TEE_SPL = bytes.fromhex("060a2b060104019c78010302")  # 1.3.6.1.4.1.3704.1.3.2

# name -> (entry, find, replace, expected message, lazy: raised only when read)
CASES = {
    "EC point off the curve": (2, lambda c: _ec_point(c)[20:22],
                               lambda c: bytes([_ec_point(c)[20] ^ 1]) + _ec_point(c)[21:22],
                               "blob entry 2: unreadable certificate public key (Invalid key)",
                               True),
    "unknown key algorithm": (2, lambda c: bytes.fromhex("2a8648ce3d0201"),
                              lambda c: bytes.fromhex("2a8648ce3d0209"),
                              "blob entry 2: unreadable certificate public key (Unknown key "
                              "type: 1.2.840.10045.2.9)", True),
    "11-letter country (a warning)": (0, lambda c: OU, lambda c: C,
                                      "blob entry 0: malformed certificate issuer name "
                                      "(cryptography warns: Attribute's length must be >= 2 "
                                      "and <= 2, but it was 11)", True),
    "duplicate extension": (2, lambda c: TEE_SPL, lambda c: TEE_SPL[:-1] + b"\x01",
                            "blob entry 2: unreadable certificate extensions (Duplicate "
                            "1.3.6.1.4.1.3704.1.3.1 extension found)", True),
    "CRL issuer country": (3, lambda c: OU, lambda c: C,
                           "blob entry 3: malformed CRL issuer name (cryptography warns: "
                           "Attribute's length must be >= 2 and <= 2, but it was 11)", True),
    # Refused at load, but with x509.InvalidVersion, which is not a ValueError.
    "unknown CRL version": (3, lambda c: bytes.fromhex("020101"), lambda c: bytes.fromhex("020105"),
                      "blob entry 3: not a valid DER X.509 CRL (5 is not a valid CRL "
                      "version)", False),
}


def corrupted(case: Case, name: str) -> bytes:
    entry, find, repl, _, _ = CASES[name]
    return mutate(case, entry, find(case), repl(case))


@pytest.fixture(autouse=True)
def fresh_parse_cache():
    pki.clear_cache()  # memoized Certs made with the other setting must not answer
    yield
    pki.clear_cache()


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_entry_is_a_named_format_problem(milan, name):
    blob = corrupted(milan, name)
    kw = dict(trust=milan.trust, at=milan.at, platform=milan.platform)
    expected = policy.Problem("format", CASES[name][3])
    assert expected in policy.check_blob(blob, **kw)
    assert expected in policy.check_report(blob, milan.report, **kw)
    parts = [blob[o:o + k] for o, k in milan.spans]
    with pytest.raises(policy.PolicyError) as e:
        policy.build_blob(*parts, **kw)
    # build_blob names its inputs, not blob entries
    assert any(p.check == "format" and CASES[name][3].split(": ", 1)[1] in p.message
               for p in e.value.problems)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[4]))
def test_negative_control_malformed_entry_raises_without_the_protection(milan, name,
                                                                         monkeypatch):
    monkeypatch.setenv("CERTD_UNSAFE", "total-policy")
    with pytest.raises(Exception) as e:  # noqa: PT011 - any escape is the point
        policy.check_blob(corrupted(milan, name), trust=milan.trust, at=milan.at)
    assert not isinstance(e.value, pki.PkiError)


def test_empty_file_is_one_format_problem(milan):
    assert policy.check_blob(b"", trust=milan.trust) == [policy.EMPTY_FILE]
    assert policy.EMPTY_FILE in policy.check_report(b"", milan.report, trust=milan.trust)
    assert policy.EMPTY_FILE.check == "format" and "empty file" in policy.EMPTY_FILE.message
    # The 24-byte empty table is a table: it only lacks the certificates.
    assert {p.check for p in policy.check_blob(bytes(24), trust=milan.trust)} == {"role"}


def test_unloadable_crl_argument_is_a_problem_not_an_exception(milan):
    kw = dict(trust=milan.trust, at=milan.at, platform=milan.platform)
    off, n = milan.spans[3]
    bad_crl = corrupted(milan, "unknown CRL version")[off:off + n]
    for crls, words in (([b"junk"], "CRL argument 0: neither PEM nor DER"),
                        ([b"", bad_crl], "CRL argument 1: not a valid DER X.509 CRL")):
        problems = policy.check_blob(milan.blob, crls=crls, **kw)
        assert [p.check for p in problems] == ["format"] * len(crls)
        assert words in problems[-1].message
