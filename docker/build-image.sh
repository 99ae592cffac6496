#!/usr/bin/env bash
# Build the CPU training image on this machine with no daemon, no registry and no network inside
# the build: a debootstrap base (docker/make-cpu-base.sh), the local CPU torch wheel, and a
# wheelhouse in docker/wheels/ downloaded here by pip (its cache and local indexes make a repeat
# fast). The build itself runs with --network none and installs from the wheelhouse only.
#
# Usage: docker/build-image.sh [TAG]            (default localhost/fljob:cpu; root)
# Knobs: FLJOB_TORCH_WHEEL  the CPU torch wheel  (default /opt/wheels/torch-2.13.0+cpu-cp311-*.whl)
#        PYTHON             CPython 3.11 whose pip fills the wheelhouse (default .venv/bin/python;
#                           it must match the base's python3, Debian 12's 3.11, x86_64)
#        FLJOB_CPU_BASE, DEBIAN_MIRROR, FLJOB_CTR_DIR, FLJOB_REBUILD: see make-cpu-base.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
tag=${1:-localhost/fljob:cpu}
base=${FLJOB_CPU_BASE:-localhost/fljob-cpu-base}
python=${PYTHON:-$repo/.venv/bin/python}
torch_wheel=${FLJOB_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2> /dev/null | head -n1 || true)}
[ -f "$torch_wheel" ] || { echo "no CPU torch wheel: set FLJOB_TORCH_WHEEL" >&2; exit 2; }

seconds() { echo $(( $(date +%s) - $1 )); }
t0=$(date +%s)
FLJOB_CPU_BASE=$base "$here/make-cpu-base.sh"

t=$(date +%s)
wheels=$here/wheels
mkdir -p "$wheels"
ln -f "$torch_wheel" "$wheels/" 2> /dev/null || cp -f "$torch_wheel" "$wheels/"
# The versions the Dockerfile pins, read from it so that they are written in one place.
arg() { sed -n "s/^ARG $1=//p" "$here/Dockerfile"; }
# --no-deps: requirements.txt is the whole closure already. --only-binary: the base has no compiler.
"$python" -m pip download -qq --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$wheels" -r "$here/requirements.txt" \
  "triton==$(arg TRITON_VERSION)" "mosaicml-streaming==$(arg STREAMING_VERSION)"
echo "wheelhouse ready in $(seconds "$t") s ($(du -sh "$wheels" | cut -f1))"

t=$(date +%s)
# runc isolation, not chroot: chroot cannot take --network none. The ulimits: podman's defaults
# need CAP_SYS_RESOURCE, which a CI container may lack.
"$here/podman-local.sh" build --network none --pull=never \
  --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
  --build-arg BASE_IMAGE="$base" --build-arg WHEELHOUSE=/wheels \
  --build-arg TORCH_WHEEL="$(basename "$torch_wheel")" -f "$here/Dockerfile" -t "$tag" "$repo"
echo "$tag built in $(seconds "$t") s (all image work: $(seconds "$t0") s)"
