#!/usr/bin/env bash
# Benchmarks (not part of the test run): release builds, then shoal-bench prints a Markdown
# table of apply → Running latency (vs MQTT hops through the same broker; and with the hub's
# state in etcd vs on sled, side by side), hub failover time (three replicas on etcd, the
# leader SIGKILLed SHOAL_BENCH_KILLS times, default 10, vs the lease TTL), agent RSS and
# binary sizes; then shoal-join-bench (root: network namespaces) times mDNS joins against
# joins with --broker. SHOAL_BENCH_N sets the number of applies (default 200),
# SHOAL_BENCH_JOINS the number of joins (default 20); then shoal-scale-bench (the hub under
# SHOAL_BENCH_FLEET simulated devices, default 10,000; once on one hub, once on three
# replicas on etcd), shoal-container-bench (root: a
# private containerd; container and WASM deploys against `ctr run`, SHOAL_BENCH_CONTAINERS
# iterations, default 20), shoal-engine-bench (Pulley against Cranelift on one module) and
# the scheduler benchmark.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
scripts/install-deps.sh
scripts/build-modules.sh
cargo build --release --workspace -q
SHOAL_BIN_DIR="$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/release/shoal-bench"
SHOAL_BIN_DIR="$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/release/shoal-join-bench"
SHOAL_BIN_DIR="$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/release/shoal-scale-bench"
# The same fleet on three hub replicas (etcd, shared status ingest).
SHOAL_BENCH_REPLICAS=3 SHOAL_BIN_DIR="$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/release/shoal-scale-bench"
SHOAL_BIN_DIR="$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/release/shoal-container-bench"
SHOAL_MODULES_DIR="$REPO_ROOT/modules/dist" "$CARGO_TARGET_DIR/release/shoal-engine-bench"
cargo bench -q -p shoal-hub --bench schedule
