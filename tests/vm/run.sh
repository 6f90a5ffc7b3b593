#!/usr/bin/env bash
# The real AF_VSOCK suite: boots QEMU guests (software emulation) whose Debian
# kernels have vsock_loopback (CID 1) and no other vsock transport, and runs
# the vsock tests (tests/vsock.rs, with the binaries) inside them.
#
#   tests/vm/run.sh              every kernel: 5.10 (bullseye: io_uring without
#                                what the engine needs), 6.1 (bookworm), 6.12
#                                (trixie), and arm64-6.1 (bookworm, an aarch64
#                                guest running the aarch64 binaries)
#   VSOCK_VM_KERNELS="6.12 arm64-6.1" tests/vm/run.sh
#   VSOCK_VM_SOAK_SECONDS=600 tests/vm/run.sh   the soak over vsock (both backends)
#                                instead of the suite, on 6.12
#
# Downloads (QEMU, busybox, kernels) are cached in target/vm (VSOCK_VM_WORK;
# target/ is CARGO_TARGET_DIR when that is set).
# Nothing is installed system-wide but the C cross compiler of the aarch64
# build (dist/musl-env.sh). Exits 0 when every guest passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
WORK=${VSOCK_VM_WORK:-$TARGET_DIR/vm}
KERNELS=${VSOCK_VM_KERNELS:-5.10 6.1 6.12 arm64-6.1}
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

step "fetch QEMU, busybox and kernels"
bash tests/vm/fetch.sh "$WORK"
qemu_libs=$(find "$WORK/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')

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

# boot KERNEL ROLE: one guest; 0 when it printed a PASS result line.
boot() {
    local kernel=$1 role=$2
    local arch dir log append machine
    arch=$(arch_of "$kernel")
    dir="$WORK/initramfs-$arch"
    step "boot the $arch guest on Linux $(cat "$WORK/kernel-$kernel/version") ($role)"
    rm -f "$dir"/lib/modules/*.ko
    cp "$WORK/kernel-$kernel/modules/"*.ko "$dir/lib/modules/"
    (cd "$dir" && find . | "$WORK/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$WORK/initramfs-$kernel.cpio.gz"
    log="$WORK/guest-$kernel-$role.log"
    append="quiet panic=-1 vsock_relay_guest=1 vsock_relay_role=$role guest_timeout=$GUEST_TIMEOUT_S${SOAK_APPEND:-}"
    case "$arch" in
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
    set +e
    LD_LIBRARY_PATH=$qemu_libs timeout --kill-after=10 "$GUEST_TIMEOUT_S" \
        "$WORK/root/usr/bin/${machine[0]}" "${machine[@]:1}" \
        -accel tcg,thread=multi -smp 2 -m 1024 \
        -nodefaults -nic none -nographic -no-reboot -serial stdio \
        -kernel "$WORK/kernel-$kernel/vmlinux" -initrd "$WORK/initramfs-$kernel.cpio.gz" \
        -append "$append" \
        < /dev/null 2>&1 | tee "$log"
    set -e
    if grep -q '^VSOCK-GUEST-RESULT: PASS' "$log"; then
        printf '[vm] %s, Linux %s, %s: PASS\n' "$arch" "$kernel" "$role"
        return 0
    fi
    printf '[vm] %s, Linux %s, %s: FAIL (%s)\n' "$arch" "$kernel" "$role" \
        "$(grep -a '^VSOCK-GUEST-RESULT' "$log" || echo 'no result line')"
    return 1
}

staged=""
failed=0
# VSOCK_VM_SOAK_SECONDS=N: one guest (the first x86_64 kernel asked for,
# 6.12 by default) runs the soak over vsock for N seconds instead of the
# suite; its SOAK-SUMMARY lines are in $WORK/guest-KERNEL-soak.log.
if [ -n "${VSOCK_VM_SOAK_SECONDS:-}" ]; then
    kernel=$(printf '%s\n' ${VSOCK_VM_KERNELS:-6.12} | grep -v '^arm64-' | head -1)
    stage x86_64
    GUEST_TIMEOUT_S=$((VSOCK_VM_SOAK_SECONDS + 600))
    SOAK_APPEND=" vsock_relay_soak_seconds=$VSOCK_VM_SOAK_SECONDS"
    boot "$kernel" soak || failed=1
    step "done"
    exit $failed
fi
for kernel in $KERNELS; do
    arch=$(arch_of "$kernel")
    case " $staged " in *" $arch "*) ;; *) stage "$arch"; staged="$staged $arch" ;; esac
    boot "$kernel" suite || failed=1
done
# The enclave image's entry script as PID 1 (dist/enclave/entry.sh), on the
# newest x86_64 kernel asked for.
enclave_kernel=$(printf '%s\n' $KERNELS | grep -v '^arm64-' | sort -V | tail -1 || true)
if [ -n "$enclave_kernel" ]; then
    boot "$enclave_kernel" enclave || failed=1
fi
step "done"
exit $failed
