#!/usr/bin/env bash
# Builds the seed corpus for the open_image fuzz target from small images made by qemu-img.
# Nothing here is committed: run it before fuzzing.
#   fuzz/seed.sh [DIR]   (default: fuzz/corpus/open_image)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus/open_image}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

img() { qemu-img "$@" >/dev/null; }
io() { local f="$1"; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null; }
keep() { cp "$1" "$out/$2"; }

# Empty images, both versions, tiny clusters (small seeds fuzz fastest).
img create -f qcow2 -o cluster_size=512,compat=1.1 v3-empty.qcow2 64K
keep v3-empty.qcow2 v3-empty-512
img create -f qcow2 -o cluster_size=512,compat=0.10 v2-empty.qcow2 64K
keep v2-empty.qcow2 v2-empty-512

# Data, zeroes and discards.
img create -f qcow2 -o cluster_size=512 v3-data.qcow2 128K
io v3-data.qcow2 'write -P 0x11 0 1536' 'write -z 4096 1024' 'write -P 0x22 65024 1024' 'discard 512 512'
keep v3-data.qcow2 v3-data-512
img create -f qcow2 -o cluster_size=512,compat=0.10 v2-data.qcow2 128K
io v2-data.qcow2 'write -P 0x33 1024 2048' 'write -z 8192 512'
keep v2-data.qcow2 v2-data-512

# Narrow and wide refcounts.
for bits in 1 8 64; do
  img create -f qcow2 -o cluster_size=512,refcount_bits=$bits rc$bits.qcow2 64K
  io rc$bits.qcow2 'write -P 0x44 0 1024'
  keep rc$bits.qcow2 refcount-$bits
done

# A 4 KiB-cluster image with an L2 table and data.
img create -f qcow2 -o cluster_size=4096 c4k.qcow2 1M
io c4k.qcow2 'write -P 0x55 0 6144' 'write -z 65536 4096'
keep c4k.qcow2 cluster-4k

# Backing file name and format extension.
img create -f raw base.raw 64K
img create -f qcow2 -o cluster_size=512 -b base.raw -F raw overlay.qcow2
io overlay.qcow2 'write -P 0x66 512 512' 'write -z 1024 512'
keep overlay.qcow2 overlay-raw-backing

# Compressed clusters, zlib and zstd.
qemu-io -f raw -c 'write -P 0x77 0 2048' -c 'write -P 0x78 4096 512' base.raw >/dev/null
img convert -c -f raw -O qcow2 -o cluster_size=512 base.raw zlib.qcow2
keep zlib.qcow2 compressed-zlib
img convert -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd base.raw zstd.qcow2
keep zstd.qcow2 compressed-zstd

# An internal snapshot.
img create -f qcow2 -o cluster_size=512 snap.qcow2 64K
io snap.qcow2 'write -P 0x88 0 1024'
img snapshot -c first snap.qcow2
io snap.qcow2 'write -P 0x99 512 512'
keep snap.qcow2 internal-snapshot

# Lazy refcounts left dirty is hard to make with qemu-img alone; a clean lazy image will do.
img create -f qcow2 -o cluster_size=512,lazy_refcounts=on lazy.qcow2 64K
io lazy.qcow2 'write -P 0xaa 0 512'
keep lazy.qcow2 lazy-refcounts

echo "seeded $(ls "$out" | wc -l) images into $out"
