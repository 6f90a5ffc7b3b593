#!/usr/bin/env bash
# The real AF_VSOCK suite: boots QEMU guests (software emulation) whose Debian
# kernels have vsock_loopback (CID 1) and no other vsock transport, and runs
# the vsock tests (tests/vsock.rs, with the vsock-proxy binary) inside them.
#
#   tests/vm/run.sh              every kernel (6.1 from bookworm, 6.12 from trixie)
#   VSOCK_VM_KERNELS=6.12 tests/vm/run.sh
#
# Downloads (QEMU, busybox, kernels) are cached in target/vm (VSOCK_VM_WORK).
# Nothing is installed system-wide. Exits 0 when every guest passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${VSOCK_VM_WORK:-$PWD/target/vm}
KERNELS=${VSOCK_VM_KERNELS:-6.1 6.12}
TARGET=x86_64-unknown-linux-musl
GUEST_TIMEOUT_S=${VSOCK_VM_TIMEOUT:-900}

started=$(date +%s)
step_started=$started
step() {
    local now
    now=$(date +%s)
    printf '[vm] %s (%ss since start, previous step %ss)\n' "$1" $((now - started)) $((now - step_started))
    step_started=$now
}

step "fetch QEMU, busybox and kernels"
bash tests/vm/fetch.sh "$WORK"
qemu_libs=$(find "$WORK/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')

step "build static binaries and the vsock test executable ($TARGET)"
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi
# A dev-dependency (criterion's alloca) compiles C: it needs musl's gcc wrapper.
if ! command -v musl-gcc >/dev/null; then
    echo "[vm] installing musl-tools (musl-gcc)"
    apt-get install -y -qq --no-install-recommends musl-tools >/dev/null || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends musl-tools >/dev/null
    }
fi
export CC_x86_64_unknown_linux_musl=musl-gcc
cargo build --release --locked --target "$TARGET" --bins
cargo test --release --locked --target "$TARGET" --test vsock --no-run
test_exe=$(cargo test --release --locked --target "$TARGET" --test vsock --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep '/vsock-' | tail -1 || true)
[ -x "$test_exe" ] || { echo "[vm] no vsock test executable found"; exit 1; }

step "pack the initramfs"
stage="$WORK/initramfs"
rm -rf "$stage"
mkdir -p "$stage"/{bin,etc,proc,sys,dev,tmp,lib/modules,tests}
cp "$WORK/root/bin/busybox" "$stage/bin/busybox"
cp "target/$TARGET/release/vsock-proxy" "target/$TARGET/release/vsock-relay" "$stage/bin/"
cp "$test_exe" "$stage/tests/vsock"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$stage/etc/hosts"
printf 'nameserver 127.0.0.1\n' > "$stage/etc/resolv.conf"
cp tests/vm/init "$stage/init"
chmod +x "$stage/init"

failed=0
for kernel in $KERNELS; do
    step "boot the guest on Linux $(cat "$WORK/kernel-$kernel/version")"
    cp "$WORK/kernel-$kernel/modules/"*.ko "$stage/lib/modules/"
    (cd "$stage" && find . | "$WORK/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$WORK/initramfs-$kernel.cpio.gz"
    log="$WORK/guest-$kernel.log"
    set +e
    LD_LIBRARY_PATH=$qemu_libs timeout --kill-after=10 "$GUEST_TIMEOUT_S" \
        "$WORK/root/usr/bin/qemu-system-x86_64" \
        -L "$WORK/root/usr/share/qemu" -L "$WORK/root/usr/share/seabios" \
        -accel tcg,thread=multi -cpu max -smp 2 -m 1024 -machine pc \
        -nodefaults -nic none -nographic -no-reboot -serial stdio \
        -kernel "$WORK/kernel-$kernel/vmlinux" -initrd "$WORK/initramfs-$kernel.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 vsock_relay_guest=1 guest_timeout=$GUEST_TIMEOUT_S" \
        < /dev/null 2>&1 | tee "$log"
    set -e
    if grep -q '^VSOCK-GUEST-RESULT: PASS' "$log"; then
        printf '[vm] Linux %s: PASS\n' "$kernel"
    else
        printf '[vm] Linux %s: FAIL (%s)\n' "$kernel" "$(grep -a '^VSOCK-GUEST-RESULT' "$log" || echo 'no result line')"
        failed=1
    fi
done
step "done"
exit $failed
