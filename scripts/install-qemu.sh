#!/usr/bin/env bash
# Installs what the qemu driver runs: QEMU (system emulator for x86_64 and
# qemu-img) and genisoimage (makes each VM's cloud-init seed; its package also
# brings isoinfo, which the tests read seeds back with), when any is missing.
# Safe to run again: when every tool is already on PATH it changes nothing.
set -euo pipefail

say() { printf 'install-qemu: %s\n' "$*" >&2; }

# tool → the Debian package that provides it
declare -A package_of=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [genisoimage]=genisoimage
  [isoinfo]=genisoimage
)
tools=(qemu-system-x86_64 qemu-img genisoimage isoinfo)

missing=()
packages=()
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("$tool")
    package="${package_of[$tool]}"
    case " ${packages[*]} " in *" $package "*) ;; *) packages+=("$package") ;; esac
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  say "${tools[*]} are already installed; nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  say "missing ${missing[*]} and apt-get is not available: install ${packages[*]} with your package manager"
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

say "installing ${packages[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${packages[@]}"

for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    say "$tool is still missing after installing ${package_of[$tool]}; check the apt-get output above"
    exit 1
  fi
done
say "installed: $(qemu-system-x86_64 --version | head -n 1); $(genisoimage --version 2>&1 | head -n 1)"
