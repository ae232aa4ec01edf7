#!/usr/bin/env bash
# Internal snapshot create / apply / delete as whole processes: `snapvmm img snapshot` beside
# `qemu-img snapshot`, on copies of one 10 GiB fully mapped qcow2 image (64 KiB clusters),
# alternating tools round by round. Prints median seconds and qemu/snapvmm ratios (>= 1.0
# means snapvmm is at least as fast).
#
# Env: ROUNDS (default 7), SIZE (default 10G), DIR (default a temp dir under /var/tmp, on
# disk so fsync costs what it costs).
set -euo pipefail
ROUNDS=${ROUNDS:-7}
SIZE=${SIZE:-10G}
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$here/Cargo.toml" --bin snapvmm
snapvmm="$here/target/release/snapvmm"
work=$(mktemp -d "${DIR:-/var/tmp}/snapvmm-snapbench.XXXXXX")
trap 'rm -rf "$work"' EXIT

qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$work/base.qcow2" "$SIZE"
cp --sparse=always "$work/base.qcow2" "$work/ours.qcow2"
cp --sparse=always "$work/base.qcow2" "$work/qemu.qcow2"

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.6f", a - b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A times
for op in create apply delete; do times[ours-$op]=""; times[qemu-$op]=""; done
for round in $(seq 1 "$ROUNDS"); do
    for tool in ours qemu; do
        img="$work/$tool.qcow2"
        if [ "$tool" = ours ]; then cmd=("$snapvmm" img snapshot); else cmd=(qemu-img snapshot); fi
        t=$(now); "${cmd[@]}" -c "s$round" "$img"; times[$tool-create]+="$(elapsed "$t") "
        t=$(now); "${cmd[@]}" -a "s$round" "$img"; times[$tool-apply]+="$(elapsed "$t") "
        t=$(now); "${cmd[@]}" -d "s$round" "$img"; times[$tool-delete]+="$(elapsed "$t") "
    done
done
qemu-img check -q "$work/ours.qcow2" && qemu-img check -q "$work/qemu.qcow2"
printf '%-8s %12s %12s %8s\n' op snapvmm_s qemu-img_s ratio
for op in create apply delete; do
    ours=$(printf '%s\n' ${times[ours-$op]} | median)
    qemu=$(printf '%s\n' ${times[qemu-$op]} | median)
    printf '%-8s %12.4f %12.4f %8.2f\n' "$op" "$ours" "$qemu" "$(awk -v q="$qemu" -v o="$ours" 'BEGIN { print q / o }')"
done
