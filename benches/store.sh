#!/usr/bin/env bash
# Snapshot store figures (issue 15), against SeaweedFS on loopback started here:
#   1. dedup: bytes uploaded by 10 successive snapshots of a running io-loop VM vs their sum,
#      with 512 KiB chunks (the default, pushed through the VM's API) and 64 KiB chunks
#      (the same snapshots pushed offline from the tree metadata into another prefix);
#   2. restore to the first guest progress line: local checkpoint vs the store, cold cache;
#   3. bytes fetched vs chunks the guest touched, without and with working-set prefetch.
# Usage: benches/store.sh [path/to/snapvmm]   (needs `weed`, /dev/kvm, jq)
set -euo pipefail
SNAPVMM=${1:-target/release/snapvmm}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 2
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
P=$((21000 + RANDOM % 4000))
mkdir -p "$WORK"/{m,v0,v1,f}
(cd "$WORK/f" && exec weed master -ip=127.0.0.1 -ip.bind=127.0.0.1 -mdir="$WORK/m" -port=$P \
    -defaultReplication=001 -volumeSizeLimitMB=64 >"$WORK/m.log" 2>&1) & PIDS+=($!)
for i in 0 1; do
    (cd "$WORK/f" && exec weed volume -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$WORK/v$i" \
        -mserver=127.0.0.1:$P -port=$((P + 1 + i)) -max=16 >"$WORK/v$i.log" 2>&1) & PIDS+=($!)
done
(cd "$WORK/f" && exec weed filer -ip=127.0.0.1 -ip.bind=127.0.0.1 -master=127.0.0.1:$P \
    -port=$((P + 3)) -s3 -s3.port=$((P + 4)) >"$WORK/f.log" 2>&1) & PIDS+=($!)
export AWS_ENDPOINT_URL=http://127.0.0.1:$((P + 4)) AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
# The bucket is made by SeaweedFS's own admin shell once the filer answers.
# An attempt that timed out after creating it leaves "already exists" for the next one.
until out=$(echo "s3.bucket.create -name bench" \
    | timeout 20 weed shell -master=127.0.0.1:$P -filer=127.0.0.1:$((P + 3)) 2>&1) \
    || [[ $out == *"already exists"* ]]; do
    sleep 0.2
done
STORE=s3://bench/fleet
# The S3 gateway starts after the filer: wait until our own client can list the store.
until "$SNAPVMM" snapshot ls "$STORE" >/dev/null 2>&1; do sleep 0.2; done

# 1. Ten snapshots of a running io-loop VM (64 MiB disk, 128 MiB RAM).
"$SNAPVMM" img create -f qcow2 "$WORK/base.qcow2" 64M >/dev/null
"$SNAPVMM" run --guest builtin:io-loop --memory 128 --disk path="$WORK/base.qcow2" \
    --serial "$WORK/serial.log" --api-socket "$WORK/vm.sock" & VM=$!; PIDS+=($VM)
until [ -S "$WORK/vm.sock" ]; do sleep 0.1; done
sum=0; total=0; sum64=0; total64=0
for i in $(seq 1 10); do
    sleep 1
    "$SNAPVMM" ctl --api-socket "$WORK/vm.sock" snapshot-create-as "s$i" >/dev/null
    up=$("$SNAPVMM" snapshot push --json --api-socket "$WORK/vm.sock" "s$i" "$STORE" | jq .bytes_uploaded)
    scanned=$("$SNAPVMM" snapshot ls --json "$STORE" | jq ".[] | select(.name==\"s$i\") | .data_bytes")
    up64=$("$SNAPVMM" snapshot push --json --chunk-size 65536 \
        --snapshot-metadata "$WORK/snapvmm-snapshots.json" "s$i" "$STORE-64k" | jq .bytes_uploaded)
    scanned64=$("$SNAPVMM" snapshot ls --json "$STORE-64k" | jq ".[] | select(.name==\"s$i\") | .data_bytes")
    echo "snapshot s$i: uploaded $((up / 1024)) KiB of $((scanned / 1024)) KiB of data; 64 KiB chunks: $((up64 / 1024)) KiB of $((scanned64 / 1024)) KiB"
    sum=$((sum + up)); total=$((total + scanned)); sum64=$((sum64 + up64)); total64=$((total64 + scanned64))
done
echo "dedup, 512 KiB chunks: 10 snapshots uploaded $((sum / 1024)) KiB; their data adds up to $((total / 1024)) KiB ($((100 * sum / total))%)"
echo "dedup, 64 KiB chunks: 10 snapshots uploaded $((sum64 / 1024)) KiB; their data adds up to $((total64 / 1024)) KiB ($((100 * sum64 / total64))%)"
"$SNAPVMM" ctl --api-socket "$WORK/vm.sock" shutdown >/dev/null; wait "$VM" || true

first_progress() { # start ns, serial file, restore pid, its stderr -> ms until io-loop's first line
    local start=$1 file=$2 pid=$3 err=$4 limit=$(( $(date +%s) + 120 ))
    until grep -q "io-loop ops" "$file" 2>/dev/null; do
        # A restore that died or never reached the guest must say so, not hang the bench.
        if ! kill -0 "$pid" 2>/dev/null || [ "$(date +%s)" -ge "$limit" ]; then
            echo "restore gave no guest progress in 120 s; its stderr:" >&2
            cat "$err" >&2
            return 1
        fi
        sleep 0.01
    done
    echo $(( ($(date +%s%N) - start) / 1000000 ))
}
restore() { # label, source, extra args...
    local label=$1 src=$2; shift 2
    local serial="$WORK/r-$label.log" sock="$WORK/r-$label.sock"
    local start; start=$(date +%s%N)
    SNAPVMM_LOG=info "$SNAPVMM" restore "$src" --serial "$serial" --api-socket "$sock" "$@" \
        2>"$WORK/r-$label.err" & local pid=$!
    local ms; ms=$(first_progress "$start" "$serial" "$pid" "$WORK/r-$label.err")
    sleep 3
    "$SNAPVMM" ctl --api-socket "$sock" shutdown >/dev/null || true; wait "$pid" || true
    local started; started=$(grep -o "from s3://[^ ]* in [0-9]* ms" "$WORK/r-$label.err" | grep -o "[0-9]* ms" || echo "-")
    echo "$label: VM started after $started; first guest progress line after ${ms} ms; $(grep -o 'fetched [0-9]* chunk(s), .*' "$WORK/r-$label.err" || echo 'local files')"
}
# 2 and 3. The local peer starts s10 on an overlay of the disk image s10 froze (as clones
# do: a frozen image never opens writable).
frozen=$(jq -r '.snapshots[] | select(.name=="s10") | .disks[0].image' "$WORK/snapvmm-snapshots.json")
[[ $frozen == /* ]] || frozen="$WORK/$frozen"
"$SNAPVMM" img create -q -f qcow2 -b "$frozen" -F qcow2 "$WORK/local-top.qcow2"
restore local "$WORK/snapvmm-snapshots.checkpoints/s10" --disk-top "vda=$WORK/local-top.qcow2" \
    --snapshot-metadata "$WORK/local.json"
for store in "$STORE" "$STORE-64k"; do
    tag=${store##*/}
    restore "$tag-cold" "$store/s10" --cache "$WORK/$tag-c1" --working-set-secs 3
    restore "$tag-no-prefetch" "$store/s10" --cache "$WORK/$tag-c2" --no-prefetch
    restore "$tag-prefetch" "$store/s10" --cache "$WORK/$tag-c3"
done
