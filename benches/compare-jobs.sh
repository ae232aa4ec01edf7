#!/usr/bin/env bash
# Stream and commit throughput, snapvmm against qemu-img, on identical chains in one run.
#
#   benches/compare-jobs.sh [MiB]        (default 1024; ROUNDS=N runs, default 6)
#
# Builds a MiB-sized qcow2 full of data with qemu-io, then times, each on a fresh copy:
#   stream: `snapvmm img rebase -b "" top`   vs `qemu-img rebase -b "" top`  (empty top over data)
#   commit: `snapvmm img commit -d top`      vs `qemu-img commit -d top`     (data top over empty base)
# and prints the median and best MiB/s of each over ROUNDS rounds (each run after a sync so
# neither pays for the other's write-back; VERBOSE=1 lists every run) and the ratio
# snapvmm/qemu-img (>= 1.0 means snapvmm is as fast or faster).
# The live jobs themselves are measured by `cargo bench --bench live`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${1:-1024}
ROUNDS=${ROUNDS:-6}
cargo build --release --quiet --bin snapvmm
SNAPVMM=${CARGO_TARGET_DIR:-$PWD/target}/release/snapvmm
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

qemu-img create -q -f qcow2 data.qcow2 "${MIB}M"
qemu-io -f qcow2 -c "write -P 0x5a 0 ${MIB}M" data.qcow2 >/dev/null
qemu-img create -q -f qcow2 empty.qcow2 "${MIB}M"

# setup_stream DIR: DIR/top.qcow2 (empty) over DIR/data.qcow2.
setup_stream() {
    rm -rf "$1" && mkdir "$1"
    cp data.qcow2 "$1/data.qcow2"
    qemu-img create -q -f qcow2 -b data.qcow2 -F qcow2 "$1/top.qcow2"
}
# setup_commit DIR: DIR/top.qcow2 (data) over DIR/base.qcow2 (empty).
setup_commit() {
    rm -rf "$1" && mkdir "$1"
    cp empty.qcow2 "$1/base.qcow2"
    cp data.qcow2 "$1/top.qcow2"
    qemu-img rebase -q -u -b base.qcow2 -F qcow2 "$1/top.qcow2"
}
# seconds CMD...: wall-clock seconds of one run, started on a clean page cache state.
seconds() {
    local start end
    sync
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    echo "$end - $start" | bc -l
}
# median NUMBERS... / best NUMBERS...: the middle and the smallest value.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
best() {
    printf '%s\n' "$@" | sort -g | head -n 1
}
# report WHAT: prints both tools' figures from the arrays `ours` and `theirs` (seconds).
report() {
    local what=$1 stat ours_s theirs_s
    [ -n "${VERBOSE:-}" ] && echo "$what seconds: snapvmm ${ours[*]}; qemu-img ${theirs[*]}" >&2
    for stat in median best; do
        ours_s=$($stat "${ours[@]}")
        theirs_s=$($stat "${theirs[@]}")
        printf '%-7s %-6s snapvmm %8.1f MiB/s   qemu-img %8.1f MiB/s   ratio %.2fx\n' "$what" "$stat" \
            "$(echo "$MIB / $ours_s" | bc -l)" "$(echo "$MIB / $theirs_s" | bc -l)" \
            "$(echo "$theirs_s / $ours_s" | bc -l)"
    done
}

# Which tool runs first alternates: on a VM, whichever runs second after the setup's copies
# tends to get page-cache pages the host never backed yet, which cost several times more.
ours=() theirs=()
for ((round = 0; round < ROUNDS; round++)); do
    setup_stream s1; setup_stream s2
    if ((round % 2 == 0)); then
        ours+=("$(seconds "$SNAPVMM" img rebase -b "" s1/top.qcow2)")
        theirs+=("$(seconds qemu-img rebase -b "" s2/top.qcow2)")
    else
        theirs+=("$(seconds qemu-img rebase -b "" s2/top.qcow2)")
        ours+=("$(seconds "$SNAPVMM" img rebase -b "" s1/top.qcow2)")
    fi
    qemu-img compare -q s1/top.qcow2 s2/top.qcow2
done
report stream

ours=() theirs=()
for ((round = 0; round < ROUNDS; round++)); do
    setup_commit c1; setup_commit c2
    if ((round % 2 == 0)); then
        ours+=("$(seconds "$SNAPVMM" img commit -q -d c1/top.qcow2)")
        theirs+=("$(seconds qemu-img commit -q -d c2/top.qcow2)")
    else
        theirs+=("$(seconds qemu-img commit -q -d c2/top.qcow2)")
        ours+=("$(seconds "$SNAPVMM" img commit -q -d c1/top.qcow2)")
    fi
    qemu-img compare -q c1/base.qcow2 c2/base.qcow2
done
report commit
