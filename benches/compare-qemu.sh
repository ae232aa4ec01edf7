#!/usr/bin/env bash
# Compares `snapvmm img bench` with `qemu-img bench` on the same images, in one run.
#
# Both tools get identical arguments. Each round runs every case once per tool, alternating
# (the tool that goes first swaps every round); the table shows the median of the rounds'
# "Run completed in X seconds" times and the ratio qemu/snapvmm (>= 1.0: snapvmm is at least
# as fast). A second table compares snapvmm on qcow2 with snapvmm on raw (the "allocated reads
# within 10% of raw" goal).
#
# Cases (4 KiB requests scattered over the whole image by a large step coprime with the
# number of blocks; -t none is O_DIRECT in both tools):
#   read-4k-rand       4 KiB random reads, depth DEPTH, -t none, fully allocated qcow2
#   read-4k-rand-wb    the same with -t writeback from a warm page cache (engine CPU cost)
#   write-4k-rand      4 KiB random writes into allocated clusters, -t none
#   write-4k-cow       4 KiB writes into a fresh empty overlay over the qcow2 (one per
#                      cluster, each allocates and copies the rest of it from the backing file)
#   read-1m-seq        1 MiB sequential reads, depth SEQ_DEPTH, -t none
#   read-4k-rand-raw   4 KiB random reads on a raw image of the same size and contents
#
# Environment:
#   ROUNDS     rounds per case (default 5)
#   COUNT      requests per 4 KiB run (default 100000)
#   SIZE       virtual size of the images, with K/M/G/T suffix (default 1G)
#   SEQ_COUNT  requests per 1 MiB run (default: two passes over the image)
#   DEPTH      requests in flight for 4 KiB cases (default 32)
#   SEQ_DEPTH  requests in flight for 1 MiB cases (default 8)
#   CASES      space-separated subset of the case names above (default: all)
#   QEMU_AIO   if set (native, io_uring), passed as `-i QEMU_AIO` to qemu-img in the -t none
#              cases only; the default leaves qemu on its default thread-pool AIO, so both
#              tools get exactly the same arguments
#   BENCH_DIR  where the temporary directory goes (default $TMPDIR or /tmp; must support
#              O_DIRECT, so not an old tmpfs)
#
# Works from any directory; needs qemu-img and qemu-io (Debian: qemu-utils).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
COUNT=${COUNT:-100000}
SIZE=${SIZE:-1G}
DEPTH=${DEPTH:-32}
SEQ_DEPTH=${SEQ_DEPTH:-8}
CASES=${CASES:-read-4k-rand read-4k-rand-wb write-4k-rand write-4k-cow read-1m-seq read-4k-rand-raw}

die() {
    echo "compare-qemu: $*" >&2
    exit 1
}

for tool in qemu-img qemu-io cargo; do
    command -v "$tool" >/dev/null || die "$tool not found (qemu-img/qemu-io: apt-get install qemu-utils)"
done

to_bytes() {
    local text=$1 number suffix
    [[ $text =~ ^([0-9]+)([KMGTkmgt]?)$ ]] || die "bad size '$text' (e.g. 1G, 512M)"
    number=${BASH_REMATCH[1]}
    suffix=${BASH_REMATCH[2]^^}
    case $suffix in
        K) echo $((number << 10)) ;;
        M) echo $((number << 20)) ;;
        G) echo $((number << 30)) ;;
        T) echo $((number << 40)) ;;
        *) echo "$number" ;;
    esac
}

gcd() {
    local a=$1 b=$2 t
    while ((b)); do
        t=$((a % b))
        a=$b
        b=$t
    done
    echo "$a"
}

# The first prime of a list that is coprime with $1 and keeps $2 * prime under INT_MAX.
coprime_step() {
    local units=$1 unit=$2 p
    for p in 104729 7919 7907 1009 997 101 97 13 11 7 5 3 1; do
        if (($(gcd "$p" "$units") == 1 && p * unit <= 2147483647)); then
            echo $((p * unit))
            return
        fi
    done
}

SIZE_BYTES=$(to_bytes "$SIZE")
((SIZE_BYTES >= 64 << 20 && SIZE_BYTES % (1 << 20) == 0)) ||
    die "SIZE must be a multiple of 1 MiB and at least 64 MiB"
BLOCKS=$((SIZE_BYTES / 4096))
CLUSTERS=$((SIZE_BYTES / 65536))
SEQ_COUNT=${SEQ_COUNT:-$((2 * SIZE_BYTES / (1 << 20)))}
STEP_4K=$(coprime_step "$BLOCKS" 4096)
STEP_CLUSTER=$(coprime_step "$CLUSTERS" 65536)
# One allocating write per cluster at most, so every request of the run allocates.
COW_COUNT=$((COUNT < CLUSTERS ? COUNT : CLUSTERS))

# case name -> file, then qemu-img bench arguments shared by both tools
case_file() {
    case $1 in
        read-4k-rand-raw) echo "$RAW" ;;
        write-4k-cow) echo "$OVERLAY" ;;
        *) echo "$BASE" ;;
    esac
}
case_args() {
    case $1 in
        read-4k-rand) echo "-f qcow2 -t none -d $DEPTH -c $COUNT -s 4096 -S $STEP_4K" ;;
        read-4k-rand-wb) echo "-f qcow2 -t writeback -d $DEPTH -c $COUNT -s 4096 -S $STEP_4K" ;;
        write-4k-rand) echo "-w -f qcow2 -t none -d $DEPTH -c $COUNT -s 4096 -S $STEP_4K" ;;
        write-4k-cow) echo "-w -f qcow2 -t none -d $DEPTH -c $COW_COUNT -s 4096 -S $STEP_CLUSTER" ;;
        read-1m-seq) echo "-f qcow2 -t none -d $SEQ_DEPTH -c $SEQ_COUNT -s 1M -S 1M" ;;
        read-4k-rand-raw) echo "-f raw -t none -d $DEPTH -c $COUNT -s 4096 -S $STEP_4K" ;;
        *) die "unknown case '$1'" ;;
    esac
}

read -r -a case_list <<<"$CASES"
for name in "${case_list[@]}"; do case_args "$name" >/dev/null; done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
echo "== building snapvmm (release)"
cargo build --release --manifest-path "$REPO/Cargo.toml" --bin snapvmm
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
SNAPVMM="${TARGET_DIR:-$REPO/target}/release/snapvmm"
[[ -x $SNAPVMM ]] || die "no binary at $SNAPVMM"
"$SNAPVMM" img bench --help >/dev/null 2>&1 || die "$SNAPVMM has no 'img bench' verb yet"

WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/snapvmm-compare.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== images: $SIZE ($SIZE_BYTES bytes) in $WORK"
BASE="$WORK/base.qcow2"
RAW="$WORK/disk.raw"
OVERLAY="$WORK/overlay.qcow2"
# Write every byte so each qcow2 cluster has a real L2 mapping and real file blocks, and the
# raw file holds the same data (not a sparse hole).
fill() {
    local format=$1 file=$2 chunk=$((64 << 20)) offset=0 args=()
    while ((offset < SIZE_BYTES)); do
        args+=(-c "write -P 0x5a $offset $chunk")
        offset=$((offset + chunk))
    done
    qemu-io -f "$format" -t none "${args[@]}" "$file" >/dev/null
}
qemu-img create -q -f qcow2 -o cluster_size=65536 "$BASE" "$SIZE_BYTES"
fill qcow2 "$BASE"
qemu-img create -q -f raw "$RAW" "$SIZE_BYTES"
fill raw "$RAW"
sync
qemu-img check -q "$BASE" || die "base image does not check clean"

# run TOOL CASE: prints the seconds the tool reports for one run
run() {
    local tool=$1 name=$2 file out seconds
    local -a args
    file=$(case_file "$name")
    read -r -a args <<<"$(case_args "$name")"
    if [[ $name == read-4k-rand-wb ]]; then
        # Both tools start from a warm page cache (the -t none writes of other cases drop
        # cached pages; whichever tool ran first would otherwise pay for the disk reads).
        cat "$file" >/dev/null
    fi
    if [[ $name == write-4k-cow ]]; then
        rm -f "$OVERLAY"
        qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$BASE" -F qcow2 "$OVERLAY"
    fi
    if [[ $tool == snapvmm ]]; then
        out=$("$SNAPVMM" img bench "${args[@]}" "$file" 2>&1) || die "snapvmm failed on $name: $out"
    else
        if [[ -n ${QEMU_AIO:-} && " ${args[*]} " == *" -t none "* ]]; then
            args=(-i "$QEMU_AIO" "${args[@]}")
        fi
        out=$(qemu-img bench "${args[@]}" "$file" 2>&1) || die "qemu-img failed on $name: $out"
    fi
    seconds=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out")
    [[ -n $seconds ]] || die "$tool printed no time on $name: $out"
    if [[ $tool == snapvmm && $name == write-4k-cow ]]; then
        # The engine's allocations must leave an image qemu-img accepts.
        qemu-img check -q "$OVERLAY" || die "snapvmm's overlay does not check clean"
    fi
    echo "$seconds"
}

median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

RESULTS="$WORK/results"
mkdir -p "$RESULTS"

echo "== $ROUNDS rounds; 4K: -c $COUNT -d $DEPTH -S $STEP_4K; cow: -c $COW_COUNT -S $STEP_CLUSTER;" \
    "1M: -c $SEQ_COUNT -d $SEQ_DEPTH"
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then order=(snapvmm qemu); else order=(qemu snapvmm); fi
    line="round $round:"
    for name in "${case_list[@]}"; do
        for tool in "${order[@]}"; do
            seconds=$(run "$tool" "$name")
            echo "$seconds" >>"$RESULTS/$name.$tool"
            line+=" $name/$tool=$seconds"
        done
    done
    echo "$line"
done

echo
echo "== snapvmm vs qemu-img bench (median of $ROUNDS; SIZE=$SIZE COUNT=$COUNT;" \
    "qemu aio ${QEMU_AIO:-threads (default)}; ratio = qemu/snapvmm)"
printf '%-18s %12s %12s %8s\n' case snapvmm_s qemu_s ratio
for name in "${case_list[@]}"; do
    s=$(median <"$RESULTS/$name.snapvmm")
    q=$(median <"$RESULTS/$name.qemu")
    ratio=$(awk -v s="$s" -v q="$q" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }')
    printf '%-18s %12s %12s %8s\n' "$name" "$s" "$q" "$ratio"
done

if [[ " $CASES " == *" read-4k-rand "* && " $CASES " == *" read-4k-rand-raw "* ]]; then
    echo
    echo "== snapvmm qcow2 vs snapvmm raw: allocated 4K random reads, -t none (goal: within 10%)"
    q=$(median <"$RESULTS/read-4k-rand.snapvmm")
    r=$(median <"$RESULTS/read-4k-rand-raw.snapvmm")
    awk -v q="$q" -v r="$r" 'BEGIN {
        printf "%-18s %12s %12s %8s\n", "case", "qcow2_s", "raw_s", "overhead"
        printf "%-18s %12s %12s %7.1f%%\n", "read-4k-rand", q, r, (q / r - 1) * 100 }'
fi
