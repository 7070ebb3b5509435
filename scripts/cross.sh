#!/usr/bin/env bash
# Cross-compiles shoal-agent for the ARM boards Shoal supports, with Debian's cross gcc as
# linker (.cargo/config.toml): aarch64-unknown-linux-gnu (64-bit Raspberry Pi OS, Debian
# arm64) and armv7-unknown-linux-gnueabihf (32-bit boards; WASM runs on wasmtime's Pulley
# interpreter there). Dev profile by default: the end-to-end tests run these under
# qemu-user. `cargo xtask dist` makes the release artifacts.
#
#   scripts/cross.sh                 # both targets, dev profile
#   scripts/cross.sh --release       # both targets, release profile
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
scripts/install-deps.sh
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  cargo build -q -p shoal-agent --target "$t" "$@"
done
