#!/usr/bin/env bash
# podman with the project's private storage and the options that work on a CI machine: root in a
# VM or container, no systemd, no CAP_SYS_RESOURCE, cgroup v1/hybrid. Each option, and why:
#   --root/--runroot          nothing lands in /var/lib/containers; `rm -rf $FLJOB_CTR_DIR` cleans up
#   --storage-driver overlay  (FLJOB_CTR_DRIVER=vfs where the kernel has no overlayfs; vfs copies
#                             every layer, so it is slower and much larger)
#   --cgroup-manager cgroupfs no systemd to ask for a scope
#   --events-backend file     no journald
#   --runtime runc            crun refuses "cgroups in hybrid mode"; runc handles it
# Callers add per-command options: `run --network none --ulimit nofile=1024:1024 --ulimit
# nproc=4096:4096` (podman's default rlimits need CAP_SYS_RESOURCE), and the same for `build`.
# Usage: docker/podman-local.sh <podman arguments>     e.g. docker/podman-local.sh images
set -euo pipefail
dir=${FLJOB_CTR_DIR:-/var/tmp/fljob-containers}
exec podman --root "$dir/storage" --runroot "$dir/run" \
  --storage-driver "${FLJOB_CTR_DRIVER:-overlay}" \
  --cgroup-manager cgroupfs --events-backend file --runtime runc "$@"
