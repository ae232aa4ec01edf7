#!/usr/bin/env bash
# Clone benchmarks (issue 14), against real snapvmm processes running the micro-guest:
#
#  1. time from the clone request to the Nth clone serving its API, N = 1, 8, 32, and
#     clones per second (`snapvmm ctl clone` returns once every clone runs);
#  2. memory of N clones of a 256 MiB guest that touched 64 MiB (the `touch` workload, which
#     keeps reading all 64 MiB): PSS and RSS summed over the clone processes
#     (/proc/PID/smaps_rollup), against N x 256 MiB;
#  3. the parent's pause in a live fork (`snapvmm ctl fork`) of a 1 GiB io-loop guest,
#     p50 and p99 over FORKS forks.
#
# Usage: benches/clone.sh    (SNAPVMM=path/to/snapvmm, FORKS=20 (0: none), COUNTS="1 8 32"
#                             ("": no clone section))
# Build first: cargo build (the storage engine is optimised even in dev builds) or
# cargo build --release and SNAPVMM=target/release/snapvmm.
set -euo pipefail

BIN=${SNAPVMM:-target/debug/snapvmm}
FORKS=${FORKS-20}
COUNTS=${COUNTS-"1 8 32"}
WORK=$(mktemp -d /tmp/snapvmm-clone-bench.XXXXXX)
PIDS=()

cleanup() {
    # The VMs and clones this script started, by pid (clones the bench destroyed are gone).
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
ctl() { "$BIN" ctl --api-socket "$1" "${@:2}"; }

# start_vm DIR WORKLOAD MEMORY_MIB SEED: a VM on a fresh 1 MiB qcow2 disk, API on DIR/api.sock.
start_vm() {
    local dir=$1
    mkdir -p "$dir"
    "$BIN" img create -f qcow2 "$dir/base.qcow2" 1M >/dev/null
    "$BIN" run --guest "builtin:$2" --memory "$3" --seed "$4" \
        --disk "path=$dir/base.qcow2" --serial "$dir/serial.log" \
        --api-socket "$dir/api.sock" >"$dir/snapvmm.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1000); do [ -S "$dir/api.sock" ] && return; sleep 0.01; done
    echo "VM in $dir did not start" >&2; cat "$dir/snapvmm.log" >&2; exit 1
}

# wait_line FILE PATTERN COUNT: waits until FILE has COUNT lines matching PATTERN.
wait_line() {
    for _ in $(seq 30000); do
        [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return
        sleep 0.02
    done
    echo "timeout waiting for '$2' in $1" >&2; exit 1
}

pids_of() { grep -o '"pid": [0-9]*' "$1" | awk '{print $2}'; }
dirs_of() { grep -o '"dir": "[^"]*"' "$1" | sed 's/"dir": "//; s/"$//'; }

if [ -n "$COUNTS" ]; then
echo "== clones of a 256 MiB guest that touched 64 MiB (binary $BIN)"
P=$WORK/parent
start_vm "$P" touch 256 64
wait_line "$P/serial.log" "touch done" 1
wait_line "$P/serial.log" "^counter" 2
ctl "$P/api.sock" pause >/dev/null
ctl "$P/api.sock" snapshot-create-as s1 >/dev/null
printf "%-6s %12s %10s %14s %14s %16s\n" N "time (s)" "clones/s" "PSS sum (MiB)" "RSS sum (MiB)" "N x 256 MiB"
for n in $COUNTS; do
    out=$WORK/clones-$n.json
    t0=$(now)
    ctl "$P/api.sock" clone s1 --count "$n" --dir "$WORK/c$n" --json >"$out"
    t1=$(now)
    PIDS+=($(pids_of "$out"))
    # Each clone has read its whole working set once it has printed two counter lines.
    for d in $(dirs_of "$out"); do wait_line "$d/serial.log" "^counter" 2; done
    pss=0; rss=0
    for pid in $(pids_of "$out"); do
        p=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")
        r=$(awk '/^Rss:/ {print $2}' "/proc/$pid/smaps_rollup")
        pss=$((pss + p)); rss=$((rss + r))
    done
    awk -v n="$n" -v t0="$t0" -v t1="$t1" -v pss="$pss" -v rss="$rss" 'BEGIN {
        t = t1 - t0
        printf "%-6d %12.3f %10.1f %14.1f %14.1f %16d\n", n, t, n / t, pss / 1024, rss / 1024, n * 256
    }'
    for d in $(dirs_of "$out"); do ctl "$P/api.sock" clone-destroy "$d" >/dev/null; done
done
ctl "$P/api.sock" shutdown >/dev/null || true
fi

[ "$FORKS" -gt 0 ] || exit 0
echo
echo "== live fork of a 1 GiB io-loop guest: the parent's pause ($FORKS forks)"
F=$WORK/forker
start_vm "$F" io-loop 1024 1
wait_line "$F/serial.log" "^io-loop ops" 2
: >"$WORK/pauses"
for i in $(seq "$FORKS"); do
    if ! ctl "$F/api.sock" fork --count 1 --dir "$WORK/f$i" 2>"$WORK/fork.err" >"$WORK/fork.out"; then
        cat "$WORK/fork.err" >&2; exit 1
    fi
    PIDS+=($(awk '{print $3}' "$WORK/fork.out"))
    grep -o 'paused [0-9.]* ms' "$WORK/fork.err" | awk '{print $2}' >>"$WORK/pauses"
    ctl "$F/api.sock" clone-destroy "$WORK/f$i/clone-0" >/dev/null
done
sort -n "$WORK/pauses" | awk '{ v[NR] = $1 } END {
    p50 = v[int((NR + 1) * 0.50)]; i99 = int(NR * 0.99 + 0.999); if (i99 > NR) i99 = NR
    printf "forks %d  pause p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", NR, p50, v[i99], v[NR]
}'
ctl "$F/api.sock" shutdown >/dev/null || true
