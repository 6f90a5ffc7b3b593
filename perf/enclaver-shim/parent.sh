#!/bin/sh
# In the parent VM: enclaver's host-side egress proxy (enclaver-run-egress),
# as perf/compare-vsock's chain set starts it (perf/vsock-guest-init):
#   parent.sh VSOCK_PORT [ALLOW_HOST:PORT]
# Listens on vsock (any CID) at VSOCK_PORT and connects out over TCP to
# whatever each connection's request names. ALLOW_HOST:PORT is accepted and
# unused: enclaver's host side enforces no policy (its in-enclave proxy
# does, see enclave.sh), and this runs it as enclaver does.
set -eu
dir=$(dirname "$0")
[ $# -ge 1 ] || { echo "usage: parent.sh VSOCK_PORT [ALLOW_HOST:PORT]" >&2; exit 2; }
exec "$dir/enclaver-run-egress" --vsock-port "$1"
