#!/usr/bin/env bash
# Fetches the tools some host tests check the project's output with, into a
# cache folder, with apt's download and unpack only (nothing is installed):
#   $WORK/bin/promtool   Prometheus's checker of the /metrics text (Debian's prometheus)
# Usage: fetch.sh WORK   (a second run uses the cache). The tests look for
# target/tools/bin first, then PATH; without the tool they skip, saying so
# (and fail under CI=true, where this script ran first).
set -euo pipefail
mkdir -p "$1"
WORK=$(cd "$1" && pwd)

say() { printf '[tools] %s\n' "$*" >&2; }

# shellcheck source=tests/apt.sh
source "$(dirname "$0")/../apt.sh"

mkdir -p "$WORK/bin"
if [ ! -x "$WORK/bin/promtool" ]; then
    say "fetching promtool (Debian's prometheus package, unpacked only)"
    download_unpack bookworm "$WORK/prometheus" prometheus
    cp "$WORK/prometheus/usr/bin/promtool" "$WORK/bin/promtool"
    rm -rf "$WORK/prometheus" "$WORK"/debs-*/prometheus_*.deb
fi
say "$("$WORK/bin/promtool" --version 2>&1 | head -1)"
