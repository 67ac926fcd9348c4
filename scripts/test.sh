#!/usr/bin/env bash
# The whole test suite: set-up (install and start what is missing), lint,
# type-check, build, then `bun test` against the real RabbitMQ and real QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== lint (biome)" >&2
node_modules/.bin/biome check src tests bench scripts
echo "== type-check (tsc)" >&2
node_modules/.bin/tsc --noEmit
echo "== tests (bun test)" >&2
exec node_modules/.bin/bun test --timeout 180000 "$@"
