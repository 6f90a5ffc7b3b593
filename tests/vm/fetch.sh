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
#   and, named as transparent:KERNEL (tests/vm/two-vms.sh transparent):
#   $WORK/transparent   Debian's Python 3.11 (python3.11-minimal and the
#       standard library: what the workshop's server.py and client.py use,
#       urllib, ssl, json, argparse, AF_VSOCK) and legacy iptables
#       (xtables-legacy-multi; the nft variant removed), with their C
#       libraries, from bookworm, amd64
#   $WORK/kernel-KERNEL/netfilter/   that kernel's modules for legacy NAT
#       and REDIRECT (ip_tables, iptable_nat, xt_REDIRECT and what they
#       depend on) and `order`, the order to insmod them in; taken from the
#       cached kernel's own package (the same version as its vmlinux)
# Usage: fetch.sh WORK [KERNEL...] [transparent:KERNEL]
#   (prints each step; a second run uses the cache)
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
# kernel_suite NAME: the suite fetch_kernel takes kernel NAME from.
kernel_suite() {
    case "$1" in
        5.10) echo bullseye ;;
        6.1) echo bookworm ;;
        6.12) echo trixie ;;
        6.18) echo trixie-backports ;;
        *) say "no netfilter modules for kernel $1 (amd64 kernels only: 5.10 6.1 6.12 6.18)"; exit 1 ;;
    esac
}

# The legacy-iptables NAT of the transparent egress: the rule's table and
# target; their dependencies come from each module's own `depends=`.
NETFILTER_MODULES="ip_tables iptable_nat xt_REDIRECT"
# Loaded first where the kernel has it as a module: libcrc32c (nf_conntrack
# and nf_nat depend on it, up to 6.13) asks the crypto API for "crc32c" when
# it loads and fails without it (its `softdep=pre: crc32c`, which modprobe
# would resolve by alias; the guests have no modprobe).
NETFILTER_SOFTDEPS="crc32c_generic"

# fetch_netfilter NAME: $WORK/kernel-NAME/netfilter/*.ko and `order` (each
# module after the ones it depends on), from the package of the cached
# kernel's version (apt reuses a package already downloaded).
fetch_netfilter() {
    local name=$1 out="$WORK/kernel-$1"
    if [ -f "$out/netfilter/order" ]; then
        say "kernel $name: netfilter modules cached ($(tr '\n' ' ' < "$out/netfilter/order"))"
        return
    fi
    local suite version pkg
    suite=$(kernel_suite "$name")
    version=$(cat "$out/version")
    pkg=linux-image-$version-unsigned
    [ "$name" = 6.18 ] && pkg=linux-image-$version
    say "kernel $name: netfilter modules from $pkg ($suite)"
    local debs="$WORK/debs-$suite"
    mkdir -p "$debs"
    if ! (cd "$debs" && private_apt "$suite" -o APT::Sandbox::User=root download -qq "$pkg" >&2); then
        say "$pkg is no longer on the mirror: remove $out to fetch the newest kernel with its modules"
        exit 1
    fi
    local tree="$out/netfilter-pkg"
    rm -rf "$tree" "$out/netfilter" && mkdir -p "$tree" "$out/netfilter"
    dpkg-deb --fsys-tarfile "$debs/${pkg}"_*.deb | tar -x -C "$tree" --wildcards '*/kernel/net/*' '*/kernel/lib/*' '*/kernel/crypto/*'
    local order=""
    # add MODULE: its dependencies first, then itself, each once.
    add() {
        case " $order " in *" $1 "*) return ;; esac
        local ko dep
        ko=$(find "$tree" -name "$1.ko*" | head -1)
        [ -n "$ko" ] || { say "module $1 not found in $pkg"; exit 1; }
        case "$ko" in
            *.xz) xz -dc "$ko" > "$out/netfilter/$1.ko" ;;
            *.zst) zstd -qdc "$ko" > "$out/netfilter/$1.ko" ;;
            *) cp "$ko" "$out/netfilter/$1.ko" ;;
        esac
        for dep in $(tr '\0' '\n' < "$out/netfilter/$1.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            add "$dep"
        done
        order="$order $1"
    }
    local m
    for m in $NETFILTER_SOFTDEPS; do
        [ -z "$(find "$tree" -name "$m.ko*")" ] || add "$m"
    done
    for m in $NETFILTER_MODULES; do add "$m"; done
    printf '%s\n' $order > "$out/netfilter/order"
    rm -rf "$tree"
    say "kernel $name: netfilter modules $order"
}

# fetch_transparent_userland: $WORK/transparent (see the header).
fetch_transparent_userland() {
    local out="$WORK/transparent"
    if [ -x "$out/usr/bin/python3.11" ] && [ -e "$out/usr/sbin/xtables-legacy-multi" ]; then
        say "Python and legacy iptables: cached"
        return
    fi
    say "fetching Python 3.11 and legacy iptables (bookworm)"
    rm -rf "$out"
    # Named one by one rather than apt's whole closure (which adds dpkg,
    # tar, perl's and Kerberos' libraries): the C library, OpenSSL for ssl,
    # zlib and expat for the interpreter, the iptables libraries.
    download_unpack bookworm "$out" libc6 libgcc-s1 libssl3 zlib1g libexpat1 \
        python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
        iptables libip4tc2 libip6tc2 libxtables12 libmnl0 libnftnl11 libnfnetlink0 libnetfilter-conntrack3
    rm -rf "$out/usr/share/doc" "$out/usr/share/man" "$out/usr/share/lintian" "$out/usr/share/locale"
    # Legacy only: no nf_tables front end to reach for by mistake.
    find "$out/usr/sbin" -lname 'xtables-nft-multi' -delete
    rm -f "$out/usr/sbin/xtables-nft-multi"
    ln -sf python3.11 "$out/usr/bin/python3"
    # iptables' lock file lives in /run.
    mkdir -p "$out/run"
}

for extra in "${@:2}"; do
    case "$extra" in
        5.10 | 6.1 | 6.12 | arm64-6.1) ;;
        transparent:*)
            fetch_transparent_userland
            fetch_netfilter "${extra#transparent:}"
            ;;
        6.18) fetch_kernel 6.18 trixie-backports '6\.18\.[0-9]+\+deb13' amd64 signed ;;
        *) say "unknown kernel $extra (known: 5.10 6.1 6.12 arm64-6.1 6.18; transparent:KERNEL)"; exit 1 ;;
    esac
done
