#!/bin/sh
# Crash trials on demand, N of each kind (default 500, >= 1000 per suite):
# - the snapshot tree (tests/live_crash.rs): exit at every metadata write step of random
#   scripted runs, and SIGKILL at random moments;
# - checkpoints (tests/checkpoint_crash.rs): SIGKILL at random moments of full,
#   incremental, live and live incremental checkpoint saves, and of tree create, revert and
#   delete with memory, of an io-loop micro-guest (needs /dev/kvm and qemu-img).
# Usage: scripts/crash-trials.sh [N] [tree|checkpoint|all]
set -eu
N="${1:-500}"
WHAT="${2:-all}"
cd "$(dirname "$0")/.."
if [ "$WHAT" = tree ] || [ "$WHAT" = all ]; then
    SNAPVMM_TREE_CRASH_TRIALS="$N" cargo test --release --test live_crash -- \
        --nocapture --test-threads=2 tree_crash_at_metadata_writes tree_sigkill_at_random_moments
fi
if [ "$WHAT" = checkpoint ] || [ "$WHAT" = all ]; then
    SNAPVMM_CHECKPOINT_CRASH_TRIALS="$N" SNAPVMM_REQUIRE_KVM=1 SNAPVMM_REQUIRE_QEMU=1 \
        cargo test --release --test checkpoint_crash -- --nocapture --test-threads=2 sigkill_during
fi
