# shellcheck shell=bash
# Sourced by tests/vm/run.sh (one guest, vsock_loopback) and
# tests/vm/two-vms.sh (two guests joined by vhost-device-vsock): the steps
# both take to build, pack and boot a guest. Runs from the repository's
# root; sets TARGET_DIR and WORK (the download cache, target/vm).
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
WORK=${VSOCK_VM_WORK:-$TARGET_DIR/vm}
GUEST_TIMEOUT_S=${VSOCK_VM_TIMEOUT:-900}

started=$(date +%s)
step_started=$started
step() {
    local now
    now=$(date +%s)
    printf '[vm] %s (%ss since start, previous step %ss)\n' "$1" $((now - started)) $((now - step_started))
    step_started=$now
}

# shellcheck source=dist/musl-env.sh
source dist/musl-env.sh

arch_of() { # KERNEL NAME -> x86_64 | aarch64
    case "$1" in arm64-*) echo aarch64 ;; *) echo x86_64 ;; esac
}

# fetch [KERNEL...]: QEMU, busybox and the kernels into $WORK (the CI's,
# and those named); sets qemu_libs.
fetch() {
    step "fetch QEMU, busybox and kernels"
    bash tests/vm/fetch.sh "$WORK" "$@"
    # shellcheck disable=SC2034 # used by the scripts that source this file
    qemu_libs=$(find "$WORK/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
}

# stage ARCH: static binaries and the vsock test executable for ARCH, in an
# initramfs folder ($WORK/initramfs-ARCH) with busybox and tests/vm/init.
stage() {
    local arch=$1
    musl_env "$arch"
    local target=$MUSL_TARGET
    step "build the release binaries (dist/build) and the vsock test executable ($target)"
    DIST_TARGETS=$arch bash dist/build
    local version bins
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
    bins="$TARGET_DIR/packages/vsock-relay-$version-$arch-linux-musl"
    cargo test --release --locked --target "$target" --test vsock --no-run
    local test_exe
    test_exe=$(cargo test --release --locked --target "$target" --test vsock --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep '/vsock-' | tail -1 || true)
    [ -x "$test_exe" ] || { echo "[vm] no vsock test executable found for $target"; exit 1; }

    step "pack the initramfs ($arch)"
    local dir="$WORK/initramfs-$arch"
    rm -rf "$dir"
    mkdir -p "$dir"/{bin,etc,proc,sys,dev,tmp,lib/modules,tests}
    case "$arch" in
        x86_64) cp "$WORK/root/bin/busybox" "$dir/bin/busybox" ;;
        aarch64) cp "$WORK/root-arm64/bin/busybox" "$dir/bin/busybox" ;;
    esac
    # The shipped binaries themselves (profile dist), not a test build.
    cp "$bins/vsock-proxy" "$bins/vsock-relay" "$dir/bin/"
    cp "$test_exe" "$dir/tests/vsock"
    printf '127.0.0.1 localhost\n::1 localhost\n' > "$dir/etc/hosts"
    printf 'nameserver 127.0.0.1\n' > "$dir/etc/resolv.conf"
    cp tests/vm/init "$dir/init"
    chmod +x "$dir/init"
    mkdir -p "$dir/enclave"
    cp dist/enclave/entry.sh "$dir/enclave/entry.sh"
}

# pack KERNEL: the staged folder of KERNEL's architecture with KERNEL's
# modules, as $WORK/initramfs-KERNEL.cpio.gz.
pack() {
    local kernel=$1 dir
    dir="$WORK/initramfs-$(arch_of "$kernel")"
    rm -f "$dir"/lib/modules/*.ko
    cp "$WORK/kernel-$kernel/modules/"*.ko "$dir/lib/modules/"
    (cd "$dir" && find . | "$WORK/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$WORK/initramfs-$kernel.cpio.gz"
}

# qemu_command KERNEL INITRD APPEND: sets QEMU, the command line of one
# guest (TCG, 2 vCPUs, 1 GiB, no network, the serial console on stdout)
# under `timeout`; add devices after it, run it with LD_LIBRARY_PATH=$qemu_libs.
qemu_command() {
    local kernel=$1 initrd=$2 append=$3 machine
    case "$(arch_of "$kernel")" in
        x86_64)
            machine=(qemu-system-x86_64 -L "$WORK/root/usr/share/qemu" -L "$WORK/root/usr/share/seabios"
                -cpu max -machine pc)
            append="console=ttyS0 $append"
            ;;
        aarch64)
            # cortex-a72 rather than max: no pointer authentication to emulate.
            machine=(qemu-system-aarch64 -cpu cortex-a72 -machine virt)
            append="console=ttyAMA0 $append"
            ;;
    esac
    # shellcheck disable=SC2034,SC2054 # QEMU is the caller's; commas are QEMU's
    QEMU=(timeout --kill-after=10 "$GUEST_TIMEOUT_S" "$WORK/root/usr/bin/${machine[0]}" "${machine[@]:1}"
        -accel tcg,thread=multi -smp 2 -m 1024
        -nodefaults -nic none -nographic -no-reboot -serial stdio
        -kernel "$WORK/kernel-$kernel/vmlinux" -initrd "$initrd" -append "$append")
}
