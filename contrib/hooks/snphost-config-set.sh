#!/bin/sh
# Set the platform's REPORTED_TCB with snphost (SNP_SET_CONFIG) inside certctl fw-update.
#
#   snphost-config-set.sh BL TEE SNP UCODE [FMC]
#
# The reported TCB selects the VCEK the firmware signs reports with, so the blob must change
# in the same step. certctl fw-update prefetches the VCEK for the new TCB first (--expect-tcb,
# no lock held), then takes the blob's exclusive lock (certd stops granting leases, QEMU's
# shared lock waits), runs snphost, re-reads the platform, installs the matching blob (or
# the empty table, never the stale one) and releases. Mask bits stay 0: a masked chip id
# leaves KDS nothing to look the VCEK up by. FMC only on Turin.
#
# Environment: CERTD_CONFIG (default /etc/certd/certd.toml), FW_UPDATE_TIMEOUT seconds
# (default 30), CERTCTL and SNPHOST (default: certctl and snphost on PATH).
set -eu

usage() {
    echo "usage: ${0##*/} BL TEE SNP UCODE [FMC]   (SPL numbers, 0-255)" >&2
    exit 2
}
[ $# -eq 4 ] || [ $# -eq 5 ] || usage
for spl in "$@"; do
    case $spl in '' | *[!0-9]*) usage ;; esac
    [ "$spl" -le 255 ] || usage
done

tcb="bl=$1,tee=$2,snp=$3,ucode=$4${5:+,fmc=$5}"
exec "${CERTCTL:-certctl}" fw-update --config "${CERTD_CONFIG:-/etc/certd/certd.toml}" \
    --expect-tcb "$tcb" --timeout "${FW_UPDATE_TIMEOUT:-30}" \
    -- "${SNPHOST:-snphost}" config set "$1" "$2" "$3" "$4" 0 ${5:+"$5"}
