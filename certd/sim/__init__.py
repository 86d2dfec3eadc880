"""A simulator of the whole SEV-SNP certificate flow, to prove certd end to end.

Separate processes share one simulated platform: :mod:`~certd.sim.psp` (the PSP's state
is the platform file plus a PKI directory, so every process signs with the same key),
:mod:`~certd.sim.vmm` (VMM processes with their guests, socket face or file face),
:mod:`~certd.sim.guests` (Linux and COCONUT SVSM guest models that verify every report),
:mod:`~certd.sim.updater` (firmware updates), :mod:`~certd.sim.chaos` (the harness) and
:mod:`~certd.sim.report` (counters and the summary). ``certctl demo`` runs it.
"""
