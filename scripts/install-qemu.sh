#!/usr/bin/env bash
# Installs QEMU (system emulator for x86_64 and qemu-img) when either is missing.
# Safe to run again: when both tools are already on PATH it changes nothing.
set -euo pipefail

say() { printf 'install-qemu: %s\n' "$*" >&2; }

missing=()
for tool in qemu-system-x86_64 qemu-img; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("$tool")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  say "qemu-system-x86_64 and qemu-img are already installed; nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  say "missing ${missing[*]} and apt-get is not available: install QEMU with your package manager"
  exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    say "missing ${missing[*]}; installing needs root, and sudo is not available: run this script as root"
    exit 1
  fi
  as_root=(sudo)
fi

say "missing ${missing[*]}; running apt-get update"
"${as_root[@]}" apt-get update

say "installing qemu-system-x86 qemu-utils"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils

for tool in qemu-system-x86_64 qemu-img; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    say "$tool is still missing after the install; check the apt-get output above"
    exit 1
  fi
done
say "installed: $(qemu-system-x86_64 --version | head -n 1)"
