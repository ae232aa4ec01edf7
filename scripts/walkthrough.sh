#!/usr/bin/env bash
# A tour of `snapvmm img` on a two-layer qcow2 chain: create, write, overlay, verify, map,
# check, flatten, benchmark; then, where /dev/kvm is usable, `snapvmm demo` (a guest's disk
# snapshotted, streamed and committed live). Builds the release binary first and works in a
# temporary directory it removes afterwards. When qemu-img is installed, it cross-checks the
# results.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --bin snapvmm
bin="$repo/target/release/snapvmm"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

snapvmm() { "$bin" "$@"; }
step() {
    printf '\n$'
    for arg in "$@"; do
        case "$arg" in
        *' '*) printf " '%s'" "$arg" ;;
        *) printf ' %s' "$arg" ;;
        esac
    done
    printf '\n'
    "$@"
}

step snapvmm img create -f qcow2 base.qcow2 1G
step snapvmm img io -c 'write -P 0xaa 0 1M' -c 'write -z 1M 1M' base.qcow2
step snapvmm img create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
step snapvmm img io -c 'write -P 0xbb 512k 64k' overlay.qcow2
# Reads fall through the overlay to the base where the overlay holds nothing.
step snapvmm img io -c 'read -P 0xaa 0 512k' -c 'read -P 0xbb 512k 64k' -c 'read -P 0 1M 1M' overlay.qcow2
step snapvmm img info --backing-chain overlay.qcow2
step snapvmm img map overlay.qcow2
step snapvmm img map --output json --max-length 4M overlay.qcow2
step snapvmm img check overlay.qcow2
step snapvmm img convert -O qcow2 overlay.qcow2 flat.qcow2
step snapvmm img info flat.qcow2
step snapvmm img io -c 'read -P 0xaa 0 512k' -c 'read -P 0xbb 512k 64k' flat.qcow2
step snapvmm img check flat.qcow2
step snapvmm img create -f qcow2 bench.qcow2 64M
step snapvmm img bench -w -c 20000 -t none bench.qcow2
step snapvmm img bench -c 20000 bench.qcow2

if command -v qemu-img >/dev/null; then
    printf '\nqemu-img found: cross-checking\n'
    step qemu-img check overlay.qcow2
    step qemu-img compare overlay.qcow2 flat.qcow2
    diff <(qemu-img map --output json overlay.qcow2) <(snapvmm img map --output json overlay.qcow2)
    printf 'qemu-img map and snapvmm img map agree\n'
fi

if [[ -r /dev/kvm && -w /dev/kvm ]]; then
    printf '\n/dev/kvm usable: the live demo\n'
    step snapvmm demo --dir "$work/demo"
else
    printf '\n/dev/kvm not usable here: skipping snapvmm demo\n'
fi
printf '\nwalkthrough complete\n'
