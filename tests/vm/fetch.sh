#!/usr/bin/env bash
# Fetches what the vsock guest needs into a cache folder, with apt's download
# and unpack only (nothing is installed system-wide):
#   $WORK/root     QEMU (Debian's qemu-system-x86), its libraries, static busybox
#   $WORK/kernel-$NAME/{vmlinux,modules/}   a Debian kernel and the vsock modules:
#       the core and both guest transports (vsock_loopback for one guest,
#       vmw_vsock_virtio_transport for tests/vm/two-vms.sh) and the host
#       side, vhost_vsock (with vhost, vhost_iotlb), for a parent VM that is
#       also a vsock host
#   and, only when named after WORK, kernels the CI does not boot:
#   6.18 (trixie-backports' newest 6.18, for the speed comparisons)
# Usage: fetch.sh WORK [KERNEL...]   (prints each step; a second run uses the cache)
set -euo pipefail
mkdir -p "$1"
WORK=$(cd "$1" && pwd)

say() { printf '[vm] %s\n' "$*" >&2; }

# mirror, private_apt, download_unpack (apt download and unpack, no install).
# shellcheck source=tests/apt.sh
source "$(dirname "$0")/../apt.sh"

# QEMU and busybox from bookworm (the host's release: QEMU 7.2).
if [ ! -x "$WORK/root/usr/bin/qemu-system-x86_64" ] || [ ! -x "$WORK/root/bin/busybox" ]; then
    say "fetching QEMU and busybox packages"
    pkgs=$(private_apt bookworm install -s --no-install-recommends qemu-system-x86 busybox-static 2>/dev/null \
        | awk '/^Inst /{print $2}')
    download_unpack bookworm "$WORK/root" $pkgs
fi
qemu_libs=$(find "$WORK/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
say "$(LD_LIBRARY_PATH=$qemu_libs "$WORK/root/usr/bin/qemu-system-x86_64" --version | head -1)"

# QEMU for the aarch64 guest (Debian's qemu-system-arm has qemu-system-aarch64,
# run on this machine) and a static busybox for arm64.
if [ ! -x "$WORK/root/usr/bin/qemu-system-aarch64" ]; then
    say "fetching QEMU for aarch64 guests"
    pkgs=$(private_apt bookworm install -s --no-install-recommends qemu-system-arm 2>/dev/null \
        | awk '/^Inst /{print $2}')
    download_unpack bookworm "$WORK/root" $pkgs
fi
if [ ! -x "$WORK/root-arm64/bin/busybox" ]; then
    say "fetching busybox for arm64"
    ARCH=arm64 download_unpack bookworm "$WORK/root-arm64" busybox-static
fi
say "$(LD_LIBRARY_PATH=$qemu_libs "$WORK/root/usr/bin/qemu-system-aarch64" --version | head -1)"

MODULES="vsock vmw_vsock_virtio_transport_common vsock_loopback vmw_vsock_virtio_transport vhost_iotlb vhost vhost_vsock"
all_modules_in() { # DIR
    local m
    for m in $MODULES; do [ -f "$1/$m.ko" ] || return 1; done
}

# fetch_kernel NAME SUITE PATTERN [ARCH [FLAVOUR]]: newest
# linux-image-PATTERN-ARCH-unsigned (ARCH: amd64, the default, or arm64),
# or with FLAVOUR "signed" the signed image (backports ship only that: the
# same kernel, its modules signed; QEMU boots it alike).
fetch_kernel() {
    local name=$1 suite=$2 pattern=$3 arch=${4:-amd64} suffix=-unsigned
    [ "${5:-}" = signed ] && suffix=""
    local out="$WORK/kernel-$name"
    if [ -f "$out/vmlinux" ] && all_modules_in "$out/modules"; then
        say "kernel $name: cached ($(cat "$out/version"))"
        return
    fi
    # The machine's own architecture shares the lists the QEMU fetch made.
    local pkg apt_arch=${arch#amd64}
    pkg=$(ARCH=$apt_arch TOOL=apt-cache private_apt "$suite" search --names-only "^linux-image-${pattern}-${arch}${suffix}\$" \
        | awk '{print $1}' | sort -V | tail -1)
    [ -n "$pkg" ] || { say "no kernel package matching $pattern in $suite"; exit 1; }
    say "kernel $name: $pkg from $suite"
    rm -rf "$out" && mkdir -p "$out"
    ARCH=$apt_arch download_unpack "$suite" "$out/pkg" "$pkg"
    local vmlinuz version
    vmlinuz=$(ls "$out"/pkg/boot/vmlinuz-* | head -1)
    version=${vmlinuz##*/vmlinuz-}
    echo "$version" > "$out/version"
    # x86: boot the uncompressed ELF (PVH entry), seconds faster than the
    # bzImage. arm64: QEMU boots Debian's compressed Image as it is.
    if [ "$arch" = arm64 ]; then
        cp "$vmlinuz" "$out/vmlinux"
    elif ! "$(dirname "$0")/extract-vmlinux.sh" "$vmlinuz" > "$out/vmlinux" 2>/dev/null; then
        say "no ELF inside $vmlinuz; booting the bzImage"
        cp "$vmlinuz" "$out/vmlinux"
    fi
    mkdir -p "$out/modules"
    for m in $MODULES; do
        local ko
        ko=$(find "$out/pkg" -name "$m.ko*" -path "*/modules/*" | head -1)
        [ -n "$ko" ] || { say "module $m not found in $pkg"; exit 1; }
        case "$ko" in
            *.xz) xz -dc "$ko" > "$out/modules/$m.ko" ;;
            *.zst) zstd -qdc "$ko" > "$out/modules/$m.ko" ;;
            *) cp "$ko" "$out/modules/$m.ko" ;;
        esac
    done
    rm -rf "$out/pkg"
}

fetch_kernel 5.10 bullseye '5\.10\.0-[0-9]+'
fetch_kernel 6.1 bookworm '6\.1\.0-[0-9]+'
fetch_kernel arm64-6.1 bookworm '6\.1\.0-[0-9]+' arm64
fetch_kernel 6.12 trixie '6\.12\.[0-9.+~a-z]*-?[0-9]*'
for extra in "${@:2}"; do
    case "$extra" in
        5.10 | 6.1 | 6.12 | arm64-6.1) ;;
        6.18) fetch_kernel 6.18 trixie-backports '6\.18\.[0-9]+\+deb13' amd64 signed ;;
        *) say "unknown kernel $extra (known: 5.10 6.1 6.12 arm64-6.1 6.18)"; exit 1 ;;
    esac
done
