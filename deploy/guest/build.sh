#!/usr/bin/env bash
# Builds the compute-agent test guest from Debian packages into OUTDIR (the libvirt service's
# state dir); never touches /boot or the host's module tree.
#
#   deploy/guest/build.sh OUTDIR               build what is missing or stale, print what it did
#   deploy/guest/build.sh --keep-base OUTDIR   the same, but never replace an existing base.qcow2:
#                                              exit 3 if it is stale (guests run on overlays of
#                                              it; kernel, initramfs and writer are read at boot
#                                              only, so they may change under running guests)
#   deploy/guest/build.sh --check OUTDIR       exit 0 if everything is built and current, else 1
#
# Outputs:
#   OUTDIR/vmlinuz          Debian's kernel (linux-image-<ver>-amd64, fetched with apt-get
#                           download into OUTDIR/dl, unpacked with dpkg-deb -x, not installed)
#   OUTDIR/vmlinux          the same kernel unpacked to ELF, booted through QEMU's PVH entry
#                           (no in-guest decompression: ~4.5 s less per boot under TCG)
#   OUTDIR/initramfs.img    busybox-static + /init + ca-writer + qemu-ga and the libraries ldd
#                           lists + the virtio/loop/ext4 modules (cpio newc, uncompressed)
#   OUTDIR/base.qcow2       the disk's base image: layout.h's pattern in the base region and a
#                           32 MiB ext2 in the fs region; virtual size CA_GUEST_DISK_MB (256)
#   OUTDIR/ca-writer        the writer, static (also the host-side base-region formatter)
#   OUTDIR/build.env        facts: kernel version, sizes, layout constants (KEY=VALUE)
# Each part is rebuilt only when its inputs change (OUTDIR/*.stamp hold input hashes).
#
# Environment: CA_GUEST_DISK_MB (virtual disk size, >= 96), CA_GUEST_KERNEL_PKG (default: what
# linux-image-amd64 depends on; the first download is kept, delete OUTDIR/dl to move on).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
check_only=0
keep_base=0
case "${1:-}" in
    --check) check_only=1; shift ;;
    --keep-base) keep_base=1; shift ;;
esac
[ $# -eq 1 ] || { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out=$1
disk_mb=${CA_GUEST_DISK_MB:-256}
# Bump when the way the base image is made changes (the hash below covers layout.h).
BASE_FORMAT=1
MODULES=(virtio_pci virtio_blk virtio_console loop ext4 crc32c_generic)

say() { printf '%s guest-build: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[[ "$disk_mb" =~ ^[0-9]+$ ]] && [ "$disk_mb" -ge 96 ] || die "CA_GUEST_DISK_MB must be >= 96"
mkdir -p "$out"
out=$(cd "$out" && pwd)

hash_of() { cat "$@" | sha256sum | cut -c1-32; }
pkg_ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

# Inputs of each part. The kernel is pinned by the .deb already downloaded, if any.
kdeb=$(ls "$out"/dl/linux-image-*.deb 2>/dev/null | head -1 || true)
writer_hash=$(hash_of "$here/writer.c" "$here/layout.h")
initrd_inputs() {
    echo "$writer_hash $(basename "${kdeb:-none}") ${MODULES[*]}"
    pkg_ver busybox-static; pkg_ver qemu-guest-agent; pkg_ver libc6; pkg_ver libglib2.0-0
    cat "$here/init" "${BASH_SOURCE[0]}"
}
initrd_hash=$(initrd_inputs | sha256sum | cut -c1-32)
base_hash=$( { echo "$BASE_FORMAT $disk_mb"; cat "$here/layout.h"; } | sha256sum | cut -c1-32)

# Bump KERNEL_STEP when the kernel step's outputs change.
kernel_inputs() { echo "KERNEL_STEP=3 $(basename "${kdeb:-none}") ${MODULES[*]}"; }
current() { [ -f "$out/$1" ] && [ -f "$out/$1.stamp" ] && [ "$(cat "$out/$1.stamp")" = "$2" ]; }

if [ "$check_only" = 1 ]; then
    [ -n "$kdeb" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/build.env" ] &&
        [ "$(cat "$out/modules/stamp" 2>/dev/null)" = "$(kernel_inputs)" ] &&
        current ca-writer "$writer_hash" &&
        current initramfs.img "$initrd_hash" &&
        current base.qcow2 "$base_hash"
    exit
fi

# One build at a time per OUTDIR: libvirt.sh and rbd-guest.sh may both bring it up to date, and
# every step writes fixed *.tmp names. The lock fd is not passed to anything long-lived.
exec 8> "$out/.build.lock"
flock -w 600 8 || die "could not lock $out/.build.lock within 600 s"
if [ "$keep_base" = 1 ] && [ -f "$out/base.qcow2" ] && ! current base.qcow2 "$base_hash"; then
    say "base.qcow2 is stale (layout.h, BASE_FORMAT or CA_GUEST_DISK_MB changed) and guests may"
    say "run on it: not rebuilding anything; stop the guests and build without --keep-base"
    exit 3
fi

# --- kernel: download once, unpack, depmod inside the unpacked tree ------------------------
if [ -z "$kdeb" ]; then
    pkg=${CA_GUEST_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
              awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || die "cannot resolve the kernel package (apt-get update?)"
    say "downloading $pkg"
    mkdir -p "$out/dl"
    # Download as root into our own dir; the _apt sandbox user cannot write there.
    (cd "$out/dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg") >&2 ||
        die "apt-get download $pkg failed"
    kdeb=$(ls "$out"/dl/linux-image-*.deb | head -1)
    initrd_hash=$(initrd_inputs | sha256sum | cut -c1-32)
fi
# Unpack into a scratch tree, keep vmlinuz and the modules the guest loads (in load order, from
# modprobe --show-depends), then drop the tree: unpacked, the package is ~400 MB.
kmods_want=$(kernel_inputs)
if [ ! -f "$out/modules/order" ] || [ ! -f "$out/vmlinuz" ] ||
   [ "$(cat "$out/modules/stamp" 2>/dev/null)" != "$kmods_want" ]; then
    say "unpacking $(basename "$kdeb")"
    kroot=$(mktemp -d "$out/kernel.XXXXXX")
    trap 'rm -rf "$kroot"' EXIT
    dpkg-deb -x "$kdeb" "$kroot"
    kver=$(ls "$kroot/lib/modules" | head -1)
    [ -f "$kroot/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $kdeb"
    # The package ships no modules.dep (its postinst runs depmod); make one for modprobe -d.
    depmod -b "$kroot" "$kver"
    rm -rf "$out/modules"
    mkdir -p "$out/modules"
    for m in "${MODULES[@]}"; do
        modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$out/modules/"
        basename "$ko" >> "$out/modules/order"
    done
    echo "$kver" > "$out/modules/kver"
    cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    # Under TCG the bzImage's own xz decompression costs ~4.5 s of every boot. Unpacked once
    # here, the ELF vmlinux boots through QEMU's PVH entry (Debian builds CONFIG_PVH=y) with
    # no decompression at all. If that fails, the guest boots the bzImage.
    rm -f "$out/vmlinux"
    xzoff=$(grep -abo -m1 $'\xfd7zXZ\x00' "$out/vmlinuz" | head -1 | cut -d: -f1 || true)
    if [ -n "$xzoff" ] &&
       tail -c +$((xzoff + 1)) "$out/vmlinuz" > "$out/vmlinux.xz" &&
       xz -dc --single-stream "$out/vmlinux.xz" > "$out/vmlinux.tmp" 2> /dev/null &&
       [ "$(head -c 4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
        mv "$out/vmlinux.tmp" "$out/vmlinux"
        rm -f "$out/vmlinux.xz"
    else
        rm -f "$out/vmlinux.xz"
        rm -f "$out/vmlinux.tmp"
        say "could not unpack vmlinux from the bzImage: booting the bzImage (slower)"
    fi
    echo "$kmods_want" > "$out/modules/stamp"
    rm -rf "$kroot"
    trap - EXIT
fi
kver=$(cat "$out/modules/kver")

# --- writer -----------------------------------------------------------------------------------
if ! current ca-writer "$writer_hash"; then
    say "compiling ca-writer"
    gcc -std=gnu11 -static -O2 -Wall -Wextra -o "$out/ca-writer.tmp" "$here/writer.c"
    mv "$out/ca-writer.tmp" "$out/ca-writer"
    echo "$writer_hash" > "$out/ca-writer.stamp"
fi
eval "$("$out/ca-writer" --print-layout)"

# --- initramfs --------------------------------------------------------------------------------
if ! current initramfs.img "$initrd_hash"; then
    say "building initramfs (kernel $kver)"
    root=$(mktemp -d "$out/initramfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,mnt/data,etc,lib/modules}
    mkdir -p "$root/var"
    ln -s ../run "$root/var/run"
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3

    cp /usr/bin/busybox "$root/bin/busybox"
    for applet in $(/usr/bin/busybox --list-full); do
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    install -m 0755 "$here/init" "$root/init"
    install -m 0755 "$out/ca-writer" "$root/bin/ca-writer"

    qga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
    [ -x "$qga" ] || die "qemu-ga not installed (qemu-guest-agent)"
    install -m 0755 "$qga" "$root/usr/sbin/qemu-ga"
    # Every absolute path ldd prints (libraries and the loader), dereferenced, at that path.
    for lib in $(ldd "$qga" | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done

    cp "$out"/modules/*.ko "$root/lib/modules/"
    cp "$out/modules/order" "$root/etc/modules.list"
    echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
    echo "root:x:0:" > "$root/etc/group"

    # Uncompressed: under TCG gunzip of the ~5 MB archive costs ~0.6 s per boot, the extra
    # 8 MB cost nothing to load.
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        > "$out/initramfs.img.tmp"
    mv "$out/initramfs.img.tmp" "$out/initramfs.img"
    echo "$initrd_hash" > "$out/initramfs.img.stamp"
    rm -rf "$root"
    trap - EXIT
fi

# --- base image -------------------------------------------------------------------------------
if ! current base.qcow2 "$base_hash"; then
    say "building base image (${disk_mb} MiB virtual)"
    raw=$(mktemp "$out/base.raw.XXXXXX")
    fs=$(mktemp "$out/datafs.XXXXXX")
    trap 'rm -f "$raw" "$fs"' EXIT
    truncate -s "${disk_mb}M" "$raw"
    "$out/ca-writer" --format-base "$raw"
    truncate -s "$LAYOUT_FS_LEN" "$fs"
    mke2fs -q -F -t ext2 -L cadata -m 0 "$fs"
    dd if="$fs" of="$raw" bs=1M seek=$((LAYOUT_FS_OFFSET / 1048576)) conv=notrunc,sparse \
        status=none
    qemu-img convert -q -f raw -O qcow2 "$raw" "$out/base.qcow2.tmp"
    mv "$out/base.qcow2.tmp" "$out/base.qcow2"
    echo "$base_hash" > "$out/base.qcow2.stamp"
    rm -f "$raw" "$fs"
    trap - EXIT
fi

kernel=$out/vmlinux
[ -f "$kernel" ] || kernel=$out/vmlinuz
{
    echo "GUEST_KERNEL=$kernel"
    echo "GUEST_INITRD=$out/initramfs.img"
    echo "GUEST_KERNEL_VERSION=$kver"
    echo "GUEST_KERNEL_DEB=$(basename "$kdeb")"
    echo "GUEST_DISK_MB=$disk_mb"
    "$out/ca-writer" --print-layout
} > "$out/build.env.tmp"
mv "$out/build.env.tmp" "$out/build.env"
say "guest ready in $out (kernel $kver, initramfs $(du -k "$out/initramfs.img" | cut -f1) KiB)"
