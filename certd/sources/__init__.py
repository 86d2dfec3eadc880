"""Where certificates come from: AMD KDS and its mirrors (:mod:`certd.sources.kds`).

Layering: sources sit above policy and store (they validate with :mod:`certd.policy` and
lock with :mod:`certd.store.locks`) and below service and cli.
"""
