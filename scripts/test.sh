#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): installs what it needs, checks
# formatting and lints, builds everything, runs the unit tests and the end-to-end tests,
# then a short fuzz run of every fuzz target.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
# Each phase prints how long the one before it took, and the run its total.
run_started=$SECONDS phase_started=$SECONDS phase_name=""
phase() {
  [ -z "$phase_name" ] || echo "-- $phase_name: $((SECONDS - phase_started)) s"
  phase_name="$1" phase_started=$SECONDS
  [ -z "$1" ] || echo "== $1"
}
phase "install dependencies"
scripts/install-deps.sh
phase "prune the shared build cache"
scripts/prune-cache.sh
phase "build the WASM modules"
scripts/build-modules.sh
phase "fmt";      cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
phase "boundaries (pure cores, a shell that sees typed commands, one runtime seam in the agent, no clock in api, no import circle between files)"
cargo run -q -p xtask -- boundaries
phase "clippy"; cargo clippy --workspace --all-targets -q -- -D warnings
# The runtime-only agent (no Cranelift, no containerd) has code of its own behind cfgs.
cargo clippy -p shoal-agent --all-targets --no-default-features -q -- -D warnings
phase "build";  cargo build --workspace -q
phase "cross-compile the agent for aarch64 and armv7 (run under qemu by the ARM tests)"
scripts/cross.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
phase "unit tests"
cargo test --workspace --exclude shoal-e2e -q 2>&1 | tee -a "$log"
phase "end-to-end tests (real hub, agents, mosquitto; network namespaces for multi-host)"
# One at a time: they start processes, and one measures CPU shares.
cargo test -p shoal-e2e -q -- --test-threads=1 2>&1 | tee -a "$log"
phase "fuzz (short: each target ${SHOAL_FUZZ_SHORT:-20}s; the long run is scripts/fuzz.sh, see FUZZING.md)"
scripts/fuzz.sh --short
phase ""
echo "-- total: $((SECONDS - run_started)) s"
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "all tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
