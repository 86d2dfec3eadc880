"""AMD specifics: the VCEK/VLEK X.509 extensions, the pinned roots, KDS URLs.

Nothing here verifies signatures (that is :mod:`certd.verify`); these modules only know
AMD's names, numbers and encodings.
"""
