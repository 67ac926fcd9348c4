#!/usr/bin/env bash
# Brings a fresh Debian machine with Node.js and npm to where aetherscale
# builds, runs and tests: npm packages (Bun among them), QEMU, a running
# RabbitMQ, and dist/aetherscale. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x node_modules/.bin/bun ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi
if ! node_modules/.bin/bun --version >/dev/null 2>&1; then
  say "the bun binary did not install; running its install script"
  (cd node_modules/bun && node install.js)
fi

bash scripts/install-qemu.sh

# Tools the tests and the guest image use, installed together (one apt-get
# update) when any is missing: iproute2 (`ip`) puts an agent in a network
# namespace of its own; openssl makes the certificates of the TLS test;
# openssh-client (ssh, ssh-keygen) logs into guests; mmdebstrap, fdisk
# (sfdisk), e2fsprogs (mkfs.ext4) and grub-pc-bin (grub-mkimage, boot.img)
# build the guest image (scripts/build-guest-image.sh); Debian's chromium is
# the real browser the web console's test drives (tests/console-browser.test.ts).
missing_packages=()
want() { # want COMMAND-OR-PATH PACKAGE
  if [ -e "$1" ] || command -v "$1" >/dev/null 2>&1; then return 0; fi
  missing_packages+=("$2")
}
want ip iproute2
want openssl openssl
want ssh openssh-client
want ssh-keygen openssh-client
want mmdebstrap mmdebstrap
want /usr/sbin/sfdisk fdisk
want /usr/sbin/mkfs.ext4 e2fsprogs
want grub-mkimage grub-common
want /usr/lib/grub/i386-pc/boot.img grub-pc-bin
want chromium chromium
if [ "${#missing_packages[@]}" -gt 0 ]; then
  read -r -a missing_packages <<<"$(printf '%s\n' "${missing_packages[@]}" | sort -u | tr '\n' ' ')"
  if command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing_packages[*]}"
    { as_root apt-get update -qq &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_packages[@]}"; } ||
      say "could not install ${missing_packages[*]}; the guest image build and the tests that need them will fail"
  else
    say "missing ${missing_packages[*]} and apt-get is not available: install them with your package manager"
  fi
fi

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    say "installing rabbitmq-server"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server
  fi
  if ! broker_up; then
    say "starting RabbitMQ (rabbitmq-server -detached)"
    as_root rabbitmq-server -detached || true
    for _ in $(seq 1 60); do broker_up && break; sleep 1; done
    broker_up || { say "RabbitMQ did not start listening on 127.0.0.1:5672 within 60 s; see /var/log/rabbitmq"; exit 1; }
    as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
fi
say "RabbitMQ is listening on 127.0.0.1:5672"

if [ "${AETHERSCALE_SKIP_BUILD:-}" != "1" ]; then
  node_modules/.bin/bun scripts/build.ts
fi
