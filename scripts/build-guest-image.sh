#!/usr/bin/env bash
# Builds a bootable Debian 12 (bookworm) guest image, a qcow2 with its own
# bootloader, from Debian packages only (apt's configured sources), and prints
# its path on stdout; progress goes to stderr:
#
#   image=$(bash scripts/build-guest-image.sh)
#
# The image is cached in ${XDG_CACHE_HOME:-~/.cache}/aetherscale/guest-images/,
# named by a hash of its recipe (this script and scripts/guest-image/), and is
# built again only when the recipe changes.
#
# No loop devices and no mounts of the image: mmdebstrap makes the root in a
# directory, mkfs.ext4 -d writes it into the partition of a plain file, and
# GRUB's boot sector and core image are written into the file's first MiB.
#
# Environment: AETHERSCALE_GUEST_MIRROR, the apt source to build from instead
# of this host's (a deb822 .sources file, a one-line-style .list file, or a
# mirror URL such as http://deb.debian.org/debian).
set -euo pipefail

# stdout carries the image's path and nothing else; every tool's output goes to stderr.
exec 3>&1 1>&2
# sfdisk and mkfs.ext4 live in /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

here=$(cd "$(dirname "$0")" && pwd)
recipe="$here/guest-image"
started=$SECONDS
SUITE=bookworm
DISK_SIZE_MIB=4096
PARTITION_START_MIB=1

say() { printf 'guest-image: %s\n' "$*" >&2; }
fail() {
  say "error: $*"
  exit 1
}
elapsed() { printf '%d s' $((SECONDS - started)); }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- what the build needs --------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (package $2)"); }
need mmdebstrap mmdebstrap
need sfdisk fdisk
need mkfs.ext4 e2fsprogs
need grub-mkimage grub-common
need qemu-img qemu-utils
need sha256sum coreutils
need flock util-linux
[ -f /usr/lib/grub/i386-pc/boot.img ] || missing+=("/usr/lib/grub/i386-pc/boot.img (package grub-pc-bin)")
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  missing+=("root: mmdebstrap needs it; run as root or install sudo")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  say "error: missing what the build needs:"
  printf '  - %s\n' "${missing[@]}" >&2
  fail "run 'bash scripts/setup.sh' (it installs them with apt-get), or install those packages yourself"
fi

# --- the cached image, named by its recipe --------------------------------
packages=$(grep -v '^[[:space:]]*\(#\|$\)' "$recipe/packages" | tr -s '[:space:]' '\n' | paste -sd, -)
[ -n "$packages" ] || fail "$recipe/packages lists no packages"
recipe_hash=$(
  cd "$here"
  {
    printf '%s\n' "build-guest-image.sh"
    cat build-guest-image.sh
    find guest-image -type f -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' file; do
      printf '%s\n' "$file"
      cat "$file"
    done
  } | sha256sum | cut -c1-16
)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/aetherscale/guest-images"
image="$cache/debian-12-$recipe_hash.qcow2"
if [ -f "$image" ]; then
  say "using the cached image (recipe $recipe_hash)"
  echo "$image" >&3
  exit 0
fi
mkdir -p "$cache"

# One build at a time per cache: a second run waits for the first and then
# finds its image. The image is built in a temporary directory and renamed
# into place, so nobody ever sees half an image, even after a crash.
exec 9>"$cache/.lock"
if ! flock -n 9; then
  say "another build of the guest image is running; waiting for it (a cold build takes a few minutes)"
  flock 9
fi
if [ -f "$image" ]; then
  say "the other build made the image (recipe $recipe_hash)"
  echo "$image" >&3
  exit 0
fi
# Holding the lock, any other build directory is a leftover of a killed build.
for stale in "$cache"/.build-*; do
  [ -e "$stale" ] || continue
  say "removing a killed build's leftovers: $stale"
  as_root rm -rf --one-file-system "$stale" ||
    say "could not remove all of $stale (a file system still mounted in it?); remove it by hand"
done

available_mib=$(df -Pm "$cache" | awk 'NR == 2 { print $4 }')
if [ "${available_mib:-0}" -lt 2048 ]; then
  fail "only ${available_mib} MiB free in $cache; the build needs about 2 GiB (set XDG_CACHE_HOME to a roomier place)"
fi

work=$(mktemp -d "$cache/.build-XXXXXX")
cleanup() { as_root rm -rf --one-file-system "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the root file system, from Debian packages -----------------------
mirror=${AETHERSCALE_GUEST_MIRROR:-}
if [ -z "$mirror" ]; then
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$candidate" ] && grep -q "^[^#]*\b$SUITE\b" "$candidate"; then
      mirror=$candidate
      break
    fi
  done
  [ -n "$mirror" ] || fail "no apt source of this host names Debian $SUITE (looked in /etc/apt/sources.list.d/debian.sources and /etc/apt/sources.list); set AETHERSCALE_GUEST_MIRROR to a Debian mirror URL (e.g. http://deb.debian.org/debian) or to a sources file"
fi
uuid=$(cat /proc/sys/kernel/random/uuid)
say "building a Debian 12 guest image (recipe $recipe_hash) into $image"
say "[1/4] installing packages into a root directory with mmdebstrap, from $mirror (about 100 MiB to download; two or three minutes): $packages"
as_root mmdebstrap --variant=minbase --include="$packages" \
  --aptopt='Acquire::Retries "3"' \
  --setup-hook="bash '$recipe/customize.sh' setup \"\$1\" $uuid" \
  --customize-hook="bash '$recipe/customize.sh' customize \"\$1\" $uuid" \
  "$SUITE" "$work/root" "$mirror" ||
  fail "mmdebstrap failed (its messages are above): check that apt can reach $mirror (apt-get update), or set AETHERSCALE_GUEST_MIRROR"
say "[1/4] root directory ready: $(as_root du -sh --one-file-system "$work/root" | cut -f1) ($(elapsed))"

# --- 2. a partitioned disk holding the root file system -------------------
disk="$work/disk.raw"
say "[2/4] writing the ext4 file system into the partition of a ${DISK_SIZE_MIB} MiB disk file"
truncate -s "${DISK_SIZE_MIB}M" "$disk"
# The first MiB stays free for GRUB's core image (the sectors after the MBR).
printf 'label: dos\nstart=%dMiB, type=83, bootable\n' "$PARTITION_START_MIB" |
  sfdisk --quiet --no-reread --no-tell-kernel "$disk"
partition_blocks=$(((DISK_SIZE_MIB - PARTITION_START_MIB) * 256))
as_root mkfs.ext4 -q -F -b 4096 -L root -U "$uuid" -d "$work/root" \
  -E "offset=$((PARTITION_START_MIB * 1024 * 1024))" "$disk" "$partition_blocks" ||
  fail "mkfs.ext4 -d failed (its messages are above)"
as_root rm -rf --one-file-system "$work/root"

# --- 3. the bootloader, written into the disk file ------------------------
say "[3/4] making the disk bootable (GRUB for BIOS in the MBR and the first MiB)"
cat >"$work/early.cfg" <<EOF
search.fs_uuid $uuid root
set prefix=(\$root)/boot/grub
EOF
grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/early.cfg" -p /boot/grub \
  biosdisk part_msdos ext2 search_fs_uuid normal linux configfile serial terminal
core_size=$(stat -c %s "$work/core.img")
gap=$(((PARTITION_START_MIB * 1024 * 1024) - 512))
[ "$core_size" -le "$gap" ] || fail "GRUB's core image is $core_size bytes, more than the $gap bytes before the partition"
# boot.img's code only (440 bytes): the partition table after it stays. It
# loads the core image from sector 1, which loads the rest of itself.
dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none

# --- 4. the qcow2 ---------------------------------------------------------
# Compressed like the distributions' cloud images: a third of the size for
# some seconds more here; QEMU inflates the clusters a guest reads.
say "[4/4] converting to a compressed qcow2"
qemu-img convert -c -f raw -O qcow2 "$disk" "$work/image.qcow2"
rm -f "$disk"
qemu-img check -q "$work/image.qcow2" || fail "qemu-img check found errors in the new image"
chmod 0644 "$work/image.qcow2"
sync "$work/image.qcow2"
mv -f "$work/image.qcow2" "$image"
say "done in $(elapsed): $image ($(du -h "$image" | cut -f1) on disk, ${DISK_SIZE_MIB} MiB virtual)"
echo "$image" >&3
