#!/usr/bin/env bash
# Two QEMU guests joined as an enclave and its parent are on Nitro: a parent
# VM (CID 3) and an enclave VM (CID 16), each with the virtio-vsock driver
# (vmw_vsock_virtio_transport, no vsock_loopback) on a vhost-user-vsock-pci
# device, both served by one rust-vmm vhost-device-vsock process whose Unix
# backend puts them in one group: a connection from either VM to the other's
# CID crosses both guest kernels and the device, and nothing else.
#
#   tests/vm/two-vms.sh            the workshop's channel, the cross-VM tests,
#                                  then transparent egress
#   tests/vm/two-vms.sh channel    the channel only: the enclave VM runs
#                                  dist/enclave/entry.sh as PID 1, the parent VM
#                                  vsock-proxy, the HTTPS stand-in and the client
#   tests/vm/two-vms.sh transparent  the workshop's own application, unchanged:
#                                  the enclave VM runs entry.sh with
#                                  EGRESS=transparent (legacy iptables, no
#                                  nf_tables loaded) and the workshop's
#                                  server.py under Debian's Python, plus
#                                  `vsock-relay serve` on port 5006; the parent
#                                  VM `vsock-relay proxy` with the dns and
#                                  transparent services, a name server and the
#                                  HTTPS stand-in off loopback, then the
#                                  workshop's client.py and `vsock-relay client`
#   tests/vm/two-vms.sh suite      the cross-VM tests (tests/vm/two_vms.rs)
#   tests/vm/two-vms.sh probe      the transport alone, no relay: 1 MiB each way
#                                  in writes of 512 B to 256 KiB, then 8, 32
#                                  and 64 connections at once (what found the
#                                  device's limits below)
#   tests/vm/two-vms.sh boot-pair NAME PARENT_INITRD ENCLAVE_INITRD PARENT_APPEND ENCLAVE_APPEND UNTIL
#                                  one pair of boots with the caller's images
#                                  (perf/compare-vsock --two-vms); UNTIL is the
#                                  VM whose end ends the pair: parent, enclave or both
#
# Settings: VSOCK_VM_KERNEL (6.12: the Debian kernel of both VMs, as
# tests/vm/fetch.sh names them), VSOCK_TWO_VMS_PARENT_VHOST=1 (the parent VM
# also loads vhost_vsock, as a parent instance that is itself a vsock host:
# there a connect to CID 16 needs VMADDR_FLAG_TO_HOST to leave the VM: the
# channel's client then asks with `:to-host` and checks that a connect
# without it fails and that doctor warns),
# VSOCK_VM_TIMEOUT (seconds per boot), CARGO_TARGET_DIR, VSOCK_VM_WORK,
# VSOCK_RELAY_WORKSHOP (transparent: the folder with the workshop's
# server.py and client.py, ../shared/anchors/workshop beside the checkout;
# they are not the project's, so they are read from there at run time and
# checked against tests/vm/workshop.sha256, never copied into the repository).
#
# The device is the machine's only new process that could touch AF_VSOCK,
# so it is built and run so that it cannot: vhost-device-vsock 0.2.0 (with
# the patch device_build explains) has only the Unix backend (0.3.0 added
# --forward-cid, an AF_VSOCK backend behind its default feature
# `backend_vsock`, and does not compile without that feature), it is built with --no-default-features all the same, and it
# runs under target/debug/no-vsock (testkit/bin/no-vsock.rs), which installs
# a seccomp filter refusing socket(AF_VSOCK) and io_uring before it execs
# the device; its first log line says so. Exits 0 when every VM passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
KERNEL=${VSOCK_VM_KERNEL:-6.12}
DEVICE_VERSION=0.2.0
PARENT_CID=3
ENCLAVE_CID=16

# step, fetch, stage, pack, qemu_command (shared with tests/vm/run.sh).
# shellcheck source=tests/vm/lib.sh
source tests/vm/lib.sh

# device_build: vhost-device-vsock at the pinned version, patched
# (tests/vm/vhost-device-vsock-0.2.0.patch), without default features, and
# the no-vsock wrapper; sets DEVICE and NO_VSOCK.
#
# Why patched: between two VMs (its sibling path) the device copies each
# packet of one guest into ONE receive buffer of the other, and Linux's
# receive buffers hold about 4 KiB while its packets carry up to 64 KiB:
# every larger packet was cut short and dropped by the receiving guest
# (`two-vms.sh probe`, no relay at all: with the unpatched device every
# write of 4096 B or more lost its connection's bytes, both ways). And
# Linux sends a packet above 32 KiB as a nonlinear skb over several
# descriptors (Linux 6.17; 6.12.117 here does too: the unpatched device
# logged DescriptorLengthTooSmall for them), which the device's parser
# (virtio-vsock, every release to 0.12) refuses, dropping the packet. No released version (0.3.0, the git
# head) and no option (--tx-buffer-size, queue sizes) changes either. The
# patch splits a sibling's packet over as many receive buffers as it needs,
# as the kernel's vhost-vsock does, and gathers a multi-descriptor packet.
device_build() {
    local root="$TARGET_DIR/tools/vhost-device-vsock-$DEVICE_VERSION-patched"
    local patch=tests/vm/vhost-device-vsock-$DEVICE_VERSION.patch
    DEVICE=${VSOCK_TWO_VMS_DEVICE:-$root/bin/vhost-device-vsock}
    if [ ! -x "$DEVICE" ] || [ "$patch" -nt "$DEVICE" ]; then
        step "build vhost-device-vsock $DEVICE_VERSION with $patch (cargo install --locked --no-default-features)"
        # Its source through cargo (fetch unpacks the crate from crates.io).
        local fetch="$TARGET_DIR/tools/fetch-vhost-device-vsock"
        mkdir -p "$fetch/src"
        : > "$fetch/src/lib.rs"
        printf '[package]\nname = "fetch-device"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nvhost-device-vsock = { version = "=%s", default-features = false }\n\n[workspace]\n' \
            "$DEVICE_VERSION" > "$fetch/Cargo.toml"
        cargo fetch --manifest-path "$fetch/Cargo.toml"
        local crate src="$TARGET_DIR/tools/src/vhost-device-vsock-$DEVICE_VERSION"
        crate=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "vhost-device-vsock-$DEVICE_VERSION.crate" | head -1)
        rm -rf "$src" && mkdir -p "$(dirname "$src")"
        tar -xzf "$crate" -C "$(dirname "$src")"
        command -v patch >/dev/null || apt-get install -y -qq --no-install-recommends patch
        patch -d "$src" -p1 < "$patch"
        # Its own workspace, not this repository's (target/ is inside it).
        printf '\n[workspace]\n' >> "$src/Cargo.toml"
        cargo install --locked --no-default-features --path "$src" --root "$root" --force
    fi
    step "build the AF_VSOCK-refusing wrapper (cargo build --bin no-vsock)"
    cargo build --locked --bin no-vsock
    NO_VSOCK="$TARGET_DIR/debug/no-vsock"
}

# boot_pair NAME PARENT_INITRD ENCLAVE_INITRD PARENT_APPEND ENCLAVE_APPEND UNTIL:
# the device under no-vsock, then both VMs, their consoles in
# $WORK/two-vms-NAME-{parent,enclave,device}.log (shown as they come, each
# line tagged); ends when UNTIL (parent, enclave or both) powered off, then
# stops the rest.
boot_pair() {
    local name=$1 parent_initrd=$2 enclave_initrd=$3 parent_append=$4 enclave_append=$5 until=$6
    local dir="$WORK/two-vms" log="$WORK/two-vms-$name"
    mkdir -p "$dir"
    rm -f "$dir"/*.sock "$dir"/*.vsock*
    local vm="groups=nitro"
    local device_cmd=("$NO_VSOCK" "$DEVICE"
        --vm "guest-cid=$PARENT_CID,socket=$dir/parent.sock,uds-path=$dir/parent.vsock,$vm"
        --vm "guest-cid=$ENCLAVE_CID,socket=$dir/enclave.sock,uds-path=$dir/enclave.vsock,$vm")
    step "$name: start the device: ${device_cmd[*]}"
    echo "\$ ${device_cmd[*]}" > "$log-device.log"
    RUST_LOG=${VSOCK_TWO_VMS_DEVICE_LOG:-info} "${device_cmd[@]}" >> "$log-device.log" 2>&1 &
    local device=$!
    # Stopped with the script, whatever ends it.
    trap 'kill $(jobs -p) 2> /dev/null || true' EXIT
    local waited=0
    until [ -S "$dir/parent.sock" ] && [ -S "$dir/enclave.sock" ]; do
        if ! kill -0 "$device" 2>/dev/null || [ $waited -ge 100 ]; then
            echo "[vm] the device did not come up:"
            cat "$log-device.log"
            kill "$device" 2>/dev/null || true
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    sed 's/^/[device] /' "$log-device.log"

    local pids=() tails=() who initrd append
    for who in parent enclave; do
        if [ "$who" = parent ]; then initrd=$parent_initrd append=$parent_append; else initrd=$enclave_initrd append=$enclave_append; fi
        qemu_command "$KERNEL" "$initrd" "$append"
        # The guest's RAM is a shared memfd: the device maps it to reach the rings.
        # shellcheck disable=SC2054 # commas are QEMU's
        QEMU+=(-object "memory-backend-memfd,id=mem,size=1024M,share=on" -machine memory-backend=mem
            -chardev "socket,id=vsock,path=$dir/$who.sock" -device vhost-user-vsock-pci,chardev=vsock)
        : > "$log-$who.log"
        LD_LIBRARY_PATH=$qemu_libs "${QEMU[@]}" < /dev/null > "$log-$who.log" 2>&1 &
        pids+=($!)
        tail -n +1 -F "$log-$who.log" 2> /dev/null > >(sed -u "s/^/[$who] /") &
        tails+=($!)
        # The parent VM first, as on Nitro. A packet for a VM whose driver
        # is not up yet stalls device 0.2.0's way into that VM for good
        # (seen here: every later connect timed out), so the enclave VM
        # starts once the parent's init printed `[guest] Linux ...` (its
        # vsock modules loaded), and the parent's side never sends to the
        # enclave before the enclave reached it (tests/vm/two_vms.rs).
        if [ "$who" = parent ]; then
            waited=0
            until grep -qa '\[guest\] Linux' "$log-parent.log"; do
                if ! kill -0 "${pids[0]}" 2>/dev/null || [ $waited -ge 1200 ]; then
                    echo "[vm] $name: the parent VM did not come up"
                    break
                fi
                sleep 0.1
                waited=$((waited + 1))
            done
        fi
    done
    case "$until" in
        parent) wait "${pids[0]}" || true ;;
        enclave) wait "${pids[1]}" || true ;;
        both) wait "${pids[0]}" "${pids[1]}" || true ;;
    esac
    kill "${pids[@]}" 2> /dev/null || true
    wait "${pids[@]}" 2> /dev/null || true
    sleep 0.5
    kill "${tails[@]}" "$device" 2> /dev/null || true
    wait "$device" 2> /dev/null || true
}

# passed NAME WHO...: 0 when each VM's console has a PASS result line.
passed() {
    local name=$1 who status=0
    shift
    for who in "$@"; do
        local line
        line=$(grep -a '^VSOCK-GUEST-RESULT' "$WORK/two-vms-$name-$who.log" || echo 'no result line')
        printf '[vm] two VMs, %s, %s VM: %s\n' "$name" "$who" "$line"
        case "$line" in "VSOCK-GUEST-RESULT: PASS"*) ;; *) status=1 ;; esac
    done
    return $status
}

common_append() { # ROLE
    local append="quiet panic=-1 vsock_relay_guest=1 vsock_relay_transport=virtio vsock_relay_role=$1"
    append="$append guest_timeout=$GUEST_TIMEOUT_S"
    if [ "${VSOCK_TWO_VMS_PARENT_VHOST:-0}" = 1 ] && [[ $1 == two-vms-parent-* ]]; then
        append="$append vsock_relay_vhost=1"
    fi
    echo "$append"
}

# pack_transparent: $WORK/initramfs-$KERNEL-transparent.cpio.gz, the
# common image with a second archive after it (the kernel unpacks both):
# Python and legacy iptables with their libraries (fetch.sh
# transparent:KERNEL), the kernel's netfilter modules in
# /lib/modules/netfilter (insmod in the order of its file `order`), and the
# workshop's server.py and client.py in /workshop, unchanged.
pack_transparent() {
    local workshop=${VSOCK_RELAY_WORKSHOP:-$PWD/../shared/anchors/workshop}
    step "pack the transparent image: Python, legacy iptables, netfilter modules, the workshop's server.py and client.py ($workshop)"
    local packed=yes
    if ! [ -f "$workshop/server.py" ] || ! [ -f "$workshop/client.py" ]; then
        # A clone that is not beside ../shared (a CI clone elsewhere): the
        # transparent pair runs without the workshop's files, with
        # `vsock-relay serve` in server.py's place, and says so.
        echo "[vm] NOTE: the workshop's server.py and client.py are not in $workshop (set VSOCK_RELAY_WORKSHOP):" \
            "this run's enclave serves with vsock-relay serve in server.py's place" >&2
        packed=no
    elif ! grep -E " (server|client)\.py$" tests/vm/workshop.sha256 | (cd "$workshop" && sha256sum --quiet -c -); then
        echo "[vm] $workshop/server.py or client.py is not the workshop's (tests/vm/workshop.sha256)" >&2
        return 1
    fi
    local dir="$WORK/initramfs-transparent"
    rm -rf "$dir"
    cp -a "$WORK/transparent" "$dir"
    mkdir -p "$dir/lib/modules/netfilter" "$dir/workshop"
    cp "$WORK/kernel-$KERNEL/netfilter/"* "$dir/lib/modules/netfilter/"
    [ "$packed" = no ] || cp "$workshop/server.py" "$workshop/client.py" "$dir/workshop/"
    { cat "$WORK/initramfs-$KERNEL.cpio.gz"
        (cd "$dir" && find . | "$WORK/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1); } \
        > "$WORK/initramfs-$KERNEL-transparent.cpio.gz"
}

# two_vms MODE: one boot pair of tests/vm/init's roles two-vms-*-MODE.
two_vms() {
    local mode=$1 until=both
    # The enclave serves until stopped.
    case "$mode" in channel | transparent) until=parent ;; esac
    local image="$WORK/initramfs-$KERNEL.cpio.gz"
    if [ "$mode" = transparent ]; then
        bash tests/vm/fetch.sh "$WORK" "transparent:$KERNEL"
        pack_transparent || return 1
        image="$WORK/initramfs-$KERNEL-transparent.cpio.gz"
    fi
    step "two VMs on Linux $(cat "$WORK/kernel-$KERNEL/version"): $mode"
    boot_pair "$mode" "$image" "$image" "$(common_append "two-vms-parent-$mode")" \
        "$(common_append "two-vms-enclave-$mode")" "$until"
    case "$mode" in
        channel) passed "$mode" parent ;;
        transparent) passed "$mode" parent && nf_tables_absent ;;
        *) passed "$mode" parent enclave ;;
    esac
}

# nf_tables_absent: the transparent enclave VM's evidence that its redirect
# ran on legacy iptables alone (tests/vm/init prints it once the rule is in).
nf_tables_absent() {
    local log="$WORK/two-vms-transparent-enclave.log"
    if grep -qa '^\[guest\] nf_tables not loaded' "$log"; then
        echo "[vm] two VMs, transparent, enclave VM: $(grep -a '^\[guest\] nf_tables not loaded' "$log")"
    else
        echo "[vm] two VMs, transparent, enclave VM: no evidence that nf_tables stayed unloaded"
        return 1
    fi
}

fetch
device_build
mode=${1:-all}
case "$mode" in
    boot-pair)
        shift
        [ $# -eq 6 ] || { echo "usage: two-vms.sh boot-pair NAME PARENT_INITRD ENCLAVE_INITRD PARENT_APPEND ENCLAVE_APPEND UNTIL" >&2; exit 2; }
        boot_pair "$@"
        exit 0
        ;;
    all | channel | suite | transparent | probe) ;;
    *)
        echo "usage: two-vms.sh [all | channel | suite | transparent | probe | boot-pair ...]" >&2
        exit 2
        ;;
esac
stage "$(arch_of "$KERNEL")"
pack "$KERNEL"
failed=0
for m in channel suite transparent probe; do
    if { [ "$mode" = all ] && [ "$m" != probe ]; } || [ "$mode" = "$m" ]; then
        two_vms "$m" || failed=1
    fi
done
step "done"
exit $failed
