# Sourced by dist/build and tests/vm/run.sh: `musl_env ARCH` (x86_64 or
# aarch64) makes cargo able to build static binaries for ARCH-unknown-linux-musl:
# the Rust target (rustup), a C compiler for the crates that build C (ring,
# criterion's alloca) and, for aarch64, the linker: Debian's
# gcc-aarch64-linux-gnu (Rust's musl targets bring their own C library and
# start files, so the result is static). Missing packages are installed with
# apt (root). Sets MUSL_TARGET.
musl_env() {
    local arch=$1
    MUSL_TARGET="$arch-unknown-linux-musl"
    case "$arch" in
        x86_64)
            command -v musl-gcc >/dev/null || musl_apt_install musl-tools
            export CC_x86_64_unknown_linux_musl=musl-gcc
            ;;
        aarch64)
            command -v aarch64-linux-gnu-gcc >/dev/null || musl_apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
            export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
            ;;
        *)
            echo "unknown architecture $arch (x86_64 or aarch64)" >&2
            return 2
            ;;
    esac
    rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET" || rustup target add "$MUSL_TARGET"
}

musl_apt_install() { # PACKAGE...
    echo "installing $* (apt)" >&2
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
}
