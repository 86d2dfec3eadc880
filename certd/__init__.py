"""certd: host-side SEV-SNP certificate provider for QEMU/KVM.

Layers, bottom-up (each imports only from the ones above it in this list):

- ``certd.abi``      byte layouts, pure encode/decode: GHCB certificate table, attestation
                     report, TCB_VERSION, the certd wire protocol.
- ``certd.amd``      AMD specifics: products, pinned roots, certificate extensions, KDS URLs.
- ``certd.verify``   cryptography: load/classify certificates, verify chains, CRLs, reports.
- ``certd.policy``   does this blob fit this platform now?
- ``certd.store``    the file face: OFD locks, crash-safe blob replacement.
- ``certd.service``  the socket face: asyncio server, leases, rotation, systemd glue.
- ``certd.cli``      ``certd`` and ``certctl``.
"""

__version__ = "0.1.0"
