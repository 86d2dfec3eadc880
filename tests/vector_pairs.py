"""The real report/VCEK and report/VLEK pairs in tests/vectors (same machine each)."""

from datetime import datetime, timezone

# report, leaf, chain (ASK or ASVK, then ARK), leaf kind
PAIRS = [
    ("milan_report.bin", "milan_vcek.der", "milan_cert_chain.pem", "vcek"),
    ("milan_virtee_report.bin", "milan_virtee_vcek.der", "milan_cert_chain.pem", "vcek"),
    ("milan_trustee_report.bin", "milan_trustee_vcek.der", "milan_cert_chain.pem", "vcek"),
    ("milan_gcp_report.bin", "milan_gcp_vcek.der", "milan_cert_chain.pem", "vcek"),
    ("milan_msft_report.bin", "milan_msft_vcek.pem", "milan_cert_chain.pem", "vcek"),
    ("genoa_report.bin", "genoa_vcek.der", "genoa_cert_chain.pem", "vcek"),
    ("genoa_msft_report.bin", "genoa_msft_vcek.pem", "genoa_cert_chain.pem", "vcek"),
    ("turin_report.bin", "turin_vcek.der", "turin_cert_chain.pem", "vcek"),
    ("turin_msft_report.bin", "turin_msft_vcek.pem", "turin_cert_chain.pem", "vcek"),
    ("milan_vlek_report.bin", "milan_vlek.der", "milan_vlek_cert_chain.pem", "vlek"),
    ("milan_vlek_b_report.bin", "milan_vlek_b.der", "milan_vlek_cert_chain.pem", "vlek"),
]

#: Inside every VCEK's validity (latest notBefore 2026-06-28, earliest notAfter 2029-09-24).
VCEK_AT = datetime(2026, 9, 1, tzinfo=timezone.utc)
#: Inside both VLEKs' 1-year validity (2024-12-10..2025-05-05 overlap).
VLEK_AT = datetime(2025, 3, 1, tzinfo=timezone.utc)


def at_for(leaf: str) -> datetime:
    return VLEK_AT if "vlek" in leaf else VCEK_AT
