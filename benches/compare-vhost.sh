#!/usr/bin/env bash
# Guest-side dd throughput through `snapvmm vhost-user-blk` and through
# `qemu-storage-daemon --export type=vhost-user-blk`, on the same qcow2 image, in one run.
#
# One QEMU (TCG, q35, memfd shared memory) boots Debian's cloud kernel with our initramfs
# (scripts/build-initramfs.sh) and its `dd-bench` workload, on each backend in turn,
# alternating which goes first every round. The workload drops the guest's page cache before
# each case and runs:
#   read-1M-seq      dd if=/dev/vda bs=1M count=256             (sequential, guest readahead)
#   read-4k-direct   dd if=/dev/vda bs=4k count=16384 iflag=direct
#   write-1M-direct  dd of=/dev/vda bs=1M count=256 oflag=direct
#   write-4k-direct  dd of=/dev/vda bs=4k count=16384 oflag=direct
# The table shows the median MB/s over the rounds and the ratio snapvmm/qemu (>= 1.0: ours is
# at least as fast). Both backends open the image buffered (qemu's cache.direct=off, our
# default) with one queue. Under TCG the guest's CPU is emulated, so absolute figures are
# low; the ratio is what compares the backends.
#
# Environment:
#   ROUNDS     boots per backend (default 3)
#   FORMAT     qcow2 (default) or raw: raw isolates the daemons from the image format
#   BENCH_DIR  where the temporary directory goes (default $TMPDIR or /tmp)
#   SNAPVMM    the snapvmm binary (default: target/release/snapvmm, built if missing)
#
# Needs qemu-system-x86_64, qemu-storage-daemon, qemu-img and qemu-io.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
FORMAT=${FORMAT:-qcow2}
snapvmm=${SNAPVMM:-}
if [ -z "$snapvmm" ]; then
    snapvmm=${CARGO_TARGET_DIR:-$repo/target}/release/snapvmm
    (cd "$repo" && cargo build --release -q --bin snapvmm)
fi
for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "compare-vhost: $tool not found" >&2; exit 1; }
done
initramfs=$("$repo/scripts/build-initramfs.sh")
kernel=$(dirname "$initramfs")/vmlinuz

dir=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/compare-vhost.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

# A fully allocated image: the guest's writes land in existing clusters on both backends.
image=$dir/disk.$FORMAT
qemu-img create -q -f "$FORMAT" "$image" 512M
qemu-io -f "$FORMAT" -c "write -P 0x5a 0 512M" "$image" >/dev/null

# start_backend NAME SOCKET: starts the backend and records its pid.
start_backend() {
    local name=$1 socket=$2
    rm -f "$socket"
    case $name in
    snapvmm)
        "$snapvmm" vhost-user-blk --socket "$socket" --disk "path=$image,format=$FORMAT" \
            --num-queues 1 2>>"$dir/snapvmm.log" &
        ;;
    qemu)
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file,filename=$image,cache.direct=off" \
            --blockdev "driver=$FORMAT,node-name=disk,file=file" \
            --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$socket,writable=on,num-queues=1" \
            2>>"$dir/qemu.log" &
        ;;
    esac
    backend_pid=$!
    pids+=("$backend_pid")
    for _ in $(seq 200); do
        [ -S "$socket" ] && return 0
        sleep 0.05
    done
    echo "compare-vhost: $name did not create $socket" >&2
    exit 1
}

# boot NAME: one guest run on backend NAME; appends "NAME CASE MBPS" lines to results.
boot() {
    local name=$1 socket=$dir/$1.sock console=$dir/console-$1.log
    start_backend "$name" "$socket"
    timeout 600 qemu-system-x86_64 -M q35 -accel tcg -cpu max -smp 1 -m 512 \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        -chardev "socket,id=blk,path=$socket" -device vhost-user-blk-pci,chardev=blk,num-queues=1 \
        -kernel "$kernel" -initrd "$initramfs" \
        -append "console=ttyS0 panic=-1 snapvmm.workload=dd-bench" \
        -nographic -nodefaults -no-reboot -serial stdio </dev/null >"$console" 2>&1
    kill "$backend_pid" 2>/dev/null || true
    wait "$backend_pid" 2>/dev/null || true
    # "snapvmm: dd CASE BYTES SECONDS" from the guest, timed with its /proc/uptime.
    sed 's/\r$//' "$console" | awk -v n="$name" '$1 == "snapvmm:" && $2 == "dd" && NF == 5 && $5 > 0 {
            printf "%s %s %.1f\n", n, $3, $4 / $5 / 1e6
        }' >>"$dir/results"
    # How the guest's driver split the I/O: its queue limits and each case's request count.
    sed 's/\r$//' "$console" | awk -v n="$name" '$1 == "snapvmm:" && $2 == "dd-queue" {
            $1 = ""; $2 = ""; print n ":" $0 }' >"$dir/queue-$name"
    sed 's/\r$//' "$console" | awk -v n="$name" '$1 == "snapvmm:" && $2 == "dd-requests" && NF == 5 {
            print n, $3, $4, $5 }' >>"$dir/requests"
    if ! grep -q '^snapvmm: dd ' "$console"; then
        echo "compare-vhost: no dd figures from $name; console:" >&2
        tail -n 30 "$console" >&2
        exit 1
    fi
}

: >"$dir/results"
: >"$dir/requests"
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then order="snapvmm qemu"; else order="qemu snapvmm"; fi
    for name in $order; do
        echo "round $round: $name" >&2
        boot "$name"
    done
done

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "guest dd through vhost-user-blk on $FORMAT, median of $ROUNDS boots each (MB/s; TCG guest)"
printf '%-18s %10s %10s %8s\n' case snapvmm qemu ratio
for case in read-1M-seq read-4k-direct write-1M-direct write-4k-direct; do
    ours=$(awk -v c="$case" '$1 == "snapvmm" && $2 == c { print $3 }' "$dir/results" | median)
    theirs=$(awk -v c="$case" '$1 == "qemu" && $2 == c { print $3 }' "$dir/results" | median)
    awk -v c="$case" -v a="$ours" -v b="$theirs" \
        'BEGIN { printf "%-18s %10.1f %10.1f %7.2fx\n", c, a, b, (b > 0 ? a / b : 0) }'
done
echo
echo "the guest driver's queue limits on each backend, and requests per case (reads writes, first boot)"
cat "$dir"/queue-* 2>/dev/null || true
awk '!seen[$1 " " $2]++ { printf "%-8s %-18s %8s %8s\n", $1, $2, $3, $4 }' "$dir/requests"
