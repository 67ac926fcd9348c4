#!/usr/bin/env bash
# The main job on one machine: install what is missing, start RabbitMQ if it is
# not running, build dist/aetherscale, make the Debian guest image the `demo`
# base image, and run this host's agent in the foreground (Ctrl+C stops the
# agent; VMs keep running).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'quickstart: %s\n' "$*" >&2; }

bash scripts/setup.sh

images="${AETHERSCALE_IMAGES_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/aetherscale/images}"
mkdir -p "$images"
say "the Debian 12 guest image: built once (a few minutes, about 100 MiB from apt's sources), then taken from its cache"
guest=$(bash scripts/build-guest-image.sh)
demo="$images/demo.qcow2"

# A hard link (or a copy across file systems), never a symlink: the agent
# refuses a base image that leaves its images directory. Renamed into place,
# so an agent never sees half a file.
install_demo() {
  local temporary="$images/.demo.qcow2.$$.tmp"
  rm -f "$temporary"
  ln "$guest" "$temporary" 2>/dev/null || cp --reflink=auto "$guest" "$temporary"
  mv -f "$temporary" "$demo"
}
# The blank disk that earlier quick starts made: a qcow2 with no data at all.
is_blank_disk() {
  local map
  map=$(qemu-img map --output=json -f qcow2 "$1" 2>/dev/null) || return 1
  ! grep -Eq '"data": ?true' <<<"$map"
}

if [ ! -e "$demo" ] && [ ! -L "$demo" ]; then
  say "making $demo from the guest image"
  install_demo
elif [ ! -L "$demo" ] && [ "$demo" -ef "$guest" ]; then
  say "$demo is the current guest image"
elif [ -L "$demo" ] && [ "$demo" -ef "$guest" ]; then
  say "replacing the symlink $demo with a hard link (the agent refuses symlinks out of its images directory)"
  install_demo
elif [ ! -L "$demo" ] && is_blank_disk "$demo"; then
  say "replacing the blank demo disk of an earlier quick start with the guest image"
  install_demo
elif [ ! -L "$demo" ] && [ "$(stat -c %s "$demo")" = "$(stat -c %s "$guest")" ] && cmp -s "$demo" "$guest"; then
  say "$demo is a copy of the current guest image"
else
  # An older build or an image of the user's: VMs made from it keep it as the
  # backing file of their disks, so replacing it would corrupt them.
  say "$demo is not the current guest image (an image of yours, or an older build): left as it is," \
    "because VMs made from it read it as their disk's backing file. To use the current build, delete" \
    "those VMs and $demo, then run npm start again; or add it under another name:" \
    "ln '$guest' '$images/debian-12.qcow2' (cp across file systems)"
fi

key_hint=""
if [ ! -f "$HOME/.ssh/id_ed25519.pub" ] && [ ! -f "$HOME/.ssh/id_rsa.pub" ]; then
  key_hint="
You have no SSH key for vm create to put into the VM: make one first with
  ssh-keygen -t ed25519"
fi

cat >&2 <<TXT

quickstart: starting this host's agent. In another terminal:
  ./dist/aetherscale vm create --image demo --wait   # a Debian 12 VM; returns once it answers on SSH
  ./dist/aetherscale vm ssh ID                       # log in as debian, with your ~/.ssh key
  ./dist/aetherscale vm console ID                   # its serial console: the boot, cloud-init
  ./dist/aetherscale vm create --image demo --init-script setup.sh --wait   # runs setup.sh at first boot
  ./dist/aetherscale vm list
  ./dist/aetherscale hosts
Without KVM a VM takes about a minute from create to SSH. Put your own base
images (any qcow2 with cloud-init) in $images as <name>.qcow2.$key_hint

TXT
exec ./dist/aetherscale agent --images-dir "$images" "$@"
