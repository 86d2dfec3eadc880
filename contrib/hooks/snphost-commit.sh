#!/bin/sh
# Commit the running firmware as the platform's minimum (snphost commit, SNP_COMMIT), inside
# certctl fw-update. SNP_COMMIT moves the COMMITTED TCB; whether the REPORTED TCB (and so
# the VCEK) moves too depends on how the platform is configured, so it runs under fw-update:
# that costs one short exclusive section, fw-update re-reads the platform afterwards, and if
# nothing changed, nothing changes (the blob keeps its generation).
#
#   snphost-commit.sh
#
# Environment: CERTD_CONFIG, FW_UPDATE_TIMEOUT, CERTCTL, SNPHOST (see snphost-config-set.sh).
set -eu
[ $# -eq 0 ] || { echo "usage: ${0##*/}   (no arguments)" >&2; exit 2; }
exec "${CERTCTL:-certctl}" fw-update --config "${CERTD_CONFIG:-/etc/certd/certd.toml}" \
    --timeout "${FW_UPDATE_TIMEOUT:-30}" -- "${SNPHOST:-snphost}" commit
