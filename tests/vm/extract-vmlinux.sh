#!/usr/bin/env bash
# Prints the uncompressed ELF kernel inside a bzImage (xz, zstd or gzip payload).
set -euo pipefail
img=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
try() { # MAGIC(grep -P) COMMAND...
    local magic=$1; shift
    for pos in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
        tail -c+$((pos + 1)) "$img" | "$@" > "$tmp/vmlinux" 2>/dev/null || true
        if [ "$(head -c4 "$tmp/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ]; then
            cat "$tmp/vmlinux"
            exit 0
        fi
    done
}
try '\xFD\x37\x7A\x58\x5A\x00' xz -dc
try '\x28\xB5\x2F\xFD' zstd -dc
try '\x1F\x8B\x08' gzip -dc
exit 1
