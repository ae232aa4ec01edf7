#!/usr/bin/env bash
# Stream and commit throughput, snapvmm against qemu-img, on identical chains in one run.
#
#   benches/compare-jobs.sh [MiB]        (default 1024)
#
# Builds a MiB-sized qcow2 full of data with qemu-io, then times, each on a fresh copy:
#   stream: `snapvmm img rebase -b "" top`   vs `qemu-img rebase -b "" top`  (empty top over data)
#   commit: `snapvmm img commit -d top`      vs `qemu-img commit -d top`     (data top over empty base)
# and prints MiB/s and the ratio snapvmm/qemu-img (>= 1.0 means snapvmm is as fast or faster).
# The live jobs themselves are measured by `cargo bench --bench live`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${1:-1024}
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
# seconds CMD...: wall-clock seconds of one run.
seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    echo "$end - $start" | bc -l
}
report() {
    local what=$1 ours=$2 theirs=$3
    printf '%-7s snapvmm %8.1f MiB/s   qemu-img %8.1f MiB/s   ratio %.2fx\n' "$what" \
        "$(echo "$MIB / $ours" | bc -l)" "$(echo "$MIB / $theirs" | bc -l)" \
        "$(echo "$theirs / $ours" | bc -l)"
}

sync
setup_stream s1; setup_stream s2
ours=$(seconds "$SNAPVMM" img rebase -b "" s1/top.qcow2)
theirs=$(seconds qemu-img rebase -b "" s2/top.qcow2)
qemu-img compare -q s1/top.qcow2 s2/top.qcow2
report stream "$ours" "$theirs"

setup_commit c1; setup_commit c2
ours=$(seconds "$SNAPVMM" img commit -q -d c1/top.qcow2)
theirs=$(seconds qemu-img commit -q -d c2/top.qcow2)
qemu-img compare -q c1/base.qcow2 c2/base.qcow2
report commit "$ours" "$theirs"
