#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): installs what it needs, checks
# formatting and lints, builds everything, runs the unit tests and the end-to-end tests,
# then a short fuzz run of every fuzz target.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
scripts/install-deps.sh
scripts/build-modules.sh
echo "== fmt";    cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== boundaries (the functional core names no I/O crate and no clock)"
cargo run -q -p xtask -- boundaries
echo "== clippy"; cargo clippy --workspace --all-targets -q -- -D warnings
# The runtime-only agent (no Cranelift, no containerd) has code of its own behind cfgs.
cargo clippy -p shoal-agent --all-targets --no-default-features -q -- -D warnings
echo "== build";  cargo build --workspace -q
echo "== cross-compile the agent for aarch64 and armv7 (run under qemu by the ARM tests)"
scripts/cross.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== unit tests"
cargo test --workspace --exclude shoal-e2e -q 2>&1 | tee -a "$log"
echo "== end-to-end tests (real hub, agents, mosquitto; network namespaces for multi-host)"
# One at a time: they start processes, and one measures CPU shares.
cargo test -p shoal-e2e -q -- --test-threads=1 2>&1 | tee -a "$log"
echo "== fuzz (short: each target ${SHOAL_FUZZ_SHORT:-20}s; the long run is scripts/fuzz.sh, see FUZZING.md)"
scripts/fuzz.sh --short
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "all tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
