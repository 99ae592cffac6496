#!/bin/sh
# The image's ENTRYPOINT: `fljob train` unless the arguments say otherwise, so that
#   run IMAGE /spec.yaml                                        trains (a spec file or an option)
#   run IMAGE launch --nproc-per-node=2 -- train /spec.yaml     runs that fljob command
#   run IMAGE bash                                              runs a program on PATH
# Schedulers that give a full command (Kubernetes `command:`, pyxis) bypass this script.
set -e
if [ $# -eq 0 ] || [ -f "$1" ] || [ "${1#-}" != "$1" ]; then
  exec fljob train "$@"
elif command -v "$1" > /dev/null 2>&1; then
  exec "$@"
fi
exec fljob "$@"
