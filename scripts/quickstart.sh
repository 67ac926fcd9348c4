#!/usr/bin/env bash
# The main job on one machine: install what is missing, start RabbitMQ if it is
# not running, build dist/aetherscale, prepare a demo base image, and run this
# host's agent in the foreground (Ctrl+C stops the agent; VMs keep running).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

images="${AETHERSCALE_IMAGES_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/aetherscale/images}"
mkdir -p "$images"
if [ ! -f "$images/demo.qcow2" ]; then
  echo "quickstart: making the demo base image $images/demo.qcow2 (a blank 1 GiB disk)" >&2
  qemu-img create -q -f qcow2 "$images/demo.qcow2" 1G
fi

cat >&2 <<TXT

quickstart: starting this host's agent. In another terminal:
  ./dist/aetherscale vm create --image demo
  ./dist/aetherscale vm list
  ./dist/aetherscale hosts
Put your own base images in $images as <name>.qcow2.

TXT
exec ./dist/aetherscale agent --images-dir "$images" "$@"
