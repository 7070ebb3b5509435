#!/usr/bin/env bash
# Fuzzing (cargo-fuzz, libFuzzer, AddressSanitizer) of what Shoal decodes from outside: see
# FUZZING.md. Installs cargo-fuzz if missing. cargo-fuzz needs nightly-only flags
# (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the one stable toolchain of this project accept them.
#
#   scripts/fuzz.sh --short          # each target for SHOAL_FUZZ_SHORT seconds (default 20): part of scripts/test.sh
#   scripts/fuzz.sh                  # each target until SHOAL_FUZZ_RUNS executions (default 10,000,000)
#   scripts/fuzz.sh manifest ...     # only the named targets
# Inputs are capped at SHOAL_FUZZ_MAX_LEN bytes (default 4096, as libFuzzer: larger ones only
# slow the search down; SHOAL_FUZZ_MAX_LEN=65536 lets a run try them).
#
# The corpus grows in ~/.cache/shoal/fuzz-corpus/TARGET, seeded from tests/golden and
# examples; a crash leaves its input in fuzz/artifacts/TARGET/ and fails the script.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked -q
export RUSTC_BOOTSTRAP=1
# Own target directory: sanitizer and --cfg fuzzing builds must not mix with the main cache.
export CARGO_TARGET_DIR="$HOME/.cache/shoal/fuzz-target"
short=0
targets=()
for a in "$@"; do
  case "$a" in
    --short) short=1 ;;
    *) targets+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(manifest bus_messages references mqtt_guard desired_verify)
for t in "${targets[@]}"; do
  cargo fuzz build -O "$t"
done
corpus_root="$HOME/.cache/shoal/fuzz-corpus"
for t in "${targets[@]}"; do
  corpus="$corpus_root/$t"
  mkdir -p "$corpus" "artifacts/$t"
  seeds=()
  case "$t" in
    manifest) seeds=("$REPO_ROOT/tests/golden" "$REPO_ROOT/examples") ;;
    mqtt_guard | desired_verify) seeds=("$REPO_ROOT/fuzz/seeds/$t") ;;
  esac
  if [ "$short" = 1 ]; then
    limit=(-max_total_time="${SHOAL_FUZZ_SHORT:-20}")
  else
    limit=(-runs="${SHOAL_FUZZ_RUNS:-10000000}")
  fi
  log=$(mktemp)
  echo "== fuzz $t (${limit[*]})"
  if ! cargo fuzz run -O "$t" "$corpus" "${seeds[@]}" -- "${limit[@]}" \
      -artifact_prefix="artifacts/$t/" -max_len="${SHOAL_FUZZ_MAX_LEN:-4096}" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    rm -f "$log"
    echo "fuzz target $t failed: see fuzz/artifacts/$t/" >&2
    exit 1
  fi
  # One line per target: executions, speed, coverage, corpus.
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  speed=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log")
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
  echo "fuzz $t: ${runs:-?} executions, ${speed:-?}/s, ${cov:-cov: ?}, 0 crashes, corpus $(ls "$corpus" | wc -l) inputs"
  rm -f "$log"
done
