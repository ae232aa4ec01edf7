#!/bin/sh
# Crash trials of the snapshot tree on demand: N trials of each kind (exit at every
# metadata write step of random scripted runs, and SIGKILL at random moments), default 500
# each (>= 1000 in all). Usage: scripts/crash-trials.sh [N]
set -eu
N="${1:-500}"
cd "$(dirname "$0")/.."
SNAPVMM_TREE_CRASH_TRIALS="$N" cargo test --release --test live_crash -- \
    --nocapture --test-threads=2 tree_crash_at_metadata_writes tree_sigkill_at_random_moments
