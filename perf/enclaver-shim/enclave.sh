#!/bin/sh
# In the enclave VM: enclaver's in-enclave egress proxy (odyn-egress), as
# perf/compare-vsock's chain set starts it (perf/vsock-guest-init):
#   enclave.sh LISTEN_PORT PARENT_CID VSOCK_PORT [ALLOW]
# An HTTP proxy on 127.0.0.1:LISTEN_PORT carrying each connection over vsock
# to PARENT_CID:VSOCK_PORT. The CID is compiled into enclaver (its
# VMADDR_CID_HOST, set by perf/build-enclaver and recorded in host-cid): a
# different PARENT_CID is refused, not silently ignored. ALLOW is the egress
# policy's allow pattern, enclaver.yaml's syntax (default 127.0.0.1, the
# sink's address; enclaver enforces its policy here, in the enclave).
set -eu
dir=$(dirname "$0")
[ $# -ge 3 ] || { echo "usage: enclave.sh LISTEN_PORT PARENT_CID VSOCK_PORT [ALLOW]" >&2; exit 2; }
built=$(cat "$dir/host-cid")
[ "$2" = "$built" ] || {
    echo "enclave.sh: this build of enclaver dials CID $built (perf/build-enclaver, VSOCK_RELAY_ENCLAVER_HOST_CID), not $2" >&2
    exit 2
}
exec "$dir/odyn-egress" --listen-port "$1" --vsock-port "$3" --allow "${4:-127.0.0.1}"
