#!/usr/bin/env bash
# Fetches Debian's stock cloud kernel (linux-image-cloud-amd64) for the Linux boot tests and
# prints the path of its bzImage. Nothing it downloads is committed: the files are cached in
# $SNAPVMM_GUEST_DIR, or target/guest/ in the repository, and reused on the next run.
# Beside the bzImage (vmlinuz) it leaves the uncompressed ELF kernel (vmlinux), decompressed
# on the host with lz4/xz/zstd/gzip/lzma as the payload needs: booting it skips the kernel's
# own decompressor, which takes minutes on a software-only KVM.
#
#   scripts/fetch-guest-kernel.sh            # -> .../target/guest/vmlinuz
#   SNAPVMM_GUEST_DIR=/cache scripts/fetch-guest-kernel.sh
#
# Uses `apt-get download` (no root needed) and `dpkg -x`; runs `apt-get update` first only
# when the package lists do not know the package yet (that step needs root).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${SNAPVMM_GUEST_DIR:-$repo/target/guest}
meta=linux-image-cloud-amd64

# extract_vmlinux BZIMAGE OUT: writes the bzImage's payload, decompressed, to OUT.
extract_vmlinux() {
    local image=$1 out=$2 setup_sects payload_offset payload_length start magic
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$image" | tr -d ' ')
    [ "$setup_sects" -eq 0 ] && setup_sects=4
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$image" | tr -d ' ')
    payload_length=$(od -An -tu4 -j $((0x24c)) -N4 "$image" | tr -d ' ')
    start=$(((setup_sects + 1) * 512 + payload_offset))
    magic=$(od -An -tx1 -j "$start" -N6 "$image" | tr -d ' ')
    local decompress
    case $magic in
    02214c18*) decompress="lz4 -dc" ;;
    fd377a585a00) decompress="xz -dc" ;;
    28b52ffd*) decompress="zstd -dcq" ;;
    1f8b*) decompress="gzip -dc" ;;
    5d0000*) decompress="xz -dc --format=lzma" ;;
    *)
        echo "fetch-guest-kernel: unknown payload compression (magic $magic)" >&2
        return 1
        ;;
    esac
    command -v "${decompress%% *}" >/dev/null || {
        echo "fetch-guest-kernel: ${decompress%% *} not found: cannot extract vmlinux" >&2
        return 1
    }
    # lz4's legacy frames make it report trailing garbage; the ELF check below is the judge.
    tail -c +$((start + 1)) "$image" | head -c "$payload_length" | $decompress >"$out.tmp.$$" 2>/dev/null || true
    if [ "$(head -c 4 "$out.tmp.$$" | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
        echo "fetch-guest-kernel: decompressing the payload gave no ELF file" >&2
        rm -f "$out.tmp.$$"
        return 1
    fi
    mv "$out.tmp.$$" "$out"
}

if [ -s "$dest/vmlinuz" ]; then
    [ -s "$dest/vmlinux" ] || extract_vmlinux "$dest/vmlinuz" "$dest/vmlinux" || true
    echo "$dest/vmlinuz"
    exit 0
fi
for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || { echo "fetch-guest-kernel: $tool not found (Debian tools needed)" >&2; exit 1; }
done

if ! apt-cache show "$meta" >/dev/null 2>&1; then
    echo "fetch-guest-kernel: package lists lack $meta; running apt-get update" >&2
    apt-get update -qq >&2
fi
# The metapackage only depends on the versioned image package that holds the kernel.
package=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$package" ]; then
    echo "fetch-guest-kernel: cannot resolve the kernel package behind $meta" >&2
    exit 1
fi

mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch.XXXXXX")
# apt-get download drops root to _apt when it can write there.
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$package" >&2)
dpkg -x "$work"/*.deb "$work/root"
kernel=$(find "$work/root/boot" -name 'vmlinuz-*' | head -n 1)
if [ -z "$kernel" ]; then
    echo "fetch-guest-kernel: $package holds no /boot/vmlinuz-*" >&2
    exit 1
fi
cp "$kernel" "$dest/vmlinuz.tmp.$$"
echo "$package" >"$dest/kernel-package"
# Renamed last, so an interrupted run never leaves a truncated kernel behind.
mv "$dest/vmlinuz.tmp.$$" "$dest/vmlinuz"
extract_vmlinux "$dest/vmlinuz" "$dest/vmlinux" || true
echo "$dest/vmlinuz"
