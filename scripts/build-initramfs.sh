#!/usr/bin/env bash
# Builds the Linux guest fixture's initramfs and prints its path. Nothing it downloads is
# committed: everything is cached in $SNAPVMM_GUEST_DIR, or target/guest/ in the repository.
#
#   scripts/build-initramfs.sh         # -> .../target/guest/initramfs.cpio.gz
#
# Steps: fetch Debian's cloud kernel (scripts/fetch-guest-kernel.sh), `apt-get download` the
# same kernel package again for its modules, and busybox-static for a shell; copy the virtio
# modules (and ext4's, where the kernel has them as modules; Debian's has ext4 built in) into
# a busybox initramfs whose /init loads them and runs the workload named on the kernel
# command line by `snapvmm.workload=NAME`:
#
#   read-vda            reads all of /dev/vda, prints "snapvmm: read-vda ok", powers off
#   ext4-write-verify   mounts the ext4 on /dev/vda, writes files and records their sha256
#                       until "stop" arrives on the console (or 2000 rounds), remounts,
#                       checks every checksum, prints "snapvmm: ext4-write-verify ok N files"
#                       (or "... FAILED"), unmounts, powers off
#   ext4-verify         mounts the ext4 on /dev/vda and checks the checksums a previous
#                       ext4-write-verify recorded: "snapvmm: ext4-verify ok N files"
#   dd-bench            dd on /dev/vda: 1 MiB sequential reads, 4 KiB O_DIRECT reads, 1 MiB
#                       and 4 KiB O_DIRECT writes, each on a cold cache, printing
#                       "snapvmm: dd CASE BYTES SECONDS" lines (and the device's queue
#                       limits and each case's request count, "snapvmm: dd-queue ..." and
#                       "snapvmm: dd-requests CASE READS WRITES")
#   shell               an interactive busybox shell on the console
# Whatever the workload, when the VM has a virtio-serial port named org.qemu.guest_agent.0
# (QEMU: -device virtio-serial -device virtserialport,name=org.qemu.guest_agent.0,...),
# Debian's qemu-ga (package qemu-guest-agent, with the shared libraries `ldd` names on the
# host) serves it, and says "snapvmm: guest agent on /dev/vportNpM"; its fsfreeze freezes
# the ext4 the workloads mount.
# The VM then powers off, or resets with `snapvmm.end=reboot` (for VMMs whose way out is the
# i8042 reset, with reboot=k).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${SNAPVMM_GUEST_DIR:-$repo/target/guest}
out=$dest/initramfs.cpio.gz
# Load order matters: each module after the ones it uses.
modules=(virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    virtio_blk virtio_console crc16 mbcache jbd2 crc32c_generic ext4)

if [ -s "$out" ] && [ "$out" -nt "${BASH_SOURCE[0]}" ]; then
    echo "$out"
    exit 0
fi
SNAPVMM_GUEST_DIR=$dest "$repo/scripts/fetch-guest-kernel.sh" >/dev/null
package=$(cat "$dest/kernel-package")

mkdir -p "$dest"
work=$(mktemp -d "$dest/.initramfs.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
if ! apt-cache show busybox-static qemu-guest-agent >/dev/null 2>&1; then
    echo "build-initramfs: package lists lack busybox-static or qemu-guest-agent; running apt-get update" >&2
    apt-get update -qq >&2
fi
(cd "$work" && apt-get download -qq "$package" busybox-static qemu-guest-agent >&2 2>/dev/null) ||
    (cd "$work" && apt-get download -qq "$package" busybox-static qemu-guest-agent >&2)
dpkg -x "$work/$package"_*.deb "$work/kernel"
dpkg -x "$work"/busybox-static_*.deb "$work/busybox"
dpkg -x "$work"/qemu-guest-agent_*.deb "$work/qga"
busybox=$work/busybox/bin/busybox
[ -x "$busybox" ] || { echo "build-initramfs: busybox-static holds no /bin/busybox" >&2; exit 1; }
moddir=$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
# qemu-ga and the libraries it links, at the paths the host's loader found them (the guest
# runs the same Debian userland's binaries).
qga=$work/qga/usr/sbin/qemu-ga
[ -x "$qga" ] || { echo "build-initramfs: qemu-guest-agent holds no /usr/sbin/qemu-ga" >&2; exit 1; }
cp "$qga" "$root/bin/qemu-ga"
if ldd "$qga" | grep -q 'not found'; then
    echo "build-initramfs: qemu-ga needs libraries this host lacks:" >&2
    ldd "$qga" | grep 'not found' >&2
    exit 1
fi
for lib in $(ldd "$qga" | grep -oE '/[^ ]+'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
mkdir -p "$root/var/run"
: >"$root/modules.order"
for module in "${modules[@]}"; do
    if grep -qE "/$module\.ko(\.[a-z]+)?$" "$moddir/modules.builtin" 2>/dev/null; then
        continue # built into the kernel
    fi
    file=$(find "$moddir" -name "$module.ko" -o -name "$module.ko.xz" -o -name "$module.ko.zst" \
        -o -name "$module.ko.gz" | head -n 1)
    if [ -z "$file" ]; then
        echo "build-initramfs: $module is neither built in nor a module of $package" >&2
        exit 1
    fi
    # busybox insmod loads plain ELF objects only: decompress on the host.
    case $file in
    *.xz) xz -dc "$file" >"$root/lib/modules/$module.ko" ;;
    *.zst) zstd -dcq "$file" >"$root/lib/modules/$module.ko" ;;
    *.gz) gzip -dc "$file" >"$root/lib/modules/$module.ko" ;;
    *) cp "$file" "$root/lib/modules/$module.ko" ;;
    esac
    echo "$module" >>"$root/modules.order"
done

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do
    insmod "/lib/modules/$module.ko" || echo "snapvmm: insmod $module failed"
done
workload=$(sed -n 's/.*snapvmm\.workload=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "snapvmm: init: workload ${workload:-none}"

# qemu-ga on the port named org.qemu.guest_agent.0, if the VM has one.
start_guest_agent() {
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] && [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ] || continue
        dev=/dev/${port##*/}
        for _ in $(seq 50); do
            [ -c "$dev" ] && break
            sleep 0.1
        done
        /bin/qemu-ga -m virtio-serial -p "$dev" -t /var/run -l /tmp/qemu-ga.log &
        echo "snapvmm: guest agent on $dev"
    done
}
start_guest_agent

wait_for_vda() {
    for _ in $(seq 100); do
        [ -b /dev/vda ] && return 0
        sleep 0.1
    done
    echo "snapvmm: no /dev/vda"
    return 1
}

ext4_write_verify() {
    mount -t ext4 /dev/vda /mnt || { echo "snapvmm: ext4-write-verify FAILED: mount"; return; }
    # "stop" on the console ends the write loop.
    (read -r _ </dev/console; touch /tmp/stop) &
    mkdir -p /mnt/data
    : >/mnt/sums
    round=0
    while [ ! -e /tmp/stop ] && [ $round -lt 2000 ]; do
        round=$((round + 1))
        dd if=/dev/urandom of=/mnt/data/f$round bs=4096 count=$((1 + round % 64)) 2>/dev/null
        (cd /mnt && sha256sum data/f$round >>/mnt/sums)
        # Older files are rewritten too, so later layers overwrite earlier ones.
        if [ $((round % 5)) -eq 0 ]; then
            old=$((round / 2))
            dd if=/dev/urandom of=/mnt/data/f$old bs=4096 count=3 conv=notrunc 2>/dev/null
            (cd /mnt && sed -i "/ data\/f$old\$/d" sums && sha256sum data/f$old >>sums)
        fi
        sync
        [ $((round % 20)) -eq 0 ] && echo "snapvmm: ext4-write-verify round $round"
    done
    files=$(wc -l </mnt/sums)
    # Remount so every check reads through the disk, not the page cache.
    umount /mnt && echo 3 >/proc/sys/vm/drop_caches && mount -t ext4 /dev/vda /mnt || {
        echo "snapvmm: ext4-write-verify FAILED: remount"
        return
    }
    if (cd /mnt && sha256sum -c -s sums); then
        echo "snapvmm: ext4-write-verify ok $files files"
    else
        echo "snapvmm: ext4-write-verify FAILED"
    fi
    umount /mnt
    sync
}

ext4_verify() {
    mount -t ext4 /dev/vda /mnt || { echo "snapvmm: ext4-verify FAILED: mount"; return; }
    files=$(wc -l </mnt/sums)
    if [ "$files" -gt 0 ] && (cd /mnt && sha256sum -c -s sums); then
        echo "snapvmm: ext4-verify ok $files files"
    else
        echo "snapvmm: ext4-verify FAILED"
    fi
    umount /mnt
}

# requests_done: reads and writes /dev/vda completed so far ("READS WRITES", from its stat).
requests_done() {
    awk '{ print $1, $5 }' /sys/block/vda/stat
}

# clock: seconds since the epoch with microseconds, from adjtimex(2). /proc/uptime ticks
# every 10 ms, 3 % of a 1 MiB write case's 0.3 s, which made two backends' figures differ by
# whole ticks; busybox's date has no %N.
clock() {
    adjtimex | awk '/time.tv_sec/ { s = $2 } /time.tv_usec/ { u = $2 } END { printf "%d.%06d\n", s, u }'
}

# timed_dd CASE BYTES DD-ARGS...: runs dd on a cold page cache and prints
# "snapvmm: dd CASE BYTES SECONDS", then "snapvmm: dd-requests CASE READS WRITES": the
# requests the driver sent the device meanwhile, which shows how it split the I/O
# (busybox's dd prints no timing of its own).
timed_dd() {
    name=$1 bytes=$2
    shift 2
    sync
    echo 3 >/proc/sys/vm/drop_caches
    before=$(requests_done)
    start=$(clock)
    if dd "$@" 2>/dev/null; then
        end=$(clock)
        echo "snapvmm: dd $name $bytes $(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
        echo "snapvmm: dd-requests $name $(echo "$before $(requests_done)" |
            awk '{ print $3 - $1, $4 - $2 }')"
    else
        echo "snapvmm: dd $name FAILED"
    fi
}

dd_bench() {
    # The limits the driver derived from the device's config space: they decide how a
    # 1 MiB request is split.
    q=/sys/block/vda/queue
    echo "snapvmm: dd-queue max_segments=$(cat $q/max_segments)" \
        "max_segment_size=$(cat $q/max_segment_size) max_sectors_kb=$(cat $q/max_sectors_kb)" \
        "max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) nr_requests=$(cat $q/nr_requests)"
    timed_dd read-1M-seq 268435456 if=/dev/vda of=/dev/null bs=1M count=256
    timed_dd read-4k-direct 67108864 if=/dev/vda of=/dev/null bs=4k count=16384 iflag=direct
    timed_dd write-1M-direct 268435456 if=/dev/zero of=/dev/vda bs=1M count=256 oflag=direct
    timed_dd write-4k-direct 67108864 if=/dev/zero of=/dev/vda bs=4k count=16384 oflag=direct
}

case $workload in
read-vda)
    wait_for_vda && dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null && echo "snapvmm: read-vda ok"
    ;;
ext4-write-verify)
    wait_for_vda && ext4_write_verify
    ;;
ext4-verify)
    wait_for_vda && ext4_verify
    ;;
dd-bench)
    wait_for_vda && dd_bench
    ;;
shell)
    setsid cttyhack sh
    ;;
*)
    echo "snapvmm: unknown workload ${workload:-none}"
    ;;
esac
echo "snapvmm: init: done"
sync
if grep -q 'snapvmm\.end=reboot' /proc/cmdline; then
    reboot -f
fi
poweroff -f
INIT
chmod 755 "$root/init"

(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "$out"
