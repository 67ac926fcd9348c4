#!/usr/bin/env bash
# mmdebstrap hooks of the guest image, run on the build host as root.
#   customize.sh setup ROOT UUID      before any package is installed
#   customize.sh customize ROOT UUID  once every package is installed
# ROOT: the root directory; UUID: the one the root file system will be made
# with (fstab, GRUB and the kernel find the root by it, whatever the disk is
# called in the VM).
set -euo pipefail
phase=$1
root=$2
uuid=$3
recipe=$(cd "$(dirname "$0")" && pwd)

if [ "$phase" = setup ]; then
  # Before the kernel's package makes the initramfs: it probes the root
  # device for its type, and there is none in a chroot, so it is told (else
  # it leaves fsck out and the root is mounted unchecked).
  mkdir -p "$root/etc/initramfs-tools/conf.d"
  echo FSTYPE=ext4 >"$root/etc/initramfs-tools/conf.d/root-fstype"
  cat >"$root/etc/fstab" <<FSTAB
# The root file system, by UUID (the disk is vda under virtio, sda elsewhere).
UUID=$uuid	/	ext4	errors=remount-ro	0	1
FSTAB
  exit 0
fi
[ "$phase" = customize ] || {
  echo "customize.sh: unknown phase '$phase' (setup or customize)" >&2
  exit 2
}

# The recipe's own files (cloud-init settings, the interfaces file), owned by root.
cp -R --no-preserve=ownership "$recipe/rootfs/." "$root/"

# mmdebstrap copies the build host's name and resolver; neither belongs in a
# guest. cloud-init sets the hostname per VM, dhclient writes resolv.conf.
echo debian >"$root/etc/hostname"
: >"$root/etc/resolv.conf"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS

# openssh-server's postinst made host keys on the build host: every VM would
# share them. cloud-init makes an ed25519 key per instance at first boot.
rm -f "$root"/etc/ssh/ssh_host_*

# GRUB's modules for the BIOS platform, where a grub-install would put them:
# the core image in the disk's first MiB loads them on demand.
mkdir -p "$root/boot/grub/i386-pc"
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
# /vmlinuz and /initrd.img are the symlinks the kernel package keeps on the
# newest kernel, so a kernel upgraded inside the guest boots without GRUB's
# tools. The kernel's messages and the login prompt go to the serial port (the
# last console= is /dev/console): that is what `vm console` shows.
cat >"$root/boot/grub/grub.cfg" <<GRUB
# aetherscale guest image (scripts/build-guest-image.sh); no menu, no delay.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=0
menuentry "Debian GNU/Linux 12" {
	search --no-floppy --fs-uuid --set=root $uuid
	linux /vmlinuz root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
	initrd /initrd.img
}
GRUB
for link in vmlinuz initrd.img; do
  if [ ! -e "$root/$link" ]; then
    echo "customize: /$link is missing from the root: the kernel package did not make its symlinks" >&2
    exit 1
  fi
done

# A fast first boot without KVM: nothing that runs apt, scrubs or re-indexes
# in the background (man-db is not in the image; its daily timer stays off
# should a user install it), and no interactive first-boot prompt on the
# console.
chroot "$root" systemctl mask --quiet \
  apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer e2scrub_reap.service \
  systemd-firstboot.service

# ifupdown waits up to 300 s for the network before network-online.target;
# a guest whose DHCP answers at all has it in a second.
if [ -f "$root/etc/default/networking" ]; then
  sed -i 's/^#\?WAIT_ONLINE_TIMEOUT=.*/WAIT_ONLINE_TIMEOUT=20/' "$root/etc/default/networking"
fi
