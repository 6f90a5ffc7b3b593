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
KERNELS=${VSOCK_VM_KERNELS:-5.10 6.1 6.12 arm64-6.1}

# step, fetch, stage, pack, qemu_command (shared with tests/vm/two-vms.sh).
# shellcheck source=tests/vm/lib.sh
source tests/vm/lib.sh

# shellcheck disable=SC2086 # one word per kernel
fetch $KERNELS

# boot KERNEL ROLE: one guest; 0 when it printed a PASS result line.
boot() {
    local kernel=$1 role=$2
    local arch log
    arch=$(arch_of "$kernel")
    step "boot the $arch guest on Linux $(cat "$WORK/kernel-$kernel/version") ($role)"
    pack "$kernel"
    log="$WORK/guest-$kernel-$role.log"
    qemu_command "$kernel" "$WORK/initramfs-$kernel.cpio.gz" \
        "quiet panic=-1 vsock_relay_guest=1 vsock_relay_role=$role guest_timeout=$GUEST_TIMEOUT_S${SOAK_APPEND:-}"
    set +e
    LD_LIBRARY_PATH=$qemu_libs "${QEMU[@]}" < /dev/null 2>&1 | tee "$log"
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
