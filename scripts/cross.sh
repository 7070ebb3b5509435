#!/usr/bin/env bash
# Cross-compiles shoal-agent for the ARM boards Shoal supports, with Debian's cross gcc as
# linker (.cargo/config.toml): aarch64-unknown-linux-gnu (64-bit Raspberry Pi OS, Debian
# arm64) and armv7-unknown-linux-gnueabihf (32-bit boards; WASM runs on wasmtime's Pulley
# interpreter there). Each in two builds: the full agent (`shoal-agent`) and the runtime-only
# one (`--no-default-features`: no Cranelift, no containerd; copied to
# `shoal-agent-runtime-only` beside it). Dev profile by default: the end-to-end tests run
# these under qemu-user. `cargo xtask dist` makes the release artifacts.
#
#   scripts/cross.sh                 # both targets, both builds, dev profile
#   scripts/cross.sh --release       # both targets, both builds, release profile
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
scripts/install-deps.sh
profile_dir=debug
for a in "$@"; do
  case "$a" in
    --release) profile_dir=release ;;
    --profile=*) profile_dir="${a#--profile=}" ;;
  esac
done
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  # Runtime-only first: both builds write target/$t/$profile_dir/shoal-agent, and the full
  # one must be what is left there.
  cargo build -q -p shoal-agent --target "$t" --no-default-features "$@"
  cp "$CARGO_TARGET_DIR/$t/$profile_dir/shoal-agent" "$CARGO_TARGET_DIR/$t/$profile_dir/shoal-agent-runtime-only"
  cargo build -q -p shoal-agent --target "$t" "$@"
done
