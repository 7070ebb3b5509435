#!/usr/bin/env bash
# Keeps the shared build cache ($CARGO_TARGET_DIR) from filling the disk. Every clone of
# the repository lives at another path, and cargo hashes a workspace crate's path into its
# artifacts' names, so each CI clone adds a full set of this workspace's artifacts (about
# 1 GB) and never reuses the last one. This removes the workspace's own artifacts (never a
# crates.io dependency's) that no build has written for SHOAL_CACHE_HOURS hours (default 4),
# and every incremental directory (CI builds without them). Hand-written because
# cargo-sweep would have to be built first on a fresh machine and knows nothing of which
# crates are ours.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
hours="${SHOAL_CACHE_HOURS:-4}"
[ -d "$CARGO_TARGET_DIR" ] || exit 0
before=$(du -sm "$CARGO_TARGET_DIR" | cut -f1)
# Target names as they appear in deps/ (crate names use '_') and package names as they
# appear in .fingerprint/ and build/ (with '-').
mapfile -t names < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
out = set()
for p in m["packages"]:
    out.add(p["name"])
    for t in p["targets"]:
        if t["name"] != "build-script-build":
            out.add(t["name"].replace("-", "_"))
print("\n".join(sorted(out)))')
for profile in "$CARGO_TARGET_DIR"/debug "$CARGO_TARGET_DIR"/release "$CARGO_TARGET_DIR"/*/debug "$CARGO_TARGET_DIR"/*/release; do
  [ -d "$profile" ] || continue
  rm -rf "$profile/incremental"
  for n in "${names[@]}"; do
    for sub in deps .fingerprint build; do
      [ -d "$profile/$sub" ] || continue
      find "$profile/$sub" -maxdepth 1 -regextype posix-extended \
        -regex ".*/(lib)?${n}-[0-9a-f]{16}([.-].*)?" -mmin +"$((hours * 60))" -exec rm -rf {} +
    done
  done
done
after=$(du -sm "$CARGO_TARGET_DIR" | cut -f1)
echo "build cache: ${before} MB -> ${after} MB (workspace artifacts older than ${hours} h removed)"
