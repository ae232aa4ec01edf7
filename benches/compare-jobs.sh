#!/usr/bin/env bash
# Stream and commit throughput, snapvmm against qemu-img, on identical chains in one run.
#
#   benches/compare-jobs.sh [MiB]        (default 1024; ROUNDS=N runs, default 6)
#   BASELINE=path/to/other/snapvmm benches/compare-jobs.sh 512   (a third column: an older
#                                        build, interleaved with the other two, for before/after)
#
# Builds a MiB-sized qcow2 full of data with qemu-io, then times, each on a fresh copy:
#   stream: `snapvmm img rebase -b "" top`   vs `qemu-img rebase -b "" top`  (empty top over data)
#   commit: `snapvmm img commit -d top`      vs `qemu-img commit -d top`     (data top over empty base)
# and prints the median and best MiB/s of each over ROUNDS rounds (each run after a sync so
# neither pays for the other's write-back; VERBOSE=1 lists every run) and the ratio
# snapvmm/qemu-img (>= 1.0 means snapvmm is as fast or faster). Every result is checked to
# read the same as the data template (`qemu-img compare`), whichever tool made it.
# The live jobs themselves are measured by `cargo bench --bench live`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${1:-1024}
ROUNDS=${ROUNDS:-6}
BASELINE=${BASELINE:-}
[ -n "$BASELINE" ] && BASELINE=$(realpath "$BASELINE")
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
# report WHAT: prints each tool's figures from the arrays `ours`, `theirs` (qemu-img) and,
# with BASELINE, `base` (seconds), with the ratios against qemu-img and the baseline.
report() {
    local what=$1 stat ours_s theirs_s base_s
    if [ -n "${VERBOSE:-}" ]; then
        echo "$what seconds: snapvmm ${ours[*]}; qemu-img ${theirs[*]}${BASELINE:+; baseline ${base[*]}}" >&2
    fi
    for stat in median best; do
        ours_s=$($stat "${ours[@]}")
        theirs_s=$($stat "${theirs[@]}")
        printf '%-7s %-6s snapvmm %8.1f MiB/s   qemu-img %8.1f MiB/s   ratio %.2fx' "$what" "$stat" \
            "$(echo "$MIB / $ours_s" | bc -l)" "$(echo "$MIB / $theirs_s" | bc -l)" \
            "$(echo "$theirs_s / $ours_s" | bc -l)"
        if [ -n "$BASELINE" ]; then
            base_s=$($stat "${base[@]}")
            printf '   baseline %8.1f MiB/s (ratio %.2fx; snapvmm/baseline %.2fx)' \
                "$(echo "$MIB / $base_s" | bc -l)" "$(echo "$theirs_s / $base_s" | bc -l)" \
                "$(echo "$base_s / $ours_s" | bc -l)"
        fi
        echo
    done
    # Each round's tools ran back to back: the median of the per-round ratios is the figure
    # least moved by load that comes and goes on a shared machine.
    local i r=() rb=()
    for ((i = 0; i < ${#ours[@]}; i++)); do
        r+=("$(echo "${theirs[i]} / ${ours[i]}" | bc -l)")
        [ -n "$BASELINE" ] && rb+=("$(echo "${base[i]} / ${ours[i]}" | bc -l)")
    done
    printf '%-7s paired median of per-round ratios: snapvmm/qemu-img %.2fx' "$what" "$(median "${r[@]}")"
    [ -n "$BASELINE" ] && printf '   snapvmm/baseline %.2fx' "$(median "${rb[@]}")"
    echo
}

# run_round KIND ROUND: one run of each tool in an order that rotates each round, each on a
# case set up just before it, checked against the data template (`qemu-img compare`: the
# same contents whichever tool made it) and removed at once. So every run follows the same
# steps (remove the last case, copy the next one in, sync): on a VM, page cache the host
# has not backed yet costs several times more, and how much of it a run meets depends on
# what was freed and allocated just before it.
run_round() {
    local kind=$1 round=$2 tools=(ours theirs) i tool
    [ -n "$BASELINE" ] && tools+=(base)
    for ((i = 0; i < ${#tools[@]}; i++)); do
        tool=${tools[(i + round) % ${#tools[@]}]}
        "setup_$kind" case
        case "$kind/$tool" in
        stream/ours) ours+=("$(seconds "$SNAPVMM" img rebase -b "" case/top.qcow2)") ;;
        stream/base) base+=("$(seconds "$BASELINE" img rebase -b "" case/top.qcow2)") ;;
        stream/theirs) theirs+=("$(seconds qemu-img rebase -b "" case/top.qcow2)") ;;
        commit/ours) ours+=("$(seconds "$SNAPVMM" img commit -q -d case/top.qcow2)") ;;
        commit/base) base+=("$(seconds "$BASELINE" img commit -q -d case/top.qcow2)") ;;
        commit/theirs) theirs+=("$(seconds qemu-img commit -q -d case/top.qcow2)") ;;
        esac
        if [ "$kind" = stream ]; then
            qemu-img compare -q data.qcow2 case/top.qcow2
        else
            qemu-img compare -q data.qcow2 case/base.qcow2
        fi
        rm -rf case
    done
}

for kind in stream commit; do
    ours=() theirs=() base=()
    for ((round = 0; round < ROUNDS; round++)); do
        run_round "$kind" "$round"
    done
    report "$kind"
done
