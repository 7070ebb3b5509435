# Shared settings for the scripts (sourced, not run).
# One build cache outside the clone, reused across runs and clones.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
export SHOAL_MODULES_TARGET="${SHOAL_MODULES_TARGET:-$HOME/.cache/shoal/modules-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
