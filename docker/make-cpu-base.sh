#!/usr/bin/env bash
# Make the CPU base image without a registry: debootstrap a minimal Debian 12 rootfs with
# python3 (3.11, which matches the cp311 CPU torch wheel) and venv/pip, then import it as a local
# image. The CUDA image needs none of this: it starts FROM a published torch image.
#
# Usage: docker/make-cpu-base.sh            (root; Debian packages debootstrap and podman)
# Knobs: FLJOB_CPU_BASE   image name       (default localhost/fljob-cpu-base)
#        DEBIAN_MIRROR    Debian mirror    (default: the one apt uses on this machine)
#        FLJOB_CTR_DIR    podman storage   (see docker/podman-local.sh)
#        FLJOB_REBUILD=1  rebuild even when the image exists
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${FLJOB_CPU_BASE:-localhost/fljob-cpu-base}
podman_local="$here/podman-local.sh"

if [ "${FLJOB_REBUILD:-0}" != 1 ] && "$podman_local" image exists "$image"; then
  echo "$image exists (FLJOB_REBUILD=1 makes it again)"
  exit 0
fi

# The mirror apt already reaches: the first bookworm (non-security) source, deb822 or one-line.
apt_mirror() {
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
    /^URIs:/ {uri=$2} /^Suites:/ && / bookworm( |$)/ && uri !~ /security/ {print uri; exit}'
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1=="deb" && $3=="bookworm" {print $2; exit}'
  true  # no sources file of one kind is fine
}
mirror=${DEBIAN_MIRROR:-$(apt_mirror | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d "${TMPDIR:-/tmp}/fljob-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
# What a container never needs: package caches and lists, docs, man pages.
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
  "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/*
tar -C "$work/rootfs" --numeric-owner -c . |
  "$podman_local" import --quiet --change 'CMD ["/usr/bin/python3"]' - "$image" > /dev/null
echo "$image made in $(( $(date +%s) - start )) s"
