#!/bin/sh
# Reset the REPORTED_TCB to the firmware's current TCB (snphost config reset) inside
# certctl fw-update. Which VCEK that needs is only known afterwards, so there is no
# --expect-tcb: fw-update re-reads the platform after snphost and fetches the VCEK for the
# TCB it then reports (cache, KDS, drop directory) within the timeout; if it cannot have it
# in time it installs the empty table, and certd rotates the right blob in when it arrives.
#
#   snphost-config-reset.sh
#
# Environment: CERTD_CONFIG, FW_UPDATE_TIMEOUT, CERTCTL, SNPHOST (see snphost-config-set.sh).
set -eu
[ $# -eq 0 ] || { echo "usage: ${0##*/}   (no arguments)" >&2; exit 2; }
exec "${CERTCTL:-certctl}" fw-update --config "${CERTD_CONFIG:-/etc/certd/certd.toml}" \
    --timeout "${FW_UPDATE_TIMEOUT:-30}" -- "${SNPHOST:-snphost}" config reset
