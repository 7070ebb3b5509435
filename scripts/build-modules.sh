#!/usr/bin/env bash
# Builds the example WASM workloads in modules/ and copies them to modules/dist/:
# hello.wasm, netprobe.wasm and serial-component.wasm (wasm32-wasip2 components), ticker.wasm, probe.wasm and
# serial.wasm (wasm32-wasip1 modules).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT/modules"
CARGO_TARGET_DIR="$SHOAL_MODULES_TARGET" cargo build -q --release --target wasm32-wasip2 -p hello -p netprobe -p serial-component
CARGO_TARGET_DIR="$SHOAL_MODULES_TARGET" cargo build -q --release --target wasm32-wasip1 -p ticker -p probe -p serial
mkdir -p dist
cp "$SHOAL_MODULES_TARGET/wasm32-wasip2/release/hello.wasm" "$SHOAL_MODULES_TARGET/wasm32-wasip2/release/netprobe.wasm" "$SHOAL_MODULES_TARGET/wasm32-wasip2/release/serial-component.wasm" dist/
cp "$SHOAL_MODULES_TARGET/wasm32-wasip1/release/ticker.wasm" "$SHOAL_MODULES_TARGET/wasm32-wasip1/release/probe.wasm" "$SHOAL_MODULES_TARGET/wasm32-wasip1/release/serial.wasm" dist/
echo "modules built: $(cd dist && ls *.wasm | tr '\n' ' ')"
