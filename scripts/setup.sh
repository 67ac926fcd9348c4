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

# Tools some tests use: iproute2 (`ip`) puts an agent in a network namespace
# of its own; openssl makes the certificates of the TLS test.
ensure_tool() {
  if command -v "$1" >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then return 0; fi
  say "installing $2 ($1)"
  { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"; } ||
    say "could not install $2; the tests that need $1 will fail or be skipped"
}
ensure_tool ip iproute2
ensure_tool openssl openssl

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
